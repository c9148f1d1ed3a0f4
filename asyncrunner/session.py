"""One session of an experiment: plan it, then carry the plan out with one shared tail.

    draft (no database) -> lock -> plan (every guard) -> open the record -> pipeline -> end

The same tail serves a new experiment, a resume and a retry of error rows; only the plan
differs. The session owns the experiment lock (held from before the plan is checked until
after the final status is written, released on every exit path), the synchronous
connection used outside the pipeline, the run log, and the HTTP client the pipeline uses
(with the built-in simulator started here for `provider: mock`). It ends every session in
one status: `completed` after finalize, `interrupted` on a signal, `failed` with the reason
on any unexpected error.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

import anyio
import httpx
import structlog

from asyncrunner import logs
from asyncrunner.config import Config
from asyncrunner.db import backup, experiments, store
from asyncrunner.db.locks import ExperimentLock
from asyncrunner.db.schema import connect
from asyncrunner.errors import AsyncRunnerError, RunFailed, Stopped
from asyncrunner.llm.client import ClientSettings, make_http_client, normalize_api_url, redact_url
from asyncrunner.pipeline.progress import Snapshot
from asyncrunner.pipeline.runner import PipelineOutcome, PipelineSpec, run_pipeline
from asyncrunner.pipeline.workers import Prompt
from asyncrunner.pipeline.writer import WriterSettings
from asyncrunner.plan import Intent, RunPlan, RunRequest, complete, draft, request_from_env
from asyncrunner.results.finalize import finalize
from asyncrunner.vocab import Status

log = structlog.get_logger("asyncrunner.session")

__all__ = ["RunRequest", "RunSummary", "execute", "request_from_env"]


@dataclass(frozen=True, slots=True)
class RunSummary:
    experiment_id: str
    status: Status
    metrics: dict[str, Any] | None
    exports: dict[str, str]


def execute(req: RunRequest, out: IO[str] = sys.stdout,
            on_commit: Callable[[Snapshot], None] | None = None, *,
            transport: httpx.AsyncBaseTransport | None = None) -> RunSummary:
    """Run a new experiment, resume one, or retry its errors; raise an AsyncRunnerError
    for the CLI to map. `transport` replaces the network (tests); the simulator of
    `provider: mock` is then not started either."""
    if req.retry_errors_only and not req.resume:
        log.warning("retry_errors_ignored",
                    message="RETRY_ERRORS_ONLY is set without RESUME: ignored; "
                            "set RESUME=1 and EXPERIMENT_ID to retry an experiment's errors")
    d = draft(req)
    with _sigterm_as_exception(), closing(connect(req.db_path)) as conn, \
            ExperimentLock(req.db_path, d.experiment_id) as lock, _run_log():
        plan = complete(conn, d)
        _open_record(conn, plan, lock, out)
        return _carry_out(conn, plan, on_commit, transport)


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


@contextmanager
def _run_log() -> Iterator[None]:
    try:
        yield
    finally:
        logs.close_run_log()
        logs.clear()


def _open_record(conn: sqlite3.Connection, plan: RunPlan, lock: ExperimentLock,
                 out: IO[str]) -> None:
    """Check the disk, back up an existing experiment, then create or reopen its record
    and say so: the first line on stdout is the experiment id."""
    cfg, experiment_id = plan.config, plan.experiment_id
    backup_path: Path | None = None
    backup.check_disk(plan.db_path, plan.target, with_backup=not plan.is_new)
    if plan.is_new:
        assert plan.ingest is not None
        experiments.create(
            conn, cfg, experiment_id=experiment_id, data_file=str(cfg.data.file),
            checksum=plan.ingest.data_checksum, n_total=plan.total,
            api_url=redact_url(normalize_api_url(cfg.model.api_url)),
            log_dir=str(Path(cfg.run.log_dir) / experiment_id))
    else:
        backup_path = backup.make_backup(plan.db_path)
        experiments.set_status(conn, experiment_id, Status.RUNNING)
    print(f"experiment_id: {experiment_id}", file=out, flush=True)
    logs.open_run_log(cfg.run.log_dir, experiment_id)
    logs.bind(experiment_id=experiment_id, session=uuid.uuid4().hex[:8])
    if lock.stale_holder:
        pid = lock.stale_holder.get("pid")
        who = f"PID {pid}, not running" if pid is not None else "unreadable content"
        log.warning("stale_lock", pid=pid, message=f"stale lock from {who}; replaced")
    for warning in plan.drift:
        log.warning("config_drift", message=warning)
    if backup_path:
        log.info("backup", message=f"backup written: {backup_path}")
    _log_start(plan)
    _log_config(cfg)


def _log_start(plan: RunPlan) -> None:
    cfg = plan.config
    if plan.is_new:
        log.info("run_start", message=f"experiment {plan.experiment_id} "
                 f"'{cfg.experiment.name}': {plan.total} narratives, {cfg.run.workers} workers",
                 model=cfg.model.name, provider=cfg.model.provider, total=plan.total,
                 workers=cfg.run.workers, batch_size=cfg.run.batch_size)
        return
    pct = 100.0 * plan.done / plan.total if plan.total else 100.0
    mode = "errors to retry" if plan.intent is Intent.RETRY_ERRORS else "remaining"
    log.info("resume", message=(
        f"RESUMING {plan.experiment_id}: completed {plan.done}, {mode} {plan.target}, "
        f"total {plan.total} ({pct:.1f}% done), previous status {plan.previous_status}"),
        completed=plan.done, remaining=plan.target, total=plan.total,
        previous_status=plan.previous_status)


def _log_config(cfg: Config) -> None:
    """A summary of what this session runs with; the key's variable name, never its value."""
    m, r = cfg.model, cfg.run
    log.info("config", model=m.name, provider=m.provider,
             api_url=redact_url(normalize_api_url(m.api_url)),
             api_key_env=m.api_key_env, temperature=m.temperature, max_tokens=m.max_tokens,
             timeout_s=m.timeout_s, prompt_version=cfg.prompt.version, workers=r.workers,
             batch_size=r.batch_size, max_attempts=r.max_attempts, seed=r.seed,
             max_narratives=r.max_narratives, data_file=cfg.data.file)


