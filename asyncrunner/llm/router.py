"""Endpoint pools: which server of a pool gets each request, and how healthy each one is.

A pool is the servers of one model (`model.endpoints`; a single `model.api_url` is a pool of
one). The client (client.py) asks it for an endpoint before every request (`pick`, or
`wait` when none can take one), tells it how the request went (`succeeded`, `failed`,
`answered`) and gives the endpoint back (`release`). The pool owns no HTTP and no task:
plain counters read and written on the event loop's thread, so nothing needs a lock.

Routing: the healthy endpoint with the fewest outstanding requests relative to its weight
(outstanding / weight, ties by order), among those with room under their own limiter
(`max_concurrency`, lowered by AIMD after a 429 and paused by its Retry-After: one
AdaptiveLimiter per endpoint, throttle.py). When every healthy endpoint is full, the least
loaded one takes the request and it queues there. The run's global limiter (`run.workers`)
is taken before `pick` and still bounds the total in flight. A request retried after its
endpoint failed avoids that endpoint while another can take it.

Health, per endpoint:

    up        answering. A failure (connection refused/reset, timeout, 5xx) counts; a
              success, or any other answer (4xx, 429), resets the count.
    cooldown  FAILURES_TO_COOL failures in a row: no traffic for 1 s, then 2 s, 4 s ...
              COOLDOWN_MAX_S; then one request goes through (half-open: the probe). Its
              success makes the endpoint up again; its failure starts a longer cooldown.
    down      in a cooldown whose probe failed too (DOWN_STREAK rounds in a row).

A failure of a request sent before the cooldown began (one of a burst in flight when the
server died) does not lengthen it. A probe that never reports (cancelled) holds the
endpoint for `probe_hold_s`, after which another probe may go. State changes are logged
(`endpoint_cooldown`, `endpoint_down`, `endpoint_up`), with the redacted URL only.

When every endpoint is failing and none has answered for `down_s` (run.endpoint_down_s),
`down_message` says so in one line; the client turns it into a fatal failure, which stops
the run (exit 4) with every committed result kept.

A pool of one routes nothing: its endpoint takes every request whatever its health (as
before pools existed), its 429s slow the run's global limiter (client.py), its health is
kept for the record only (not logged: the retry lines say it), and it has no free
failovers.

`stats`/`snapshot_json` give per-endpoint figures (what the writer stores in
sessions.endpoints_json at each commit); `endpoint_lines` renders that JSON for `status`.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from asyncrunner.clock import utc_now
from asyncrunner.llm.throttle import AdaptiveLimiter

log = structlog.get_logger("asyncrunner.llm.router")

UP, COOLDOWN, DOWN = "up", "cooldown", "down"
FAILURES_TO_COOL = 3          # failures in a row (no answer between) that start a cooldown
DOWN_STREAK = 2               # cooldown rounds in a row (its probe failed): "down"
COOLDOWN_BASE_S = 1.0         # first cooldown; doubled per failed probe
COOLDOWN_MAX_S = 60.0
DEFAULT_PROBE_HOLD_S = 60.0   # a probe that never reports frees the endpoint after this
LATENCY_SAMPLE = 512          # the latest latencies kept per endpoint (for the median)
ERROR_CHARS = 120             # of an endpoint's last error in the down message
UNBOUNDED = 1 << 20           # the ceiling of an endpoint with no max_concurrency nor workers


@dataclass(frozen=True, slots=True)
class EndpointSettings:
    """One server of a pool. `label` is the URL as stored and logged (client.redact_url);
    build these with client.endpoint_settings. The key is never shown."""

    api_url: str                        # as posted to
    label: str
    weight: float = 1.0
    max_concurrency: int | None = None
    api_key: str | None = field(default=None, repr=False)


class EndpointLimiter(AdaptiveLimiter):
    """An endpoint's AdaptiveLimiter, unchanged, with what routing reads of it."""

    @property
    def allowed(self) -> int:
        """Requests it admits at once now (max_concurrency, lowered by AIMD)."""
        return self._allowed

    @property
    def paused_until(self) -> float:
        """time.monotonic() until which its requests wait (a Retry-After); 0: never."""
        return self._paused_until


