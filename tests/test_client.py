"""The retry policy at the client edge (httpx.MockTransport: a narrow unit boundary).

The same behaviours are exercised over real HTTP against the mock server in test_faults.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from email.utils import formatdate
import time

import httpx
import pytest

from asyncrunner.client import (
    ClientSettings, Completion, LLMClient, RequestFailure, normalize_api_url, parse_retry_after,
)
from asyncrunner.throttle import AdaptiveLimiter

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


def scripted(*responses: httpx.Response | Exception) -> tuple[Callable[[httpx.Request], httpx.Response], list[httpx.Request]]:
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
    handler, seen = scripted(httpx.Response(429, headers={"Retry-After": "0.2"}),
                             httpx.Response(200, json=OK_BODY))
    client, limiter = make_client(handler)
    started = time.monotonic()
    out = await client.complete("s", "u")
    assert isinstance(out, Completion) and out.attempts == 2
    assert time.monotonic() - started >= 0.2
    assert limiter.stats().decreases == 1 and limiter.stats().limit < 4
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
    assert parse_retry_after("99999") == 300.0


def test_url_normalisation() -> None:
    assert normalize_api_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert normalize_api_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    full = "http://h:1/v1/chat/completions"
    assert normalize_api_url(full) == full
