"""The built-in simulated LLM: an OpenAI-compatible chat-completions server with fault injection.

This module owns:
  * the deterministic keyword "model" (`IPV_CUES`, `classify_text`) that answers the research
    question (IPV indicators in a suicide case narrative) with the JSON the prompt asks for;
  * `MockServer`, a tiny HTTP/1.1 server written directly on asyncio streams. No web framework:
    the point is full control over the wire, so faults (hangs, resets, HTML 502s, truncated or
    fenced answers, 429 with or without Retry-After) can be injected exactly and reproducibly;
  * request statistics for tests and benchmarks (`ServerStats`), which never hold request text;
  * `serve_forever`, the blocking entry point of `asyncrunner mock-server`.

Endpoints: POST /v1/chat/completions and /chat/completions, GET /v1/models, GET /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import signal
import time
from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

# Canonical cue phrases the simulated model looks for (lower case). synth.py phrases its
# positive narratives with these, so the demo's metrics are meaningful.
IPV_CUES: tuple[str, ...] = (
    "partner",
    "boyfriend",
    "girlfriend",
    "husband",
    "wife",
    "spouse",
    "fiance",
    "ex-",
    "domestic",
    "restraining order",
    "protective order",
    "argument with",
    "jealous",
    "abuse",
    "strangle",
    "choke",
    "stalk",
)

# Share of texts whose answer is flipped: a stable "model error" so metrics are not perfect.
NOISE_PERCENT = 8

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})
HEALTH_PATHS = frozenset({"/health", "/v1/health"})

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024
STOP_GRACE_S = 0.5

_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable",
}

_BAD_GATEWAY_HTML = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


# --------------------------------------------------------------------------- the "model"


def _cue_pattern(cue: str) -> re.Pattern[str]:
    # Word-ish boundaries so "wife" does not fire inside "housewife"; a few inflections
    # ("abused", "strangled", "partners") count as the same cue.
    tail = r"(?:s|d|ed|es|er|ers|ing|ive|y)?(?![a-z])" if cue[-1].isalpha() else ""
    return re.compile(r"(?<![a-z])" + re.escape(cue) + tail)


_CUE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (cue, _cue_pattern(cue)) for cue in IPV_CUES)


@dataclass(frozen=True, slots=True)
class Classification:
    """The simulated model's answer for one text."""

    detected: bool
    confidence: float
    indicators: tuple[str, ...]
    rationale: str

    def to_json(self) -> str:
        return json.dumps({
            "detected": self.detected,
            "confidence": self.confidence,
            "indicators": list(self.indicators),
            "rationale": self.rationale,
        })


def find_cues(text: str) -> tuple[str, ...]:
    """The `IPV_CUES` present in `text`, in `IPV_CUES` order."""
    lowered = text.lower()
    # The plain substring test first: it is far cheaper than the regex and usually fails.
    return tuple(cue for cue, pattern in _CUE_PATTERNS
                 if cue in lowered and pattern.search(lowered))


# Any fixed salt gives a stable ~8% flip; this one keeps the short fixture narratives of the
# test suite (tests/conftest.py) out of the flipped share, so tests can reason by keyword.
_HASH_SALT = b"mock-noise-16:"


