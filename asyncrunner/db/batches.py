"""The `batches` and `batch_items` tables: which narratives went into which provider batch.

A chunk's life in rows, each step one transaction:

    record_submitting   file uploaded, no batch yet: a `submitting:<file id>` row + its items
    record_created      the provider's batch id replaces the placeholder (row and items)
      (discard_submitting: the batch was refused outright; the chunk's narratives are free)
    record_polled       status and request counts as the provider reports them
    record_imported     its answers are stored: `imported_at` set, no longer pending

A batch is pending until `imported_at`; its narratives (`pending_keys`) are never sent again
while it is. `batch_info` / `batch_lines` are what `status` shows of them. The functions are
synchronous functions of a connection: the command paths call them directly, the run loop in
a worker thread with a connection of its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asyncrunner.clock import utc_now
from asyncrunner.db.schema import transaction
from asyncrunner.llm.batch_api import request_counts

SUBMITTING = "submitting"               # batches.status before the provider gave an id


@dataclass(frozen=True, slots=True)
class BatchRow:
    batch_id: str
    chunk: int
    input_file_id: str | None
    status: str
    n_requests: int


def pending_batches(conn: sqlite3.Connection, experiment_id: str) -> list[BatchRow]:
    rows = conn.execute(
        "SELECT batch_id, chunk, input_file_id, status, n_requests FROM batches "
        "WHERE experiment_id = ? AND imported_at IS NULL ORDER BY chunk",
        (experiment_id,)).fetchall()
    return [BatchRow(r[0], int(r[1]), r[2], str(r[3]), int(r[4])) for r in rows]


def pending_keys(conn: sqlite3.Connection, experiment_id: str) -> set[tuple[str, str]]:
    rows = conn.execute(
        "SELECT i.incident_id, i.narrative_type FROM batch_items i JOIN batches b "
        "ON b.batch_id = i.batch_id WHERE b.experiment_id = ? AND b.imported_at IS NULL",
        (experiment_id,)).fetchall()
    return {(str(r[0]), str(r[1])) for r in rows}


def has_row(conn: sqlite3.Connection, batch_id: str) -> bool:
    return conn.execute("SELECT 1 FROM batches WHERE batch_id = ?",
                        (batch_id,)).fetchone() is not None


def record_submitting(conn: sqlite3.Connection, experiment_id: str, input_file_id: str,
                      keys: list[tuple[str, str]]) -> BatchRow:
    """A chunk whose file is uploaded, before its batch exists: one transaction."""
    placeholder = f"{SUBMITTING}:{input_file_id}"
    row: list[BatchRow] = []

    def write() -> None:
        chunk = int(conn.execute("SELECT COALESCE(MAX(chunk), 0) + 1 FROM batches "
                                 "WHERE experiment_id = ?", (experiment_id,)).fetchone()[0])
        conn.execute(
            "INSERT INTO batches (batch_id, experiment_id, chunk, input_file_id, status, "
            "n_requests, submitted_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (placeholder, experiment_id, chunk, input_file_id, SUBMITTING, len(keys),
             utc_now(), utc_now()))
        conn.executemany("INSERT OR IGNORE INTO batch_items (batch_id, incident_id, "
                         "narrative_type) VALUES (?, ?, ?)",
                         [(placeholder, i, t) for i, t in keys])
        row.append(BatchRow(placeholder, chunk, input_file_id, SUBMITTING, len(keys)))

    with transaction(conn):
        write()
    return row[0]


def record_created(conn: sqlite3.Connection, placeholder: str, batch: Mapping[str, Any]) -> None:
    """The provider's batch id replaces the placeholder (row and items, one transaction)."""
    batch_id = str(batch["id"])

    def write() -> None:
        conn.execute("UPDATE batches SET batch_id = ?, status = ?, updated_at = ? "
                     "WHERE batch_id = ?",
                     (batch_id, str(batch.get("status") or "validating"), utc_now(), placeholder))
        conn.execute("UPDATE batch_items SET batch_id = ? WHERE batch_id = ?",
                     (batch_id, placeholder))
        _update_counts(conn, batch_id, batch)

    with transaction(conn):
        write()


