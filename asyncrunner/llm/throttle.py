"""Shared back-pressure for all workers: an AIMD concurrency limit plus a common pause.

When the server says slow down (429/503), every worker slows down, not only the one that
was told: the allowed concurrency halves and everyone waits out the server's Retry-After.
As in TCP, a slow-down answer to a request sent before the last decrease does not halve
again: a burst of 429s from one round of requests is one decrease, not fifty. Each success
adds 1/limit, so the limit climbs back by about one per round of requests, and never above
the target: the `--workers` ceiling, or below it the value `--workers auto` tunes
(`set_target`, see autotune.py), under which halving and climbing back work the same.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio


@dataclass(frozen=True, slots=True)
class ThrottleStats:
    limit: float
    in_flight: int
    ceiling: int
    decreases: int
    paused_for_s: float
    pause_reason: str | None = None   # while paused: what the server said
    target: int | None = None         # what the limit climbs back to (<= ceiling)


# A common pause at least this long is announced (on_pause): shorter ones pass unseen.
VISIBLE_PAUSE_S = 2.0


class TokenBudget:
    """An optional tokens-per-minute limit over a sliding 60 s window.

    A request is charged an estimate before it is sent (prompt characters / chars-per-token,
    plus the mean completion seen so far); the estimate is replaced by the usage the server
    reports, and the chars-per-token ratio learns from it.
    """

    WINDOW_S = 60.0

    def __init__(self, tokens_per_minute: float, max_completion_tokens: int) -> None:
        self.tpm = tokens_per_minute
        self._spent: deque[list[float]] = deque()  # [time, tokens]
        self._chars_per_token = 4.0
        self._completion_mean = max_completion_tokens / 2

    def estimate(self, prompt_chars: int) -> float:
        return prompt_chars / self._chars_per_token + self._completion_mean

    def _used(self, now: float) -> float:
        while self._spent and now - self._spent[0][0] >= self.WINDOW_S:
            self._spent.popleft()
        return sum(entry[1] for entry in self._spent)

    async def reserve(self, tokens: float) -> list[float]:
        while True:
            now = time.monotonic()
            # An empty window always admits one request, however large, so nothing starves.
            if not self._spent or self._used(now) + tokens <= self.tpm:
                entry = [now, tokens]
                self._spent.append(entry)
                return entry
            await anyio.sleep(max(0.05, self._spent[0][0] + self.WINDOW_S - now))

    def settle(self, entry: list[float], prompt_chars: int, prompt_tokens: int | None,
               completion_tokens: int | None) -> None:
        if prompt_tokens:
            observed = prompt_chars / prompt_tokens
            self._chars_per_token = 0.8 * self._chars_per_token + 0.2 * observed
            entry[1] = prompt_tokens + (completion_tokens or 0)
        if completion_tokens is not None:
            self._completion_mean = 0.8 * self._completion_mean + 0.2 * completion_tokens


class AdaptiveLimiter:
    """The concurrency limit itself: a plain counter. `acquire` and `release` touch no lock
    and never wait while a slot is free; only a request that finds every slot taken queues,
    first come first served, and `release` hands its slot straight to the first in line."""

    def __init__(self, ceiling: int, *, floor: int = 1,
                 requests_per_minute: float | None = None,
                 on_pause: Callable[[float, str], None] | None = None) -> None:
        """`on_pause(seconds, reason)` is told when the server makes every request wait
        for VISIBLE_PAUSE_S or longer (once per pause, again when a pause is extended), so
        that a long silence is explained on the console and in the log."""
        self.ceiling = ceiling
        self.floor = floor
        self._target = ceiling            # the limit climbs back to this (set_target)
        self._limit = float(ceiling)
        self._allowed = ceiling           # int(self._limit), kept in step with it
        self._in_flight = 0
        self._waiters: deque[anyio.Event] = deque()
        self._paused_until = 0.0
        self._pause_reason: str | None = None
        self._announced_until = 0.0
        self.on_pause = on_pause
        self._last_decrease = -1e9
        self._decreases = 0
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_slot = 0.0

    def stats(self) -> ThrottleStats:
        return ThrottleStats(
            limit=self._limit, in_flight=self._in_flight, ceiling=self.ceiling,
            decreases=self._decreases,
            paused_for_s=max(0.0, self._paused_until - time.monotonic()),
            pause_reason=self._pause_reason if self._paused_until > time.monotonic() else None,
            target=self._target,
        )

    def set_target(self, n: int) -> int:
        """Let the limit climb to `n` (clamped to floor..ceiling) instead of the ceiling;
        returns the target set. A limit at the old target moves to the new one at once; a
        limit held below it by a recent slow-down keeps climbing back one step per success,
        and a limit above the new target drops to it (requests in flight finish)."""
        target = max(self.floor, min(self.ceiling, n))
        if self._limit >= self._target or self._limit > target:
            self._limit = float(target)
            self._allowed = target
        self._target = target
        if self._waiters:
            self._wake()
        return target

    async def acquire(self) -> None:
        if self._in_flight < self._allowed and not self._waiters:
            self._in_flight += 1          # the fast path: no lock, no wait
        else:
            await self._wait_for_slot()
        if self._paused_until or self._interval:
            try:
                await self._wait_turn()
            except BaseException:
                self._release()
                raise

    async def _wait_for_slot(self) -> None:
        granted = anyio.Event()
        self._waiters.append(granted)
        try:
            await granted.wait()          # release() counted the slot in for us
        except BaseException:
            if granted.is_set():          # handed a slot, then cancelled: give it back
                self._release()
            else:
                self._waiters.remove(granted)
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
        # Never awaits, so it cannot be interrupted: a cancelled request still gives its
        # slot back (a release that waited for a lock inside a cancelled scope would raise
        # at once and leak the slot, shrinking the limit for good).
        self._release()

    def _release(self) -> None:
        self._in_flight -= 1
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Hand free slots to waiting requests, oldest first."""
        while self._waiters and self._in_flight < self._allowed:
            self._in_flight += 1
            self._waiters.popleft().set()

    def on_success(self) -> None:
        if self._limit < self._target:
            self._limit = min(float(self._target), self._limit + 1.0 / max(self._limit, 1.0))
            self._allowed = int(self._limit)
            if self._waiters:
                self._wake()

    def on_slow_down(self, retry_after_s: float | None, sent_at: float | None = None,
                     reason: str | None = None) -> None:
        """`sent_at`: when the refused request was sent (time.monotonic()); None = now.
        `reason`: what the server said, for the announcement of a long pause."""
        now = time.monotonic()
        if retry_after_s and now + retry_after_s > self._paused_until:
            self._paused_until = now + retry_after_s
            self._pause_reason = reason or f"the server asked to wait {retry_after_s:g}s"
            if (retry_after_s >= VISIBLE_PAUSE_S
                    and self._paused_until >= self._announced_until + 1.0):
                self._announced_until = self._paused_until
                if self.on_pause is not None:
                    self.on_pause(retry_after_s, self._pause_reason)
        if (now if sent_at is None else sent_at) > self._last_decrease:
            self._last_decrease = now
            self._decreases += 1
            self._limit = max(float(self.floor), self._limit / 2.0)
            self._allowed = int(self._limit)
