"""The `studies` table: one row per sweep, written once, before any of its cells runs.

A study row holds the sweep's fully resolved spec (spec_json: the base configuration, the
cells with their settings, and the experiment id every cell x repeat was given), so that
`sweep --resume` needs nothing but the database. Its experiments are ordinary rows of
`experiments`, tagged with study_id / study_cell / study_repeat by the session that creates
them; this module only reads those tags.

`sweep_checksum` identifies the grid (what the experiments would answer, without ids): the
same SWEEP.yaml run again into the same database finds its first study by it and is refused.
The check and the insert share one transaction, so two sweeps started at once cannot both
create the same study.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from asyncrunner.clock import utc_now
from asyncrunner.db.schema import transaction


@dataclass(frozen=True, slots=True)
class StudyRecord:
    study_id: str
    name: str | None
    sweep_file: str | None
    sweep_checksum: str
    spec: dict[str, Any]
    created_at: str


class StudyExperiment(NamedTuple):
    """One experiment tagged with a study (as the experiments table holds it)."""

    experiment_id: str
    cell: str | None
    repeat: int | None
    status: str | None


@dataclass(frozen=True, slots=True)
class ExperimentOutcome:
    """What a sweep reports about one of its experiments."""

    experiment_id: str
    status: str | None
    n_done: int
    n_total: int
    f1: float | None
    failure_reason: str | None


def create_study(conn: sqlite3.Connection, *, study_id: str, name: str | None,
                 sweep_file: str | None, sweep_checksum: str,
                 spec: Mapping[str, Any]) -> str | None:
    """Insert the study unless one with the same checksum exists.

    Returns None once the row is committed, or the existing study's id (nothing written).
    """
    with transaction(conn):
        existing = find_by_checksum(conn, sweep_checksum)
        if existing is not None:
            return existing             # (the empty transaction commits nothing)
        conn.execute(
            "INSERT INTO studies (study_id, name, sweep_file, sweep_checksum, spec_json, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (study_id, name, sweep_file, sweep_checksum,
             json.dumps(spec, ensure_ascii=False), utc_now()))
    return None


def get_study(conn: sqlite3.Connection, study_id: str) -> StudyRecord | None:
    row = conn.execute(
        "SELECT study_id, name, sweep_file, sweep_checksum, spec_json, created_at "
        "FROM studies WHERE study_id = ?", (study_id,)).fetchone()
    if row is None:
        return None
    try:
        spec = json.loads(row[4])
    except ValueError:
        spec = None
    return StudyRecord(row[0], row[1], row[2], row[3],
                       spec if isinstance(spec, dict) else {}, row[5])


def find_by_checksum(conn: sqlite3.Connection, sweep_checksum: str) -> str | None:
    """The oldest study of this grid, if any."""
    row = conn.execute(
        "SELECT study_id FROM studies WHERE sweep_checksum = ? "
        "ORDER BY created_at, rowid LIMIT 1", (sweep_checksum,)).fetchone()
    return str(row[0]) if row else None


def experiments_of(conn: sqlite3.Connection, study_id: str) -> list[StudyExperiment]:
    """The study's experiments in the order they were created."""
    rows = conn.execute(
        "SELECT experiment_id, study_cell, study_repeat, status FROM experiments "
        "WHERE study_id = ? ORDER BY rowid", (study_id,)).fetchall()
    return [StudyExperiment(str(r[0]), r[1], r[2], r[3]) for r in rows]


def outcomes(conn: sqlite3.Connection,
             experiment_ids: Iterable[str]) -> dict[str, ExperimentOutcome]:
    """Status, progress and F1 of each experiment that exists (missing ids are left out)."""
    found: dict[str, ExperimentOutcome] = {}
    for experiment_id in experiment_ids:
        row = conn.execute(
            "SELECT status, n_narratives_completed, n_narratives_total, f1, failure_reason "
            "FROM experiments WHERE experiment_id = ?", (experiment_id,)).fetchone()
        if row is not None:
            found[experiment_id] = ExperimentOutcome(
                experiment_id, row[0], int(row[1] or 0), int(row[2] or 0),
                float(row[3]) if row[3] is not None else None, row[4])
    return found
