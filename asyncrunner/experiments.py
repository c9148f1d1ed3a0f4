"""The experiment record's lifecycle: create, resume checks, status changes, config drift.

Results are written only by writer.py; this module writes the `experiments` row outside the
pipeline (before it starts and after it ends), each change in its own short transaction.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from .clock import local_now
from .config import Config
from .errors import RefusedError
from .store import RESUMABLE, ExperimentRecord, count_results, get_experiment


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
        ) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?)
        """,
        (
            experiment_id, cfg.experiment.name, m.name, m.provider, m.temperature, api_url,
            p.system_prompt, p.user_template, p.version, r.seed, data_file, checksum,
            r.max_narratives, n_total, local_now(), log_dir, json.dumps(stored),
        ),
    )


def set_status(conn: sqlite3.Connection, experiment_id: str, status: str,
               reason: str | None = None) -> None:
    ended = status in ("completed", "cancelled", "interrupted", "failed")
    conn.execute(
        "UPDATE experiments SET status = ?, failure_reason = ?, "
        "end_time = CASE WHEN ? THEN ? ELSE end_time END WHERE experiment_id = ?",
        (status, reason, ended, local_now(), experiment_id),
    )


def mark_running(conn: sqlite3.Connection, experiment_id: str) -> None:
    conn.execute(
        "UPDATE experiments SET status = 'running', failure_reason = NULL, end_time = NULL "
        "WHERE experiment_id = ?",
        (experiment_id,),
    )


def require_resumable(conn: sqlite3.Connection, experiment_id: str, *,
                      force: bool = False, retry_errors_only: bool = False) -> ExperimentRecord:
    """The experiment, if the contract lets it be resumed now; otherwise refuse (exit 3).
    The caller already holds the experiment lock, so a live second process was refused there.

    A completed experiment is refused, except to retry its error rows: a run finishes
    with its failed narratives recorded, and retrying them is what RETRY_ERRORS_ONLY is for.
    """
    record = get_experiment(conn, experiment_id)
    if record is None:
        raise RefusedError(
            f"no experiment {experiment_id} in this database; "
            "list them with `asyncrunner status` (check --db / EXPERIMENTS_DB)"
        )
    if record.status == "completed" and retry_errors_only:
        if not count_results(conn, experiment_id)[1]:
            raise RefusedError(f"experiment {experiment_id} is completed with no error rows; "
                               "nothing to retry")
        return record
    if record.status == "completed":
        raise RefusedError(
            f"experiment {experiment_id} is completed; nothing to resume "
            "(start a new experiment to run it again)"
        )
    if record.status == "cancelled" and not force:
        raise RefusedError(
            f"experiment {experiment_id} was cancelled; resume it with --force if you mean to"
        )
    if record.status not in RESUMABLE + ("cancelled",):
        raise RefusedError(f"experiment {experiment_id} has unknown status {record.status!r}")
    return record


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


def config_drift(record: ExperimentRecord, cfg: Config) -> list[str]:
    """One warning per setting where the YAML differs from the stored experiment."""
    warnings: list[str] = []
    current = cfg.to_dict()
    for (section, key), attr in AUTHORITATIVE:
        mine: Any = current[section][key]
        stored: Any = getattr(record, attr)
        if isinstance(stored, float) or isinstance(mine, float):
            same = mine is not None and stored is not None and float(mine) == float(stored)
            same = same or (mine is None and stored is None)
        else:
            same = mine == stored
        if not same:
            shown_new = _short(mine)
            shown_old = _short(stored)
            warnings.append(
                f"config drift: {section}.{key} in the YAML is {shown_new}, the experiment "
                f"ran with {shown_old}; using the stored value"
            )
    return warnings


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"
