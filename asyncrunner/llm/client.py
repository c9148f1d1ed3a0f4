"""The LLM endpoint client: request building, error mapping, retries, back-pressure.

One HTTP session (`make_http_client`: an httpx transport over aiohttp's connection pool, see
transport.py) is shared by all workers. Each request is a prepared `httpx.Request`: URL,
headers, timeouts and the JSON around the prompt are built once; per request there is one
JSON encode (the user prompt) and one call into the transport, without httpx.AsyncClient's
per-request merging of headers, cookies and URLs. Anything with an httpx-style
`send(request)` serves as the session, so tests pass an `httpx.AsyncClient` over an
`httpx.MockTransport`, or give the transport to `make_http_client`.

Every failure is translated here, at the edge, into a `RequestFailure` with a contract
error category; nothing HTTP-shaped leaves this module. What is retried, and how:

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
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import anyio
import httpx
import structlog

from asyncrunner import __version__
from asyncrunner.llm.throttle import AdaptiveLimiter, TokenBudget
from asyncrunner.vocab import ErrorCategory

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
SLOW_DOWN_STATUS = frozenset({429, 503})
MAX_RETRY_AFTER_S = 300.0
CONTEXT_TOO_LONG = ("context length", "context_length", "too long", "maximum context",
                    "too many tokens", "exceeds the context")

log = structlog.get_logger("asyncrunner.llm.client")


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
    category: ErrorCategory
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


def http_timeouts(timeout_s: float) -> dict[str, float | None]:
    """httpx's per-phase timeouts (the request's "timeout" extension): connect within
    min(timeout_s, 10) s, each read and write within timeout_s, wait for a pooled connection
    as long as it takes (the limiter already bounds what is in flight)."""
    return httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0), pool=None).as_dict()


class HttpSender(Protocol):
    """What LLMClient needs from the HTTP side; `httpx.AsyncClient` qualifies too."""

    async def send(self, request: httpx.Request) -> httpx.Response: ...

    async def aclose(self) -> None: ...


class HttpSession:
    """The HTTP side shared by all workers: one transport and its pool, used directly.

    `send` hands a prepared request to the transport and returns the response with its body
    read; a request without a "timeout" extension gets this session's. Usable as
    `async with`; closing it closes the transport.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout_s: float) -> None:
        self.transport = transport
        self.timeouts = http_timeouts(timeout_s)

    async def send(self, request: httpx.Request) -> httpx.Response:
        if "timeout" not in request.extensions:
            request.extensions = {**request.extensions, "timeout": self.timeouts}
        response = await self.transport.handle_async_request(request)
        try:
            await response.aread()      # at once for aiohttp's and MockTransport's answers
        finally:
            await response.aclose()
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> HttpSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


def make_http_client(workers: int, timeout_s: float, *,
                     transport: httpx.AsyncBaseTransport | None = None) -> HttpSession:
    """The one shared HTTP session, its pool sized to the number of workers. `transport`
    replaces the network (tests inject an httpx.MockTransport here)."""
    if transport is None:
        from asyncrunner.llm.transport import (
            AiohttpTransport,  # aiohttp loads only for commands that send
        )

        transport = AiohttpTransport(max_connections=workers)
    return HttpSession(transport, timeout_s)


# Stands for the user prompt in a pre-encoded request body; a NUL never occurs in a
# template by accident, and json.dumps encodes a string the same alone as inside a body.
_PROMPT_SLOT = "\x00asyncrunner:user-prompt\x00"
_ENCODED_SLOT = json.dumps(_PROMPT_SLOT)


