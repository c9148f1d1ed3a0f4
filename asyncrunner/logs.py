"""Structured logging: one JSON line per event in `log_dir/<experiment_id>/run.jsonl`,
and a short human line on the console rendered from the same event.

Context (experiment id, session) is bound once per run with contextvars; workers add the
incident id and narrative type. Narrative text and secrets are never passed to a logger;
as a second line of defence, keys that could hold them are dropped before rendering.
"""

from __future__ import annotations

import json
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO, Any

import structlog

from asyncrunner.textsafe import for_terminal

FORBIDDEN_KEYS = frozenset({"text", "narrative_text", "narrative", "api_key", "authorization",
                            "prompt", "user_prompt", "messages", "content"})
# Events the console shows at info level; everything at warning or above is shown too.
CONSOLE_EVENTS = frozenset({
    "run_start", "ingest", "resume", "config_drift", "stale_lock", "backup", "signal",
    "run_finished", "run_interrupted", "run_failed", "exports", "retry_errors_ignored",
    "response_format", "workers_auto",
    # the Batch API: a 24-hour poll must not be silent on the console
    "batch_submitted", "batch_status", "batch_imported", "batch_resume", "batch_adopted",
})


class _Sinks:
    def __init__(self) -> None:
        self.file: IO[str] | None = None
        # None: whatever sys.stderr is when the line is written, so that the live progress
        # bar (which redirects stderr while it runs) prints log lines above itself.
        self.console: IO[str] | None = None
        self.quiet_console_info = False


_sinks = _Sinks()


def _drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in FORBIDDEN_KEYS & event.keys():
        event.pop(key)
    return event


def _console_line(event: MutableMapping[str, Any]) -> str:
    name = event.get("event", "")
    level = event.get("level", "info")
    extras = " ".join(
        f"{k}={v}" for k, v in event.items()
        if k not in ("event", "level", "timestamp", "experiment_id", "session", "message")
    )
    prefix = "" if level == "info" else f"{level.upper()}: "
    message = event.get("message")
    body = message if message else name
    return for_terminal(f"{prefix}{body}" + (f" ({extras})" if extras and not message else ""))


def _fan_out(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _sinks.file is not None:
        _sinks.file.write(json.dumps(event, default=str) + "\n")
        _sinks.file.flush()
    level = event.get("level", "info")
    show = level in ("warning", "error", "critical") or (
        event.get("event") in CONSOLE_EVENTS and not _sinks.quiet_console_info
    )
    if show:
        print(_console_line(event), file=_sinks.console or sys.stderr, flush=True)
    raise structlog.DropEvent


def configure(*, console: IO[str] | None = None) -> None:
    """Process-wide set-up; call again to change sinks (tests run many runs in one process)."""
    _sinks.console = console
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            _fan_out,
        ],
        cache_logger_on_first_use=False,
    )


def open_run_log(log_dir: str | Path, experiment_id: str) -> Path:
    """Append to the experiment's run.jsonl (one file across all its sessions)."""
    close_run_log()
    folder = Path(log_dir) / experiment_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.jsonl"
    _sinks.file = path.open("a", encoding="utf-8")
    return path


def close_run_log() -> None:
    if _sinks.file is not None:
        _sinks.file.close()
        _sinks.file = None


def bind(**context: Any) -> None:
    structlog.contextvars.bind_contextvars(**context)


def clear() -> None:
    structlog.contextvars.clear_contextvars()
