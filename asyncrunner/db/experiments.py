"""The experiment record: create it, check it can be resumed, move it between statuses, and
keep the history of its configuration and metrics.

This module owns the `experiments` row outside the pipeline (the writer updates only its
progress counters, in the same transaction as the results). Which status may follow which
is `TRANSITIONS`, and every status change goes through `set_status`, which refuses a move
the table does not allow: a completed experiment cannot silently become `running` again.
"""

from __future__ import annotations

import json
import platform
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncrunner import __version__, refusals
from asyncrunner.clock import local_now, utc_now
from asyncrunner.config import RESPONSE_FORMAT_USED, Config
from asyncrunner.db.locks import ExperimentLock
from asyncrunner.db.store import ExperimentRecord, count_results, get_experiment
from asyncrunner.llm.parsing import PARSER_VERSION
from asyncrunner.settings import flatten
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


def provenance() -> dict[str, str]:
    """What produced an experiment's answers besides its configuration."""
    return {"asyncrunner_version": __version__, "parser_version": PARSER_VERSION,
            "python_version": platform.python_version(), "platform": platform.platform()}


def create(conn: sqlite3.Connection, cfg: Config, *, experiment_id: str, data_file: str,
           checksum: str, n_total: int, api_url: str, log_dir: str,
           study: tuple[str, str, int] | None = None, sample_json: str | None = None) -> None:
    """`study`: (study id, cell, repeat) of a sweep's cell; `sample_json`: the sample's
    definition when the experiment scores a sample (its keys go to experiment_sample)."""
    m, p, r = cfg.model, cfg.prompt, cfg.run
    stored = cfg.to_dict()
    stored["model"]["api_url"] = api_url  # already redacted by the caller
    prov = provenance()
    conn.execute(
        """
        INSERT INTO experiments (
            experiment_id, experiment_name, status, model_name, model_provider, temperature,
            api_url, system_prompt, user_template, prompt_version, run_seed, data_file,
            data_checksum, max_narratives, n_narratives_total, n_narratives_processed,
            n_narratives_completed, start_time, log_dir, config_json, asyncrunner_version,
            parser_version, python_version, platform, study_id, study_cell, study_repeat,
            sample_json
        ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?, ?, ?, ?, ?,
                  ?, ?, ?, ?)
        """,
        (
            experiment_id, cfg.experiment.name, Status.RUNNING, m.name, m.provider,
            m.temperature, api_url, p.system_prompt, p.user_template, p.version, r.seed,
            data_file, checksum, r.max_narratives, n_total, local_now(), log_dir,
            json.dumps(stored), prov["asyncrunner_version"], prov["parser_version"],
            prov["python_version"], prov["platform"], *(study or (None, None, None)),
            sample_json,
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


def set_total(conn: sqlite3.Connection, experiment_id: str, n_total: int) -> None:
    """The experiment's size, once known: its data file was still loading when it began
    (db/loading.py) and has been loaded whole since."""
    conn.execute("UPDATE experiments SET n_narratives_total = ? WHERE experiment_id = ?",
                 (n_total, experiment_id))


def set_status(conn: sqlite3.Connection, experiment_id: str, status: Status,
               reason: str | None = None) -> None:
    """Move the experiment to `status` (ending it sets end_time; running clears it)."""
    current = _current(conn, experiment_id)
    if current is not None and status not in TRANSITIONS[current]:
        raise TransitionError(f"experiment {experiment_id}: {current} -> {status} "
                              "is not an allowed status change")
    # An ended experiment has no ETA: nobody is working towards it any more.
    conn.execute(
        "UPDATE experiments SET status = ?, failure_reason = ?, "
        "end_time = CASE WHEN ? THEN ? ELSE NULL END, "
        "estimated_completion_time = CASE WHEN ? THEN NULL "
        "ELSE estimated_completion_time END WHERE experiment_id = ?",
        (status, reason, status.ended, local_now(), status.ended, experiment_id),
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


# (config path, record column) pairs: the configuration an experiment keeps in columns of
# its own (operators query them), beside the full configuration in config_json.
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
COLUMN_OF: dict[str, str] = {f"{section}.{key}": column
                             for (section, key), column in AUTHORITATIVE}


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """One change of an experiment's stored configuration, for `config_history`."""

    key: str
    old: Any
    new: Any
    reason: str      # CHANGE_ALLOWED_DRIFT, CHANGE_ADOPTED, CHANGE_CHECKSUM, CHANGE_SUBSET


CHANGE_ALLOWED_DRIFT = "allowed drift (--allow-drift)"
CHANGE_ADOPTED = "not recorded by the R version; taken from this session's settings"
CHANGE_CHECKSUM = "no checksum stored (R version); computed from the data file at resume"
CHANGE_SUBSET = "the R experiment covered the first narratives of its file only"


def record_config(conn: sqlite3.Connection, experiment_id: str, session_id: str,
                  config: dict[str, Any], changes: list[ConfigChange]) -> None:
    """Store `config` as the experiment's configuration (its columns too) and one
    `config_history` row per change. Call inside the caller's transaction."""
    flat = flatten(config)
    assignments = {column: flat.get(key) for key, column in COLUMN_OF.items()
                   if any(c.key == key or c.key.startswith(key + ".") for c in changes)}
    sets = "".join(f", {column} = :{column}" for column in assignments)
    conn.execute(f"UPDATE experiments SET config_json = :config{sets} "
                 "WHERE experiment_id = :experiment_id",
                 {"config": json.dumps(config), "experiment_id": experiment_id, **assignments})
    now = utc_now()
    conn.executemany(
        "INSERT INTO config_history (experiment_id, session_id, changed_at, key, old_value, "
        "new_value, reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(experiment_id, session_id, now, c.key, json.dumps(c.old, default=str),
          json.dumps(c.new, default=str), c.reason) for c in changes])


def record_response_format(conn: sqlite3.Connection, experiment_id: str, mode: str) -> None:
    """The structured-output mode the probe chose: in its column and in config_json (as
    `model.response_format_used`, beside the setting it was chosen for)."""
    row = conn.execute("SELECT config_json FROM experiments WHERE experiment_id = ?",
                       (experiment_id,)).fetchone()
    config = json.loads(row[0]) if row is not None and row[0] else None
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        config["model"][RESPONSE_FORMAT_USED] = mode
    with conn:
        conn.execute("UPDATE experiments SET response_format_used = ?, "
                     "config_json = COALESCE(?, config_json) WHERE experiment_id = ?",
                     (mode, json.dumps(config) if isinstance(config, dict) else None,
                      experiment_id))


def record_checksum(conn: sqlite3.Connection, experiment_id: str, session_id: str,
                    checksum: str, max_narratives: int | None, n_total: int) -> None:
    """An R-era experiment's narrative set, identified at its first resume here."""
    changes = [ConfigChange("data_checksum", None, checksum, CHANGE_CHECKSUM)]
    if max_narratives is not None:
        changes.append(ConfigChange("run.max_narratives", None, max_narratives, CHANGE_SUBSET))
    conn.execute("UPDATE experiments SET data_checksum = ?, n_narratives_total = ?, "
                 "max_narratives = COALESCE(?, max_narratives) WHERE experiment_id = ?",
                 (checksum, n_total, max_narratives, experiment_id))
    conn.executemany(
        "INSERT INTO config_history (experiment_id, session_id, changed_at, key, old_value, "
        "new_value, reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(experiment_id, session_id, utc_now(), c.key, json.dumps(c.old), json.dumps(c.new),
          c.reason) for c in changes])


def archive_metrics(conn: sqlite3.Connection, experiment_id: str, session_id: str) -> bool:
    """Keep a completed experiment's metrics before a session recomputes them; returns
    whether there were any. Call inside the caller's transaction."""
    cursor = conn.execute(
        """INSERT INTO metrics_history (experiment_id, recorded_at, superseded_by_session,
               completed_at, n_results, n_errors, n_tp, n_fp, n_tn, n_fn, precision, recall,
               f1, accuracy, metrics_json)
           SELECT experiment_id, ?, ?, end_time,
               (SELECT COUNT(*) FROM narrative_results r WHERE r.experiment_id = e.experiment_id),
               (SELECT COALESCE(SUM(error_occurred), 0) FROM narrative_results r
                WHERE r.experiment_id = e.experiment_id),
               n_tp, n_fp, n_tn, n_fn, precision, recall, f1, accuracy, metrics_json
           FROM experiments e WHERE experiment_id = ? AND metrics_json IS NOT NULL""",
        (utc_now(), session_id, experiment_id))
    return cursor.rowcount > 0