class Endpoint:
    """One endpoint's live state: load, health, counters. Mutated by its pool only."""

    __slots__ = ("completed", "cooling_since", "errors", "fails", "in_flight", "index",
                 "label", "last_error", "latencies", "limiter", "retry_at", "settings",
                 "streak", "weight")

    def __init__(self, index: int, settings: EndpointSettings,
                 limiter: EndpointLimiter | None) -> None:
        self.index = index
        self.settings = settings
        self.label = settings.label
        self.weight = settings.weight
        self.limiter = limiter          # None in a pool of one: the global limiter serves
        self.in_flight = 0              # picked and not yet released (queued ones included)
        self.completed = 0              # requests answered with a completion
        self.errors = 0                 # requests that failed here, any reason
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLE)
        self.fails = 0                  # endpoint failures since its last answer
        self.streak = 0                 # cooldown rounds in a row
        self.retry_at = 0.0             # 0: healthy; else no traffic before this (clock)
        self.cooling_since = 0.0
        self.last_error: str | None = None

    @property
    def state(self) -> str:
        if not self.retry_at:
            return UP
        return DOWN if self.streak >= DOWN_STREAK else COOLDOWN


def cooldown_s(streak: int, base_s: float = COOLDOWN_BASE_S,
               max_s: float = COOLDOWN_MAX_S) -> float:
    """The cooldown of the `streak`-th round in a row: 1 s, 2 s, 4 s ... COOLDOWN_MAX_S."""
    return min(max_s, base_s * 2.0 ** min(max(streak - 1, 0), 16))


