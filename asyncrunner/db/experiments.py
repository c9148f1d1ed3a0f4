"""The experiment record: create it, check it can be resumed, move it between statuses.

This module owns the `experiments` row outside the pipeline (the writer updates only its
progress counters, in the same transaction as the results). Which status may follow which
is `TRANSITIONS`, and every status change goes through `set_status`, which refuses a move
the table does not allow: a completed experiment cannot silently become `running` again.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from asyncrunner import refusals
from asyncrunner.clock import local_now
from asyncrunner.config import Config
from asyncrunner.db.locks import ExperimentLock
from asyncrunner.db.store import ExperimentRecord, count_results, get_experiment
from asyncrunner.vocab import RESUMABLE, Status

# status -> the statuses it may move to. `running -> running` is a resume after a crash
# (the lock proved the old process dead); `completed -> running` only retries error rows;
# `completed -> interrupted/failed` is a stop or a failure while its exports are written
# (finalize marks it completed first), which leaves it resumable so the exports are redone.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.RUNNING: frozenset(Status),
    Status.INTERRUPTED: frozenset({Status.RUNNING, Status.CANCELLED}),
    Status.FAILED: frozenset({Status.RUNNING, Status.CANCELLED}),
    Status.CANCELLED: frozenset({Status.RUNNING}),
    Status.COMPLETED: frozenset({Status.RUNNING, Status.INTERRUPTED, Status.FAILED}),
}


class TransitionError(RuntimeError):
    """A status change the rules do not allow: a bug in the caller, not an operator error."""


def create(conn: sqlite3.Connection, cfg: Config, *, experiment_id: str, data_file: str,
           checksum: str, n_total: int, api_url: str, log_dir: str) -> None:
    m, p, r = cfg.model, cfg.prompt, cfg.run
    stored = cfg.to_dict()
    stored["model"]["api_url"] = api_url  # already redacted by the caller
    conn.execute(
        """
        INSERT INTO experiments (
            experiment_id, experiment_name, status, model_name, model_provider, temperature,
            api_url, system_prompt, user_template, prompt_version, run_seed, data_file,
            data_checksum, max_narratives, n_narratives_total, n_narratives_processed,
            n_narratives_completed, start_time, log_dir, config_json
        ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?)
        """,
        (
            experiment_id, cfg.experiment.name, Status.RUNNING, m.name, m.provider,
            m.temperature, api_url, p.system_prompt, p.user_template, p.version, r.seed,
            data_file, checksum, r.max_narratives, n_total, local_now(), log_dir,
            json.dumps(stored),
        ),
    )


def _current(conn: sqlite3.Connection, experiment_id: str) -> Status | None:
    row = conn.execute("SELECT status FROM experiments WHERE experiment_id = ?",
                       (experiment_id,)).fetchone()
    if row is None:
        return None
    try:
        return Status(row[0])
    except ValueError:
        return None


def set_status(conn: sqlite3.Connection, experiment_id: str, status: Status,
               reason: str | None = None) -> None:
    """Move the experiment to `status` (ending it sets end_time; running clears it)."""
    current = _current(conn, experiment_id)
    if current is not None and status not in TRANSITIONS[current]:
        raise TransitionError(f"experiment {experiment_id}: {current} -> {status} "
                              "is not an allowed status change")
    conn.execute(
        "UPDATE experiments SET status = ?, failure_reason = ?, "
        "end_time = CASE WHEN ? THEN ? ELSE NULL END WHERE experiment_id = ?",
        (status, reason, status.ended, local_now(), experiment_id),
    )


def require_resumable(conn: sqlite3.Connection, experiment_id: str, *,
                      force: bool = False, retry_errors_only: bool = False) -> ExperimentRecord:
    """The experiment, if it may be resumed now; otherwise refuse (exit 3).
    The caller already holds the experiment lock, so a live second process was refused there.

    A completed experiment is refused, except to retry its error rows: a run finishes
    with its failed narratives recorded, and retrying them is what RETRY_ERRORS_ONLY is for.
    """
    record = get_experiment(conn, experiment_id)
    if record is None:
        raise refusals.no_experiment(experiment_id)
    if record.status == Status.COMPLETED:
        if not retry_errors_only:
            raise refusals.completed(experiment_id)
        if not count_results(conn, experiment_id)[1]:
            raise refusals.nothing_to_retry(experiment_id)
        return record
    if record.status == Status.CANCELLED:
        if not force:
            raise refusals.cancelled(experiment_id)
        return record
    if record.status not in RESUMABLE:
        raise refusals.unknown_status(experiment_id, record.status)
    return record


def cancel(conn: sqlite3.Connection, db_path: Path, experiment_id: str) -> None:
    """Mark an experiment cancelled; refused while a live process holds its lock."""
    record = get_experiment(conn, experiment_id)
    if record is None:
        raise refusals.no_experiment(experiment_id, db_path)
    if record.status in (Status.COMPLETED, Status.CANCELLED):
        raise refusals.cannot_cancel(experiment_id, record.status)
    with ExperimentLock(db_path, experiment_id):
        set_status(conn, experiment_id, Status.CANCELLED, "cancelled by operator")


# (config path, record attribute) pairs that the stored experiment decides on resume.
AUTHORITATIVE: tuple[tuple[tuple[str, str], str], ...] = (
    (("model", "name"), "model_name"),
    (("model", "provider"), "model_provider"),
    (("model", "temperature"), "temperature"),
    (("prompt", "system_prompt"), "system_prompt"),
    (("prompt", "user_template"), "user_template"),
    (("prompt", "version"), "prompt_version"),
    (("run", "seed"), "run_seed"),
    (("data", "file"), "data_file"),
    (("run", "max_narratives"), "max_narratives"),
)


def _same(mine: Any, stored: Any) -> bool:
    if isinstance(stored, float) or isinstance(mine, float):
        if mine is None or stored is None:
            return mine is None and stored is None
        return float(mine) == float(stored)
    return bool(mine == stored)


def config_drift(record: ExperimentRecord, cfg: Config) -> list[str]:
    """One warning per setting where the YAML differs from the stored experiment."""
    warnings: list[str] = []
    current = cfg.to_dict()
    for (section, key), attr in AUTHORITATIVE:
        mine: Any = current[section][key]
        stored: Any = getattr(record, attr)
        if not _same(mine, stored):
            warnings.append(
                f"config drift: {section}.{key} in the YAML is {_short(mine)}, the experiment "
                f"ran with {_short(stored)}; using the stored value"
            )
    return warnings


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"
