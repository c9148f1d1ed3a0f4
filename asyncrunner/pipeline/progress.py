"""Rate, ETA and the progress line, computed from snapshots the writer publishes.

The rate is this session's, over a recent window: a resumed run never counts the earlier
sessions' completions as its own speed, and a run that slows down shows it within minutes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the writer knows after a commit. Immutable: readers never see it change."""

    done: int                 # results stored for the experiment, all sessions
    total: int
    session_done: int         # results this session committed
    errors: dict[str, int] = field(default_factory=dict)   # this session, by category
    rate: float = 0.0         # narratives/s, recent window of this session
    elapsed_s: float = 0.0    # this session
    eta: datetime | None = None
    prompt_tokens: int = 0    # this session
    completion_tokens: int = 0
    concurrency: float | None = None
    waiting_until: datetime | None = None   # every request waits for the server (local time)
    waiting_for: str | None = None          # what the server said (HTTP 429, Retry-After ...)

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    @property
    def tokens_per_s(self) -> float:
        if not self.elapsed_s:
            return 0.0
        return (self.prompt_tokens + self.completion_tokens) / self.elapsed_s


class RateWindow:
    """Completions per second over the last `window_s` seconds of this session."""

    def __init__(self, window_s: float = 300.0) -> None:
        self.window_s = window_s
        self.started = time.monotonic()
        self._points: deque[tuple[float, int]] = deque([(self.started, 0)])

    def add(self, session_done: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._points.append((now, session_done))
        while len(self._points) > 2 and now - self._points[1][0] >= self.window_s:
            self._points.popleft()
        t0, n0 = self._points[0]
        return (session_done - n0) / (now - t0) if now > t0 else 0.0

    def elapsed(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.started


def eta_from(rate: float, remaining: int, now: datetime | None = None) -> datetime | None:
    if remaining <= 0:
        return now or datetime.now().astimezone()
    if rate <= 0:
        return None
    return (now or datetime.now().astimezone()) + timedelta(seconds=remaining / rate)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def progress_line(s: Snapshot) -> str:
    """The contract's plain line, for logs and non-terminal output."""
    eta = s.eta.strftime("%Y-%m-%d %H:%M:%S") if s.eta else "unknown"
    line = (
        f"[PROGRESS] {s.done}/{s.total} ({s.percent:.1f}%) | Rate: {s.rate:.2f}/sec | "
        f"ETA: {eta} | Elapsed: {format_duration(s.elapsed_s)}"
    )
    if s.waiting_until is not None:
        line += f" | Waiting: until {s.waiting_until:%H:%M:%S} ({s.waiting_for})"
    return line