def _client_settings(plan: RunPlan) -> ClientSettings:
    m, env = plan.config.model, plan.request.env
    key = env.get(m.api_key_env) if m.api_key_env else None
    return ClientSettings(
        api_url=normalize_api_url(m.api_url), model=m.name, temperature=m.temperature,
        max_tokens=m.max_tokens, timeout_s=m.timeout_s, max_attempts=plan.config.run.max_attempts,
        seed=plan.config.run.seed, api_key=key or None, response_format=m.response_format,
        extra_body=dict(m.extra_body or {}), backoff_base_s=plan.config.run.retry_backoff_s,
    )


def pipeline_spec(plan: RunPlan) -> PipelineSpec:
    r = plan.config.run
    return PipelineSpec(
        db_path=str(plan.db_path), selection=plan.selection,
        writer=WriterSettings(experiment_id=plan.experiment_id, total=plan.total,
                              session_target=plan.target, batch_size=r.batch_size,
                              interval_s=r.commit_interval_s,
                              retry_errors_only=plan.intent is Intent.RETRY_ERRORS),
        client=_client_settings(plan),
        prompt=Prompt(plan.config.prompt.system_prompt, plan.config.prompt.user_template),
        workers=r.workers, grace_s=r.grace_period_s,
        requests_per_minute=r.requests_per_minute, tokens_per_minute=r.tokens_per_minute,
    )


