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
        rate_limit   429 (also slows every worker down, see throttle.py; 503 does too;
                     in a pool of several endpoints only the endpoint that said it)
    not retried
        data_error   400 saying the prompt is too long for the model's context (OpenAI's,
                     vLLM's and llama.cpp's wordings, and llama.cpp's exceed_context_size_error)
        api_error    any other 4xx (bad key, unknown model, bad request), and a response
                     larger than the session's max_response_bytes ("response larger than
                     max_response_bytes=N")

Endpoint pools (`ClientSettings.pool`, router.py): each attempt goes to the endpoint the pool
picks, with that endpoint's URL and key. An attempt that failed because its endpoint failed
(`endpoint_failure`: no connection, dropped, timed out, 5xx) is sent again at once to
another endpoint without using up one of the max_attempts, while another is healthy, at
most `pool.max_failovers` times per prompt; every outcome names its endpoint (redacted).
Without a pool the client makes a pool of one of `api_url`: every request goes there,
exactly as before pools existed.

Fatal failures (`RequestFailure.fatal`, `describe_fatal`): 401 and 403 (bad or missing
key), 404 (unknown model or path), and a 400/422 that names a field of the request (its
OpenAI `param`, a key the body carries such as `response_format`, `temperature` or an
`extra_body` key, or "unsupported/unknown parameter", "extra inputs are not permitted"). No
narrative can succeed after one of these, so the run stops at the first. So it does when no
endpoint of the pool has answered for run.endpoint_down_s (the failure's message says which
endpoint failed how; it has no status). A 400 about the prompt's length stays a
per-narrative `data_error`, and other 400s (a content filter, say) stay per-narrative
`api_error`s.

Request shape: `ClientSettings.response_format` is the structured-output mode
(`json_schema`, `json_object`, or None/"none": no field; see answer_schema.py, whose bounded
schema is sent unless `response_schema` replaces it), `system_role` "system" sends the system
prompt as a system message and "user" puts it at the start of the user turn, joined by a
blank line (for chat templates without a system role, e.g. Gemma's). A parse-retry request
(`complete(..., followup=..., seed=...)`) adds turns after the user prompt (the repair turn of
parsing.repair_messages) or replaces the seed (a resample); it is encoded whole, once.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import anyio
import httpx
import structlog

from asyncrunner import __version__
from asyncrunner.llm.answer_schema import (
    error_message,
    names_response_format,
    response_format_payload,
)
from asyncrunner.llm.router import Endpoint, EndpointPool, EndpointSettings
from asyncrunner.llm.throttle import AdaptiveLimiter, TokenBudget
from asyncrunner.vocab import ErrorCategory

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
SLOW_DOWN_STATUS = frozenset({429, 503})
DEFAULT_MAX_RETRY_AFTER_S = 300.0
CONTEXT_TOO_LONG = ("context length", "context_length", "too long", "maximum context",
                    "too many tokens", "exceeds the context", "context size",
                    "exceed_context_size")
FATAL_STATUS = frozenset({401, 403, 404})
# A 400/422 with one of these names a request field the endpoint does not take.
BAD_FIELD_PHRASES = ("unsupported parameter", "unknown parameter", "unrecognized request argument",
                     "extra inputs are not permitted", "extra_forbidden", "invalid parameter",
                     "unknown field", "unrecognized field", "not supported with this model")
SYSTEM_ROLES = ("system", "user")
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024

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
    api_key: str | None = field(default=None, repr=False)
    response_format: str | None = None        # json_schema | json_object | None ("none")
    extra_body: dict[str, Any] = field(default_factory=dict)
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S   # a longer Retry-After is capped
    system_role: str = "system"                # system | user
    response_schema: dict[str, Any] | None = None   # replaces the bounded answer schema
    # The endpoints to route through (router.py), shared by every client of a run; None:
    # api_url alone (with api_key), as a pool of one of the client's own.
    pool: EndpointPool | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)            # not frozen: one per answer (see pipeline/messages.py)
