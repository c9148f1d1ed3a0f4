"""The HTTP transport over real HTTP on 127.0.0.1, against the built-in simulator: answers,
the client's error categories for refused, reset and hanging connections, connection reuse,
and the prepared request the client sends through it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest
from conftest import ServerThread, cli_env, run_cli, write_config, write_fixture_csv

from asyncrunner.llm.client import (
    ClientSettings,
    Completion,
    HttpSession,
    LLMClient,
    RequestFailure,
    _body_text,
    make_http_client,
)
from asyncrunner.llm.throttle import AdaptiveLimiter
from asyncrunner.llm.transport import AiohttpTransport
from asyncrunner.sim import FaultConfig, MockServer

TEXT = "Narrative:\nAfter an argument with her boyfriend the decedent was found at home."


def settings(url: str, *, timeout_s: float = 5.0, attempts: int = 1) -> ClientSettings:
    return ClientSettings(api_url=url, model="mock-classifier", temperature=0.0,
                          max_tokens=64, timeout_s=timeout_s, max_attempts=attempts,
                          backoff_base_s=0.0)


async def complete_once(url: str, *, timeout_s: float = 5.0,
                        workers: int = 2) -> Completion | RequestFailure:
    async with make_http_client(workers, timeout_s) as http:
        client = LLMClient(settings(url, timeout_s=timeout_s), http, AdaptiveLimiter(workers))
        with anyio.fail_after(timeout_s + 5):
            return await client.complete("system", TEXT)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_answer_comes_back_whole() -> None:
    async with MockServer() as server:
        out = await complete_once(server.base_url)
    assert isinstance(out, Completion) and out.attempts == 1
    assert out.content is not None and json.loads(out.content)["detected"] is True
    assert out.prompt_tokens and out.completion_tokens
    assert json.loads(out.raw)["choices"][0]["message"]["content"] == out.content


async def test_connection_refused_is_an_api_error() -> None:
    out = await complete_once(f"http://127.0.0.1:{unused_port()}/v1")
    assert isinstance(out, RequestFailure)
    assert (out.category, out.retryable, out.status) == ("api_error", True, None)
    assert out.message.startswith("ConnectError")


async def test_a_reset_connection_is_an_api_error() -> None:
    async with MockServer(faults=FaultConfig(reset_rate=1.0)) as server:
        out = await complete_once(server.base_url)
    assert isinstance(out, RequestFailure)
    assert (out.category, out.retryable, out.status) == ("api_error", True, None)


async def test_a_hanging_server_is_a_timeout() -> None:
    async with MockServer(faults=FaultConfig(hang_rate=1.0)) as server:
        with anyio.fail_after(5):
            out = await complete_once(server.base_url, timeout_s=0.3)
    assert isinstance(out, RequestFailure)
    assert (out.category, out.retryable) == ("timeout", True)
    assert out.response_sec < 2.0


class DrippingServer:
    """Answers every request with a 200 whose body comes one byte every `gap_s`: each read
    succeeds well within a read timeout, the exchange as a whole never ends."""

    def __init__(self, gap_s: float = 0.1) -> None:
        self.gap_s = gap_s
        self.served = 0

    async def _serve(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(20):
                await stream.receive()
                self.served += 1
                await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 100000\r\n\r\n")
                for _ in range(100_000):
                    await stream.send(b" ")
                    await anyio.sleep(self.gap_s)

    async def run(self, listener: anyio.abc.SocketListener) -> None:
        async with listener:
            await listener.serve(self._serve)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_server_dripping_its_answer_is_a_timeout(transport: str) -> None:
    """The whole exchange is bounded ("total": timeout_s + 1 s), not only each read: by
    aiohttp itself on our transport, by the session on any other (here httpx's own)."""
    drip = DrippingServer()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drip.run, listener)
        other = httpx.AsyncHTTPTransport() if transport == "httpx" else None
        async with make_http_client(1, 0.5, transport=other) as http:
            assert http._bounded is (transport == "aiohttp")
            client = LLMClient(settings(f"http://127.0.0.1:{port}/v1", timeout_s=0.5), http,
                               AdaptiveLimiter(1))
            with anyio.fail_after(10):
                out = await client.complete("system", TEXT)
        tg.cancel_scope.cancel()
    assert drip.served == 1
    assert isinstance(out, RequestFailure)
    assert (out.category, out.retryable) == ("timeout", True)
    assert 1.4 <= out.response_sec < 5.0


async def test_the_transport_answers_with_a_read_httpx_response() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": TEXT}]})
    async with MockServer() as server, AiohttpTransport(max_connections=1) as transport:
        request = httpx.Request("POST", server.url, content=body,
                                headers={"Content-Type": "application/json"})
        with anyio.fail_after(5):
            response = await transport.handle_async_request(request)
    assert (response.status_code, response.http_version) == (200, "HTTP/1.1")
    assert response.is_stream_consumed and response.request is request
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("faults", "error"), [
    (FaultConfig(reset_rate=1.0), httpx.RemoteProtocolError),
    (FaultConfig(hang_rate=1.0), httpx.ReadTimeout),
])
async def test_the_transport_raises_httpx_exceptions(faults: FaultConfig,
                                                     error: type[Exception]) -> None:
    async with MockServer(faults=faults) as server, \
            AiohttpTransport(max_connections=1) as transport:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": TEXT}]})
        request = httpx.Request("POST", server.url, content=body, extensions={
            "timeout": {"connect": 1.0, "read": 0.3, "write": 1.0, "pool": None}})
        with anyio.fail_after(5), pytest.raises(error):
            await transport.handle_async_request(request)
    port = unused_port()
    async with AiohttpTransport(max_connections=1) as transport:
        with anyio.fail_after(5), pytest.raises(httpx.ConnectError):
            await transport.handle_async_request(
                httpx.Request("GET", f"http://127.0.0.1:{port}/health"))


