"""The `sessions` table: one row per process that worked on an experiment.

A session is a new run, a resume or a retry of error rows. Its row says who (PID, host,
asyncrunner and parser version), why (intent), with what (the effective settings, their hash,
their difference from the experiment's stored configuration, the keys `--allow-drift` let
change), how much it set out to do (`target`), how much it did and how it ended.

What a session did is counted from the results themselves: every result it writes or
retries gets `processed_at` (UTC, the format `started_at` uses) at or after its start, so
`n_done` is exact live (status of a running retry: k of E) and after a `kill -9` alike,
without the writer knowing about sessions. A session found still open when the next one
starts (the lock proved its process gone) is closed then as `died`.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from typing import Any

from asyncrunner import __version__
from asyncrunner.clock import utc_now
from asyncrunner.llm.parsing import PARSER_VERSION
from asyncrunner.vocab import SessionEnd


def counts_since(conn: sqlite3.Connection, experiment_id: str, started_at: str,
                 until: str | None = None) -> tuple[int, int]:
    """(results written or retried since `started_at` [and before `until`], of which errors)."""
    row = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(error_occurred), 0) FROM narrative_results "
        "WHERE experiment_id = ? AND processed_at >= ? AND (? IS NULL OR processed_at < ?)",
        (experiment_id, started_at, until, until)).fetchone()
    return int(row[0]), int(row[1])


def open_session(conn: sqlite3.Connection, *, session_id: str, experiment_id: str,
                 intent: str, target: int, settings: dict[str, Any], settings_hash: str,
                 diff: dict[str, Any], allowed_drift: list[str],
                 retry_categories: list[str] | None) -> str:
    """Close sessions left open by dead processes, then record this one; returns its start."""
    started_at = utc_now()
    for (old_id, old_start) in conn.execute(
            "SELECT session_id, started_at FROM sessions WHERE experiment_id = ? "
            "AND ended_at IS NULL", (experiment_id,)).fetchall():
        done, errors = counts_since(conn, experiment_id, old_start, started_at)
        conn.execute(
            "UPDATE sessions SET ended_as = ?, end_reason = ?, n_done = ?, n_errors = ? "
            "WHERE session_id = ?",
            (SessionEnd.DIED, "no clean end (killed, or the machine stopped); found by the "
             "next session", done, errors, old_id))
    conn.execute(
        "INSERT INTO sessions (session_id, experiment_id, intent, pid, host, started_at, "
        "target, n_done, n_errors, retry_categories, settings_hash, settings_json, "
        "settings_diff, allowed_drift, asyncrunner_version, parser_version) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?, ?, ?, ?, ?)",
        (session_id, experiment_id, intent, os.getpid(), socket.gethostname(), started_at,
         target, json.dumps(retry_categories) if retry_categories is not None else None,
         settings_hash, json.dumps(settings, default=str), json.dumps(diff, default=str),
         json.dumps(allowed_drift), __version__, PARSER_VERSION))
    return started_at


def end_session(conn: sqlite3.Connection, session_id: str, ended_as: SessionEnd,
                reason: str | None = None) -> None:
    row = conn.execute("SELECT experiment_id, started_at FROM sessions WHERE session_id = ?",
                       (session_id,)).fetchone()
    if row is None:
        return
    done: int | None
    errors: int | None
    try:
        done, errors = counts_since(conn, row[0], row[1])
    except sqlite3.Error:
        # The session may be ending *because* the results table is unusable; its row
        # still records how it ended.
        done = errors = None
    conn.execute(
        "UPDATE sessions SET ended_at = ?, ended_as = ?, end_reason = ?, n_done = ?, "
        "n_errors = ? WHERE session_id = ?",
        (utc_now(), ended_as, reason, done, errors, session_id))


_JSON_FIELDS = ("settings_json", "settings_diff", "allowed_drift", "retry_categories")


def list_sessions(conn: sqlite3.Connection, experiment_id: str) -> list[dict[str, Any]]:
    """Every session of an experiment, oldest first; open ones counted as of now."""
    cursor = conn.execute("SELECT * FROM sessions WHERE experiment_id = ? ORDER BY started_at",
                          (experiment_id,))
    names = [d[0] for d in cursor.description]
    out = []
    for values in cursor.fetchall():
        row = dict(zip(names, values, strict=True))
        for name in _JSON_FIELDS:
            row[name] = json.loads(row[name]) if row[name] else None
        row["settings"] = row.pop("settings_json")
        if row["ended_at"] is None and row["ended_as"] is None:
            row["n_done"], row["n_errors"] = counts_since(conn, experiment_id,
                                                          row["started_at"])
        out.append(row)
    return out


def config_history(conn: sqlite3.Connection, experiment_id: str) -> list[dict[str, Any]]:
    cursor = conn.execute(
        "SELECT changed_at, session_id, key, old_value, new_value, reason FROM config_history "
        "WHERE experiment_id = ? ORDER BY history_id", (experiment_id,))
    return [{"changed_at": r[0], "session_id": r[1], "key": r[2],
             "old": json.loads(r[3]) if r[3] is not None else None,
             "new": json.loads(r[4]) if r[4] is not None else None, "reason": r[5]}
            for r in cursor.fetchall()]


def metrics_history(conn: sqlite3.Connection, experiment_id: str) -> list[dict[str, Any]]:
    cursor = conn.execute(
        "SELECT recorded_at, superseded_by_session, completed_at, n_results, n_errors, n_tp, "
        "n_fp, n_tn, n_fn, precision, recall, f1, accuracy FROM metrics_history "
        "WHERE experiment_id = ? ORDER BY history_id", (experiment_id,))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
