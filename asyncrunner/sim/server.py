"""The simulated LLM server: routes, the life of a completion request, statistics, CLI entry.

This module owns `MockServer`, an OpenAI-compatible endpoint on 127.0.0.1:

  * routing: POST /v1/chat/completions and /chat/completions, GET /v1/models, GET /health,
    and the Batch API under /v1/files and /v1/batches (batch.py: files, batches on a clock,
    output and error files; every batch line answered by `_batch_answer`, the chat
    endpoint's own model, faults and refusals);
  * the life of a completion request: the endpoint-wide refusals (`fail_status` 401/403/404
    on every request, a wrong `api_key`: 401, a response_format in `reject_response_formats`:
    the 400 llama.cpp or LM Studio send), the `max_concurrent` refusal (429), the seeded fault
    draw, the `capacity` queue (at most K served at once, the rest wait in arrival order), the
    latency timer, and the answer built by `model.py`, `faults.py` and `api.py`: per model
    name, temperature and seed (model.py), within a json_schema's maxItems/maxLength, the
    400 of a model whose context is too small for a prompt over `max_context_chars`, cut at
    the request's max_tokens with finish_reason "length" when `truncate_at_max_tokens` is on
    and the answer needs more, invalid JSON on a narrative's first request under
    `invalid_first_rate` (a repair turn or a resample then gets the valid answer);
  * `ServerStats`, an immutable snapshot of counters that never holds request text (it
    does hold the last response_format as sent, and the tokens of the answers delivered, by
    the same 4-characters-a-token count as the answers' `usage`);
  * `serve_forever`, the blocking entry point of `asyncrunner mock-server`.

The wire is `http.py`'s; this module only sees whole requests and answers them.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import signal
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType, TracebackType
from typing import Any

from . import api
from .batch import BatchApi, BatchOptions
from .faults import (
    FAIL_STATUSES,
    HANG,
    RESET,
    FaultConfig,
    FaultDraws,
    error_answer,
    format_rejection,
    invalid_json,
    overloaded_answer,
    shape_content,
    status_failure,
)
from .http import Exchange, HttpResponse, HttpServer
from .model import Classification, classify_text, text_hash

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})
BATCH_PATH_PREFIXES = ("/v1/files", "/v1/batches", "/files", "/batches")
HEALTH_PATHS = frozenset({"/health", "/v1/health"})

STOP_GRACE_S = 0.5
_NO_FAULTS = FaultConfig()
_HEALTH_BODY = b'{"status": "ok"}'


@dataclass(frozen=True, slots=True)
class ServerStats:
    """An immutable snapshot of what the server has seen. Holds no request text."""

    total_requests: int                    # every HTTP request read, any path
    completion_requests: int               # requests to a chat-completions path
    by_outcome: Mapping[str, int]          # e.g. "ok", "rate_limited", "hang", "not_found"
    by_status: Mapping[int, int]           # HTTP status sent -> count (hang/reset: none)
    max_in_flight: int                     # peak of admitted, unanswered completions
    in_flight: int                         # admitted and unanswered, queued ones included
    connections_opened: int                # TCP connections accepted since start
    open_connections: int
    arrivals_per_second: tuple[int, ...]   # completion arrivals per 1 s since the first one
    peak_connections: int = 0              # most TCP connections open at once
    queued: int = 0                        # waiting for one of `capacity` slots
    max_queued: int = 0
    prompt_tokens: int = 0                 # usage of the 200 answers delivered, summed
    completion_tokens: int = 0
    repair_turns: int = 0                  # completions that were repair turns
    by_response_format: Mapping[str, int] = field(     # type or "none" -> count
        default_factory=lambda: MappingProxyType({}))
    last_response_format: Any = None       # the last one received, as sent (decoded JSON)
    last_seed: int | None = None           # the last completion request's seed
    files_uploaded: int = 0                # Batch API (batch.py): POST /v1/files
    batches_created: int = 0               # POST /v1/batches
    batch_polls: int = 0                   # GET /v1/batches/{id}
    file_downloads: int = 0                # GET /v1/files/{id}/content
    batch_lines: int = 0                   # request lines in the batches created

    def outcome(self, name: str) -> int:
        return self.by_outcome.get(name, 0)

    def status(self, code: int) -> int:
        return self.by_status.get(code, 0)

    def summary(self) -> str:
        """One line of counts for the operator, e.g. when the CLI server stops."""
        statuses = ",".join(f"{code}:{n}" for code, n in sorted(self.by_status.items()))
        return (f"requests={self.total_requests} completions={self.completion_requests} "
                f"statuses={statuses or '-'} max_in_flight={self.max_in_flight} "
                f"connections_opened={self.connections_opened} "
                f"peak_connections={self.peak_connections} "
                f"tokens={self.prompt_tokens}+{self.completion_tokens}")


# The states of a completion between admission and its end.
_QUEUED, _SERVING, _HANGING, _DONE = range(4)


class _Job:
    """One admitted completion request, its answer already built (None for a hang)."""

    __slots__ = ("delay_s", "exchange", "outcome", "response", "state", "timer", "tokens")

    def __init__(self, exchange: Exchange, outcome: str, response: HttpResponse | None,
                 delay_s: float, tokens: tuple[int, int] = (0, 0)) -> None:
        self.exchange = exchange
        self.outcome = outcome
        self.response = response
        self.delay_s = delay_s
        self.tokens = tokens
        self.state = _QUEUED
        self.timer: asyncio.TimerHandle | None = None


class MockServer:
    """An OpenAI-compatible simulated LLM on 127.0.0.1 with seeded, reproducible faults.

    `max_concurrent`: answer 429 to completions beyond this many in flight.
    `capacity`: serve at most this many completions at once and queue the rest, so the
    throughput is capacity / latency, as on a real inference server with K slots. Hangs and
    resets take no slot (they stand for requests lost in front of the model).
    `reject_response_formats`: response_format types ("json_schema", "json_object") answered
    with the 400 of a server that does not take them.
    `fail_status`: 401, 403 or 404 to every completion request (bad key, no access, unknown
    model); `api_key`: 401 unless the request carries `Authorization: Bearer <api_key>`.
    `truncate_at_max_tokens`: an answer longer than the request's max_tokens is cut there,
    finish_reason "length".
    `max_context_chars`: a request whose messages hold more characters is answered with
    the 400 of a prompt too long for the model's context (a `data_error` to the client).
    `batch_delay_s`, `batch_expire_after_s`: how long a batch takes, and when it expires
    with the lines answered by then (batch.py; `batches.options` changes them later).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0,
                 faults: FaultConfig = _NO_FAULTS, seed: int = 0,
                 model: str = "mock-classifier", max_concurrent: int | None = None,
                 capacity: int | None = None, latency_jitter_ms: float = 0.0,
                 reject_response_formats: Iterable[str] = (), fail_status: int | None = None,
                 api_key: str | None = None, truncate_at_max_tokens: bool = False,
                 max_context_chars: int | None = None, batch_delay_s: float = 0.0,
                 batch_expire_after_s: float | None = None) -> None:
        if host not in ("127.0.0.1", "localhost"):
            # A simulator that answers anyone on the network is never what a test wants.
            raise ValueError(f"MockServer listens on loopback only, not {host!r}")
        if latency_ms < 0 or latency_jitter_ms < 0:
            raise ValueError("latency_ms and latency_jitter_ms must be >= 0")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1 or None")
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be >= 1 or None")
        if fail_status is not None and fail_status not in FAIL_STATUSES:
            raise ValueError(f"fail_status must be one of {FAIL_STATUSES} or None")
        if max_context_chars is not None and max_context_chars < 1:
            raise ValueError("max_context_chars must be >= 1 or None")
        self.host = "127.0.0.1"  # "localhost" could resolve to ::1 and miss the URL below
        self.port = port
        self.latency_ms = latency_ms
        self.latency_jitter_ms = latency_jitter_ms
        self.faults = faults
        self.seed = seed
        self.model = model
        self.max_concurrent = max_concurrent
        self.capacity = capacity
        self.reject_response_formats = frozenset(reject_response_formats)
        self.fail_status = fail_status
        self.api_key = api_key
        self.truncate_at_max_tokens = truncate_at_max_tokens
        self.max_context_chars = max_context_chars
        self.batches = BatchApi(self._batch_answer,
                                BatchOptions(batch_delay_s, batch_expire_after_s))
        self._draws = FaultDraws(faults, seed)
        self._answered_invalid: set[tuple[str, int]] = set()   # invalid_first_rate
        self._http = HttpServer(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: deque[_Job] = deque()
        self._serving = 0
        self._created = int(time.time())
        self._counter = 0
        # Counters plus 8 bytes per completion arrival: a long-running CLI server stays small.
        self._total = 0
        self._outcomes: Counter[str] = Counter()
        self._statuses: Counter[int] = Counter()
        self._arrivals = array("d")
        self._in_flight = 0
        self._max_in_flight = 0
        self._queued = 0
        self._max_queued = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._repair_turns = 0
        self._formats: Counter[str] = Counter()
        self._last_format: Any = None
        self._last_seed: int | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> int:
        if self._loop is not None:
            raise RuntimeError("MockServer already started")
        self.port = await self._http.start(self.host, self.port)
        self._loop = asyncio.get_running_loop()
        return self.port

    async def stop(self) -> None:
        """Close the listener, then every connection, hanging and queued requests included."""
        if self._loop is None:
            return
        await self._http.stop(STOP_GRACE_S)
        self._waiting.clear()
        self._loop = None

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
            connections_opened=self._http.connections_opened,
            open_connections=self._http.open_connections,
            arrivals_per_second=_histogram(arrivals),
            peak_connections=self._http.peak_connections,
            queued=self._queued,
            max_queued=self._max_queued,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            repair_turns=self._repair_turns,
            by_response_format=MappingProxyType(dict(self._formats)),
            last_response_format=self._last_format,
            last_seed=self._last_seed,
            **_vars_of(self.batches.stats()),
        )

    def request_times(self) -> tuple[float, ...]:
        """Arrival times (time.monotonic()) of chat-completion requests, in arrival order."""
        return tuple(self._arrivals)

    def reset_stats(self) -> None:
        """Zero the counters; peaks restart from the present (connections_opened stays)."""
        self._total = 0
        self._outcomes.clear()
        self._statuses.clear()
        self._arrivals = array("d")
        self._max_in_flight = self._in_flight
        self._max_queued = self._queued
        self._prompt_tokens = self._completion_tokens = self._repair_turns = 0
        self._formats.clear()
        self._last_format = self._last_seed = None
        self.batches.reset_stats()
        self._http.reset_peak()

    def _send(self, exchange: Exchange, outcome: str, response: HttpResponse) -> None:
        self._outcomes[outcome] += 1
        self._statuses[response.status] += 1
        exchange.respond(response)

    # -- http.App: routing -------------------------------------------------------------

    def handle(self, exchange: Exchange) -> None:
        arrival = time.monotonic()
        self._total += 1
        request = exchange.request
        path = request.path.rstrip("/") or "/"
        if path in COMPLETION_PATHS:
            self._arrivals.append(arrival)
            if request.method == "POST":
                self._completion(exchange)
            else:
                self._send(exchange, "method_not_allowed", api.error_response(
                    405, f"{request.method} not allowed; use POST", "invalid_request_error"))
        elif path in MODELS_PATHS and request.method == "GET":
            self._send(exchange, "models", api.model_list(self.model, self._created))
        elif path in HEALTH_PATHS and request.method == "GET":
            self._send(exchange, "health", HttpResponse(200, _HEALTH_BODY))
        elif path.startswith(BATCH_PATH_PREFIXES):
            refusal = self._refusal(exchange)
            if refusal is not None:
                self._send(exchange, *refusal)
            else:
                self._send(exchange, *self.batches.handle(request.method, path,
                                                          request.headers, request.body))
        else:
            self._send(exchange, "not_found", api.error_response(
                404, f"no route for {request.method} {request.path[:100]}",
                "invalid_request_error"))

    def reject(self, status: int, message: str) -> HttpResponse:
        self._total += 1
        self._outcomes["bad_request"] += 1
        self._statuses[status] += 1
        return api.error_response(status, message, "invalid_request_error")

    # -- the life of a completion ------------------------------------------------------

    def _refusal(self, exchange: Exchange) -> tuple[str, HttpResponse] | None:
        """The endpoint-wide refusals: `fail_status` on every request, a wrong key."""
        if self.fail_status is not None:
            return f"status_{self.fail_status}", status_failure(self.fail_status, self.model)
        if self.api_key is not None and exchange.request.headers.get(
                "authorization", "") != f"Bearer {self.api_key}":
            return "status_401", status_failure(401, self.model)
        return None

    def _completion(self, exchange: Exchange) -> None:
        refusal = self._refusal(exchange)
        if refusal is not None:
            self._send(exchange, *refusal)
            return
        if self.max_concurrent is not None and self._in_flight >= self.max_concurrent:
            # Refused requests are not "in flight": max_in_flight counts admitted work only.
            self._send(exchange, "overloaded", overloaded_answer(self.faults))
            return
        try:
            request = api.parse_completion_body(exchange.request.body)
        except ValueError as exc:
            self._send(exchange, "bad_request",
                       api.error_response(400, str(exc), "invalid_request_error"))
            return
        kind = request.response_format_type
        self._formats[kind] += 1
        self._last_format = request.response_format
        self._last_seed = request.seed
        if kind in self.reject_response_formats:
            self._send(exchange, "format_rejected", format_rejection(kind))
            return
        too_long = self._context_refusal(request)
        if too_long is not None:
            self._send(exchange, "context_too_long", too_long)
            return
        outcome = self._draws.next()
        if outcome == RESET:
            self._outcomes[outcome] += 1
            exchange.reset()
            return
        job = self._job(exchange, outcome, request)
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        exchange.on_abandon(lambda: self._abandon(job))
        if outcome == HANG:
            self._hang(job)
        elif self.capacity is not None and self._serving >= self.capacity:
            self._waiting.append(job)
            self._queued += 1
            self._max_queued = max(self._max_queued, self._queued)
        else:
            self._serve(job)

    def _context_refusal(self, request: api.CompletionRequest) -> HttpResponse | None:
        """OpenAI's 400 for a prompt longer than the model's context, if it is."""
        limit = self.max_context_chars
        if limit is None:
            return None
        chars = sum(len(api.message_text(m.get("content"))) for m in request.messages)
        if chars <= limit:
            return None
        return api.error_response(
            400, f"This model's maximum context length is {max(1, limit // 4)} tokens. "
                 f"However, your messages resulted in {max(1, chars // 4)} tokens. Please "
                 "reduce the length of the messages.", "invalid_request_error")

    def _batch_answer(self, body: Any) -> tuple[int, Any] | None:
        """One batch line, answered as the chat endpoint would answer it: the same parsing,
        refusals, fault draw and model; a hang or reset is no answer at all (None)."""
        try:
            request = api.parse_completion_body(json.dumps(body).encode())
        except ValueError as exc:
            return 400, _decoded(api.error_response(400, str(exc), "invalid_request_error"))
        kind = request.response_format_type
        self._formats[kind] += 1
        self._last_format = request.response_format
        self._last_seed = request.seed
        if kind in self.reject_response_formats:
            return 400, _decoded(format_rejection(kind))
        too_long = self._context_refusal(request)
        if too_long is not None:
            return 400, _decoded(too_long)
        outcome = self._draws.next()
        if outcome in (HANG, RESET):
            return None
        error = error_answer(outcome, self.faults)
        if error is not None:
            return error.status, _decoded(error)
        response, tokens = self._chat_completion(outcome, request,
                                                 api.narrative_text(request.messages))
        self._prompt_tokens += tokens[0]
        self._completion_tokens += tokens[1]
        return response.status, _decoded(response)

    def _job(self, exchange: Exchange, outcome: str, request: api.CompletionRequest) -> _Job:
        if outcome == HANG:
            return _Job(exchange, outcome, None, 0.0)
        # The answer is built on arrival, so that when a wave of latency timers fires
        # together each costs one write: the simulator then adds almost nothing to latency.
        text = api.narrative_text(request.messages)
        if api.is_repair_turn(request.messages):
            self._repair_turns += 1
        error = error_answer(outcome, self.faults)
        if error is not None:
            return _Job(exchange, outcome, error, self._delay_s(text))
        response, tokens = self._chat_completion(outcome, request, text)
        return _Job(exchange, outcome, response, self._delay_s(text), tokens)

    def _hang(self, job: _Job) -> None:
        # Hold the request until the client gives up (abandon), hang_s passes, or stop().
        self._outcomes[HANG] += 1
        job.state = _HANGING
        job.timer = self._call_later(self.faults.hang_s, self._end_hang, job)

    def _end_hang(self, job: _Job) -> None:
        self._finish(job)
        job.exchange.close()

    def _serve(self, job: _Job) -> None:
        job.state = _SERVING
        self._serving += 1
        if job.delay_s > 0:
            job.timer = self._call_later(job.delay_s, self._answer, job)
        else:
            self._answer(job)

    def _answer(self, job: _Job) -> None:
        self._finish(job)
        assert job.response is not None  # only hangs have none, and they are never served
        if job.exchange.open:
            self._prompt_tokens += job.tokens[0]
            self._completion_tokens += job.tokens[1]
        self._send(job.exchange, job.outcome, job.response)

    def _abandon(self, job: _Job) -> None:
        """The client left before its answer: free what the request held."""
        if job.state == _DONE:
            return
        if job.timer is not None:
            job.timer.cancel()
        if job.state != _HANGING:
            self._outcomes["abandoned"] += 1  # the drawn outcome was never delivered
        self._finish(job)

    def _finish(self, job: _Job) -> None:
        """Count a job out of flight and hand its slot, if any, to the next waiting one."""
        state, job.state, job.timer = job.state, _DONE, None
        self._in_flight -= 1
        if state == _QUEUED:
            self._queued -= 1  # stays in the deque; _next_waiting skips finished jobs
        elif state == _SERVING:
            self._serving -= 1
            waiting = self._next_waiting()
            if waiting is not None:
                self._serve(waiting)

    def _next_waiting(self) -> _Job | None:
        while self._waiting:
            job = self._waiting.popleft()
            if job.state == _QUEUED:
                self._queued -= 1
                return job
        return None

    def _call_later(self, delay: float, callback: Callable[[_Job], None],
                    job: _Job) -> asyncio.TimerHandle:
        assert self._loop is not None
        return self._loop.call_later(delay, callback, job)

    def _delay_s(self, text: str) -> float:
        delay_ms = self.latency_ms
        if self.latency_jitter_ms:
            # Jitter from the text hash: the same narrative always takes the same time.
            unit = ((text_hash(text) >> 20) % 10_001) / 10_000.0
            delay_ms = max(0.0, delay_ms + (2.0 * unit - 1.0) * self.latency_jitter_ms)
        return delay_ms / 1000.0

    def _chat_completion(self, outcome: str, request: api.CompletionRequest,
                         text: str) -> tuple[HttpResponse, tuple[int, int]]:
        model = request.model or self.model
        answer = classify_text(text, model, request.temperature, request.seed)
        schema = request.schema
        if schema is not None:
            answer = _within_schema(answer, schema)
        answer_json = answer.to_json()
        if self.faults.invalid_first_rate and self._invalid_first(request, model, text):
            content, finish_reason = invalid_json(answer_json), "stop"
        else:
            content, finish_reason = shape_content(outcome, answer_json)
        usage = api.usage_tokens(request.messages, content)
        limit = request.max_tokens
        if (self.truncate_at_max_tokens and limit is not None and limit >= 1
                and usage[1] > limit):
            content, finish_reason = content[: limit * 4], "length"
            usage = (usage[0], limit)
        self._counter += 1
        response = api.chat_completion(f"chatcmpl-mock-{self.seed}-{self._counter}", model,
                                       request.messages, content, finish_reason, usage)
        return response, usage

    def _invalid_first(self, request: api.CompletionRequest, model: str, text: str) -> bool:
        """A narrative picked by `invalid_first_rate` that this server has not answered
        before, in a request that is not a repair turn."""
        h = text_hash(text)
        if ((h >> 40) % 10_000) >= self.faults.invalid_first_rate * 10_000:
            return False
        if api.is_repair_turn(request.messages):
            return False
        key = (model, h)
        if key in self._answered_invalid:
            return False
        self._answered_invalid.add(key)
        return True


