"""One session of an experiment: guards, set-up, the pipeline, and how it ends.

    new:     ingest -> lock -> experiment record -> pipeline -> finalize
    resume:  id check -> lock -> status/checksum guards -> backup -> pipeline -> finalize

Every guard runs before anything is written. The lock is held from before the experiment
record is created (or checked) until after its final status is written, and released on
every exit path. Only here are statuses changed: `completed` after finalize,
`interrupted` on a signal, `failed` with the reason on any unexpected error.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

import anyio
import structlog

from . import backup, experiments, logs, store
from .client import ClientSettings, normalize_api_url, redact_url
from .config import Config, build_config, config_from_dict, env_flag, read_yaml, resolve_data_path
from .errors import AsyncRunnerError, InputError, RefusedError, RunFailed, Stopped
from .finalize import finalize
from .ids import new_experiment_id, require_uuid
from .ingest import file_checksum, ingest
from .locks import ExperimentLock
from .producer import WorkSelection
from .progress import Snapshot
from .runner import PipelineSpec, run_pipeline
from .schema import connect
from .workers import Prompt
from .writer import WriterSettings

log = structlog.get_logger("asyncrunner.session")


@dataclass(frozen=True, slots=True)
class RunRequest:
    db_path: Path
    config_path: str | None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    resume: bool = False
    experiment_id: str | None = None
    retry_errors_only: bool = False
    force: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass(frozen=True, slots=True)
class RunSummary:
    experiment_id: str
    status: str
    metrics: dict[str, Any] | None
    exports: dict[str, str]


def request_from_env(db_path: Path, config_path: str | None, overrides: Mapping[str, Any], *,
                     resume: bool, experiment_id: str | None, retry_errors_only: bool,
                     force: bool, env: Mapping[str, str]) -> RunRequest:
    """Flags win over RESUME / EXPERIMENT_ID / RETRY_ERRORS_ONLY from the environment."""
    resume = resume or env_flag(env, "RESUME")
    experiment_id = experiment_id or env.get("EXPERIMENT_ID") or None
    retry = retry_errors_only or env_flag(env, "RETRY_ERRORS_ONLY")
    return RunRequest(db_path=db_path, config_path=config_path, overrides=overrides,
                      resume=resume, experiment_id=experiment_id, retry_errors_only=retry,
                      force=force, env=env)


def execute(req: RunRequest, out: IO[str] = sys.stdout,
            on_commit: Callable[[Snapshot], None] | None = None) -> RunSummary:
    """Run a new experiment or resume one; raise an AsyncRunnerError for the CLI to map."""
    if req.retry_errors_only and not req.resume:
        log.warning("retry_errors_ignored",
                    message="RETRY_ERRORS_ONLY is set without RESUME: ignored; "
                            "set RESUME=1 and EXPERIMENT_ID to retry an experiment's errors")
    with _sigterm_as_exception():
        if req.resume:
            return _resume(req, out, on_commit)
        return _start(req, out, on_commit)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Outside the pipeline (set-up, finalize), SIGTERM must unwind like Ctrl-C so the lock
    is released and the status written, instead of killing the process where it stands."""
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _start(req: RunRequest, out: IO[str],
           on_commit: Callable[[Snapshot], None] | None) -> RunSummary:
    if not req.config_path:
        raise InputError("run needs a CONFIG.yaml (or RESUME=1 with EXPERIMENT_ID to resume)")
    cfg = build_config(read_yaml(req.config_path), overrides=req.overrides, env=req.env,
                       source=req.config_path)
    data_path = resolve_data_path(cfg)
    if not data_path.is_file():
        raise InputError(f"config key 'data.file': data file not found: {cfg.data.file}")
    conn = connect(req.db_path)
    try:
        report = ingest(conn, cfg.data, data_path)
        log.info("ingest", message=(
            f"data {cfg.data.file}: {report.n_narratives} narratives"
            + ("" if report.loaded else " (already in the database; file not re-read)")
            + f", {report.n_blank} blank skipped, {report.n_duplicates} duplicates skipped"),
            checksum=report.data_checksum)
        cutoff = store.set_cutoff(conn, report.data_checksum, cfg.run.max_narratives)
        total = store.count_set(conn, report.data_checksum, cutoff)
        if total == 0:
            raise InputError(f"data file {cfg.data.file} holds no narratives to classify")
        experiment_id = new_experiment_id()
        with ExperimentLock(req.db_path, experiment_id):
            backup.check_disk(req.db_path, total, with_backup=False)
            experiments.create(
                conn, cfg, experiment_id=experiment_id, data_file=str(cfg.data.file),
                checksum=report.data_checksum, n_total=total,
                api_url=redact_url(normalize_api_url(cfg.model.api_url)),
                log_dir=str(Path(cfg.run.log_dir) / experiment_id),
            )
            print(f"experiment_id: {experiment_id}", file=out, flush=True)
            logs.open_run_log(cfg.run.log_dir, experiment_id)
            logs.bind(experiment_id=experiment_id, session=uuid.uuid4().hex[:8])
            log.info("run_start", message=f"experiment {experiment_id} "
                     f"'{cfg.experiment.name}': {total} narratives, {cfg.run.workers} workers",
                     model=cfg.model.name, provider=cfg.model.provider, total=total,
                     workers=cfg.run.workers, batch_size=cfg.run.batch_size)
            _log_config(cfg)
            selection = WorkSelection(experiment_id, report.data_checksum, cutoff)
            return _run_session(conn, req, cfg, selection, total, total, out, on_commit)
    finally:
        conn.close()
        logs.close_run_log()
        logs.clear()