class Completion:
    content: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    response_sec: float
    attempts: int
    raw: str
    endpoint: str | None = None     # the redacted URL of the endpoint that answered


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
    fatal: bool = False     # no other request can succeed either: stop the run
    endpoint: str | None = None     # the redacted URL of the endpoint it failed on


class ResponseTooLarge(httpx.TransportError):
    """The response body is larger than the session allows (`max_response_bytes`)."""

    def __init__(self, limit: int, request: httpx.Request | None = None) -> None:
        super().__init__(f"response larger than max_response_bytes={limit}", request=request)
        self.limit = limit


def describe_fatal(failure: RequestFailure) -> str:
    """The one line an operator reads when a fatal failure stops the run. A fatal failure
    without a status is the pool's own (no endpoint has answered for run.endpoint_down_s):
    its message is that line."""
    status = failure.status
    if status is None:
        return failure.message
    if status == 401:
        hint = "the endpoint rejected the API key; check model.api_key_env and the key"
    elif status == 403:
        hint = "the endpoint refused access; check the API key's permissions"
    elif status == 404:
        hint = "the endpoint does not know this model or path; check model.name and api_url"
    else:
        hint = ("the endpoint rejected a request field; check model.response_format, "
                "model.extra_body and the model settings")
    return f"{hint} ({failure.message})"


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


def redact_endpoint_urls(endpoints: object) -> object:
    """model.endpoints as stored and logged: each URL normalized and redacted."""
    if not isinstance(endpoints, list):
        return endpoints
    return [{**e, "api_url": redact_url(normalize_api_url(str(e.get("api_url", ""))))}
            if isinstance(e, dict) else e for e in endpoints]


def redact_model_urls(model: Mapping[str, Any]) -> dict[str, Any]:
    """A config's `model` mapping as stored and logged: api_url and every endpoint URL
    normalized and redacted."""
    out = dict(model)
    if isinstance(out.get("api_url"), str):
        out["api_url"] = redact_url(normalize_api_url(out["api_url"]))
    if "endpoints" in out:
        out["endpoints"] = redact_endpoint_urls(out["endpoints"])
    return out


def endpoint_settings(url: str, *, weight: float = 1.0, max_concurrency: int | None = None,
                      api_key: str | None = None) -> EndpointSettings:
    """One endpoint of a pool: its URL completed as requests are posted to it, and labelled
    (stored, logged) redacted."""
    url = normalize_api_url(url)
    return EndpointSettings(url, redact_url(url), weight=weight,
                            max_concurrency=max_concurrency, api_key=api_key)