def _within_schema(answer: Classification, schema: dict[str, Any]) -> Classification:
    """The answer kept within a json_schema's maxItems / maxLength, as a constrained
    decoder would."""
    props = schema.get("properties")
    if not isinstance(props, dict):
        return answer
    indicators_schema = props.get("indicators") or {}
    items_schema = indicators_schema.get("items") or {}
    rationale_schema = props.get("rationale") or {}
    max_items = indicators_schema.get("maxItems")
    item_len = items_schema.get("maxLength")
    rationale_len = rationale_schema.get("maxLength")
    indicators = answer.indicators
    if isinstance(max_items, int):
        indicators = indicators[:max_items]
    if isinstance(item_len, int):
        indicators = tuple(i[:item_len] for i in indicators)
    rationale = answer.rationale
    if isinstance(rationale_len, int):
        rationale = rationale[:rationale_len]
    return Classification(answer.detected, answer.confidence, indicators, rationale)


def _decoded(response: HttpResponse) -> Any:
    """An answer's body as a batch line holds it: the JSON, or the text if it is none."""
    try:
        return json.loads(response.body)
    except ValueError:
        return response.body.decode("utf-8", "replace")


def _vars_of(stats: Any) -> dict[str, Any]:
    """A slotted dataclass's fields as keyword arguments."""
    return {f.name: getattr(stats, f.name) for f in fields(stats)}


