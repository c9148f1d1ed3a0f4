"""The simulated LLM over real HTTP on 127.0.0.1: answers, faults, limits, stats, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from asyncrunner.sim import (
    IPV_CUES,
    FaultConfig,
    MockServer,
    classify_text,
    find_cues,
    serve_forever,
)

ROOT = Path(__file__).resolve().parent.parent
POSITIVE = "Her boyfriend was arrested after a domestic argument; a restraining order followed."
NEGATIVE = "The decedent lived alone and had lost his job."
ANSWER_KEYS = {"detected", "confidence", "indicators", "rationale"}


def body(text: str = POSITIVE, model: str = "mock-classifier") -> dict[str, Any]:
    return {"model": model, "messages": [
        {"role": "system", "content": "You classify narratives. Answer in JSON."},
        {"role": "user", "content": f"Narrative:\n{text}"},
    ], "temperature": 0.0}


async def post(client: httpx.AsyncClient, server: MockServer, text: str = POSITIVE,
               **kw: Any) -> httpx.Response:
    return await client.post(server.url, json=body(text), **kw)


def content_of(response: httpx.Response) -> str:
    content = response.json()["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    return content


@pytest.fixture
async def server() -> AsyncIterator[MockServer]:
    async with MockServer() as s:
        yield s


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as c:
        yield c


async def wait_until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Poll server state that has no event to wait on; give up quietly after timeout_s."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)


async def faulty(**faults: Any) -> MockServer:
    server = MockServer(faults=FaultConfig(**faults))
    await server.start()
    return server


# --------------------------------------------------------------------------- normal answers


async def test_answer_is_a_chat_completion_with_the_requested_json(
        server: MockServer, client: httpx.AsyncClient) -> None:
    response = await post(client, server)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert payload["object"] == "chat.completion"
    assert payload["model"] == "mock-classifier"
    assert payload["id"] and isinstance(payload["created"], int)
    choice = payload["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    answer = json.loads(choice["message"]["content"])
    assert set(answer) == ANSWER_KEYS
    assert answer["detected"] is True
    assert 0.5 <= answer["confidence"] <= 0.99
    assert {"boyfriend", "domestic", "restraining order"} <= set(
        answer["indicators"])
    assert POSITIVE not in answer["rationale"]
    usage = payload["usage"]
    chars = sum(len(m["content"]) for m in body()["messages"])
    assert usage["prompt_tokens"] == chars // 4
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_negative_text_is_not_detected(server: MockServer,
                                             client: httpx.AsyncClient) -> None:
    answer = json.loads(content_of(await post(client, server, NEGATIVE)))
    assert answer["detected"] is False and answer["indicators"] == []


async def test_same_text_same_answer_across_servers_and_seeds(client: httpx.AsyncClient) -> None:
    contents = []
    for seed in (0, 1):
        async with MockServer(seed=seed, latency_ms=1) as server:
            contents += [content_of(await post(client, server)) for _ in range(2)]
    assert len(set(contents)) == 1
    assert contents[0] == classify_text("Narrative:\n" + POSITIVE).to_json()


def test_keyword_rule_and_stable_noise() -> None:
    assert find_cues("Her ex-husband was jealous; he strangled her.") == (
        "husband", "ex-", "jealous", "strangle")
    assert find_cues("A housewife found the exit.") == ()  # no cue inside other words
    texts = [f"Case {i}: the decedent was found at home." for i in range(2000)]
    flipped = sum(classify_text(t).detected for t in texts)  # no cues: detected == flipped
    assert 0.06 * len(texts) < flipped < 0.10 * len(texts)
    assert [classify_text(t) for t in texts[:50]] == [classify_text(t) for t in texts[:50]]
    for t in texts[:200]:
        assert 0.5 <= classify_text(t).confidence <= 0.99
    assert all(cue == cue.lower() for cue in IPV_CUES)


async def test_paths_models_and_health(server: MockServer, client: httpx.AsyncClient) -> None:
    base = f"http://127.0.0.1:{server.port}"
    assert server.url == f"{base}/v1/chat/completions"
    no_v1 = await client.post(f"{base}/chat/completions", json=body())
    assert no_v1.status_code == 200
    models = (await client.get(f"{base}/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["mock-classifier"]
    assert (await client.get(f"{base}/health")).status_code == 200


async def test_missing_model_falls_back_to_the_server_model(
        server: MockServer, client: httpx.AsyncClient) -> None:
    payload = {"messages": [{"role": "user", "content": NEGATIVE}]}
    response = await client.post(server.url, json=payload)
    assert response.json()["model"] == "mock-classifier"


async def test_unknown_path_is_404_json(server: MockServer, client: httpx.AsyncClient) -> None:
    response = await client.get(f"http://127.0.0.1:{server.port}/v1/nope")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"messages": []}',
                                 b'{"messages": "hi"}', b"\xff\xfe"])
async def test_bad_body_is_400_json(server: MockServer, client: httpx.AsyncClient,
                                    raw: bytes) -> None:
    response = await client.post(server.url, content=raw,
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


async def test_get_on_completions_is_405(server: MockServer, client: httpx.AsyncClient) -> None:
    assert (await client.get(server.url)).status_code == 405


async def test_malformed_request_line_gets_400_and_close(server: MockServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"NONSENSE\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 2)  # read() to EOF: the server closed
    writer.close()
    await writer.wait_closed()
    assert data.startswith(b"HTTP/1.1 400 ")


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(("fault", "status"), [
    ("error_rate", 500), ("rate_429", 429), ("rate_503", 503), ("rate_502_html", 502)])
async def test_http_error_faults(client: httpx.AsyncClient, fault: str, status: int) -> None:
    server = await faulty(**{fault: 1.0})
    try:
        response = await post(client, server)
    finally:
        await server.stop()
    assert response.status_code == status
    if status == 502:
        assert response.headers["content-type"].startswith("text/html")
        assert "<html>" in response.text
    else:
        assert response.json()["error"]["message"]
    assert ("retry-after" in response.headers) == (status == 429)
    if status == 429:
        assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize(("retry_after", "header"), [(None, None), (2.5, "2.5"), (0, "0")])
async def test_retry_after_is_configurable(client: httpx.AsyncClient, retry_after: float | None,
                                           header: str | None) -> None:
    server = await faulty(rate_429=1.0, retry_after_s=retry_after)
    try:
        response = await post(client, server)
    finally:
        await server.stop()
    assert response.status_code == 429
    assert response.headers.get("retry-after") == header


async def test_malformed_fenced_reasoning_and_truncated_answers(
        client: httpx.AsyncClient) -> None:
    expected = json.loads(classify_text("Narrative:\n" + POSITIVE).to_json())
    contents: dict[str, tuple[str, str]] = {}
    for fault in ("malformed_rate", "fenced_rate", "reasoning_rate", "truncate_rate"):
        server = await faulty(**{fault: 1.0})
        try:
            response = await post(client, server)
        finally:
            await server.stop()
        assert response.status_code == 200
        choice = response.json()["choices"][0]
        contents[fault] = (choice["message"]["content"], choice["finish_reason"])

    malformed, reason = contents["malformed_rate"]
    assert reason == "stop" and "{" not in malformed
    fenced, reason = contents["fenced_rate"]
    assert reason == "stop" and "```json\n" in fenced and not fenced.startswith("{")
    assert json.loads(fenced.split("```json\n", 1)[1].split("\n```", 1)[0]) == expected
    reasoning, reason = contents["reasoning_rate"]
    assert reasoning.startswith("<|channel|>analysis<|message|>")
    final_marker = "<|start|>assistant<|channel|>final<|message|>"
    assert json.loads(reasoning.split(final_marker, 1)[1]) == expected
    truncated, reason = contents["truncate_rate"]
    assert reason == "length"
    with pytest.raises(ValueError):
        json.loads(truncated)


async def test_reset_drops_the_connection_without_a_response(
        client: httpx.AsyncClient) -> None:
    server = await faulty(reset_rate=1.0)
    try:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await post(client, server)
        assert server.stats().outcome("reset") == 1
    finally:
        await server.stop()


async def test_hang_times_the_client_out_and_ends_when_the_client_leaves() -> None:
    server = await faulty(hang_rate=1.0)
    try:
        async with httpx.AsyncClient(timeout=0.3, trust_env=False) as client:
            with pytest.raises(httpx.ReadTimeout):
                await post(client, server)
        await wait_until(lambda: not server.stats().in_flight)
        assert server.stats().in_flight == 0  # the handler noticed the client had gone
        assert server.stats().outcome("hang") == 1
    finally:
        await server.stop()


async def test_hang_ends_by_itself_after_hang_s(client: httpx.AsyncClient) -> None:
    server = await faulty(hang_rate=1.0, hang_s=0.1)
    try:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await post(client, server)
    finally:
        await server.stop()


async def test_stop_is_prompt_with_hanging_requests_and_idle_connections(
        client: httpx.AsyncClient) -> None:
    server = await faulty(hang_rate=1.0)
    idle = httpx.AsyncClient(timeout=5.0, trust_env=False)
    async with idle:
        assert (await idle.get(f"http://127.0.0.1:{server.port}/health")).status_code == 200
        hanging = [asyncio.create_task(post(client, server)) for _ in range(3)]
        await wait_until(lambda: server.stats().in_flight >= 3)
        assert server.stats().in_flight == 3
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 1.0
        results = await asyncio.gather(*hanging, return_exceptions=True)
    assert all(isinstance(r, (httpx.RemoteProtocolError, httpx.ReadError)) for r in results)
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{server.port}/health")


async def test_fault_sequence_is_reproducible_for_a_seed(client: httpx.AsyncClient) -> None:
    faults = FaultConfig(error_rate=0.2, rate_429=0.2, fenced_rate=0.2, truncate_rate=0.1)

    async def outcomes(seed: int) -> list[tuple[int, str | None]]:
        async with MockServer(faults=faults, seed=seed) as server:
            seen = []
            for _ in range(60):
                r = await post(client, server)
                seen.append((r.status_code, r.json()["choices"][0]["finish_reason"]
                             if r.status_code == 200 else None))
            return seen

    first, again, other = await outcomes(3), await outcomes(3), await outcomes(4)
    assert first == again
    assert first != other
    statuses = {status for status, _ in first}
    assert statuses == {200, 429, 500}
    assert 0.25 < sum(s == 200 for s, _ in first) / len(first) < 0.75


def test_fault_config_validation() -> None:
    with pytest.raises(ValueError):
        FaultConfig(error_rate=1.5)
    with pytest.raises(ValueError):
        FaultConfig(error_rate=0.6, rate_429=0.6)
    with pytest.raises(ValueError):
        FaultConfig(retry_after_s=-1)
    config = FaultConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.error_rate = 0.5  # type: ignore[misc]
    assert all(rate == 0 for _, rate in config.rates())


# --------------------------------------------------------------------------- load and stats


async def test_global_concurrency_limit_answers_429(client: httpx.AsyncClient) -> None:
    async with MockServer(latency_ms=300, max_concurrent=2,
                          faults=FaultConfig(retry_after_s=3)) as server:
        responses = await asyncio.gather(*(post(client, server) for _ in range(5)))
        stats = server.stats()
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429, 429]
    assert all(r.headers["retry-after"] == "3" for r in responses if r.status_code == 429)
    assert stats.max_in_flight == 2
    assert stats.outcome("overloaded") == 3 and stats.outcome("ok") == 2


async def test_requests_are_served_concurrently(client: httpx.AsyncClient) -> None:
    async with MockServer(latency_ms=200) as server:
        responses = await asyncio.gather(*(post(client, server, f"case {i}")
                                           for i in range(40)))
        stats = server.stats()
    assert all(r.status_code == 200 for r in responses)
    assert stats.max_in_flight >= 20          # served side by side, not one after another


async def test_stats_snapshot(client: httpx.AsyncClient) -> None:
    secret = "Unique narrative text zq7 with a husband."
    server = await faulty(rate_429=0.5)
    try:
        base = f"http://127.0.0.1:{server.port}"
        before = time.monotonic()
        responses = [await post(client, server, secret) for _ in range(20)]
        await client.get(f"{base}/health")
        await client.get(f"{base}/missing")
        stats = server.stats()
        times = server.request_times()
    finally:
        await server.stop()
    ok = sum(r.status_code == 200 for r in responses)
    assert stats.total_requests == 22 and stats.completion_requests == 20
    assert stats.outcome("ok") == ok and stats.outcome("rate_limited") == 20 - ok
    assert stats.status(200) == ok + 1 and stats.status(429) == 20 - ok
    assert stats.status(404) == 1 and stats.outcome("not_found") == 1
    assert 0 < ok < 20
    assert len(times) == 20 and list(times) == sorted(times) and times[0] >= before
    assert sum(stats.arrivals_per_second) == 20
    assert stats.max_in_flight == 1 and stats.in_flight == 0
    assert "zq7" not in repr(stats) and "zq7" not in repr(times)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.total_requests = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.by_outcome["ok"] = 0  # type: ignore[index]


async def test_keep_alive_connections_are_reused(server: MockServer,
                                                 client: httpx.AsyncClient) -> None:
    for i in range(20):
        assert (await post(client, server, f"case {i}")).status_code == 200
    assert server.stats().connections_opened == 1
    assert server.stats().open_connections == 1


async def test_a_pooled_client_is_seen_as_its_pool_of_connections(server: MockServer) -> None:
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(200):
        queue.put_nowait(i)
    codes: list[int] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            codes.append((await post(client, server, f"case {i}")).status_code)

    async with httpx.AsyncClient(timeout=5.0, trust_env=False, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(8)))
        stats = server.stats()
    assert codes == [200] * 200
    assert stats.completion_requests == 200
    assert 1 <= stats.connections_opened <= 9
    assert stats.peak_connections <= 9 and stats.open_connections <= stats.peak_connections


async def test_capacity_queues_beyond_k_and_serves_in_waves(
        client: httpx.AsyncClient) -> None:
    async with MockServer(latency_ms=150, capacity=2) as server:
        started = time.monotonic()
        responses = await asyncio.gather(*(post(client, server, f"case {i}")
                                           for i in range(6)))
        elapsed = time.monotonic() - started
        stats = server.stats()
    assert [r.status_code for r in responses] == [200] * 6  # queued, never refused
    assert elapsed >= 0.42  # at least three waves of two: throughput is capacity / latency
    assert stats.max_queued == 4 and stats.queued == 0
    assert stats.max_in_flight == 6 and stats.in_flight == 0


async def test_a_queued_request_whose_client_leaves_frees_its_place(
        client: httpx.AsyncClient) -> None:
    async with MockServer(latency_ms=300, capacity=1) as server:
        served = asyncio.create_task(post(client, server, "first"))
        async with httpx.AsyncClient(timeout=0.1, trust_env=False) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await post(impatient, server, "second")
        assert (await served).status_code == 200
        await wait_until(lambda: not server.stats().in_flight)
        stats = server.stats()
        assert stats.queued == 0 and stats.in_flight == 0 and stats.max_queued == 1
        assert stats.outcome("abandoned") == 1 and stats.outcome("ok") == 1
        started = time.monotonic()
        assert (await post(client, server, "third")).status_code == 200
        assert time.monotonic() - started < 0.6  # the abandoned one holds no slot


def test_capacity_and_max_concurrent_are_validated() -> None:
    with pytest.raises(ValueError):
        MockServer(capacity=0)
    with pytest.raises(ValueError):
        MockServer(max_concurrent=0)


async def test_connection_close_is_honoured(server: MockServer,
                                            client: httpx.AsyncClient) -> None:
    for _ in range(2):
        response = await post(client, server, headers={"Connection": "close"})
        assert response.status_code == 200
        assert response.headers["connection"] == "close"
    assert server.stats().connections_opened == 2


async def test_pipelined_requests_on_one_raw_connection(server: MockServer) -> None:
    payload = json.dumps(body()).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request * 3)
    for _ in range(3):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        assert head.startswith(b"HTTP/1.1 200 ")
        assert json.loads(await reader.readexactly(length))["object"] == "chat.completion"
    writer.close()
    await writer.wait_closed()


def test_loopback_only() -> None:
    with pytest.raises(ValueError):
        MockServer(host="0.0.0.0")


# --------------------------------------------------------------------------- CLI entry


def test_serve_forever_rejects_unknown_options() -> None:
    with pytest.raises(TypeError):
        serve_forever(0, 0.0, 0.0, no_such_option=1)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_forever_runs_until_a_signal(signum: signal.Signals) -> None:
    code = "from asyncrunner.sim import serve_forever; serve_forever(0, 0.0, 0.0, capacity=4)"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("mock-server listening on http://127.0.0.1:")
        assert line.endswith("/v1")
        base = line.rsplit(" ", 1)[1]
        with httpx.Client(timeout=5, trust_env=False) as client:
            assert client.post(base + "/chat/completions", json=body()).status_code == 200
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    summary = [line for line in err.splitlines() if line.startswith("mock-server stopped ")]
    assert len(summary) == 1, err
    assert "requests=1 completions=1 statuses=200:1 " in summary[0]
    assert "connections_opened=1 peak_connections=1" in summary[0]
    assert POSITIVE not in out + err  # request bodies are never logged


# --------------------------------------------------------------------------- issue #15 modes

from asyncrunner.llm.answer_schema import response_format_payload  # noqa: E402
from asyncrunner.llm.client import (  # noqa: E402
    ClientSettings,
    Completion,
    LLMClient,
    make_http_client,
)
from asyncrunner.llm.parsing import parse_answer, repair_messages  # noqa: E402
from asyncrunner.llm.throttle import AdaptiveLimiter  # noqa: E402
from asyncrunner.sim.model import REFERENCE_MODEL  # noqa: E402

SYSTEM = "You decide whether intimate partner violence is a circumstance. Answer in JSON."


def with_format(mode: str, text: str = POSITIVE, max_tokens: int = 256) -> dict[str, Any]:
    return {**body(text), "max_tokens": max_tokens,
            "response_format": response_format_payload(mode, max_tokens)}


async def test_rejecting_json_schema_as_llama_cpp_does(client: httpx.AsyncClient) -> None:
    async with MockServer(reject_response_formats=("json_schema",)) as server:
        rejected = await client.post(server.url, json=with_format("json_schema"))
        fine = [await client.post(server.url, json=with_format(mode))
                for mode in ("json_object", "none")]
        stats = server.stats()
    assert rejected.status_code == 400
    error = rejected.json()["error"]
    assert error["type"] == "invalid_request_error" and "JSON schema" in error["message"]
    assert [r.status_code for r in fine] == [200, 200]
    assert stats.outcome("format_rejected") == 1
    assert stats.by_response_format == {"json_schema": 1, "json_object": 1, "none": 1}


async def test_rejecting_json_object_as_lm_studio_does(client: httpx.AsyncClient) -> None:
    async with MockServer(reject_response_formats=("json_object",)) as server:
        rejected = await client.post(server.url, json=with_format("json_object"))
        accepted = await client.post(server.url, json=with_format("json_schema"))
    assert rejected.status_code == 400
    assert rejected.json() == {"error": "'response_format.type' must be 'json_schema' or 'text'"}
    assert accepted.status_code == 200


async def test_an_unknown_type_lists_the_types_taken(client: httpx.AsyncClient) -> None:
    async with MockServer(reject_response_formats=("xml",)) as server:
        payload = {**body(), "response_format": {"type": "xml"}}
        response = await client.post(server.url, json=payload)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        'response_format type must be one of "text" or "json_object", but got: xml')


async def test_an_accepted_schema_is_recorded_verbatim_and_bounds_the_answer(
        client: httpx.AsyncClient) -> None:
    text = "Her ex-husband, a jealous partner, had stalked and choked her; domestic abuse."
    async with MockServer() as server:
        plain = json.loads(content_of(await client.post(server.url, json=body(text))))
        response = await client.post(server.url, json=with_format("json_schema", text, 256))
        stats = server.stats()
    assert stats.last_response_format == response_format_payload("json_schema", 256)
    assert len(plain["indicators"]) > 3
    answer = json.loads(content_of(response))
    assert answer["indicators"] == plain["indicators"][:3]          # maxItems 3
    assert answer["detected"] == plain["detected"]


async def test_invalid_json_once_then_valid_on_a_repair_turn() -> None:
    async with MockServer(faults=FaultConfig(invalid_first_rate=1.0)) as server, \
            make_http_client(1, 5.0) as http:
        settings = ClientSettings(api_url=server.base_url, model=REFERENCE_MODEL,
                                  temperature=0.0, max_tokens=256, timeout_s=5,
                                  max_attempts=1, seed=1)
        llm = LLMClient(settings, http, AdaptiveLimiter(1))
        user = "Narrative:\n" + POSITIVE
        first = await llm.complete(SYSTEM, user)
        assert isinstance(first, Completion) and first.content is not None
        assert first.content.startswith("{'detected': True")            # a Python dict
        with pytest.raises(ValueError):
            parse_answer(first.content)
        repaired = await llm.complete(SYSTEM, user, followup=repair_messages(
            first.content, "no JSON object with 'detected' in response"))
        assert isinstance(repaired, Completion)
        answer = parse_answer(repaired.content)
        # the narrative was classified, not the repair instruction
        assert answer.detected and "boyfriend" in answer.indicators
        resampled = await llm.complete(SYSTEM, user, seed=99)          # seen before: valid
        assert isinstance(resampled, Completion)
        assert parse_answer(resampled.content) == answer
        other = await llm.complete(SYSTEM, "Narrative:\n" + NEGATIVE)  # its own first time
        assert isinstance(other, Completion) and other.content is not None
        assert other.content.startswith("{'detected'")
        stats = server.stats()
    assert stats.repair_turns == 1 and stats.last_seed == 1
    # the token ledger: what the client was told, summed over every attempt, is the
    # simulator's own count of what it served
    served = [first, repaired, resampled, other]
    assert stats.prompt_tokens == sum(c.prompt_tokens or 0 for c in served)
    assert stats.completion_tokens == sum(c.completion_tokens or 0 for c in served)
    assert stats.completion_requests == 4


async def test_invalid_first_picks_a_share_of_narratives(client: httpx.AsyncClient) -> None:
    texts = [f"Case {i}: the decedent's husband was arrested." for i in range(200)]
    async with MockServer(faults=FaultConfig(invalid_first_rate=0.25)) as server:
        firsts = [content_of(await client.post(server.url, json=body(t))) for t in texts]
    invalid = sum(c.startswith("{'") for c in firsts)
    assert 0.15 * len(texts) < invalid < 0.35 * len(texts)
    with pytest.raises(ValueError):
        FaultConfig(invalid_first_rate=1.5)


@pytest.mark.parametrize(("max_tokens", "finish_reason"), [(10, "length"), (512, "stop")])
async def test_truncate_at_max_tokens(client: httpx.AsyncClient, max_tokens: int,
                                      finish_reason: str) -> None:
    async with MockServer(truncate_at_max_tokens=True) as server:
        response = await client.post(server.url, json={**body(), "max_tokens": max_tokens})
        stats = server.stats()
    payload = response.json()
    choice = payload["choices"][0]
    assert choice["finish_reason"] == finish_reason
    if finish_reason == "length":
        assert len(choice["message"]["content"]) == 40
        assert payload["usage"]["completion_tokens"] == 10
        with pytest.raises(ValueError) as error:
            parse_answer(choice["message"]["content"], "length", max_tokens)
        assert str(error.value) == "answer cut off at max_tokens=10 (finish_reason=length)"
    else:
        parse_answer(choice["message"]["content"])
    assert stats.completion_tokens == payload["usage"]["completion_tokens"]


async def test_object_shaped_indicators(client: httpx.AsyncClient) -> None:
    server = await faulty(object_indicators_rate=1.0)
    try:
        content = content_of(await post(client, server))
    finally:
        await server.stop()
    indicators = json.loads(content)["indicators"]
    assert indicators and all(set(i) == {"indicator", "evidence"} for i in indicators)
    parsed = parse_answer(content).indicators
    assert parsed[0] == f"{indicators[0]['indicator']}: {indicators[0]['evidence']}"


@pytest.mark.parametrize(("status", "code"), [
    (401, "invalid_api_key"), (403, "forbidden"), (404, "model_not_found")])
async def test_fail_status_on_every_request(client: httpx.AsyncClient, status: int,
                                            code: str) -> None:
    async with MockServer(fail_status=status) as server:
        responses = [await post(client, server) for _ in range(3)]
        stats = server.stats()
    assert [r.status_code for r in responses] == [status] * 3
    assert responses[0].json()["error"]["code"] == code
    assert stats.completion_requests == 3 and stats.status(status) == 3
    assert stats.prompt_tokens == stats.completion_tokens == 0
    with pytest.raises(ValueError):
        MockServer(fail_status=500)


async def test_api_key_is_checked(client: httpx.AsyncClient) -> None:
    async with MockServer(api_key="sk-test") as server:
        missing = await post(client, server)
        wrong = await post(client, server, headers={"Authorization": "Bearer sk-nope"})
        right = await post(client, server, headers={"Authorization": "Bearer sk-test"})
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)


async def test_token_counts_cover_delivered_answers_only(client: httpx.AsyncClient) -> None:
    async with MockServer(faults=FaultConfig(error_rate=0.5), seed=5) as server:
        usages = []
        for i in range(20):
            r = await client.post(server.url, json=body(f"{POSITIVE} {i}"))
            if r.status_code == 200:
                usages.append(r.json()["usage"])
        stats = server.stats()
    assert 0 < len(usages) < 20
    assert stats.prompt_tokens == sum(u["prompt_tokens"] for u in usages)
    assert stats.completion_tokens == sum(u["completion_tokens"] for u in usages)
    assert f"tokens={stats.prompt_tokens}+{stats.completion_tokens}" in stats.summary()


async def test_system_role_user_is_classified_on_the_narrative(
        client: httpx.AsyncClient) -> None:
    # the system prompt names "partner" violence; folded into the user turn it must not count
    payload = {"model": REFERENCE_MODEL, "messages": [
        {"role": "user", "content": f"{SYSTEM}\n\nNarrative:\n{NEGATIVE}"}]}
    async with MockServer() as server:
        answer = json.loads(content_of(await client.post(server.url, json=payload)))
    assert answer == json.loads(classify_text("Narrative:\n" + NEGATIVE).to_json())


def test_the_reference_model_ignores_temperature_and_seed() -> None:
    texts = [f"Case {i}: her husband was jealous." for i in range(100)] + [POSITIVE, NEGATIVE]
    for text in texts:
        reference = classify_text(text)
        assert classify_text(text, REFERENCE_MODEL, 0.9, 7) == reference
        assert classify_text(text, "", 0.5, 1) == reference


def test_other_models_and_sampling_answer_slightly_differently() -> None:
    texts = [f"Case {i}: the decedent was found at home." for i in range(2000)]

    def detections(*args: Any) -> list[bool]:
        return [classify_text(t, *args).detected for t in texts]

    reference = detections()
    qwen, gpt = detections("qwen3-8b"), detections("gpt-oss-20b")
    assert detections("qwen3-8b") == qwen                             # deterministic
    for variant in (qwen, gpt):
        differ = sum(a != b for a, b in zip(reference, variant, strict=True))
        assert 0.02 * len(texts) < differ < 0.07 * len(texts)         # ~4 %
    assert qwen != gpt
    cold = detections("qwen3-8b", 0.0, 1)
    assert cold == detections("qwen3-8b", 0.0, 2) == qwen           # T=0: seed irrelevant
    warm1, warm2 = detections("qwen3-8b", 0.7, 1), detections("qwen3-8b", 0.7, 2)
    assert warm1 != warm2 and warm1 == detections("qwen3-8b", 0.7, 1)
    differ = sum(a != b for a, b in zip(cold, warm1, strict=True))
    assert 0.015 * len(texts) < differ < 0.06 * len(texts)           # 0.7 x 5 % = 3.5 %
    assert [classify_text(t, "qwen3-8b").confidence for t in texts[:50]] != [
        classify_text(t).confidence for t in texts[:50]]


async def test_the_request_model_temperature_and_seed_reach_the_answer(
        client: httpx.AsyncClient) -> None:
    text = "Narrative:\n" + POSITIVE
    async with MockServer() as server:
        payload = {**body(), "model": "qwen3-8b", "temperature": 0.7, "seed": 3}
        answer = json.loads(content_of(await client.post(server.url, json=payload)))
    assert answer == json.loads(classify_text(text, "qwen3-8b", 0.7, 3).to_json())


def test_serve_forever_takes_the_new_options() -> None:
    from asyncrunner.sim.server import _split_options

    faults, kwargs = _split_options(0.0, {
        "invalid_first_rate": 0.1, "object_indicators_rate": 0.2,
        "reject_response_formats": ("json_schema",), "fail_status": 401, "api_key": "k",
        "truncate_at_max_tokens": True})
    assert (faults.invalid_first_rate, faults.object_indicators_rate) == (0.1, 0.2)
    assert kwargs == {"reject_response_formats": ("json_schema",), "fail_status": 401,
                      "api_key": "k", "truncate_at_max_tokens": True}