def endpoint_failure(failure: RequestFailure) -> bool:
    """Whether the endpoint failed rather than the request: no connection, dropped, timed
    out, or a 5xx (router.py cools such an endpoint down; a pool retries elsewhere)."""
    return failure.retryable and (failure.status is None or failure.status >= 500)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date; seconds from now, uncapped
    (the client caps it at max_retry_after_s and says so)."""
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
    return max(seconds, 0.0)


# The whole exchange may take this much longer than one read may (EXCHANGE_SLACK_S).
EXCHANGE_SLACK_S = 1.0


def http_timeouts(timeout_s: float) -> dict[str, float | None]:
    """httpx's per-phase timeouts (the request's "timeout" extension): connect within
    min(timeout_s, 10) s, each read and write within timeout_s, wait for a pooled connection
    as long as it takes (the limiter already bounds what is in flight). Plus "total", ours:
    the bound on the whole exchange (a server dripping bytes never trips a per-read one)."""
    return {**httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0), pool=None).as_dict(),
            "total": timeout_s + EXCHANGE_SLACK_S}


class HttpSender(Protocol):
    """What LLMClient needs from the HTTP side. `HttpSession` (make_http_client) is what
    runs use; `httpx.AsyncClient` qualifies too (tests), but bounds each phase of an
    exchange only, not the whole of it (the "total" timeout is HttpSession's)."""

    async def send(self, request: httpx.Request) -> httpx.Response: ...

    async def aclose(self) -> None: ...


class HttpSession:
    """The HTTP side shared by all workers: one transport and its pool, used directly.

    `send` hands a prepared request to the transport and returns the response with its body
    read; a request without a "timeout" extension gets this session's. The exchange ends
    with TimeoutError after the extension's "total" seconds: the aiohttp transport keeps
    that bound itself (`bounds_total`: one timer less per request, on the hot path), other
    transports are bounded here. A body larger than `max_response_bytes` raises
    `ResponseTooLarge` (the aiohttp transport stops reading at the limit; other transports
    are checked after reading). Usable as `async with`; closing it closes the transport.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout_s: float,
                 max_response_bytes: int | None = None) -> None:
        self.transport = transport
        self.timeouts = http_timeouts(timeout_s)
        self.max_response_bytes = max_response_bytes
        self._bounded = bool(getattr(transport, "bounds_total", False))

    async def send(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout")
        if timeouts is None:
            timeouts = self.timeouts
            request.extensions = {**request.extensions, "timeout": timeouts}
        total = None if self._bounded else timeouts.get("total")
        if total is None:
            response = await self._exchange(request)
        else:
            with anyio.fail_after(total):     # the body read included
                response = await self._exchange(request)
        limit = self.max_response_bytes
        if limit is not None and len(response.content) > limit:
            raise ResponseTooLarge(limit, request)
        return response

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
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
                     transport: httpx.AsyncBaseTransport | None = None,
                     max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
                     ) -> HttpSession:
    """The one shared HTTP session, its pool sized to the number of workers. `transport`
    replaces the network (tests inject an httpx.MockTransport here). A response body over
    `max_response_bytes` (None: no limit) is an api_error naming the limit."""
    if transport is None:
        from asyncrunner.llm.transport import (
            AiohttpTransport,  # aiohttp loads only for commands that send
        )

        transport = AiohttpTransport(max_connections=workers,
                                     max_response_bytes=max_response_bytes)
    return HttpSession(transport, timeout_s, max_response_bytes)


# Stands for the user prompt in a pre-encoded request body; a NUL never occurs in a
# template by accident, and json.dumps encodes a string the same alone as inside a body.
_PROMPT_SLOT = "\x00asyncrunner:user-prompt\x00"
_ENCODED_SLOT = json.dumps(_PROMPT_SLOT)


Message = Mapping[str, Any]


class LLMClient:
    def __init__(self, settings: ClientSettings, http: HttpSender,
                 limiter: AdaptiveLimiter, *, rng: random.Random | None = None,
                 budget: TokenBudget | None = None) -> None:
        if settings.system_role not in SYSTEM_ROLES:
            raise ValueError(f"system_role must be system or user, got {settings.system_role!r}")
        self.settings = settings
        self.http = http
        self.limiter = limiter
        self.budget = budget
        self.url = normalize_api_url(settings.api_url)
        self._rng = rng or random.Random()
        # Built once; every request shares them (nothing downstream mutates them).
        self._url = httpx.URL(self.url)
        self._headers = _headers(settings.api_key)
        self._extensions = {"timeout": http_timeouts(settings.timeout_s)}
        self.pool = settings.pool if settings.pool is not None else EndpointPool(
            [endpoint_settings(self.url, api_key=settings.api_key)],
            probe_hold_s=settings.timeout_s + 1.0)
        # Per endpoint of the pool (by Endpoint.index): the URL and headers posted to.
        self._wire = [(httpx.URL(ep.settings.api_url), _headers(ep.settings.api_key))
                      for ep in self.pool.endpoints]
        self._templates: dict[str, tuple[str, str] | None] = {}
        self.response_format = response_format_payload(
            settings.response_format, settings.max_tokens, schema=settings.response_schema)
        # The top-level fields this client sends: a 400 naming one of them is fatal.
        self._fields = frozenset(self.build_body("", "")) - {"messages"}

    def user_content(self, system_prompt: str, user_prompt: str) -> str:
        """The user turn's text: with system_role "user" the system prompt comes first."""
        if self.settings.system_role == "user" and system_prompt:
            return f"{system_prompt}\n\n{user_prompt}"
        return user_prompt

    def messages(self, system_prompt: str, user_content: str,
                 followup: Sequence[Message] = ()) -> list[dict[str, Any]]:
        turns: list[dict[str, Any]] = []
        if self.settings.system_role == "system":
            turns.append({"role": "system", "content": system_prompt})
        turns.append({"role": "user", "content": user_content})
        turns.extend(dict(turn) for turn in followup)
        return turns

    def build_body(self, system_prompt: str, user_prompt: str, *,
                   followup: Sequence[Message] = (), seed: int | None = None) -> dict[str, Any]:
        """The request body; `followup` turns go after the user prompt, `seed` replaces the
        run's seed (both for parse retries)."""
        return self._body(self.messages(system_prompt,
                                        self.user_content(system_prompt, user_prompt), followup),
                          seed)

    def _body(self, messages: list[dict[str, Any]], seed: int | None) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {
            "model": s.model,
            "messages": messages,
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
        }
        seed = s.seed if seed is None else seed
        if seed is not None:
            body["seed"] = seed
        if self.response_format is not None:
            body["response_format"] = self.response_format
        body.update(s.extra_body)
        return body

    def encode_body(self, system_prompt: str, user_prompt: str, *,
                    followup: Sequence[Message] = (), seed: int | None = None) -> bytes:
        """`json.dumps(build_body(...))`, byte for byte, with one encode per request: the
        JSON around the user prompt is encoded once per system prompt. A parse retry
        (followup turns or another seed) is rare and encoded whole."""
        if followup or seed is not None:
            return json.dumps(self.build_body(system_prompt, user_prompt, followup=followup,
                                              seed=seed)).encode()
        try:
            template = self._templates[system_prompt]
        except KeyError:
            template = self._template(system_prompt)
        if template is None:   # extra_body replaced the messages: encode it whole
            return json.dumps(self.build_body(system_prompt, user_prompt)).encode()
        content = self.user_content(system_prompt, user_prompt)
        return (template[0] + json.dumps(content) + template[1]).encode()

    def _template(self, system_prompt: str) -> tuple[str, str] | None:
        encoded = json.dumps(self._body(self.messages(system_prompt, _PROMPT_SLOT), None))
        head, slot, tail = encoded.partition(_ENCODED_SLOT)
        template = (head, tail) if slot and _ENCODED_SLOT not in tail else None
        if len(self._templates) >= 8:     # one system prompt per run; bound it all the same
            self._templates.clear()
        self._templates[system_prompt] = template
        return template

    def prepare(self, system_prompt: str, user_prompt: str, *,
                followup: Sequence[Message] = (), seed: int | None = None) -> httpx.Request:
        """The request for one prompt, sent as it is on every attempt."""
        return httpx.Request("POST", self._url, headers=self._headers,
                             content=self.encode_body(system_prompt, user_prompt,
                                                      followup=followup, seed=seed),
                             extensions=self._extensions)

    async def complete(self, system_prompt: str, user_prompt: str, *,
                       followup: Sequence[Message] = (),
                       seed: int | None = None) -> Completion | RequestFailure:
        """Send one prompt, retrying what is worth retrying. `followup` and `seed` shape a
        parse retry (see build_body).

        Each attempt goes to the endpoint the pool picks. One that failed because its
        endpoint failed (endpoint_failure) is sent again at once to another endpoint,
        without using up an attempt, while another is healthy: at most
        pool.max_failovers times per prompt (none in a pool of one). Other retries wait
        their backoff and prefer another endpoint too. When no endpoint has answered for
        run.endpoint_down_s the outcome is a fatal failure saying so."""
        body = self.encode_body(system_prompt, user_prompt, followup=followup, seed=seed)
        prompt_chars = (len(system_prompt) + len(user_prompt)
                        + sum(len(str(turn.get("content") or "")) for turn in followup))
        started = time.monotonic()
        pool = self.pool
        attempt, sent, failovers = 1, 0, 0
        avoid: Endpoint | None = None
        while True:
            charge = (await self.budget.reserve(self.budget.estimate(prompt_chars))
                      if self.budget else None)
            sent += 1
            outcome, ep = await self._attempt(body, sent, started, avoid)
            if self.budget and charge is not None and isinstance(outcome, Completion):
                self.budget.settle(charge, prompt_chars, outcome.prompt_tokens,
                                   outcome.completion_tokens)
            if isinstance(outcome, Completion) or not outcome.retryable or ep is None:
                return outcome
            avoid = ep
            if endpoint_failure(outcome):
                down = pool.down_message()
                if down is not None:
                    return self._down(down, started, sent)
                if failovers < pool.max_failovers and pool.other_healthy(ep):
                    failovers += 1
                    log.info("failover", endpoint=ep.label, category=outcome.category,
                             status=outcome.status, failovers=failovers)
                    continue
            if attempt >= self.settings.max_attempts:
                return outcome
            # A Retry-After holds back its own endpoint (its limiter); in a pool the retry
            # may go elsewhere without waiting for it.
            elsewhere = pool.max_failovers > 0 and pool.other_healthy(ep)
            wait = self._backoff(attempt, None if elsewhere else outcome.retry_after_s)
            log.info("retry", attempt=attempt, category=outcome.category,
                     status=outcome.status, wait_s=round(wait, 3))
            await anyio.sleep(wait)
            attempt += 1

    def _down(self, message: str, started: float, sent: int) -> RequestFailure:
        return RequestFailure(ErrorCategory.API_ERROR, message, time.monotonic() - started,
                              sent, fatal=True)

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        s = self.settings
        ceiling = min(s.backoff_max_s, s.backoff_base_s * 2 ** (attempt - 1))
        jittered = self._rng.uniform(0.0, ceiling)
        return max(jittered, retry_after_s or 0.0)

    async def _attempt(self, body: bytes, sent: int, started: float, avoid: Endpoint | None,
                       ) -> tuple[Completion | RequestFailure, Endpoint | None]:
        """One request: a slot of the run's limiter, an endpoint (and a slot of its own
        limiter, in a pool of several), the exchange. No endpoint: the pool's down message,
        as a fatal failure."""
        await self.limiter.acquire()
        try:
            pool = self.pool
            ep = pool.pick(avoid)
            if ep is None:
                found = await pool.wait(avoid)
                if isinstance(found, str):
                    return self._down(found, started, sent), None
                ep = found
            try:
                own = ep.limiter
                if own is None:
                    return await self._send(self._request(ep, body), sent, started, ep), ep
                await own.acquire()
                try:
                    return await self._send(self._request(ep, body), sent, started, ep), ep
                finally:
                    await own.release()
            finally:
                pool.release(ep)
        finally:
            await self.limiter.release()

    def _request(self, ep: Endpoint, body: bytes) -> httpx.Request:
        url, headers = self._wire[ep.index]
        return httpx.Request("POST", url, headers=headers, content=body,
                             extensions=self._extensions)

    async def _send(self, request: httpx.Request, attempt: int, started: float,
                    ep: Endpoint) -> Completion | RequestFailure:
        label = ep.label

        def fail(category: ErrorCategory, message: str, **kw: Any) -> RequestFailure:
            return RequestFailure(category, message, time.monotonic() - started, attempt,
                                  endpoint=label, **kw)

        sent_at = time.monotonic()
        outcome: Completion | RequestFailure
        try:
            # Bounded as a whole by the "total" timeout (http_timeouts): see HttpSession.
            response = await self.http.send(request)
        except (TimeoutError, httpx.TimeoutException):
            outcome = fail(ErrorCategory.TIMEOUT,
                           f"no response within {self.settings.timeout_s:g}s", retryable=True)
        except ResponseTooLarge as exc:
            outcome = fail(ErrorCategory.API_ERROR, str(exc))
        except httpx.TransportError as exc:
            outcome = fail(ErrorCategory.API_ERROR,
                           f"{type(exc).__name__}: connection failed or dropped",
                           retryable=True)
        else:
            outcome = self._interpret(response, attempt, started, sent_at, fail, ep)
        self._record(ep, outcome, sent_at)
        return outcome

    def _record(self, ep: Endpoint, outcome: Completion | RequestFailure,
                sent_at: float) -> None:
        """Tell the pool how the endpoint did (its health and counters)."""
        now = time.monotonic()
        if isinstance(outcome, Completion):
            self.pool.succeeded(ep, now, now - sent_at)
        elif endpoint_failure(outcome):
            self.pool.failed(ep, now, sent_at, outcome.message)
        else:
            self.pool.answered(ep, now)

    def _interpret(self, response: httpx.Response, attempt: int, started: float,
                   sent_at: float, fail: Callable[..., RequestFailure],
                   ep: Endpoint) -> Completion | RequestFailure:
        status = response.status_code
        text = _body_text(response)
        if status != 200:
            asked = parse_retry_after(response.headers.get("retry-after"))
            cap = self.settings.max_retry_after_s
            retry_after = min(asked, cap) if asked is not None else None
            if status in SLOW_DOWN_STATUS:
                reason = f"HTTP {status}"
                if asked is not None:
                    reason += f", Retry-After {asked:g}s"
                    if asked > cap:
                        reason += f" (capped at run.max_retry_after_s={cap:g}s)"
                # In a pool of several the endpoint's own limiter slows down, not the run's.
                (ep.limiter or self.limiter).on_slow_down(retry_after, sent_at, reason)
            detail = _error_detail(text)
            category = ErrorCategory.RATE_LIMIT if status == 429 else ErrorCategory.API_ERROR
            if status == 400 and _context_too_long(detail, text):
                return fail(ErrorCategory.DATA_ERROR, f"HTTP 400: prompt too long: {detail}",
                            status=status, raw=text[:2000])
            retryable = status in RETRYABLE_STATUS or status >= 500
            return fail(category, f"HTTP {status}: {detail}", status=status,
                        retryable=retryable, retry_after_s=retry_after, raw=text[:2000],
                        fatal=self._fatal(status, text))
        try:
            payload = json.loads(text)
            choice = payload["choices"][0]
            content = choice["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return fail(ErrorCategory.API_ERROR, "HTTP 200 but the body is not a chat completion",
                        status=status, retryable=True, raw=text[:2000])
        self.limiter.on_success()
        if ep.limiter is not None:
            ep.limiter.on_success()
        usage = payload.get("usage") or {}
        return Completion(
            content=content if isinstance(content, str) else None,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")),
            response_sec=time.monotonic() - started,
            attempts=attempt,
            raw=text,
            endpoint=ep.label,
        )

    def _fatal(self, status: int, text: str) -> bool:
        """401/403/404, or a 400/422 naming a field this client sends (see module doc)."""
        if status in FATAL_STATUS:
            return True
        if status not in (400, 422):
            return False
        return names_request_field(text, self._fields)


def _headers(api_key: str | None) -> httpx.Headers:
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "User-Agent": f"asyncrunner/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.Headers(headers)


def names_request_field(body: str, fields: frozenset[str] | set[str]) -> bool:
    """True when an error body says a request field (one of `fields`, `messages` aside)
    is wrong or unknown, rather than something about this one prompt."""
    message, param = error_message(body)
    lowered = message.lower()
    if param is not None and param.split(".")[0].split("[")[0] in fields:
        return True
    if names_response_format(message, param) or any(p in lowered for p in BAD_FIELD_PHRASES):
        return True
    return any(re.search(rf"(?<![a-z_]){re.escape(name.lower())}(?![a-z_])", lowered)
               for name in fields if name != "messages")


def _context_too_long(detail: str, body: str) -> bool:
    lowered = detail.lower()
    return (any(k in lowered for k in CONTEXT_TOO_LONG)
            or "exceed_context_size" in body)


def _body_text(response: httpx.Response) -> str:
    """`response.text`, without httpx's charset parsing (an email.message.Message per
    response) when the body is UTF-8 or says no charset: then httpx decodes UTF-8 with
    replacement too, and so does this. The header is read from the raw list: httpx's
    case-insensitive lookup costs more than the rest of this per answer."""
    content_type = b", ".join(value for key, value in response.headers.raw
                              if key.lower() == b"content-type").lower()
    if b"charset" not in content_type or b"charset=utf-8" in content_type:
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
        if not message and isinstance(payload, dict) and payload.get("object") == "error":
            message = payload.get("message")     # vLLM's older error shape
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