def _histogram(arrivals: array[float]) -> tuple[int, ...]:
    if not arrivals:
        return ()
    start = min(arrivals)
    counts = [0] * (int(max(arrivals) - start) + 1)
    for t in arrivals:
        counts[int(t - start)] += 1
    return tuple(counts)


# --------------------------------------------------------------------------- CLI entry

_SERVER_KWARGS = frozenset({"seed", "model", "max_concurrent", "capacity", "latency_jitter_ms",
                            "reject_response_formats", "fail_status", "api_key",
                            "truncate_at_max_tokens", "max_context_chars", "batch_delay_s",
                            "batch_expire_after_s"})


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
    then prints one summary line of requests and connections to stderr and returns.

    `fault_kwargs` takes FaultConfig fields (rate_429=0.1, ...) and the MockServer options
    seed, model, max_concurrent, capacity, latency_jitter_ms, reject_response_formats,
    fail_status, api_key, truncate_at_max_tokens, max_context_chars, batch_delay_s and
    batch_expire_after_s. Runs on uvloop when it is installed
    (never required).
    """
    from ..errors import UsageError

    try:
        faults, server_kwargs = _split_options(error_rate, fault_kwargs)
        server = MockServer(port=port, latency_ms=latency_ms, faults=faults, **server_kwargs)
    except ValueError as exc:
        raise UsageError(f"mock-server: {exc}") from None
    try:
        with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
            runner.run(_serve_until_signal(server))
    except KeyboardInterrupt:
        pass  # a signal that arrived before the handlers were installed
    except OSError as exc:
        raise UsageError(f"mock-server cannot listen on 127.0.0.1:{port}: "
                         f"{exc.strerror or exc}") from None


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when importable (optional; asyncio's own loop otherwise)."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] | None = getattr(
        uvloop, "new_event_loop", None)
    return factory


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
        try:
            print(f"mock-server listening on {server.base_url}", flush=True)
            await stop.wait()
        finally:
            await server.stop()
            print(f"mock-server stopped {server.stats().summary()}", file=sys.stderr,
                  flush=True)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
