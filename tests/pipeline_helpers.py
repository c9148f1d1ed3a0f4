"""Shared building blocks for the in-process pipeline-stage tests.

A real SQLite file (schema from `asyncrunner.db.schema.connect`), rows written with plain SQL,
and message factories. Nothing of the package itself is patched.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from asyncrunner.db.schema import connect
from asyncrunner.pipeline.messages import Narrative, Result
from asyncrunner.vocab import ErrorCategory

EXPERIMENT_ID = "exp-a"
CHECKSUM = "sum-a"
NARRATIVE_TYPE = "NarrativeLE"
PROCESSED_AT = "2025-01-01T00:00:00.000000Z"


# --- database ------------------------------------------------------------------------------


def incident(i: int) -> str:
    return f"inc-{i:04d}"


def database(tmp_path: Path) -> Iterator[Path]:
    """Fixture body (`db = pytest.fixture(name="db")(database)`): a database with the
    experiments EXPERIMENT_ID and "other", and one connection held open meanwhile. SQLite
    checkpoints and syncs the WAL whenever its last connection closes; without a keeper,
    every short-lived connection of a test would pay for that."""
    path = tmp_path / "experiments.db"
    with closing(connect(path)) as keeper:
        for experiment_id in (EXPERIMENT_ID, "other"):
            add_experiment(keeper, experiment_id)
        yield path


open_database = contextmanager(database)


def add_experiment(conn: sqlite3.Connection, experiment_id: str, *, total: int = 0,
                   checksum: str = CHECKSUM) -> None:
    conn.execute(
        "INSERT INTO experiments (experiment_id, status, data_checksum, n_narratives_total) "
        "VALUES (?, 'running', ?, ?)",
        (experiment_id, checksum, total),
    )


def add_narratives(path: Path, numbers: Iterable[tuple[int, str]]) -> None:
    """One source narrative per (number, checksum), in that order: incident `incident(i)`,
    text "narrative text i"."""
    with closing(connect(path)) as conn:
        conn.executemany(
            "INSERT INTO source_narratives (incident_id, narrative_type, narrative_text, "
            "manual_flag_ind, manual_flag, data_source, data_checksum) "
            "VALUES (?, ?, ?, ?, ?, 'test.csv', ?)",
            [(incident(i), NARRATIVE_TYPE, f"narrative text {i}", i % 2, i % 3 % 2, checksum)
             for i, checksum in numbers],
        )


def add_result_rows(path: Path, numbers: Iterable[int], *, experiment_id: str = EXPERIMENT_ID,
                    error: bool = False) -> None:
    """Stored results (plain SQL) for narratives `incident(i)`, errored or answered."""
    with closing(connect(path)) as conn:
        conn.executemany(
            "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
            "detected, error_occurred, error_category, error_message) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(experiment_id, incident(i), NARRATIVE_TYPE, None if error else 1, int(error),
              "timeout" if error else None, "stored failure" if error else None)
             for i in numbers],
        )


def query(path: Path, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    with closing(connect(path, migrate_schema=False)) as conn:
        return list(conn.execute(sql, params))


def stored_results(path: Path, experiment_id: str = EXPERIMENT_ID) -> list[sqlite3.Row]:
    return query(path, "SELECT * FROM narrative_results WHERE experiment_id = ? "
                       "ORDER BY result_id", (experiment_id,))


def stored_incidents(path: Path, experiment_id: str = EXPERIMENT_ID) -> list[str]:
    return [row["incident_id"] for row in stored_results(path, experiment_id)]


def experiment_row(path: Path, experiment_id: str = EXPERIMENT_ID) -> sqlite3.Row:
    rows = query(path, "SELECT * FROM experiments WHERE experiment_id = ?", (experiment_id,))
    assert len(rows) == 1
    return rows[0]


def aiosqlite_threads() -> list[threading.Thread]:
    """aiosqlite connection threads still alive (each unclosed connection keeps one)."""
    alive = [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]
    for thread in alive:
        thread.join(timeout=2)
    return [t for t in alive if t.is_alive()]


# --- messages ------------------------------------------------------------------------------


def make_narrative(i: int, *, text: str = "She said he hit her.") -> Narrative:
    return Narrative(narrative_id=i, incident_id=incident(i), narrative_type=NARRATIVE_TYPE,
                     text=text, manual_flag_ind=1, manual_flag=i % 2)


def make_result(i: int, *, error_category: str | None = None, attempts: int = 1,
                error_message: str | None = None, tokens: tuple[int, int] = (10, 5),
                detected: int | None = 1) -> Result:
    failed = error_category is not None
    return Result(
        narrative_id=i, incident_id=incident(i), narrative_type=NARRATIVE_TYPE,
        manual_flag_ind=1, manual_flag=i % 2, processed_at=PROCESSED_AT,
        attempt_count=attempts, response_sec=0.25, raw_response=f"raw {i}",
        prompt_tokens=tokens[0], completion_tokens=tokens[1],
        detected=None if failed else detected, confidence=None if failed else 0.75,
        indicators=None if failed else '["cue"]', rationale=None if failed else "because",
        error_category=None if error_category is None else ErrorCategory(error_category),
        error_message=(error_message or f"{error_category} failure") if failed else None,
    )
