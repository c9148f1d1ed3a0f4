"""What a session will do, decided and checked before the experiment record is touched.

    RunRequest (flags, environment, YAML path)
        --draft()-->     Draft      which experiment and why; no database opened
        --complete()-->  RunPlan    under the experiment's lock: every guard passed, the
                                    narratives, the effective settings and the counts known

A plan says *why* it runs (`Intent`: a new experiment, a resume, a retry of error rows) and
everything that follows from it; session.py then carries out any plan with one shared tail.
Nothing here changes an experiment row. The only write is ingest, which loads a new file's
narratives once per checksum and is idempotent.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from asyncrunner import refusals
from asyncrunner.config import (
    Config,
    build_config,
    config_from_dict,
    env_flag,
    load_config,
    resolve_data_path,
)
from asyncrunner.db import store
from asyncrunner.db.experiments import config_drift, require_resumable
from asyncrunner.db.ingest import IngestReport, file_checksum, ingest
from asyncrunner.errors import InputError
from asyncrunner.ids import new_experiment_id, require_uuid
from asyncrunner.pipeline.producer import WorkSelection
from asyncrunner.vocab import Status

log = structlog.get_logger("asyncrunner.plan")


class Intent(StrEnum):
    NEW = "new"
    RESUME = "resume"
    RETRY_ERRORS = "retry-errors"


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What the operator asked for, before anything is checked."""

    db_path: Path
    config_path: str | None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    resume: bool = False
    experiment_id: str | None = None
    retry_errors_only: bool = False
    force: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)


def request_from_env(db_path: Path, config_path: str | None, overrides: Mapping[str, Any], *,
                     resume: bool, experiment_id: str | None, retry_errors_only: bool,
                     force: bool, env: Mapping[str, str]) -> RunRequest:
    """Flags win over RESUME / EXPERIMENT_ID / RETRY_ERRORS_ONLY from the environment."""
    return RunRequest(
        db_path=db_path, config_path=config_path, overrides=overrides,
        resume=resume or env_flag(env, "RESUME"),
        experiment_id=experiment_id or env.get("EXPERIMENT_ID") or None,
        retry_errors_only=retry_errors_only or env_flag(env, "RETRY_ERRORS_ONLY"),
        force=force, env=env)


@dataclass(frozen=True, slots=True)
class Draft:
    request: RunRequest
    intent: Intent
    experiment_id: str
    config: Config | None = None     # a new experiment's validated configuration


@dataclass(frozen=True, slots=True)
class RunPlan:
    """One session's work, fully checked."""

    request: RunRequest
    intent: Intent
    experiment_id: str
    config: Config                   # the effective settings of this session
    selection: WorkSelection         # which narratives the producer hands out
    total: int                       # narratives in the experiment
    target: int                      # narratives this session sets out to process
    done: int = 0                    # results already stored
    drift: tuple[str, ...] = ()      # YAML values overruled by the stored experiment
    previous_status: Status | None = None
    ingest: IngestReport | None = None

    @property
    def db_path(self) -> Path:
        return self.request.db_path

    @property
    def is_new(self) -> bool:
        return self.intent is Intent.NEW


def draft(req: RunRequest) -> Draft:
    """Check what can be checked without a database: the id, the YAML, the data file."""
    if req.resume:
        if not req.experiment_id:
            raise refusals.resume_needs_id()
        experiment_id = require_uuid(req.experiment_id)
        if not req.db_path.exists():
            raise refusals.database_missing(req.db_path)
        intent = Intent.RETRY_ERRORS if req.retry_errors_only else Intent.RESUME
        return Draft(req, intent, experiment_id)
    if not req.config_path:
        raise InputError("run needs a CONFIG.yaml (or RESUME=1 with EXPERIMENT_ID to resume)")
    cfg = load_config(req.config_path, overrides=req.overrides, env=req.env)
    return Draft(req, Intent.NEW, new_experiment_id(), cfg)