async def _serve_pipeline(plan: RunPlan, spec: PipelineSpec,
                          on_commit: Callable[[Snapshot], None] | None,
                          transport: httpx.AsyncBaseTransport | None) -> PipelineOutcome:
    """Bring up the HTTP side (and the simulator for `provider: mock`), run the pipeline."""
    async with AsyncExitStack() as stack:
        if plan.config.model.provider == "mock" and transport is None:
            from asyncrunner.sim import MockServer

            server = await stack.enter_async_context(
                MockServer(latency_ms=0.0, model=spec.client.model))
            spec = _with_url(spec, server.url)
        http = await stack.enter_async_context(
            make_http_client(spec.workers, spec.client.timeout_s, transport=transport))
        return await run_pipeline(spec, http, on_commit=on_commit)


def _with_url(spec: PipelineSpec, url: str) -> PipelineSpec:
    return replace(spec, client=replace(spec.client, api_url=url))


def _carry_out(conn: sqlite3.Connection, plan: RunPlan,
               on_commit: Callable[[Snapshot], None] | None,
               transport: httpx.AsyncBaseTransport | None) -> RunSummary:
    experiment_id = plan.experiment_id
    try:
        outcome = anyio.run(_serve_pipeline, plan, pipeline_spec(plan), on_commit, transport)
        # The event loop put the default SIGTERM action back when it closed.
        signal.signal(signal.SIGTERM, _raise_stopped)
        if outcome.stopped_by is not None:
            raise Stopped(outcome.stopped_by)
        done, _ = store.count_results(conn, experiment_id)
        if done < plan.total:
            raise RunFailed(f"work ran out with {done}/{plan.total} narratives stored")
        result = finalize(conn, experiment_id, Path(plan.config.run.output_dir))
    except (Stopped, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        _end_interrupted(conn, plan, signum)
        raise Stopped(signum) from None
    except AsyncRunnerError as exc:
        _end_failed(conn, experiment_id, str(exc))
        raise
    except BaseException as exc:
        reason = _describe(exc)
        _end_failed(conn, experiment_id, reason)
        raise RunFailed(f"run failed: {reason}; resume with "
                        f"`asyncrunner resume {experiment_id}`") from exc
    log.info("exports", message=f"results written: {result['exports']['csv']}, "
                                f"{result['exports']['json']}")
    report = _write_report(conn, experiment_id, Path(plan.config.run.output_dir))
    if report:
        result["exports"]["report"] = report
    overall = result["metrics"]["overall"]
    log.info("run_finished", message=f"experiment {experiment_id} completed",
             n=overall["n"], precision=overall["precision"], recall=overall["recall"],
             f1=overall["f1"])
    return RunSummary(experiment_id, Status.COMPLETED, result["metrics"], result["exports"])


def _end_interrupted(conn: sqlite3.Connection, plan: RunPlan, signum: int) -> None:
    name = signal.Signals(signum).name
    experiments.set_status(conn, plan.experiment_id, Status.INTERRUPTED, f"stopped by {name}")
    done, _ = store.count_results(conn, plan.experiment_id)
    log.warning("run_interrupted", message=(
        f"interrupted: {done}/{plan.total} narratives stored; resume with "
        f"RESUME=1 EXPERIMENT_ID={plan.experiment_id} or "
        f"`asyncrunner resume {plan.experiment_id}`"))


def _end_failed(conn: sqlite3.Connection, experiment_id: str, reason: str) -> None:
    experiments.set_status(conn, experiment_id, Status.FAILED, reason[:500])
    log.error("run_failed", message=f"run failed: {reason[:300]}")


def _write_report(conn: sqlite3.Connection, experiment_id: str, output_dir: Path) -> str | None:
    """The HTML report is a convenience: if it cannot be drawn the run has still finished."""
    try:
        from asyncrunner.results.report import default_report_path, write_report

        out = default_report_path(output_dir, experiment_id)
        return str(write_report(conn, experiment_id, out))
    except Exception as exc:  # noqa: BLE001 - any failure here must not fail a finished run
        log.warning("report_failed", message=f"report not written: {_describe(exc)}; "
                    f"run `asyncrunner report {experiment_id}` to retry")
        return None


def _describe(exc: BaseException) -> str:
    """A one-line reason, looking inside exception groups for the first real cause."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:500]
