"""Read-only queries: an experiment's narrative set, counts, summaries, listings.

Nothing here writes. Every function takes a synchronous connection (see schema.connect);
the producer's async paging lives in producer.py and uses the same SQL fragments.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncrunner.db.locks import probe
from asyncrunner.vocab import RESUMABLE, ErrorCategory


@dataclass(frozen=True, slots=True)
class ExperimentRecord:
    experiment_id: str
    experiment_name: str | None
    status: str | None
    model_name: str | None
    model_provider: str | None
    temperature: float | None
    api_url: str | None
    system_prompt: str | None
    user_template: str | None
    prompt_version: str | None
    run_seed: int | None
    data_file: str | None
    data_checksum: str | None
    max_narratives: int | None
    n_narratives_total: int | None
    n_narratives_completed: int | None
    start_time: str | None
    end_time: str | None
    log_dir: str | None
    config_json: str | None
    failure_reason: str | None

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json) if self.config_json else {}


_RECORD_FIELDS = ExperimentRecord.__slots__


def get_experiment(conn: sqlite3.Connection, experiment_id: str) -> ExperimentRecord | None:
    row = conn.execute(
        f"SELECT {', '.join(_RECORD_FIELDS)} FROM experiments WHERE experiment_id = ?",
        (experiment_id,),
    ).fetchone()
    return ExperimentRecord(*row) if row else None


def set_cutoff(conn: sqlite3.Connection, checksum: str, max_narratives: int | None) -> int | None:
    """The highest narrative_id in an experiment's set: its first `max_narratives`
    narratives of the file in file order, or all of them (None)."""
    if max_narratives is None:
        return None
    row = conn.execute(
        "SELECT narrative_id FROM source_narratives WHERE data_checksum = ? "
        "ORDER BY narrative_id LIMIT 1 OFFSET ?",
        (checksum, max_narratives - 1),
    ).fetchone()
    return row[0] if row else None


def count_set(conn: sqlite3.Connection, checksum: str, cutoff: int | None) -> int:
    row = conn.execute(
        "SELECT COUNT(*) FROM source_narratives WHERE data_checksum = ? "
        "AND (? IS NULL OR narrative_id <= ?)",
        (checksum, cutoff, cutoff),
    ).fetchone()
    return int(row[0])


def count_results(conn: sqlite3.Connection, experiment_id: str) -> tuple[int, int]:
    """(results stored, of which errors) for an experiment."""
    row = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(error_occurred), 0) FROM narrative_results "
        "WHERE experiment_id = ?",
        (experiment_id,),
    ).fetchone()
    return int(row[0]), int(row[1])


def errors_by_category(conn: sqlite3.Connection, experiment_id: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT COALESCE(error_category, 'unknown'), COUNT(*) FROM narrative_results "
        "WHERE experiment_id = ? AND error_occurred = 1 GROUP BY 1",
        (experiment_id,),
    ).fetchall()
    found = {str(cat): int(n) for cat, n in rows}
    # The contract's order first, then anything an older version stored.
    ordered = {str(c): found[c] for c in ErrorCategory if found.get(c)}
    return ordered | {cat: n for cat, n in found.items() if cat not in ordered}


def token_totals(conn: sqlite3.Connection, experiment_id: str) -> tuple[int, int, float]:
    """(prompt tokens, completion tokens, summed response seconds), tokens over every
    request a narrative took (parse retries included)."""
    row = conn.execute(
        "SELECT COALESCE(SUM(COALESCE(prompt_tokens_total, prompt_tokens)), 0), "
        "COALESCE(SUM(COALESCE(completion_tokens_total, completion_tokens)), 0), "
        "COALESCE(SUM(response_sec), 0) FROM narrative_results WHERE experiment_id = ?",
        (experiment_id,),
    ).fetchone()
    return int(row[0]), int(row[1]), float(row[2])


def answer_stats(conn: sqlite3.Connection, experiment_id: str) -> dict[str, int]:
    """Answers (rows without an error), how many a repair turn or a resample produced, and
    how many answers were cut off at max_tokens (finish_reason 'length')."""
    row = conn.execute(
        "SELECT COALESCE(SUM(error_occurred = 0), 0), "
        "COALESCE(SUM(answer_source = 'repair'), 0), "
        "COALESCE(SUM(answer_source = 'resample'), 0), "
        "COALESCE(SUM(finish_reason = 'length'), 0) "
        "FROM narrative_results WHERE experiment_id = ?", (experiment_id,)).fetchone()
    return {"answers": int(row[0]), "repair": int(row[1]), "resample": int(row[2]),
            "cut_off": int(row[3])}


def list_experiments(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT experiment_id, experiment_name, status, n_narratives_completed, "
        "n_narratives_total, estimated_completion_time, start_time, "
        "(SELECT COUNT(*) FROM narrative_results r WHERE r.experiment_id = e.experiment_id "
        " AND r.error_occurred = 1) AS n_errors "
        "FROM experiments e ORDER BY start_time DESC"
    ).fetchall()


def latest_resumable(conn: sqlite3.Connection,
                     db_path: str | Path | None = None) -> ExperimentRecord | None:
    """The newest resumable experiment; with `db_path`, skipping any a live process holds
    (a `running` experiment whose run is alive is not resumable, it is running)."""
    for (experiment_id,) in conn.execute(
            "SELECT experiment_id FROM experiments WHERE status IN (?, ?, ?) "
            "ORDER BY start_time DESC", tuple(sorted(RESUMABLE))).fetchall():
        if db_path is not None and _is_uuid(experiment_id) \
                and probe(db_path, experiment_id).held:
            continue
        return get_experiment(conn, experiment_id)
    return None


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, TypeError, AttributeError):
        return False


def experiment_row(conn: sqlite3.Connection, experiment_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT * FROM experiments WHERE experiment_id = ?", (experiment_id,)
    ).fetchone()
    return dict(row) if row else None