class LLMClient:
    def __init__(self, settings: ClientSettings, http: HttpSender,
                 limiter: AdaptiveLimiter, *, rng: random.Random | None = None,
                 budget: TokenBudget | None = None) -> None:
        self.settings = settings
        self.http = http
        self.limiter = limiter
        self.budget = budget
        self.url = normalize_api_url(settings.api_url)
        self._rng = rng or random.Random()
        # Built once; every request shares them (nothing downstream mutates them).
        self._url = httpx.URL(self.url)
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": f"asyncrunner/{__version__}"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        self._headers = httpx.Headers(headers)
        self._extensions = {"timeout": http_timeouts(settings.timeout_s)}
        self._templates: dict[str, tuple[str, str] | None] = {}

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

    def encode_body(self, system_prompt: str, user_prompt: str) -> bytes:
        """`json.dumps(build_body(...))`, byte for byte, with one encode per request: the
        JSON around the user prompt is encoded once per system prompt."""
        try:
            template = self._templates[system_prompt]
        except KeyError:
            template = self._template(system_prompt)
        if template is None:   # extra_body replaced the messages: encode it whole
            return json.dumps(self.build_body(system_prompt, user_prompt)).encode()
        return (template[0] + json.dumps(user_prompt) + template[1]).encode()

    def _template(self, system_prompt: str) -> tuple[str, str] | None:
        encoded = json.dumps(self.build_body(system_prompt, _PROMPT_SLOT))
        head, slot, tail = encoded.partition(_ENCODED_SLOT)
        template = (head, tail) if slot and _ENCODED_SLOT not in tail else None
        if len(self._templates) >= 8:     # one system prompt per run; bound it all the same
            self._templates.clear()
        self._templates[system_prompt] = template
        return template

    def prepare(self, system_prompt: str, user_prompt: str) -> httpx.Request:
        """The request for one prompt, sent as it is on every attempt."""
        return httpx.Request("POST", self._url, headers=self._headers,
                             content=self.encode_body(system_prompt, user_prompt),
                             extensions=self._extensions)

    async def complete(self, system_prompt: str,
                       user_prompt: str) -> Completion | RequestFailure:
        """Send one prompt, retrying what is worth retrying."""
        request = self.prepare(system_prompt, user_prompt)
        prompt_chars = len(system_prompt) + len(user_prompt)
        started = time.monotonic()
        outcome: Completion | RequestFailure | None = None
        for attempt in range(1, self.settings.max_attempts + 1):
            charge = (await self.budget.reserve(self.budget.estimate(prompt_chars))
                      if self.budget else None)
            outcome = await self._attempt(request, attempt, started)
            if self.budget and charge is not None and isinstance(outcome, Completion):
                self.budget.settle(charge, prompt_chars, outcome.prompt_tokens,
                                   outcome.completion_tokens)
            if isinstance(outcome, Completion) or not outcome.retryable:
                break
            if attempt == self.settings.max_attempts:
                break
            wait = self._backoff(attempt, outcome.retry_after_s)
            log.info("retry", attempt=attempt, category=outcome.category,
                     status=outcome.status, wait_s=round(wait, 3))
            await anyio.sleep(wait)
        assert outcome is not None
        return outcome

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        s = self.settings
        ceiling = min(s.backoff_max_s, s.backoff_base_s * 2 ** (attempt - 1))
        jittered = self._rng.uniform(0.0, ceiling)
        return max(jittered, retry_after_s or 0.0)

    async def _attempt(self, request: httpx.Request, attempt: int,
                       started: float) -> Completion | RequestFailure:
        await self.limiter.acquire()
        try:
            return await self._send(request, attempt, started)
        finally:
            await self.limiter.release()

    async def _send(self, request: httpx.Request, attempt: int,
                    started: float) -> Completion | RequestFailure:
        def fail(category: ErrorCategory, message: str, **kw: Any) -> RequestFailure:
            return RequestFailure(category, message, time.monotonic() - started, attempt, **kw)

        sent_at = time.monotonic()
        try:
            # httpx's read timeout is per read; this bounds the whole exchange.
            with anyio.fail_after(self.settings.timeout_s + 1.0):
                response = await self.http.send(request)
        except (TimeoutError, httpx.TimeoutException):
            return fail(ErrorCategory.TIMEOUT, f"no response within {self.settings.timeout_s:g}s",
                        retryable=True)
        except httpx.TransportError as exc:
            return fail(ErrorCategory.API_ERROR,
                        f"{type(exc).__name__}: connection failed or dropped", retryable=True)
        return self._interpret(response, attempt, started, sent_at, fail)

    def _interpret(self, response: httpx.Response, attempt: int, started: float,
                   sent_at: float,
                   fail: Callable[..., RequestFailure]) -> Completion | RequestFailure:
        status = response.status_code
        text = _body_text(response)
        if status != 200:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status in SLOW_DOWN_STATUS:
                self.limiter.on_slow_down(retry_after, sent_at)
            detail = _error_detail(text)
            category = ErrorCategory.RATE_LIMIT if status == 429 else ErrorCategory.API_ERROR
            if status == 400 and any(k in detail.lower() for k in CONTEXT_TOO_LONG):
                return fail(ErrorCategory.DATA_ERROR, f"HTTP 400: prompt too long: {detail}",
                            status=status, raw=text[:2000])
            retryable = status in RETRYABLE_STATUS or status >= 500
            return fail(category, f"HTTP {status}: {detail}", status=status,
                        retryable=retryable, retry_after_s=retry_after, raw=text[:2000])
        try:
            payload = json.loads(text)
            choice = payload["choices"][0]
            content = choice["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return fail(ErrorCategory.API_ERROR, "HTTP 200 but the body is not a chat completion",
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


def _body_text(response: httpx.Response) -> str:
    """`response.text`, without httpx's charset parsing (an email.message.Message per
    response) when the body is UTF-8 or says no charset: then httpx decodes UTF-8 with
    replacement too, and so does this."""
    content_type = response.headers.get("content-type", "").lower()
    if "charset" not in content_type or "charset=utf-8" in content_type:
        return response.content.decode("utf-8", errors="replace")
    return response.text


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