def _resume(req: RunRequest, out: IO[str],
            on_commit: Callable[[Snapshot], None] | None) -> RunSummary:
    if not req.experiment_id:
        raise RefusedError("RESUME=1 needs EXPERIMENT_ID=<uuid> (or --experiment-id); "
                           "`asyncrunner resume --latest` finds the newest resumable one")
    experiment_id = require_uuid(req.experiment_id)
    if not req.db_path.exists():
        raise RefusedError(f"database {req.db_path} does not exist; check --db / EXPERIMENTS_DB")
    conn = connect(req.db_path)
    try:
        with ExperimentLock(req.db_path, experiment_id) as lock:
            record = experiments.require_resumable(
                conn, experiment_id, force=req.force,
                retry_errors_only=req.retry_errors_only)
            cfg, drift = _resume_config(req, record)
            _check_data_unchanged(record)
            cutoff = store.set_cutoff(conn, record.data_checksum or "", record.max_narratives)
            total = store.count_set(conn, record.data_checksum or "", cutoff)
            done, errors = store.count_results(conn, experiment_id)
            target = errors if req.retry_errors_only else max(0, total - done)
            backup.check_disk(req.db_path, target, with_backup=True)
            backup_path = backup.make_backup(req.db_path)
            experiments.mark_running(conn, experiment_id)
            print(f"experiment_id: {experiment_id}", file=out, flush=True)
            logs.open_run_log(cfg.run.log_dir, experiment_id)
            logs.bind(experiment_id=experiment_id, session=uuid.uuid4().hex[:8])
            if lock.stale_holder:
                log.warning("stale_lock", pid=lock.stale_holder.get("pid"),
                            message=f"replaced a stale lock left by PID "
                                    f"{lock.stale_holder.get('pid')} (no longer running)")
            for warning in drift:
                log.warning("config_drift", message=warning)
            log.info("backup", message=f"backup written: {backup_path}")
            pct = 100.0 * done / total if total else 100.0
            mode = "errors to retry" if req.retry_errors_only else "remaining"
            log.info("resume", message=(
                f"RESUMING {experiment_id}: completed {done}, {mode} {target}, "
                f"total {total} ({pct:.1f}% done), previous status {record.status}"),
                completed=done, remaining=target, total=total, previous_status=record.status)
            _log_config(cfg)
            selection = WorkSelection(experiment_id, record.data_checksum or "", cutoff,
                                      retry_errors_only=req.retry_errors_only)
            return _run_session(conn, req, cfg, selection, total, target, out, on_commit)
    finally:
        conn.close()
        logs.close_run_log()
        logs.clear()


def _resume_config(req: RunRequest, record: store.ExperimentRecord) -> tuple[Config, list[str]]:
    """The stored experiment decides model, prompt, temperature, seed, data file and
    max_narratives; the YAML (if given), environment and flags decide how to run it."""
    stored = config_from_dict(record.config)
    if req.config_path:
        current = build_config(read_yaml(req.config_path), overrides=req.overrides,
                               env=req.env, source=req.config_path)
        drift = experiments.config_drift(record, current)
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


def _log_config(cfg: Config) -> None:
    """A summary of what this session runs with; the key's variable name, never its value."""
    m, r = cfg.model, cfg.run
    log.info("config", model=m.name, provider=m.provider,
             api_url=redact_url(normalize_api_url(m.api_url)),
             api_key_env=m.api_key_env, temperature=m.temperature, max_tokens=m.max_tokens,
             timeout_s=m.timeout_s, prompt_version=cfg.prompt.version, workers=r.workers,
             batch_size=r.batch_size, max_attempts=r.max_attempts, seed=r.seed,
             max_narratives=r.max_narratives, data_file=cfg.data.file)


