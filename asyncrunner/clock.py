"""Timestamps, in one format each: local wall time for what operators read in the
experiments table (start, end, progress, ETA), UTC ISO-8601 for per-result times."""

from __future__ import annotations

import time
from datetime import datetime

LOCAL_FORMAT = "%Y-%m-%d %H:%M:%S"


def local_now() -> str:
    return datetime.now().astimezone().strftime(LOCAL_FORMAT)


class _UtcStamps:
    """UTC ISO-8601 with microseconds (`2026-12-01T17:30:00.123456Z`). Called once per
    result, so the part down to the second is formatted once per second and the
    microseconds appended."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._second = second
        return f"{self._prefix}{int((now - second) * 1_000_000):06d}Z"


utc_now = _UtcStamps()
