"""Timestamps, in one format each: local wall time for what operators read in the
experiments table (start, end, progress, ETA), UTC ISO-8601 for per-result times."""

from __future__ import annotations

from datetime import UTC, datetime

LOCAL_FORMAT = "%Y-%m-%d %H:%M:%S"


def local_now() -> str:
    return datetime.now().astimezone().strftime(LOCAL_FORMAT)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_local(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, LOCAL_FORMAT).astimezone()
    except ValueError:
        return None