class EndpointPool:
    """The endpoints of one run (see the module doc). `workers` bounds each endpoint's own
    limiter as the run's does; `resume_hint` ends the down message; `clock`
    (time.monotonic) can be faked in tests, and the cooldown's first step (None: the
    module's COOLDOWN_BASE_S, read when the pool is made) shortened."""

    def __init__(self, endpoints: Sequence[EndpointSettings], *, workers: int | None = None,
                 down_s: float = 300.0, probe_hold_s: float = DEFAULT_PROBE_HOLD_S,
                 resume_hint: str | None = None, cooldown_base_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not endpoints:
            raise ValueError("an endpoint pool needs at least one endpoint")
        many = len(endpoints) > 1
        self.endpoints = tuple(
            Endpoint(i, s, self._limiter(s, workers) if many else None)
            for i, s in enumerate(endpoints))
        self._single = None if many else self.endpoints[0]
        self.max_failovers = 2 * len(self.endpoints) if many else 0
        self.down_s = down_s
        self.probe_hold_s = probe_hold_s
        self.cooldown_base_s = COOLDOWN_BASE_S if cooldown_base_s is None else cooldown_base_s
        self.resume_hint = resume_hint or "asyncrunner resume EXPERIMENT_ID"
        self._clock = clock
        self.started = self.last_answer = clock()
        self._changed: anyio.Event | None = None

    def _limiter(self, s: EndpointSettings, workers: int | None) -> EndpointLimiter:
        caps = [c for c in (s.max_concurrency, workers) if c is not None]
        limiter = EndpointLimiter(min(caps) if caps else UNBOUNDED)

        def announce(seconds: float, reason: str) -> None:
            log.warning("endpoint_waiting", endpoint=s.label, wait_s=round(seconds, 1),
                        message=f"endpoint {s.label} asks to wait {seconds:g}s ({reason}); "
                                "the other endpoints carry on")

        limiter.on_pause = announce
        return limiter

    @property
    def single(self) -> bool:
        return self._single is not None

    # -- routing -------------------------------------------------------------------------

    def pick(self, avoid: Endpoint | None = None) -> Endpoint | None:
        """The endpoint for the next request, counted in flight (give it back with
        `release`); None when every endpoint is cooling down (then `wait`). `avoid`: the
        endpoint the request just failed on, taken only when nothing else can be."""
        ep = self._single
        if ep is not None:
            ep.in_flight += 1
            return ep
        now = 0.0
        best: Endpoint | None = None
        best_load = math.inf
        fallback: Endpoint | None = None
        fallback_key: tuple[bool, bool, float] | None = None
        for ep in self.endpoints:
            if ep.retry_at:
                now = now or self._clock()
                if now < ep.retry_at:
                    continue
                # The cooldown is over: this request is the probe (half-open). No other
                # goes here until it reports, or probe_hold_s passes.
                ep.retry_at = now + self.probe_hold_s
                ep.in_flight += 1
                return ep
            load = ep.in_flight / ep.weight
            limiter = ep.limiter
            assert limiter is not None
            paused = limiter.paused_until > 0 and limiter.paused_until > time.monotonic()
            if ep is not avoid and not paused and ep.in_flight < limiter.allowed:
                if load < best_load:
                    best, best_load = ep, load
            else:
                key = (ep is avoid, paused, load)
                if fallback_key is None or key < fallback_key:
                    fallback, fallback_key = ep, key
        chosen = best or fallback
        if chosen is not None:
            chosen.in_flight += 1
        return chosen

    async def wait(self, avoid: Endpoint | None = None) -> Endpoint | str:
        """`pick`, waiting while every endpoint cools down; the down message instead when
        none has answered for `down_s`."""
        while True:
            ep = self.pick(avoid)
            if ep is not None:
                return ep
            now = self._clock()
            message = self.down_message(now)
            if message is not None:
                return message
            wake = min([e.retry_at for e in self.endpoints if e.retry_at]
                       + [self.last_answer + self.down_s])
            if self._changed is None:
                self._changed = anyio.Event()
            with anyio.move_on_after(max(wake - now, 0.0) + 0.001):
                await self._changed.wait()

    def release(self, ep: Endpoint) -> None:
        ep.in_flight -= 1

    def other_healthy(self, ep: Endpoint) -> bool:
        """Whether another endpoint could take a retry now (up, or due for its probe)."""
        now = 0.0
        for other in self.endpoints:
            if other is ep:
                continue
            if not other.retry_at:
                return True
            now = now or self._clock()
            if other.retry_at <= now:
                return True
        return False

    # -- outcomes ------------------------------------------------------------------------

    def succeeded(self, ep: Endpoint, now: float, latency_s: float) -> None:
        ep.completed += 1
        ep.latencies.append(latency_s)
        self.last_answer = now
        if ep.fails:
            self._recover(ep)

    def answered(self, ep: Endpoint, now: float) -> None:
        """An answer that is not a completion (a 4xx, a 429, a body that is not one): the
        request failed, the endpoint did not."""
        ep.errors += 1
        self.last_answer = now
        if ep.fails:
            self._recover(ep)

    def failed(self, ep: Endpoint, now: float, sent_at: float, reason: str) -> None:
        """The endpoint failed this request (no connection, dropped, timeout, 5xx)."""
        ep.errors += 1
        ep.fails += 1
        ep.last_error = reason
        if ep.retry_at:
            if sent_at >= ep.cooling_since:       # the probe (or, in a pool of one, any)
                self._cool(ep, now, ep.streak + 1, reason)
        elif ep.fails >= FAILURES_TO_COOL:
            self._cool(ep, now, 1, reason)

    def _cool(self, ep: Endpoint, now: float, streak: int, reason: str) -> None:
        before = ep.state
        wait = cooldown_s(streak, self.cooldown_base_s)
        ep.streak = streak
        ep.retry_at = now + wait
        ep.cooling_since = now
        after = ep.state
        if after != before and not self.single:
            what = ("is down: its probe failed too" if after == DOWN
                    else f"failed {ep.fails} times in a row")
            log.warning(f"endpoint_{after}", endpoint=ep.label,
                    cooldown_s=wait, reason=reason,
                    message=f"endpoint {ep.label} {what} ({reason}); next try in {wait:g}s")
        self._notify()

    def _recover(self, ep: Endpoint) -> None:
        was = ep.state
        ep.fails = ep.streak = 0
        ep.retry_at = 0.0
        if was != UP and not self.single:
            log.warning("endpoint_up", endpoint=ep.label,
                    message=f"endpoint {ep.label} answers again")
            self._notify()

    def _notify(self) -> None:
        """Wake requests waiting for an endpoint (wait) to look again."""
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    # -- the whole pool ------------------------------------------------------------------

    def down_message(self, now: float | None = None) -> str | None:
        """One line when every endpoint is failing and none has answered for `down_s`."""
        now = self._clock() if now is None else now
        if now - self.last_answer < self.down_s:
            return None
        if any(not ep.fails for ep in self.endpoints):
            return None
        causes = "; ".join(f"{ep.label}: {(ep.last_error or 'no answer')[:ERROR_CHARS]}"
                           for ep in self.endpoints)
        them = "it" if self.single else "them"
        return (f"no endpoint has answered for {self.down_s:g} s ({causes}); "
                f"fix {them}, then `{self.resume_hint}`")

    def stats(self, now: float | None = None) -> list[dict[str, Any]]:
        """Per endpoint, as of now: state, load, counts, rate over the pool's life, median
        latency of the latest LATENCY_SAMPLE answers."""
        now = self._clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        out = []
        for ep in self.endpoints:
            out.append({
                "endpoint": ep.label, "weight": ep.weight,
                "max_concurrency": ep.settings.max_concurrency, "state": ep.state,
                "in_flight": ep.in_flight, "completed": ep.completed, "errors": ep.errors,
                "rate": round(ep.completed / elapsed, 3),
                "median_latency_s": _median(ep.latencies),
                "retry_in_s": round(max(ep.retry_at - now, 0.0), 1) if ep.retry_at else None,
                "last_error": ep.last_error,
            })
        return out

    def snapshot_json(self) -> str:
        """What sessions.endpoints_json holds: {"as_of": UTC time, "endpoints": stats}."""
        return json.dumps({"as_of": utc_now(), "endpoints": self.stats()})


def _median(values: deque[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    value = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return round(value, 3)


def endpoint_lines(endpoints_json: str | None) -> list[str]:
    """sessions.endpoints_json as text, one line per endpoint, e.g.
    "endpoint http://gpu1:8000/v1/chat/completions: up, 12 in flight, 5120 completed
    (4.21/s), median 2.95 s, 3 errors". Nothing for a session without one."""
    if not endpoints_json:
        return []
    try:
        data = json.loads(endpoints_json)
        endpoints = data["endpoints"] if isinstance(data, dict) else data
        return [endpoint_line(e) for e in endpoints]
    except (ValueError, KeyError, TypeError, AttributeError):
        return ["endpoints: (not readable)"]


def endpoint_line(e: dict[str, Any]) -> str:
    state = str(e.get("state", "?"))
    if state != UP and e.get("retry_in_s"):
        state += f" (next try in {e['retry_in_s']:g} s)"
    median = e.get("median_latency_s")
    text = (f"endpoint {e.get('endpoint', '?')}: {state}, {e.get('in_flight', 0)} in flight, "
            f"{e.get('completed', 0)} completed ({float(e.get('rate') or 0):.2f}/s), "
            f"median {f'{median:.2f} s' if median is not None else '-'}, "
            f"{e.get('errors', 0)} errors")
    if e.get("state") != UP and e.get("last_error"):
        text += f"; last error: {e['last_error']}"
    return text