async def test_connections_are_reused() -> None:
    """200 requests, 8 at a time, over one transport: at most 8 (+1) connections."""
    async with MockServer(latency_ms=5.0) as server, make_http_client(8, 5.0) as http:
        client = LLMClient(settings(server.base_url), http, AdaptiveLimiter(8))
        outcomes: list[Completion | RequestFailure] = []
        todo = iter(range(200))

        async def work() -> None:
            for i in todo:
                outcomes.append(await client.complete("system", f"{TEXT} case {i}"))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(work)
        stats = server.stats()
    assert len(outcomes) == 200 and all(isinstance(o, Completion) for o in outcomes)
    assert stats.completion_requests == 200
    assert stats.connections_opened <= 9


async def test_a_mock_transport_still_drops_in() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "x"},
                                                      "finish_reason": "stop"}]})

    async with make_http_client(2, 7.0, transport=httpx.MockTransport(handler)) as http:
        assert isinstance(http, HttpSession)
        out = await LLMClient(settings("http://llm.test/v1", timeout_s=30.0), http,
                              AdaptiveLimiter(2)).complete("s", "u")
        await http.send(httpx.Request("GET", "http://llm.test/health"))
    assert isinstance(out, Completion) and out.content == "x"
    assert seen[0].url == "http://llm.test/v1/chat/completions"
    # the client's request carries its own timeouts; one without them gets the session's
    assert seen[0].extensions["timeout"] == {"connect": 10.0, "read": 30.0, "write": 30.0,
                                             "pool": None, "total": 31.0}
    assert seen[1].extensions["timeout"] == {"connect": 7.0, "read": 7.0, "write": 7.0,
                                             "pool": None, "total": 8.0}


@pytest.mark.parametrize("extra", [
    {}, {"top_p": 0.9, "temperature": 0.7},
    {"messages": [{"role": "user", "content": "replaced"}]},
    {"stop": ["\x00asyncrunner:user-prompt\x00"]},
])
@pytest.mark.parametrize("system", ["system", "\x00asyncrunner:user-prompt\x00 \u00e9\"\\"])
def test_the_prepared_body_is_the_body_encoded_whole(extra: dict[str, object],
                                                     system: str) -> None:
    s = ClientSettings(api_url="http://h/v1", model="m", temperature=0.2, max_tokens=8,
                       timeout_s=1, max_attempts=1, seed=7, response_format="json_object",
                       extra_body=extra)
    client = LLMClient(s, HttpSession(httpx.MockTransport(lambda r: httpx.Response(200)), 1),
                       AdaptiveLimiter(1))
    for user in ("u", "quote \" backslash \\ newline \n NUL \x00 \u2013 \U0001f600", ""):
        assert client.encode_body(system, user) == json.dumps(
            client.build_body(system, user)).encode()


@pytest.mark.parametrize("content_type", [
    None, "application/json", "application/json; charset=utf-8", "text/html; charset=UTF-8",
    "text/plain; charset=iso-8859-1", "text/plain; charset=\"latin-1\"", "text/plain; charset=nope",
])
@pytest.mark.parametrize("body", [b"", b'{"a": "\xc3\xa9"}', b"\xff\xfe half \xc3", b"plain"])
@pytest.mark.parametrize("name", ["content-type", "Content-Type"])
def test_the_body_is_read_as_httpx_reads_it(content_type: str | None, body: bytes,
                                            name: str) -> None:
    headers = [(name, content_type)] if content_type else []
    response = httpx.Response(200, headers=headers, content=body)
    assert _body_text(response) == response.text


def test_a_5000_narrative_run_reuses_its_connections(tmp_path: Path) -> None:
    """A whole `asyncrunner run` (its own process, real HTTP) of 5,000 narratives at C
    workers: the simulator accepts at most C + 10 % TCP connections (counted, not timed)."""
    rows = [(f"{i:05d}", f"Her boyfriend was arrested. Case {i}.", f"Examiner note {i}.",
             "1", "0", "1") for i in range(2500)]
    data = write_fixture_csv(tmp_path / "cases.csv", rows)
    workers = 64
    with ServerThread() as server:
        cfg = write_config(tmp_path, data, server.base_url, workers=workers, batch_size=100)
        proc = run_cli("run", str(cfg), "--db", str(tmp_path / "exp.db"),
                       env=cli_env(ASYNCRUNNER_TEST_KEY="k"), timeout=300)
        stats = server.stats()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert stats.completion_requests >= 5000
    assert stats.connections_opened <= workers * 1.1
