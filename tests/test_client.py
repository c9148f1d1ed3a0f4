"""The retry policy at the client edge (httpx.MockTransport: a narrow unit boundary).

The same behaviours are exercised over real HTTP against the mock server in test_faults.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import anyio
import httpx
import pytest

from asyncrunner.llm.client import (
    ClientSettings,
    Completion,
    LLMClient,
    RequestFailure,
    normalize_api_url,
    parse_retry_after,
    redact_url,
)
from asyncrunner.llm.throttle import AdaptiveLimiter, TokenBudget

OK_BODY = {"choices": [{"message": {"content": '{"detected": true}'}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 11, "completion_tokens": 7}}


def make_client(handler: Callable[[httpx.Request], httpx.Response], *, attempts: int = 3,
                key: str | None = None, **kw: object) -> tuple[LLMClient, AdaptiveLimiter]:
    settings = ClientSettings(api_url="http://127.0.0.1:9/v1", model="m", temperature=0.2,
                              max_tokens=50, timeout_s=5, max_attempts=attempts, seed=1024,
                              api_key=key, backoff_base_s=0.0, **kw)  # type: ignore[arg-type]
    limiter = AdaptiveLimiter(4)
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return LLMClient(settings, http, limiter), limiter


Handler = Callable[[httpx.Request], httpx.Response]


def scripted(*responses: httpx.Response | Exception) -> tuple[Handler, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        return item
    return handler, seen


async def test_success_builds_request_and_reads_usage() -> None:
    handler, seen = scripted(httpx.Response(200, json=OK_BODY))
    client, _ = make_client(handler, key="sk-SENTINEL", response_format="json_object",
                            extra_body={"top_p": 0.9})
    out = await client.complete("sys", "user text")
    assert isinstance(out, Completion) and out.attempts == 1
    assert (out.prompt_tokens, out.completion_tokens) == (11, 7)
    req = seen[0]
    assert req.url.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-SENTINEL"
    body = json.loads(req.content)
    assert body["seed"] == 1024 and body["top_p"] == 0.9
    assert body["response_format"] == {"type": "json_object"}
    await client.http.aclose()


async def test_429_then_success_honours_retry_after_and_slows_everyone() -> None:
    handler, _ = scripted(httpx.Response(429, headers={"Retry-After": "0.2"}),
                          httpx.Response(200, json=OK_BODY))
    client, limiter = make_client(handler)
    started = time.monotonic()
    out = await client.complete("s", "u")
    assert isinstance(out, Completion) and out.attempts == 2
    assert time.monotonic() - started >= 0.2
    assert limiter.stats().decreases == 1 and limiter.stats().limit < 4
    await client.http.aclose()


async def test_a_long_retry_after_is_capped_by_the_setting_and_announced() -> None:
    """Retry-After: 3600 was capped at 300 s without a word; the cap is now
    run.max_retry_after_s and the pause is announced with what the server said."""
    handler, _ = scripted(httpx.Response(429, headers={"Retry-After": "3600"}))
    client, limiter = make_client(handler, attempts=1, max_retry_after_s=40.0)
    told: list[tuple[float, str]] = []
    limiter.on_pause = lambda seconds, reason: told.append((seconds, reason))
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure) and out.retry_after_s == 40.0
    assert told == [(40.0, "HTTP 429, Retry-After 3600s "
                           "(capped at run.max_retry_after_s=40s)")]
    stats = limiter.stats()
    assert 39.0 < stats.paused_for_s <= 40.0
    assert stats.pause_reason is not None and "Retry-After 3600s" in stats.pause_reason
    # the same pause again, or a shorter one inside it, is not announced twice
    limiter.on_slow_down(10.0, reason="HTTP 429")
    assert len(told) == 1
    await client.http.aclose()


async def test_a_short_pause_is_not_announced() -> None:
    handler, _ = scripted(httpx.Response(503, headers={"Retry-After": "1"}))
    client, limiter = make_client(handler, attempts=1)
    told: list[tuple[float, str]] = []
    limiter.on_pause = lambda seconds, reason: told.append((seconds, reason))
    await client.complete("s", "u")
    assert told == [] and limiter.stats().pause_reason == "HTTP 503, Retry-After 1s"
    await client.http.aclose()


@pytest.mark.parametrize(
    ("response", "category", "attempts"),
    [
        (httpx.Response(500, text="boom"), "api_error", 3),
        (httpx.Response(502, text="<html><title>Bad Gateway</title></html>"), "api_error", 3),
        (httpx.Response(429, text="slow down"), "rate_limit", 3),
        (httpx.Response(401, json={"error": {"message": "bad key"}}), "api_error", 1),
        (httpx.Response(404, text="no such model"), "api_error", 1),
        (httpx.Response(400, json={"error": {"message": "This model's maximum context "
                                             "length is 4096 tokens"}}), "data_error", 1),
        (httpx.Response(200, text="not json"), "api_error", 3),
        (httpx.ConnectError("refused"), "api_error", 3),
        (httpx.ReadTimeout("slow"), "timeout", 3),
        (httpx.RemoteProtocolError("dropped"), "api_error", 3),
    ],
)
async def test_failures_are_categorised(response: httpx.Response | Exception, category: str,
                                        attempts: int) -> None:
    handler, seen = scripted(response)
    client, _ = make_client(handler)
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure)
    assert (out.category, out.attempts, len(seen)) == (category, attempts, attempts)
    await client.http.aclose()


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = formatdate(time.time() + 5, usegmt=True)
    value = parse_retry_after(date)
    assert value is not None and 3.0 <= value <= 5.0
    assert parse_retry_after("99999") == 99999.0     # capped by the client, not here


def test_url_normalisation() -> None:
    assert normalize_api_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert normalize_api_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    full = "http://h:1/v1/chat/completions"
    assert normalize_api_url(full) == full


# --- in-process additions: request body, retry decisions, AIMD through the client ---------


async def test_request_body_and_headers_carry_the_run_settings() -> None:
    handler, seen = scripted(httpx.Response(200, json=OK_BODY))
    client, _ = make_client(handler, extra_body={"temperature": 0.7, "top_k": 5})
    await client.complete("system text", "user text")
    body = json.loads(seen[0].content)
    assert body == {
        "model": "m",
        "messages": [{"role": "system", "content": "system text"},
                     {"role": "user", "content": "user text"}],
        "temperature": 0.7,            # extra_body is merged last, so it can override
        "max_tokens": 50, "seed": 1024, "top_k": 5,
    }
    assert seen[0].method == "POST" and seen[0].headers["content-type"] == "application/json"
    assert "authorization" not in seen[0].headers
    await client.http.aclose()


async def test_optional_body_fields_are_left_out_when_unset() -> None:
    settings = ClientSettings(api_url="http://h/v1/chat/completions", model="m",
                              temperature=0.0, max_tokens=8, timeout_s=1, max_attempts=1)
    async with httpx.AsyncClient() as http:
        client = LLMClient(settings, http, AdaptiveLimiter(1))
        assert set(client.build_body("s", "u")) == {"model", "messages", "temperature",
                                                    "max_tokens"}
        assert client.url == "http://h/v1/chat/completions"


@pytest.mark.parametrize(
    ("status", "category", "attempts", "slows_down"),
    [
        (503, "api_error", 3, True),
        (504, "api_error", 3, False),
        (408, "api_error", 3, False),
        (409, "api_error", 3, False),
        (425, "api_error", 3, False),
        (400, "api_error", 1, False),
        (403, "api_error", 1, False),
        (422, "api_error", 1, False),
    ],
)
async def test_which_statuses_are_retried(status: int, category: str, attempts: int,
                                          slows_down: bool) -> None:
    handler, seen = scripted(httpx.Response(status, json={"error": {"message": "nope"}}))
    client, limiter = make_client(handler)
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure)
    assert (out.category, out.attempts, len(seen), out.status) == (category, attempts, attempts,
                                                                   status)
    assert out.retryable == (attempts > 1)
    assert out.message == f"HTTP {status}: nope"
    assert (limiter.stats().decreases > 0) == slows_down
    await client.http.aclose()


@pytest.mark.parametrize("status", [500, 503])
async def test_retry_after_is_waited_out_and_reported(status: int) -> None:
    handler, seen = scripted(httpx.Response(status, headers={"Retry-After": "0.1"}, text="busy"))
    client, limiter = make_client(handler, attempts=2)
    started = time.monotonic()
    out = await client.complete("s", "u")
    elapsed = time.monotonic() - started
    assert isinstance(out, RequestFailure) and len(seen) == 2
    assert out.retry_after_s == 0.1 and elapsed >= 0.095
    # a 503 also pauses every worker (the limiter's common pause); a 500 only this request
    assert (limiter.stats().paused_for_s > 0) == (status == 503)
    await client.http.aclose()


async def test_without_retry_after_a_zero_backoff_retries_at_once() -> None:
    handler, seen = scripted(httpx.Response(500, text="boom"))
    client, _ = make_client(handler, attempts=4)
    started = time.monotonic()
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure) and out.retry_after_s is None and len(seen) == 4
    assert time.monotonic() - started < 0.1
    await client.http.aclose()


@pytest.mark.parametrize("body", [
    {"choices": []}, {"error": "overloaded"}, {"choices": [{"message": "text"}]},
    {"choices": [{"text": "legacy completion"}]}, [1, 2],
])
async def test_a_200_that_is_not_a_chat_completion_is_a_retried_api_error(body: object) -> None:
    handler, seen = scripted(httpx.Response(200, json=body))
    client, limiter = make_client(handler)
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure)
    assert (out.category, out.attempts, len(seen), out.status) == ("api_error", 3, 3, 200)
    assert out.raw is not None and json.loads(out.raw) == body
    assert limiter.stats().limit == 4                  # not a success: the limit did not move
    await client.http.aclose()


@pytest.mark.parametrize("error", [
    httpx.ConnectTimeout("connect"), httpx.WriteTimeout("write"), httpx.PoolTimeout("pool"),
])
async def test_every_kind_of_timeout_is_the_timeout_category(error: Exception) -> None:
    handler, _ = scripted(error)
    client, _ = make_client(handler, attempts=2)
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure)
    assert (out.category, out.attempts, out.status, out.raw) == ("timeout", 2, None, None)
    assert out.message == "no response within 5s"
    await client.http.aclose()


async def test_a_timeout_then_an_answer_is_a_completion_on_the_second_attempt() -> None:
    handler, _ = scripted(httpx.ReadTimeout("slow"), httpx.Response(200, json=OK_BODY))
    client, _ = make_client(handler)
    out = await client.complete("s", "u")
    assert isinstance(out, Completion) and out.attempts == 2
    await client.http.aclose()


@pytest.mark.parametrize(("message", "usage", "expected"), [
    ({"content": None}, None, (None, None, None)),
    ({"content": ["parts"]}, {"prompt_tokens": True, "completion_tokens": "7"}, (None, None, None)),
    ({"content": "x"}, {"prompt_tokens": 3}, ("x", 3, None)),
])
async def test_completion_fields_are_taken_only_when_well_typed(
        message: dict[str, object], usage: dict[str, object] | None,
        expected: tuple[object, object, object]) -> None:
    body = {"choices": [{"message": message, "finish_reason": "length"}], "usage": usage}
    handler, _ = scripted(httpx.Response(200, json=body))
    client, _ = make_client(handler)
    out = await client.complete("s", "u")
    assert isinstance(out, Completion) and out.finish_reason == "length"
    assert (out.content, out.prompt_tokens, out.completion_tokens) == expected
    assert out.raw is not None and json.loads(out.raw) == body
    await client.http.aclose()


@pytest.mark.parametrize(("response", "message"), [
    (httpx.Response(418, json={"error": "short and\nstout"}), "HTTP 418: short and stout"),
    (httpx.Response(451, text="<html><head><TITLE> Gone </TITLE></head></html>"), "HTTP 451: Gone"),
    (httpx.Response(410, text=""), "HTTP 410: empty body"),
    (httpx.Response(406, text="x" * 500), "HTTP 406: " + "x" * 200),
])
async def test_the_error_message_is_one_short_line_from_the_body(response: httpx.Response,
                                                                 message: str) -> None:
    handler, _ = scripted(response)
    client, _ = make_client(handler)
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure) and out.message == message
    await client.http.aclose()


def test_redact_url_drops_credentials_and_query() -> None:
    assert redact_url("http://user:pw@h:1/v1?key=sk-1") == "http://h:1/v1"
    assert redact_url("http://h:1/v1") == "http://h:1/v1"
    assert redact_url("http://[::1") == "<invalid url>"


def gate(n: int, response: httpx.Response) -> Callable[[httpx.Request], Any]:
    """An async handler holding requests until `n` are in flight, then answering them all."""
    arrived = 0
    everyone = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal arrived
        arrived += 1
        if arrived == n:
            everyone.set()
        await everyone.wait()
        return response
    return handler


async def rounds(client: LLMClient, n: int) -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(client.complete, "s", "u")


async def test_aimd_one_round_of_429s_halves_once_and_successes_climb_back() -> None:
    limiter = AdaptiveLimiter(4)
    settings = ClientSettings(api_url="http://h/v1", model="m", temperature=0, max_tokens=8,
                              timeout_s=5, max_attempts=1, backoff_base_s=0.0)
    transport = httpx.MockTransport(gate(4, httpx.Response(429, text="slow")))
    async with httpx.AsyncClient(transport=transport) as http:
        await rounds(LLMClient(settings, http, limiter), 4)      # four refusals, one round
    assert (limiter.stats().limit, limiter.stats().decreases) == (2, 1)
    transport = httpx.MockTransport(gate(2, httpx.Response(429, text="slow")))
    async with httpx.AsyncClient(transport=transport) as http:
        await rounds(LLMClient(settings, http, limiter), 2)      # sent after the decrease
    assert (limiter.stats().limit, limiter.stats().decreases) == (1, 2)
    handler, _ = scripted(httpx.Response(200, json=OK_BODY))
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = LLMClient(settings, http, limiter)
        limits = []
        for _ in range(12):
            await client.complete("s", "u")
            limits.append(limiter.stats().limit)
    assert limits[:3] == pytest.approx([2.0, 2.5, 2.9])
    assert limits == sorted(limits) and limits[-1] == 4.0      # back to, never above, the ceiling
    assert limiter.stats().in_flight == 0


async def test_a_token_budget_learns_from_the_reported_usage() -> None:
    handler, _ = scripted(httpx.Response(200, json=OK_BODY))
    client, _ = make_client(handler)
    budget = TokenBudget(tokens_per_minute=10_000, max_completion_tokens=50)
    client.budget = budget
    before = budget.estimate(100)
    out = await client.complete("s" * 50, "u" * 50)
    assert isinstance(out, Completion)
    # 100 characters were 11 prompt tokens; completions of 7 pull the mean down from 25
    chars_per_token = 0.8 * 4 + 0.2 * 100 / 11
    assert budget.estimate(100) == pytest.approx(100 / chars_per_token + 0.8 * 25 + 0.2 * 7)
    assert budget.estimate(100) != before
    await client.http.aclose()


def test_retry_after_edge_values() -> None:
    assert parse_retry_after(" 2 ") == 2.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("nan") is None
    assert parse_retry_after("") is None


@pytest.mark.parametrize("extra_body", [
    {}, {"top_p": 0.5}, {"messages": [{"role": "user", "content": "replaced"}]},
])
async def test_the_body_sent_is_the_json_of_build_body_for_every_prompt(
        extra_body: dict[str, Any]) -> None:
    handler, seen = scripted(httpx.Response(200, json=OK_BODY))
    client, _ = make_client(handler, extra_body=extra_body)
    prompts = [(f"system {i % 10} \u00e9\"\\", f"user {i}: \u201cquoted\u201d\n\t\x00 {{}}")
               for i in range(12)]                # more system prompts than any cache holds
    for system, user in prompts:
        await client.complete(system, user)
    for (system, user), request in zip(prompts, seen, strict=True):
        assert request.content == json.dumps(client.build_body(system, user)).encode()
    await client.http.aclose()


# --- structured outputs, system role, parse retries (issue #15) ------------------------------


async def test_json_schema_sends_the_bounded_answer_schema_in_openai_form() -> None:
    from asyncrunner.llm.answer_schema import answer_schema

    handler, seen = scripted(httpx.Response(200, json=OK_BODY))
    client, _ = make_client(handler, response_format="json_schema")
    await client.complete("s", "u")
    body = json.loads(seen[0].content)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "narrative_classification", "strict": True, "schema": answer_schema(50)}}
    assert body["response_format"]["json_schema"]["schema"]["properties"]["indicators"][
        "maxItems"] == 1                    # max_tokens 50: the smallest tier
    assert seen[0].content == json.dumps(client.build_body("s", "u")).encode()
    await client.http.aclose()


@pytest.mark.parametrize("mode", [None, "none"])
async def test_no_response_format_field_for_none(mode: str | None) -> None:
    handler, seen = scripted(httpx.Response(200, json=OK_BODY))
    client, _ = make_client(handler, response_format=mode)
    await client.complete("s", "u")
    assert "response_format" not in json.loads(seen[0].content)
    await client.http.aclose()


def test_an_explicit_schema_replaces_the_bounded_one_and_bad_settings_are_refused() -> None:
    custom = {"type": "object"}
    client, _ = make_client(lambda r: httpx.Response(200), response_format="json_schema",
                            response_schema=custom)
    assert client.build_body("s", "u")["response_format"]["json_schema"]["schema"] == custom
    with pytest.raises(ValueError, match="response format"):
        make_client(lambda r: httpx.Response(200), response_format="yaml")
    with pytest.raises(ValueError, match="system_role"):
        make_client(lambda r: httpx.Response(200), system_role="developer")


@pytest.mark.parametrize(("system", "expected"), [
    ("Answer in JSON.", [{"role": "user", "content": "Answer in JSON.\n\nNarrative: x"}]),
    ("", [{"role": "user", "content": "Narrative: x"}]),
])
async def test_system_role_user_puts_the_system_prompt_first_in_the_user_turn(
        system: str, expected: list[dict[str, str]]) -> None:
    handler, seen = scripted(httpx.Response(200, json=OK_BODY))
    client, _ = make_client(handler, system_role="user")
    for _ in range(2):                          # the cached template, too
        await client.complete(system, "Narrative: x")
    for request in seen:
        assert json.loads(request.content)["messages"] == expected
        assert request.content == json.dumps(client.build_body(system, "Narrative: x")).encode()
    await client.http.aclose()


@pytest.mark.parametrize("role", ["system", "user"])
async def test_a_repair_turn_and_a_resample_seed_shape_the_request(role: str) -> None:
    from asyncrunner.llm.parsing import repair_messages

    handler, seen = scripted(httpx.Response(200, json=OK_BODY))
    client, _ = make_client(handler, system_role=role, response_format="json_object")
    followup = repair_messages("{'detected': True}", "no JSON object with 'detected'")
    await client.complete("sys", "Narrative: x", followup=followup)
    await client.complete("sys", "Narrative: x", seed=77)
    await client.complete("sys", "Narrative: x")
    repair, resample, plain = (json.loads(r.content) for r in seen)
    assert repair["messages"][-2:] == followup
    assert repair["messages"][:-2] == plain["messages"]
    assert repair["seed"] == plain["seed"] == 1024 and resample["seed"] == 77
    assert resample["messages"] == plain["messages"]
    assert repair["response_format"] == {"type": "json_object"}
    assert seen[0].content == json.dumps(client.build_body(
        "sys", "Narrative: x", followup=followup)).encode()
    await client.http.aclose()


@pytest.mark.parametrize(("response", "category", "fatal"), [
    (httpx.Response(401, json={"error": {"message": "Incorrect API key provided"}}),
     "api_error", True),
    (httpx.Response(403, json={"error": {"message": "forbidden"}}), "api_error", True),
    (httpx.Response(404, json={"error": {"message": "The model `m` does not exist"}}),
     "api_error", True),
    (httpx.Response(404, text="<html><title>Not Found</title></html>"), "api_error", True),
    # 400s naming a field this client sends
    (httpx.Response(400, json={"error": {"message": "Unsupported value: 'temperature' does "
                                         "not support 0.2 with this model.",
                                         "param": "temperature"}}), "api_error", True),
    (httpx.Response(400, json={"error": {"message": "Unsupported parameter: 'max_tokens' is "
                                         "not supported with this model. Use "
                                         "'max_completion_tokens' instead."}}),
     "api_error", True),
    (httpx.Response(400, json={"object": "error", "message": "top_k must be an integer",
                               "type": "BadRequestError", "code": 400}), "api_error", True),
    (httpx.Response(422, json={"detail": [{"loc": ["body", "foo"],
                                           "msg": "Extra inputs are not permitted"}]}),
     "api_error", True),
    (httpx.Response(400, json={"error": {"code": 400, "type": "invalid_request_error",
                                         "message": "JSON schema conversion failed"}}),
     "api_error", True),
    # about this prompt only: per-narrative errors
    (httpx.Response(400, json={"error": {"message": "This model's maximum context length is "
                                         "4096 tokens"}}), "data_error", False),
    (httpx.Response(400, json={"error": {"code": 400, "type": "exceed_context_size_error",
                                         "message": "request (5000 tokens) exceeds the "
                                                    "available context size (4096 tokens), "
                                                    "try increasing it"}}),
     "data_error", False),
    (httpx.Response(400, json={"error": {"message": "Invalid prompt: your prompt was flagged "
                                         "as potentially violating our usage policy."}}),
     "api_error", False),
    (httpx.Response(413, text="too large"), "api_error", False),
    (httpx.Response(500, text="boom"), "api_error", False),
    (httpx.Response(429, text="slow"), "rate_limit", False),
])
async def test_fatal_failures_are_marked_and_not_retried(response: httpx.Response,
                                                         category: str, fatal: bool) -> None:
    from asyncrunner.llm.client import describe_fatal

    handler, seen = scripted(response)
    client, _ = make_client(handler, extra_body={"top_k": 5})
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure)
    assert (out.category, out.fatal) == (category, fatal)
    if fatal:
        assert len(seen) == 1 and not out.retryable
        line = describe_fatal(out)
        assert out.message in line and "\n" not in line


def test_describe_fatal_names_the_cause() -> None:
    from asyncrunner.llm.client import describe_fatal

    def line(status: int) -> str:
        return describe_fatal(RequestFailure("api_error", f"HTTP {status}: x", 0.1, 1,  # type: ignore[arg-type]
                                             status=status, fatal=True))
    assert "API key" in line(401) and "access" in line(403)
    assert "model" in line(404) and "request field" in line(400)


async def test_a_response_over_max_response_bytes_is_an_api_error_naming_the_limit() -> None:
    from asyncrunner.llm.client import make_http_client

    handler, seen = scripted(httpx.Response(200, content=b"x" * 2000))
    http = make_http_client(1, 5.0, transport=httpx.MockTransport(handler),
                            max_response_bytes=1000)
    settings = ClientSettings(api_url="http://h/v1", model="m", temperature=0, max_tokens=8,
                              timeout_s=5, max_attempts=3)
    async with http:
        out = await LLMClient(settings, http, AdaptiveLimiter(1)).complete("s", "u")
    assert isinstance(out, RequestFailure)
    assert (out.category, out.message, out.retryable, len(seen)) == (
        "api_error", "response larger than max_response_bytes=1000", False, 1)


async def test_the_aiohttp_transport_stops_reading_at_max_response_bytes() -> None:
    from asyncrunner.llm.client import ResponseTooLarge
    from asyncrunner.llm.transport import AiohttpTransport
    from asyncrunner.sim import MockServer

    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
    async with MockServer() as server:
        for limit, too_large in ((100, True), (100_000, False)):
            async with AiohttpTransport(max_connections=1,
                                        max_response_bytes=limit) as transport:
                request = httpx.Request("POST", server.url, content=body)
                if too_large:
                    with pytest.raises(ResponseTooLarge) as info:
                        await transport.handle_async_request(request)
                    assert info.value.limit == limit
                else:
                    response = await transport.handle_async_request(request)
                    assert response.status_code == 200


async def test_the_aiohttp_transport_counts_a_chunked_body_against_the_limit() -> None:
    import asyncio

    from asyncrunner.llm.client import ResponseTooLarge
    from asyncrunner.llm.transport import AiohttpTransport

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):
            writer.write(b"64\r\n" + b"y" * 100 + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for limit, too_large in ((500, True), (5000, False)):
            async with AiohttpTransport(max_connections=1,
                                        max_response_bytes=limit) as transport:
                request = httpx.Request("GET", f"http://127.0.0.1:{port}/")
                with anyio.fail_after(5):
                    if too_large:
                        with pytest.raises(ResponseTooLarge):
                            await transport.handle_async_request(request)
                    else:
                        response = await transport.handle_async_request(request)
                        assert len(response.content) == 2000
    finally:
        server.close()
        await server.wait_closed()
