"""The LLM endpoint client: request building, error mapping, retries, back-pressure.

One `httpx.AsyncClient` is shared by all workers. Every failure is translated here, at the
edge, into a `RequestFailure` with a contract error category; nothing HTTP-shaped leaves
this module. What is retried, and how:

    retried (up to run.max_attempts, exponential backoff with full jitter, Retry-After honoured)
        timeout      connect/read/write/pool timeouts, or the whole request over timeout_s
        api_error    connection refused/reset/dropped, 408 409 425 500 502 503 504 (any 5xx),
                     a 200 whose body is not a chat completion
        rate_limit   429 (also slows every worker down, see throttle.py; 503 does too)
    not retried
        data_error   400 saying the prompt is too long for the model's context
        api_error    any other 4xx (bad key, unknown model, bad request)
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import structlog

from .throttle import AdaptiveLimiter, TokenBudget

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
SLOW_DOWN_STATUS = frozenset({429, 503})
MAX_RETRY_AFTER_S = 300.0
CONTEXT_TOO_LONG = ("context length", "context_length", "too long", "maximum context",
                    "too many tokens", "exceeds the context")

log = structlog.get_logger("asyncrunner.client")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    api_url: str
    model: str
    temperature: float
    max_tokens: int
    timeout_s: float
    max_attempts: int
    seed: int | None = None
    api_key: str | None = None
    response_format: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Completion:
    content: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    response_sec: float
    attempts: int
    raw: str


@dataclass(frozen=True, slots=True)
class RequestFailure:
    category: str
    message: str
    response_sec: float
    attempts: int
    retryable: bool = False
    retry_after_s: float | None = None
    status: int | None = None
    raw: str | None = None


def normalize_api_url(url: str) -> str:
    """Accept a base URL ending in /v1 as well as the full chat-completions URL."""
    trimmed = url.rstrip("/")
    if trimmed.endswith("/v1"):
        return trimmed + "/chat/completions"
    return trimmed


def redact_url(url: str) -> str:
    """The URL as stored and logged: no user:password, no query string (keys hide there)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid url>"
    return str(parsed.copy_with(userinfo=b"", query=None))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def make_http_client(workers: int, timeout_s: float) -> httpx.AsyncClient:
    """The one shared client, its pool sized to the number of workers."""
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0), pool=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


class LLMClient:
    def __init__(self, settings: ClientSettings, http: httpx.AsyncClient,
                 limiter: AdaptiveLimiter, *, rng: random.Random | None = None,
                 budget: TokenBudget | None = None) -> None:
        self.settings = settings
        self.http = http
        self.limiter = limiter
        self.budget = budget
        self.url = normalize_api_url(settings.api_url)
        self._rng = rng or random.Random()
        self._headers = {"Content-Type": "application/json"}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"

    def build_body(self, system_prompt: str, user_prompt: str) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {
            "model": s.model,
            "messages": [
                {"role": "system", "content": system_prompt},
                {"role": "user", "content": user_prompt},
            ],
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
        }
        if s.seed is not None:
            body["seed"] = s.seed
        if s.response_format:
            body["response_format"] = {"type": s.response_format}
        body.update(s.extra_body)
        return body

    async def complete(self, system_prompt: str, user_prompt: str,
                       **context: Any) -> Completion | RequestFailure:
        """Send one prompt, retrying what is worth retrying. `context` (ids) goes to logs."""
        body = json.dumps(self.build_body(system_prompt, user_prompt))
        prompt_chars = len(system_prompt) + len(user_prompt)
        started = time.monotonic()
        outcome: Completion | RequestFailure | None = None
        for attempt in range(1, self.settings.max_attempts + 1):
            charge = (await self.budget.reserve(self.budget.estimate(prompt_chars))
                      if self.budget else None)
            outcome = await self._attempt(body, attempt, started)
            if self.budget and charge is not None and isinstance(outcome, Completion):
                self.budget.settle(charge, prompt_chars, outcome.prompt_tokens,
                                   outcome.completion_tokens)
            if isinstance(outcome, Completion) or not outcome.retryable:
                break
            if attempt == self.settings.max_attempts:
                break
            wait = self._backoff(attempt, outcome.retry_after_s)
            log.info("retry", attempt=attempt, category=outcome.category,
                     status=outcome.status, wait_s=round(wait, 3), **context)
            await anyio.sleep(wait)
        assert outcome is not None
        return outcome

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        s = self.settings
        ceiling = min(s.backoff_max_s, s.backoff_base_s * 2 ** (attempt - 1))
        jittered = self._rng.uniform(0.0, ceiling)
        return max(jittered, retry_after_s or 0.0)

    async def _attempt(self, body: str, attempt: int,
                       started: float) -> Completion | RequestFailure:
        await self.limiter.acquire()
        try:
            return await self._send(body, attempt, started)
        finally:
            await self.limiter.release()

    async def _send(self, body: str, attempt: int, started: float) -> Completion | RequestFailure:
        def fail(category: str, message: str, **kw: Any) -> RequestFailure:
            return RequestFailure(category, message, time.monotonic() - started, attempt, **kw)

        sent_at = time.monotonic()
        try:
            # httpx's read timeout is per read; this bounds the whole exchange.
            with anyio.fail_after(self.settings.timeout_s + 1.0):
                response = await self.http.post(self.url, content=body, headers=self._headers)
        except (TimeoutError, httpx.TimeoutException):
            return fail("timeout", f"no response within {self.settings.timeout_s:g}s",
                        retryable=True)
        except httpx.TransportError as exc:
            return fail("api_error", f"{type(exc).__name__}: connection failed or dropped",
                        retryable=True)
        return self._interpret(response, attempt, started, sent_at, fail)

    def _interpret(self, response: httpx.Response, attempt: int, started: float,
                   sent_at: float, fail: Any) -> Completion | RequestFailure:
        status = response.status_code
        text = response.text
        if status != 200:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status in SLOW_DOWN_STATUS:
                self.limiter.on_slow_down(retry_after, sent_at)
            detail = _error_detail(text)
            category = "rate_limit" if status == 429 else "api_error"
            if status == 400 and any(k in detail.lower() for k in CONTEXT_TOO_LONG):
                return fail("data_error", f"HTTP 400: prompt too long: {detail}",
                            status=status, raw=text[:2000])
            retryable = status in RETRYABLE_STATUS or status >= 500
            return fail(category, f"HTTP {status}: {detail}", status=status,
                        retryable=retryable, retry_after_s=retry_after, raw=text[:2000])
        try:
            payload = json.loads(text)
            choice = payload["choices"][0]
            content = choice["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return fail("api_error", "HTTP 200 but the body is not a chat completion",
                        status=status, retryable=True, raw=text[:2000])
        self.limiter.on_success()
        usage = payload.get("usage") or {}
        return Completion(
            content=content if isinstance(content, str) else None,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")),
            response_sec=time.monotonic() - started,
            attempts=attempt,
            raw=text,
        )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_detail(text: str) -> str:
    """A short, single-line reason from an error body (JSON error message or HTML title)."""
    try:
        payload = json.loads(text)
        err = payload.get("error") if isinstance(payload, dict) else None
        message = err.get("message") if isinstance(err, dict) else err
        if message:
            return " ".join(str(message).split())[:200]
    except ValueError:
        pass
    lowered = text.lower()
    if "<title>" in lowered:
        start = lowered.index("<title>") + 7
        end = lowered.find("</title>", start)
        return " ".join(text[start:end if end > 0 else start + 100].split())[:200]
    return " ".join(text.split())[:200] or "empty body"