def complete(conn: sqlite3.Connection, d: Draft) -> RunPlan:
    """Run every guard that needs the database; the caller holds the experiment's lock."""
    if d.intent is Intent.NEW:
        return _plan_new(conn, d)
    return _plan_resume(conn, d)


def _plan_new(conn: sqlite3.Connection, d: Draft) -> RunPlan:
    assert d.config is not None
    cfg = d.config
    report = ingest(conn, cfg.data, resolve_data_path(cfg))
    log.info("ingest", message=(
        f"data {cfg.data.file}: {report.n_narratives} narratives"
        + ("" if report.loaded else " (already in the database; file not re-read)")
        + f", {report.n_blank} blank skipped, {report.n_duplicates} duplicates skipped"),
        checksum=report.data_checksum)
    cutoff = store.set_cutoff(conn, report.data_checksum, cfg.run.max_narratives)
    total = store.count_set(conn, report.data_checksum, cutoff)
    if total == 0:
        raise InputError(f"data file {cfg.data.file} holds no narratives to classify")
    return RunPlan(
        request=d.request, intent=d.intent, experiment_id=d.experiment_id, config=cfg,
        selection=WorkSelection(d.experiment_id, report.data_checksum, cutoff),
        total=total, target=total, ingest=report)


def _plan_resume(conn: sqlite3.Connection, d: Draft) -> RunPlan:
    req, experiment_id = d.request, d.experiment_id
    retry = d.intent is Intent.RETRY_ERRORS
    record = require_resumable(conn, experiment_id, force=req.force, retry_errors_only=retry)
    cfg, drift = _resume_config(req, record)
    _check_data_unchanged(record)
    checksum = record.data_checksum or ""
    cutoff = store.set_cutoff(conn, checksum, record.max_narratives)
    total = store.count_set(conn, checksum, cutoff)
    done, errors = store.count_results(conn, experiment_id)
    return RunPlan(
        request=req, intent=d.intent, experiment_id=experiment_id, config=cfg,
        selection=WorkSelection(experiment_id, checksum, cutoff, retry_errors_only=retry),
        total=total, target=errors if retry else max(0, total - done), done=done,
        drift=tuple(drift), previous_status=_status_or_none(record.status))


def _status_or_none(value: str | None) -> Status | None:
    try:
        return Status(value) if value is not None else None
    except ValueError:
        return None


def _resume_config(req: RunRequest, record: store.ExperimentRecord) -> tuple[Config, list[str]]:
    """The stored experiment decides model, prompt, temperature, seed, data file and
    max_narratives; the YAML (if given), environment and flags decide how to run it."""
    stored = config_from_dict(record.config)
    if req.config_path:
        current = load_config(req.config_path, overrides=req.overrides, env=req.env,
                              require_data=False)
        drift = config_drift(record, current)
    else:
        current = build_config(stored.to_dict(), overrides=req.overrides, env=req.env)
        drift = []
    cfg = replace(
        current,
        model=replace(current.model, name=record.model_name or stored.model.name,
                      provider=record.model_provider or stored.model.provider,
                      temperature=record.temperature if record.temperature is not None
                      else stored.model.temperature),
        prompt=replace(current.prompt, system_prompt=record.system_prompt or "",
                       user_template=record.user_template or stored.prompt.user_template,
                       version=record.prompt_version or stored.prompt.version),
        data=replace(stored.data, file=record.data_file or stored.data.file),
        run=replace(current.run, seed=record.run_seed, max_narratives=record.max_narratives),
    )
    return cfg, drift


def _check_data_unchanged(record: store.ExperimentRecord) -> None:
    path = Path(record.data_file or "")
    if not path.is_file():
        raise refusals.data_missing(record.experiment_id, record.data_file)
    if file_checksum(path) != record.data_checksum:
        raise refusals.data_changed(record.experiment_id, record.data_file)
