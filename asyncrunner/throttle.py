"""Shared back-pressure for all workers: an AIMD concurrency limit plus a common pause.

When the server says slow down (429/503), every worker slows down, not only the one that
was told: the allowed concurrency halves (at most once per `cooldown_s`, so one burst of
429s is one decrease, not fifty) and everyone waits out the server's Retry-After. Each
success adds 1/limit, so the limit climbs back by about one per window of full
concurrency, and never above the `--workers` ceiling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio


@dataclass(frozen=True, slots=True)
class ThrottleStats:
    limit: float
    in_flight: int
    ceiling: int
    decreases: int
    paused_for_s: float


class AdaptiveLimiter:
    def __init__(self, ceiling: int, *, cooldown_s: float = 1.0, floor: int = 1,
                 requests_per_minute: float | None = None) -> None:
        self.ceiling = ceiling
        self.floor = floor
        self.cooldown_s = cooldown_s
        self._limit = float(ceiling)
        self._in_flight = 0
        self._changed = anyio.Condition()
        self._paused_until = 0.0
        self._last_decrease = -1e9
        self._decreases = 0
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_slot = 0.0

    def stats(self) -> ThrottleStats:
        return ThrottleStats(
            limit=self._limit, in_flight=self._in_flight, ceiling=self.ceiling,
            decreases=self._decreases,
            paused_for_s=max(0.0, self._paused_until - time.monotonic()),
        )

    async def acquire(self) -> None:
        async with self._changed:
            while self._in_flight >= int(self._limit):
                await self._changed.wait()
            self._in_flight += 1
        try:
            await self._wait_turn()
        except BaseException:
            await self.release()
            raise

    async def _wait_turn(self) -> None:
        """Honour a common pause (Retry-After) and the optional requests-per-minute pace."""
        now = time.monotonic()
        start = max(now, self._paused_until)
        if self._interval:
            start = max(start, self._next_slot)
            self._next_slot = start + self._interval
        if start > now:
            await anyio.sleep(start - now)

    async def release(self) -> None:
        async with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def on_success(self) -> None:
        self._limit = min(float(self.ceiling), self._limit + 1.0 / max(self._limit, 1.0))

    def on_slow_down(self, retry_after_s: float | None) -> None:
        now = time.monotonic()
        if retry_after_s:
            self._paused_until = max(self._paused_until, now + retry_after_s)
        if now - self._last_decrease >= self.cooldown_s:
            self._last_decrease = now
            self._decreases += 1
            self._limit = max(float(self.floor), self._limit / 2.0)