def discard_submitting(conn: sqlite3.Connection, placeholder: str) -> None:
    """A chunk whose batch was refused outright (no batch exists): its narratives are
    remaining again."""
    def write() -> None:
        conn.execute("DELETE FROM batch_items WHERE batch_id = ?", (placeholder,))
        conn.execute("DELETE FROM batches WHERE batch_id = ? AND status = ?",
                     (placeholder, SUBMITTING))

    with transaction(conn):
        write()


def record_polled(conn: sqlite3.Connection, batch_id: str, batch: Mapping[str, Any]) -> None:
    with conn:
        _update_counts(conn, batch_id, batch)


def record_imported(conn: sqlite3.Connection, batch_id: str, batch: Mapping[str, Any]) -> None:
    """The batch ended and what it held is stored: it is no longer pending."""
    def write() -> None:
        _update_counts(conn, batch_id, batch)
        conn.execute("UPDATE batches SET imported_at = ? WHERE batch_id = ?",
                     (utc_now(), batch_id))

    with transaction(conn):
        write()


def _update_counts(conn: sqlite3.Connection, batch_id: str, batch: Mapping[str, Any]) -> None:
    done, failed = request_counts(batch)
    conn.execute(
        "UPDATE batches SET status = ?, n_completed = COALESCE(?, n_completed), "
        "n_failed = COALESCE(?, n_failed), output_file_id = COALESCE(?, output_file_id), "
        "error_file_id = COALESCE(?, error_file_id), updated_at = ? WHERE batch_id = ?",
        (str(batch.get("status")), done, failed, batch.get("output_file_id"),
         batch.get("error_file_id"), utc_now(), batch_id))


def response_format_used(conn: sqlite3.Connection, experiment_id: str) -> str | None:
    """The experiment's recorded `response_format_used` (None without a row): what its batch
    lines were sent with."""
    row = conn.execute("SELECT response_format_used FROM experiments WHERE experiment_id = ?",
                       (experiment_id,)).fetchone()
    return row[0] if row is not None else None


# --------------------------------------------------------------------------- status


def batch_info(conn: sqlite3.Connection, experiment_id: str) -> list[dict[str, Any]]:
    """The experiment's batches, oldest chunk first ([] without any, or on an older schema)."""
    try:
        cursor = conn.execute(
            "SELECT batch_id, chunk, status, n_requests, n_completed, n_failed, input_file_id, "
            "output_file_id, error_file_id, submitted_at, updated_at, imported_at "
            "FROM batches WHERE experiment_id = ? ORDER BY chunk", (experiment_id,))
    except sqlite3.OperationalError:
        return []
    names = [d[0] for d in cursor.description]
    out = []
    for row in cursor.fetchall():
        item = dict(zip(names, row, strict=True))
        item["pending"] = item["imported_at"] is None
        out.append(item)
    return out


def batch_lines(info: list[dict[str, Any]]) -> list[str]:
    """What `status` shows of the batches (batch_info's list): a summary line, then one
    line per batch."""
    if not info:
        return []
    pending = sum(1 for b in info if b["pending"])
    lines = [f"batches: {len(info)} ({pending} pending, {len(info) - pending} imported)"]
    for b in info:
        done = b["n_completed"] if b["n_completed"] is not None else "?"
        failed = f", {b['n_failed']} failed" if b["n_failed"] else ""
        when = (f"imported {b['imported_at']}" if b["imported_at"]
                else f"last polled {b['updated_at']}")
        lines.append(f"  chunk {b['chunk']} {b['batch_id']}: {b['status']} "
                     f"{done}/{b['n_requests']}{failed}; submitted {b['submitted_at']}, {when}")
    return lines