def _text_hash(text: str) -> int:
    digest = hashlib.sha256(_HASH_SALT + text.encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big")


def classify_text(text: str) -> Classification:
    """Keyword rule plus a stable ~8% flip; the same text always gets the same answer."""
    cues = find_cues(text)
    h = _text_hash(text)
    flipped = h % 100 < NOISE_PERCENT
    wobble = ((h >> 8) % 1000) / 1000.0  # 0..1, independent of the flip decision
    detected = bool(cues) != flipped
    if flipped:
        # A wrong answer comes with a hesitant confidence, as real models tend to give.
        confidence = 0.5 + 0.2 * wobble
    elif cues:
        confidence = min(0.99, 0.7 + 0.07 * len(cues) + 0.1 * wobble)
    else:
        confidence = 0.75 + 0.2 * wobble
    if detected and cues:
        indicators = cues
        rationale = "The narrative mentions " + ", ".join(repr(c) for c in cues) + "."
    elif detected:
        indicators = ("possible relationship conflict",)
        rationale = "The circumstances suggest possible relationship conflict."
    elif cues:
        indicators = ()
        rationale = "Relationship terms appear but not in a context of partner violence."
    else:
        indicators = ()
        rationale = "No intimate partner violence indicators are mentioned."
    return Classification(detected, round(confidence, 2), indicators, rationale)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Per-request fault probabilities (each 0..1, sum <= 1), drawn with a seeded RNG."""

    error_rate: float = 0.0        # HTTP 500 JSON error
    rate_429: float = 0.0          # HTTP 429, with Retry-After unless retry_after_s is None
    rate_503: float = 0.0          # HTTP 503 JSON error
    rate_502_html: float = 0.0     # HTTP 502 with an HTML body (a proxy in front of the model)
    hang_rate: float = 0.0         # never answer (until the client leaves or hang_s passes)
    reset_rate: float = 0.0        # drop the connection without any response
    malformed_rate: float = 0.0    # 200, content is prose, not JSON
    fenced_rate: float = 0.0       # 200, JSON inside ```json fences with prose around it
    reasoning_rate: float = 0.0    # 200, harmony-style analysis channel before the final JSON
    truncate_rate: float = 0.0     # 200, JSON cut in half, finish_reason "length"
    retry_after_s: float | None = 1.0
    hang_s: float = 3600.0

    def __post_init__(self) -> None:
        total = 0.0
        for name, rate in self.rates():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"FaultConfig.{name} must be within 0..1, got {rate!r}")
            total += rate
        if total > 1.0 + 1e-9:
            raise ValueError(f"FaultConfig rates add up to {total:g}; they must not exceed 1")
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ValueError("FaultConfig.retry_after_s must be >= 0 or None")
        if self.hang_s < 0:
            raise ValueError("FaultConfig.hang_s must be >= 0")

    def rates(self) -> tuple[tuple[str, float], ...]:
        """(outcome name, probability) in the fixed order faults are drawn."""
        return (
            ("error_500", self.error_rate),
            ("rate_limited", self.rate_429),
            ("unavailable", self.rate_503),
            ("bad_gateway_html", self.rate_502_html),
            ("hang", self.hang_rate),
            ("reset", self.reset_rate),
            ("malformed", self.malformed_rate),
            ("fenced", self.fenced_rate),
            ("reasoning", self.reasoning_rate),
            ("truncated", self.truncate_rate),
        )

    def draw(self, rng: random.Random) -> str:
        """One outcome name; "ok" when no fault fires. Exactly one RNG draw per request."""
        u = rng.random()
        edge = 0.0
        for name, rate in self.rates():
            edge += rate
            if u < edge:
                return name
        return "ok"


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True, slots=True)
class ServerStats:
    """An immutable snapshot of what the server has seen. Holds no request text."""

    total_requests: int                    # every parsed HTTP request, any path
    completion_requests: int               # requests to a chat-completions path
    by_outcome: Mapping[str, int]          # e.g. "ok", "rate_limited", "hang", "not_found"
    by_status: Mapping[int, int]           # HTTP status sent -> count (hang/reset: none)
    max_in_flight: int                     # peak of concurrent chat-completion requests
    in_flight: int
    connections_opened: int
    open_connections: int
    arrivals_per_second: tuple[int, ...]   # completion arrivals per 1 s since the first one

    def outcome(self, name: str) -> int:
        return self.by_outcome.get(name, 0)

    def status(self, code: int) -> int:
        return self.by_status.get(code, 0)


# --------------------------------------------------------------------------- HTTP plumbing


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    version: str
    headers: Mapping[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class _BadRequest(Exception):
    """The request head cannot be parsed; answer with `status` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json_response(status: int, payload: object,
                   headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _Response(status, json.dumps(payload).encode(), headers=headers)


def _error_response(status: int, message: str, err_type: str,
                    headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _json_response(status, {"error": {"message": message, "type": err_type,
                                             "code": status}}, headers)


def _encode_response(response: _Response, keep_alive: bool) -> bytes:
    reason = _REASONS.get(response.status, "Unknown")
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        "Server: asyncrunner-mock",
    ]
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request on the connection, or None when the client closed it cleanly."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest(400, "incomplete request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, "request head too large") from None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _BadRequest(411, "chunked bodies are not supported; send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _BadRequest(400, "invalid Content-Length") from None
    if length < 0:
        raise _BadRequest(400, "invalid Content-Length")
    if length > MAX_BODY_BYTES:
        raise _BadRequest(413, "request body too large")
    body = await reader.readexactly(length) if length else b""
    path = target.split("?", 1)[0]
    return _Request(method.upper(), path, version, MappingProxyType(headers), body)


def _message_text(content: Any) -> str:
    """Message content as text: a plain string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _parse_completion_body(body: bytes) -> tuple[str, list[dict[str, Any]]]:
    """(requested model, messages) or ValueError with a message fit for the client."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ValueError("request body must be a JSON object")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a non-empty list of message objects")
    model = payload.get("model")
    return (model if isinstance(model, str) and model else ""), messages


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _message_text(message.get("content"))
    return ""


def _render_content(outcome: str, answer: Classification) -> tuple[str, str]:
    """(content, finish_reason) for a 200 answer shaped by `outcome`."""
    payload = answer.to_json()
    if outcome == "malformed":
        return "I cannot answer that.", "stop"
    if outcome == "fenced":
        return ("Here is my assessment of the narrative:\n\n```json\n" + payload
                + "\n```\n\nLet me know if you need anything else."), "stop"
    if outcome == "reasoning":
        thinking = ("The user wants an IPV assessment. I will check the narrative for partner "
                    "violence cues and answer with the requested JSON object.")
        return ("<|channel|>analysis<|message|>" + thinking + "<|end|>"
                "<|start|>assistant<|channel|>final<|message|>" + payload), "stop"
    if outcome == "truncated":
        return payload[: len(payload) // 2], "length"
    return payload, "stop"


# --------------------------------------------------------------------------- the server


class MockServer:
    """An OpenAI-compatible simulated LLM on 127.0.0.1 with seeded, reproducible faults."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0,
                 faults: FaultConfig = FaultConfig(), seed: int = 0,
                 model: str = "mock-classifier", max_concurrent: int | None = None,
                 latency_jitter_ms: float = 0.0) -> None:
        if host not in ("127.0.0.1", "localhost"):
            # A simulator that answers anyone on the network is never what a test wants.
            raise ValueError(f"MockServer listens on loopback only, not {host!r}")
        if latency_ms < 0 or latency_jitter_ms < 0:
            raise ValueError("latency_ms and latency_jitter_ms must be >= 0")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1 or None")
        self.host = "127.0.0.1"  # "localhost" could resolve to ::1 and miss the URL below
        self.port = port
        self.latency_ms = latency_ms
        self.latency_jitter_ms = latency_jitter_ms
        self.faults = faults
        self.seed = seed
        self.model = model
        self.max_concurrent = max_concurrent
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()   # asyncio's per-connection tasks
        self._handlers: set[asyncio.Task[None]] = set()     # our work inside each connection
        self._writers: set[asyncio.StreamWriter] = set()
        # Counters plus 8 bytes per completion arrival: a long-running CLI server stays small.
        self._total = 0
        self._outcomes: Counter[str] = Counter()
        self._statuses: Counter[int] = Counter()
        self._arrivals = array("d")
        self._in_flight = 0
        self._max_in_flight = 0
        self._connections_opened = 0
        self._created = int(time.time())
        self._counter = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("MockServer already started")
        self._server = await asyncio.start_server(
            self._handle_connection, self.host, self.port, limit=MAX_HEAD_BYTES,
            reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Close the listener, then every connection, hanging handlers included."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._handlers):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=STOP_GRACE_S)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), STOP_GRACE_S)

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """The /v1 base URL, the form OpenAI-style clients are configured with."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    # -- statistics --------------------------------------------------------------------

    def stats(self) -> ServerStats:
        arrivals = self._arrivals
        return ServerStats(
            total_requests=self._total,
            completion_requests=len(arrivals),
            by_outcome=MappingProxyType(dict(self._outcomes)),
            by_status=MappingProxyType(dict(self._statuses)),
            max_in_flight=self._max_in_flight,
            in_flight=self._in_flight,
            connections_opened=self._connections_opened,
            open_connections=len(self._writers),
            arrivals_per_second=_histogram(arrivals),
        )

    def request_times(self) -> tuple[float, ...]:
        """Arrival times (time.monotonic()) of chat-completion requests, in arrival order."""
        return tuple(self._arrivals)

    def reset_stats(self) -> None:
        self._total = 0
        self._outcomes.clear()
        self._statuses.clear()
        self._arrivals = array("d")
        self._max_in_flight = self._in_flight

    # -- connection handling -----------------------------------------------------------

    async def _handle_connection(self, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        # The work runs in an inner task that stop() may cancel. The callback task itself is
        # never cancelled: on Python 3.11 asyncio logs a spurious traceback when it is.
        outer = asyncio.current_task()
        assert outer is not None
        task = asyncio.create_task(self._serve_connection(reader, writer))
        self._connections.add(outer)
        self._handlers.add(task)
        self._writers.add(writer)
        self._connections_opened += 1
        try:
            await task
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass  # the client went away mid-request; nothing to answer
        except asyncio.CancelledError:
            task.cancel()  # stop(), or the loop shutting down: no goodbye, no flushing
            writer.transport.abort()
        except Exception:  # a bug here must not kill the server; the traceback has no body
            log.exception("mock-server connection handler failed")
            writer.transport.abort()
        finally:
            self._writers.discard(writer)
            self._handlers.discard(task)
            self._connections.discard(outer)
            if not writer.transport.is_closing():
                writer.close()  # flushes what is buffered, then closes

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await _read_request(reader)
            except _BadRequest as exc:
                self._finish("other", time.monotonic(), "bad_request", None, exc.status)
                writer.write(_encode_response(
                    _error_response(exc.status, str(exc), "invalid_request_error"), False))
                await writer.drain()
                return
            if request is None:
                return
            keep_alive = request.keep_alive
            response = await self._dispatch(request, reader, writer)
            if response is None:
                return  # reset or hang: the connection is finished without an answer
            writer.write(_encode_response(response, keep_alive))
            await writer.drain()
            if not keep_alive:
                return

    async def _dispatch(self, request: _Request, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> _Response | None:
        arrival = time.monotonic()
        path = request.path.rstrip("/") or "/"
        if path in COMPLETION_PATHS:
            if request.method != "POST":
                return self._finish("completion", arrival, "method_not_allowed",
                                    _error_response(405, f"{request.method} not allowed; use POST",
                                                    "invalid_request_error"))
            return await self._completion(request, arrival, reader, writer)
        if path in MODELS_PATHS and request.method == "GET":
            return self._finish("models", arrival, "models", _json_response(200, {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": self._created,
                          "owned_by": "asyncrunner-mock"}],
            }))
        if path in HEALTH_PATHS and request.method == "GET":
            return self._finish("health", arrival, "health",
                                _json_response(200, {"status": "ok"}))
        return self._finish("other", arrival, "not_found", _error_response(
            404, f"no route for {request.method} {request.path[:100]}", "invalid_request_error"))

    def _finish(self, kind: str, arrival: float, outcome: str, response: _Response | None,
                status: int | None = None) -> _Response | None:
        """Count one request (kind: completion, models, health, other); pass `response` on."""
        self._total += 1
        self._outcomes[outcome] += 1
        sent = response.status if response is not None else status
        if sent is not None:  # hang and reset send nothing
            self._statuses[sent] += 1
        if kind == "completion":
            self._arrivals.append(arrival)
        return response

    async def _completion(self, request: _Request, arrival: float,
                          reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> _Response | None:
        if self.max_concurrent is not None and self._in_flight >= self.max_concurrent:
            # Refused requests are not "in flight": max_in_flight counts admitted work only.
            return self._finish("completion", arrival, "overloaded", _error_response(
                429, "too many concurrent requests; slow down", "rate_limit_error",
                self._retry_after_header()))
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            return await self._completion_in_flight(request, arrival, reader, writer)
        finally:
            self._in_flight -= 1

    async def _completion_in_flight(self, request: _Request, arrival: float,
                                    reader: asyncio.StreamReader,
                                    writer: asyncio.StreamWriter) -> _Response | None:
        finish = self._finish
        try:
            requested_model, messages = _parse_completion_body(request.body)
        except ValueError as exc:
            return finish("completion", arrival, "bad_request",
                          _error_response(400, str(exc), "invalid_request_error"))
        outcome = self.faults.draw(self._rng)
        if outcome == "reset":
            finish("completion", arrival, outcome, None)
            writer.transport.abort()
            return None
        if outcome == "hang":
            finish("completion", arrival, outcome, None)
            await self._hang(reader)
            return None
        text = _last_user_text(messages)
        await self._sleep_latency(text)
        error = self._fault_response(outcome)
        if error is not None:
            return finish("completion", arrival, outcome, error)
        return finish("completion", arrival, outcome,
                      self._chat_completion(outcome, requested_model or self.model,
                                            messages, text))

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        # Hold the request until the client gives up (EOF), hang_s passes, or stop() cancels.
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            async with asyncio.timeout(self.faults.hang_s):
                while await reader.read(65536):
                    pass

    async def _sleep_latency(self, text: str) -> None:
        delay_ms = self.latency_ms
        if self.latency_jitter_ms:
            # Jitter from the text hash: the same narrative always takes the same time.
            unit = ((_text_hash(text) >> 20) % 10_001) / 10_000.0
            delay_ms = max(0.0, delay_ms + (2.0 * unit - 1.0) * self.latency_jitter_ms)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000.0)

    def _retry_after_header(self) -> tuple[tuple[str, str], ...]:
        value = self.faults.retry_after_s
        if value is None:
            return ()
        return (("Retry-After", f"{value:g}" if value != int(value) else str(int(value))),)

    def _fault_response(self, outcome: str) -> _Response | None:
        if outcome == "error_500":
            return _error_response(500, "simulated internal server error", "server_error")
        if outcome == "rate_limited":
            return _error_response(429, "rate limit reached; slow down", "rate_limit_error",
                                   self._retry_after_header())
        if outcome == "unavailable":
            return _error_response(503, "model is loading; try again", "service_unavailable")
        if outcome == "bad_gateway_html":
            return _Response(502, _BAD_GATEWAY_HTML.encode(), "text/html; charset=utf-8")
        return None

    def _chat_completion(self, outcome: str, model: str, messages: list[dict[str, Any]],
                         text: str) -> _Response:
        content, finish_reason = _render_content(outcome, classify_text(text))
        prompt_chars = sum(len(_message_text(m.get("content"))) for m in messages)
        prompt_tokens = max(1, prompt_chars // 4)
        completion_tokens = max(1, len(content) // 4)
        self._counter += 1
        return _json_response(200, {
            "id": f"chatcmpl-mock-{self.seed}-{self._counter}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })


def _histogram(arrivals: array[float]) -> tuple[int, ...]:
    if not arrivals:
        return ()
    start = min(arrivals)
    counts = [0] * (int(max(arrivals) - start) + 1)
    for t in arrivals:
        counts[int(t - start)] += 1
    return tuple(counts)


# --------------------------------------------------------------------------- CLI entry

_SERVER_KWARGS = frozenset({"seed", "model", "max_concurrent", "latency_jitter_ms"})


def _split_options(error_rate: float,
                   options: Mapping[str, Any]) -> tuple[FaultConfig, dict[str, Any]]:
    """serve_forever's keyword options -> (FaultConfig, MockServer keyword arguments)."""
    fault_names = {f.name for f in fields(FaultConfig)}
    unknown = set(options) - fault_names - _SERVER_KWARGS
    if unknown:
        raise TypeError(f"serve_forever() got unknown options: {', '.join(sorted(unknown))}")
    faults = FaultConfig(error_rate=error_rate,
                         **{k: v for k, v in options.items() if k in fault_names})
    return faults, {k: v for k, v in options.items() if k in _SERVER_KWARGS}


def serve_forever(port: int, latency_ms: float, error_rate: float, **fault_kwargs: Any) -> None:
    """blocking entry for the `asyncrunner mock-server` CLI command: prints one line
    `mock-server listening on http://127.0.0.1:<port>/v1` and runs until SIGINT/SIGTERM,
    then exits cleanly (no traceback).

    `fault_kwargs` takes FaultConfig fields (rate_429=0.1, ...) and the MockServer options
    seed, model, max_concurrent and latency_jitter_ms.
    """
    from .errors import UsageError

    try:
        faults, server_kwargs = _split_options(error_rate, fault_kwargs)
        server = MockServer(port=port, latency_ms=latency_ms, faults=faults, **server_kwargs)
    except ValueError as exc:
        raise UsageError(f"mock-server: {exc}") from None
    try:
        asyncio.run(_serve_until_signal(server))
    except KeyboardInterrupt:
        pass  # a signal that arrived before the handlers were installed
    except OSError as exc:
        raise UsageError(f"mock-server cannot listen on 127.0.0.1:{port}: "
                         f"{exc.strerror or exc}") from None


async def _serve_until_signal(server: MockServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):
            pass  # Windows: Ctrl+C arrives as KeyboardInterrupt instead
    try:
        await server.start()
        print(f"mock-server listening on {server.base_url}", flush=True)
        await stop.wait()
    finally:
        await server.stop()
        for signum in installed:
            loop.remove_signal_handler(signum)
