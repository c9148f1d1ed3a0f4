"""`--workers auto`: find the concurrency where throughput stops rising, and keep it there.

This module owns the tuning: `Meter` wraps the HTTP session and counts every answered
request (HTTP 200) with its latency (the exchange only, not the wait for a slot) and every
slow-down (429/503); `Tuner` is the decision, pure and fed one measured `Window` at a time;
`Autotuner` is the task that runs beside the workers, measures windows (at least
`window_s` and `window_completions` answers, after one round of requests at a new level)
and sets the limiter's target (`AdaptiveLimiter.set_target`). The AIMD under the target
keeps working: a 429 still halves the limit at once.

    climb    from `start`, multiply the level by `step` while each step turns at least
             `min_gain` of the concurrency it adds into throughput and the median latency
             stays within `latency_bound` x the baseline (the lowest window median of the
             cycle: at first the window at `start`). A step fails after two windows, as
             one window can be noise.
    settle   at the step that fails: the knee by Little's law, the best rate seen x the
             baseline latency x (1 + headroom), below the failed level (past the knee
             requests only queue: the rate stays and the latency grows with the level).
             On a 429/503: the last level that passed, or `backoff` x the level.
    hold     back off by `backoff` on a 429/503. Every `reprobe_s`, or after two windows
             in a row over the latency bound, a cycle: windows at half the level, halving
             again while that keeps the rate (still past the knee), for a fresh baseline;
             then `probe_step` above the level held: kept, and the climb goes on, when it
             passes as a climb step would, otherwise settle again at the knee.

When the very first step fails, `start` may be past the knee already: a baseline is
measured at half of it, as in a cycle, before the knee is estimated.
The level never leaves 1..ceiling (`run.workers`).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass

import anyio
import httpx
import structlog

from asyncrunner.llm.client import SLOW_DOWN_STATUS, HttpSender
from asyncrunner.llm.throttle import AdaptiveLimiter

log = structlog.get_logger("asyncrunner.llm.autotune")

CLIMB = "climb"
HOLD = "hold"
REBASE = "rebase"
PROBE = "probe"


@dataclass(frozen=True, slots=True)
class AutotuneSettings:
    start: int = 4                  # the first level
    step: float = 1.5               # climb: level x step (at least +1)
    probe_step: float = 1.25        # re-probe from a held level
    min_gain: float = 0.5           # share of the added concurrency a step must turn into rate
    latency_bound: float = 1.5      # median latency at most this x the baseline
    headroom: float = 0.1           # above the knee estimate
    backoff: float = 0.8            # on a slow-down while holding
    window_s: float = 2.0           # a window lasts at least this long ...
    window_completions: int = 50    # ... and holds at least this many answers
    reprobe_s: float = 180.0        # between cycles while holding


DEFAULT_AUTOTUNE = AutotuneSettings()


@dataclass(frozen=True, slots=True)
class Window:
    """What one measurement window at one level saw."""

    level: int
    completions: int                # answered requests (HTTP 200)
    seconds: float
    median_latency_s: float
    slowdowns: int = 0              # 429/503 answers
    end: float = 0.0                # time.monotonic() when it ended

    @property
    def rate(self) -> float:
        return self.completions / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    level: int                      # the target from now on
    phase: str                      # climb | hold | rebase | probe
    settled: bool = False           # a climb, probe or back-off ended on `level`
    reason: str = ""


class Tuner:
    """The decision alone: `observe` one window at `level`, get the next level."""

    def __init__(self, settings: AutotuneSettings, ceiling: int) -> None:
        self.settings = settings
        self.ceiling = max(1, ceiling)
        self.level = max(1, min(settings.start, self.ceiling))
        self.phase = CLIMB
        self.baseline_s: float | None = None    # lowest window median of this cycle
        self._step = settings.step
        self._passed: Window | None = None      # the last window that passed, this cycle
        self._failed: Window | None = None      # the step that ended the climb
        self._rebase_from: Window | None = None  # the level a rebase window halved
        self._rechecked = False                 # the level failed once already
        self._first_level = self.level          # of this cycle's climb
        self._best_rate = 0.0                   # this cycle
        self._held_since = 0.0
        self._over = 0                          # hold windows in a row over the bound

    def observe(self, w: Window) -> Decision:
        if w.completions <= 0 or w.seconds <= 0:
            return Decision(self.level, self.phase)
        if self.phase == HOLD:
            return self._hold(w)
        if self.baseline_s is None or w.median_latency_s < self.baseline_s:
            self.baseline_s = w.median_latency_s
        if w.slowdowns:
            passed = self._passed
            back = (passed.level if passed is not None and passed.level < w.level
                    else int(w.level * self.settings.backoff))
            return self._settle(back, w, "the server asked to slow down (429/503)")
        self._best_rate = max(self._best_rate, w.rate)
        if self.phase == REBASE:
            return self._after_rebase(w)
        if self._passed is None or self._passes(w, self._passed):
            self._passed, self._rechecked = w, False
            if w.level >= self.ceiling:
                return self._settle(w.level, w, "reached the ceiling run.workers")
            self.level = self._up(w.level)
            return Decision(self.level, self.phase)
        if not self._rechecked:         # one window can be noise: measure this level again
            self._rechecked = True
            return Decision(self.level, self.phase)
        self._failed = w
        passed = self._passed
        assert passed is not None
        if self.phase == CLIMB and passed.level == self._first_level and passed.level >= 2:
            # The first step failed: the first level may be past the knee already, and its
            # latency no baseline. Measure one at half of it before estimating the knee.
            self._rebase_from = passed
            self.phase, self.level = REBASE, passed.level // 2
            return Decision(self.level, REBASE)
        return self._settle_at_knee(w)

    def _settle_at_knee(self, w: Window) -> Decision:
        failed = self._failed
        assert failed is not None
        reason = (f"{failed.level} gave no more throughput"
                  if failed.median_latency_s <= self._bound() else
                  f"the latency at {failed.level} rose past the bound")
        return self._settle(min(self._knee(), failed.level - 1), w, reason)

    def _passes(self, w: Window, before: Window) -> bool:
        added = w.level / before.level - 1.0
        faster = w.rate >= before.rate * (1.0 + self.settings.min_gain * added)
        return faster and w.median_latency_s <= self._bound()

    def _bound(self) -> float:
        return self.settings.latency_bound * (self.baseline_s or math.inf)

    def _knee(self) -> int:
        return round(self._best_rate * (self.baseline_s or 0.0) * (1.0 + self.settings.headroom))

    def _up(self, level: int) -> int:
        return min(self.ceiling, max(level + 1, round(level * self._step)))

    def _settle(self, level: int, w: Window, reason: str) -> Decision:
        self.level = max(1, min(self.ceiling, level))
        self.phase = HOLD
        self._held_since = w.end
        self._failed = None
        self._rechecked = False
        self._over = 0
        return Decision(self.level, HOLD, settled=True, reason=reason)

    def _hold(self, w: Window) -> Decision:
        if w.slowdowns:
            return self._settle(int(self.level * self.settings.backoff), w,
                                "the server asked to slow down (429/503)")
        self._over = self._over + 1 if w.median_latency_s > self._bound() else 0
        if self._over >= 2 or (w.end - self._held_since >= self.settings.reprobe_s
                               and self.level < self.ceiling):
            return self._cycle(w)
        return Decision(self.level, HOLD)

    def _cycle(self, held: Window) -> Decision:
        """Measure a fresh baseline at half the level, then probe above the level held."""
        self.baseline_s = None
        self._failed = None
        self._best_rate = held.rate
        self._passed = held
        self._step = self.settings.probe_step
        if self.level >= 2:
            self._rebase_from = held
            self.phase, self.level = REBASE, self.level // 2
        else:
            self.phase, self.level = PROBE, self._up(self.level)
        return Decision(self.level, self.phase)

    def _after_rebase(self, w: Window) -> Decision:
        before = self._rebase_from
        assert before is not None
        kept = 1.0 - self.settings.min_gain * (1.0 - w.level / before.level)
        if w.level >= 2 and w.rate >= before.rate * kept:
            # Half the level kept the rate: still past the knee, no baseline yet.
            self._rebase_from = w
            self.level = w.level // 2
            return Decision(self.level, REBASE)
        if self._failed is not None:            # the climb's first step had failed
            return self._settle_at_knee(w)
        held = self._passed
        assert held is not None
        if held.level >= self.ceiling:
            return self._settle(min(self._knee(), self.ceiling), w,
                                "the latency rose at the ceiling run.workers")
        self.phase, self.level = PROBE, self._up(held.level)
        return Decision(self.level, PROBE)


class Meter:
    """The HTTP session, counted: answers, their latencies, slow-downs. An `HttpSender`."""

    def __init__(self, http: HttpSender) -> None:
        self.http = http
        self.completions = 0
        self.slowdowns = 0
        self._latencies: list[float] = []
        self._wake_at = sys.maxsize
        self._wake = anyio.Event()

    async def send(self, request: httpx.Request) -> httpx.Response:
        started = time.monotonic()
        response = await self.http.send(request)
        if response.status_code == 200:
            self._latencies.append(time.monotonic() - started)
            self.completions += 1
            if self.completions >= self._wake_at:
                self._wake_at = sys.maxsize
                self._wake.set()
        elif response.status_code in SLOW_DOWN_STATUS:
            self.slowdowns += 1
        return response

    async def aclose(self) -> None:
        await self.http.aclose()

    async def answers(self, n: int) -> None:
        """Return once `n` more requests have been answered."""
        if n <= 0:
            return
        self._wake_at = self.completions + n
        self._wake = anyio.Event()
        await self._wake.wait()

    async def window(self, level: int, min_s: float, min_completions: int) -> Window:
        """Measure from now for at least `min_s` and `min_completions` answers."""
        started, done, slowed = time.monotonic(), self.completions, self.slowdowns
        self._latencies = []
        await anyio.sleep(min_s)
        await self.answers(min_completions - (self.completions - done))
        end = time.monotonic()
        latencies, self._latencies = self._latencies, []
        return Window(level, self.completions - done, end - started,
                      statistics.median(latencies) if latencies else 0.0,
                      self.slowdowns - slowed, end)


class Autotuner:
    """The task that tunes `limiter`'s target from what `meter` sees; `stop()` ends it."""

    def __init__(self, limiter: AdaptiveLimiter, meter: Meter,
                 settings: AutotuneSettings = DEFAULT_AUTOTUNE) -> None:
        self.limiter = limiter
        self.meter = meter
        self.settings = settings
        self.tuner = Tuner(settings, limiter.ceiling)
        self.settled: int | None = None     # the value it last settled on
        self._scope = anyio.CancelScope()
        limiter.set_target(self.tuner.level)

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        s = self.settings
        level = self.tuner.level
        log.info("workers_auto", phase="start", workers=level, ceiling=self.limiter.ceiling,
                 message=f"--workers auto: starting at {level} requests at a time, "
                         f"at most {self.limiter.ceiling} (run.workers)")
        with self._scope:
            changed = True
            while True:
                if changed:     # one round at the new level before measuring it
                    await self.meter.answers(level)
                window = await self.meter.window(level, s.window_s, s.window_completions)
                decision = self.tuner.observe(window)
                changed = decision.level != level
                level = self.limiter.set_target(decision.level)
                self._report(window, decision)

    def _report(self, w: Window, d: Decision) -> None:
        """Every window into the run log (debug); a newly settled value to the console."""
        median_ms = round(w.median_latency_s * 1000, 1)
        log.debug("workers_auto_window", level=w.level, rate=round(w.rate, 1),
                  median_ms=median_ms, slowdowns=w.slowdowns, phase=d.phase, next=d.level,
                  reason=d.reason or None)
        if not d.settled or d.level == self.settled:
            return
        self.settled = d.level
        log.info("workers_auto", phase="settled", workers=d.level, rate=round(w.rate, 1),
                 median_ms=median_ms, reason=d.reason,
                 message=f"--workers auto: settled on {d.level} requests at a time "
                         f"({d.reason}; {w.rate:.0f}/s at {w.level}, median latency "
                         f"{median_ms:g} ms)")