def _check_data_unchanged(record: store.ExperimentRecord) -> None:
    path = Path(record.data_file or "")
    if not path.is_file():
        raise RefusedError(
            f"data file {record.data_file} of experiment {record.experiment_id} is missing; "
            "restore it (same content) to resume"
        )
    if file_checksum(path) != record.data_checksum:
        raise RefusedError(
            f"data file {record.data_file} has changed since experiment "
            f"{record.experiment_id} started (checksum mismatch); restore the original "
            "file to resume, or start a new experiment with the new file"
        )


def _client_settings(cfg: Config, env: Mapping[str, str]) -> ClientSettings:
    m = cfg.model
    key = env.get(m.api_key_env) if m.api_key_env else None
    return ClientSettings(
        api_url=normalize_api_url(m.api_url), model=m.name, temperature=m.temperature,
        max_tokens=m.max_tokens, timeout_s=m.timeout_s, max_attempts=cfg.run.max_attempts,
        seed=cfg.run.seed, api_key=key or None, response_format=m.response_format,
        extra_body=dict(m.extra_body or {}), backoff_base_s=cfg.run.retry_backoff_s,
    )


def _run_session(conn: sqlite3.Connection, req: RunRequest, cfg: Config,
                 selection: WorkSelection, total: int, target: int, out: IO[str],
                 on_commit: Callable[[Snapshot], None] | None) -> RunSummary:
    experiment_id = selection.experiment_id
    spec = PipelineSpec(
        db_path=req.db_path, selection=selection,
        writer=WriterSettings(experiment_id=experiment_id, total=total, session_target=target,
                              batch_size=cfg.run.batch_size,
                              interval_s=cfg.run.commit_interval_s,
                              retry_errors_only=selection.retry_errors_only),
        client=_client_settings(cfg, req.env),
        prompt=Prompt(cfg.prompt.system_prompt, cfg.prompt.user_template),
        workers=cfg.run.workers, grace_s=cfg.run.grace_period_s,
        requests_per_minute=cfg.run.requests_per_minute,
        tokens_per_minute=cfg.run.tokens_per_minute,
        mock_server=cfg.model.provider == "mock",
    )
    try:
        outcome = anyio.run(run_pipeline, spec, on_commit)
        # The event loop put the default SIGTERM action back when it closed.
        signal.signal(signal.SIGTERM, _raise_stopped)
        done, _ = store.count_results(conn, experiment_id)
        if outcome.stopped_by is not None:
            raise Stopped(outcome.stopped_by)
        if done < total:
            raise RunFailed(f"work ran out with {done}/{total} narratives stored")
        result = finalize(conn, experiment_id, Path(cfg.run.output_dir))
    except (Stopped, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        experiments.set_status(conn, experiment_id, "interrupted",
                               f"stopped by {signal.Signals(signum).name}")
        done, _ = store.count_results(conn, experiment_id)
        log.warning("run_interrupted", message=(
            f"interrupted: {done}/{total} narratives stored; resume with "
            f"RESUME=1 EXPERIMENT_ID={experiment_id} or `asyncrunner resume {experiment_id}`"))
        raise Stopped(signum) from None
    except AsyncRunnerError as exc:
        _mark_failed(conn, experiment_id, str(exc))
        raise
    except BaseException as exc:
        reason = _describe(exc)
        _mark_failed(conn, experiment_id, reason)
        raise RunFailed(f"run failed: {reason}; resume with "
                        f"`asyncrunner resume {experiment_id}`") from exc
    log.info("exports", message=f"results written: {result['exports']['csv']}, "
                                f"{result['exports']['json']}")
    report = _write_report(conn, experiment_id, Path(cfg.run.output_dir))
    if report:
        result["exports"]["report"] = report
    overall = result["metrics"]["overall"]
    log.info("run_finished", message=f"experiment {experiment_id} completed",
             n=overall["n"], precision=overall["precision"], recall=overall["recall"],
             f1=overall["f1"])
    return RunSummary(experiment_id, "completed", result["metrics"], result["exports"])


def _write_report(conn: sqlite3.Connection, experiment_id: str, output_dir: Path) -> str | None:
    """The HTML report is a convenience: if it cannot be drawn the run has still finished."""
    from .report import default_report_path, write_report

    try:
        return str(write_report(conn, experiment_id, default_report_path(output_dir, experiment_id)))
    except Exception as exc:  # noqa: BLE001 - any failure here must not fail a finished run
        log.warning("report_failed", message=f"report not written: {_describe(exc)}; "
                    f"run `asyncrunner report {experiment_id}` to retry")
        return None


def _mark_failed(conn: sqlite3.Connection, experiment_id: str, reason: str) -> None:
    experiments.set_status(conn, experiment_id, "failed", reason[:500])
    log.error("run_failed", message=f"run failed: {reason[:300]}")


def _describe(exc: BaseException) -> str:
    """A one-line reason, looking inside exception groups for the first real cause."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:500]
