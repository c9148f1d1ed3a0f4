"""One session of an experiment: plan it, then carry the plan out with one shared tail.

    draft (no database) -> lock -> [backup] -> plan (every guard) -> [backup] ->
        open the record and the session row -> probe -> pipeline -> end (record and
        session row) -> [error-share check]

The same tail serves a new experiment, a resume and a retry of error rows; only the plan
differs. The session owns the experiment lock (held from before the plan is checked until
after the final status is written, released on every exit path), the synchronous
connection used outside the pipeline, the run log, and the HTTP client the pipeline uses
(with the built-in simulator started here for `provider: mock`). It ends every session in
one status: `completed` after finalize, `interrupted` on a signal or when the endpoint
cannot serve (EndpointCannotServe, exit 4: a fatal probe answer, a fatal answer during the
run, the circuit breaker; the reason in failure_reason), `failed` with the reason on any
unexpected error; and it records itself in the `sessions` table (db/sessions.py):
intent, effective settings and their difference from the stored configuration, what it did
and how it ended.

Requests go through one endpoint pool per session (llm/router.py): `model.endpoints`, or
`model.api_url` as a pool of one, each endpoint with the key its api_key_env names (else
model.api_key_env); every URL is stored and logged redacted, and the pool's per-endpoint
figures end up in sessions.endpoints_json (the writer's commits, and once more at the end).

The response-format probe (llm/probe.py) runs on the pipeline's HTTP session, through the
pool (so to its first healthy endpoint), before the first narrative: a new experiment
tries its `model.response_format` setting (auto falls back json_schema -> json_object ->
none), a resume of an `auto` experiment only the mode its first probe chose; the mode is
stored (experiments.response_format_used and config_json's model.response_format_used) and
logged as one line. An endpoint that answers no try at all (busy, unreachable) does not
stop the run: it goes ahead with the setting's first mode, unverified (unless no endpoint
has answered for run.endpoint_down_s: EndpointCannotServe). A session with nothing to send
does not probe. After the report, a completed run whose error share is above
run.max_error_share raises TooManyErrors (exit 4).

Backups: before a resume writes anything (after its guards passed), and before a new run
writes into a database that already holds experiments (before its ingest).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AsyncExitStack, closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any, cast

import anyio
import httpx
import structlog

from asyncrunner import logs
from asyncrunner.config import Config, unknown_env_variables
from asyncrunner.db import backup, checksums, drops, experiments, sample, sessions, store
from asyncrunner.db.ingest import ORIGIN_ADOPTED, IngestReport, mapping_json
from asyncrunner.db.locks import ExperimentLock
from asyncrunner.db.schema import connect, transaction
from asyncrunner.diskspace import SpaceReserve, disk_full_cause, disk_full_error
from asyncrunner.errors import (
    AsyncRunnerError,
    DiskFull,
    EndpointCannotServe,
    RunFailed,
    Stopped,
    TooManyErrors,
)
from asyncrunner.llm.answer_schema import candidate_formats
from asyncrunner.llm.client import (
    ClientSettings,
    endpoint_settings,
    make_http_client,
    normalize_api_url,
    redact_endpoint_urls,
    redact_model_urls,
    redact_url,
)
from asyncrunner.llm.probe import ProbeError, ProbeResult, probe
from asyncrunner.llm.router import EndpointPool, EndpointSettings
from asyncrunner.llm.setup import client_settings, endpoints_from
from asyncrunner.pipeline.producer import FirstPage
from asyncrunner.pipeline.progress import Snapshot
from asyncrunner.pipeline.runner import Loading, PipelineOutcome, PipelineSpec, run_pipeline
from asyncrunner.pipeline.workers import Prompt
from asyncrunner.pipeline.writer import WriterSettings
from asyncrunner.plan import (
    LEGACY_ROWS,
    Draft,
    Intent,
    RunPlan,
    RunRequest,
    complete,
    draft,
    file_change_lines,
    request_from_env,
)
from asyncrunner.results.finalize import finalize
from asyncrunner.settings import settings_hash
from asyncrunner.vocab import SessionEnd, Status

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
    if req.allow_drift and not req.resume:
        log.warning("allow_drift_ignored",
                    message="--allow-drift applies to a resume only: ignored for a new "
                            "experiment")
    d = draft(req)
    session_id = uuid.uuid4().hex
    with _sigterm_as_exception(), closing(connect(req.db_path)) as conn, \
            ExperimentLock(req.db_path, d.experiment_id) as lock, _run_log(), \
            SpaceReserve(req.db_path, d.experiment_id) as reserve, \
            _resume_backup(d) as pending:
        first_backup = _backup_before_new_run(conn, d)
        plan = complete(conn, d, before_write=pending.snapshot if pending else None,
                        load_beside=True)
        try:
            _warn_unknown_env(req.env, plan.config)
            _open_record(conn, plan, lock, out, session_id, first_backup, pending)
            return _carry_out(conn, plan, session_id, _progress_for(plan, on_commit),
                              transport, reserve)
        finally:
            if plan.background is not None:
                plan.background.close()     # unfinished, it is finished by the next session


def _warn_unknown_env(env: Mapping[str, str], cfg: Config) -> None:
    """A misspelled ASYNCRUNNER_* setting would otherwise be ignored without a word."""
    known = [name for name in [cfg.model.api_key_env,
                               *(e.get("api_key_env") for e in cfg.model.endpoints or [])]
             if name]
    for line in unknown_env_variables(env, known=known):
        log.warning("unknown_env_variable", message=line)


def _backup_before_new_run(conn: sqlite3.Connection, d: Draft) -> Path | None:
    """A new run writes (its ingest, its record) into a database that may hold other
    experiments' results: copy it first, as a resume does."""
    if d.intent is not Intent.NEW or d.request.study is not None:
        return None        # a study's cells: the sweep took one backup before the first
    return backup.backup_before_new_writes(conn, d.request.db_path)


@contextmanager
def _resume_backup(d: Draft) -> Iterator[backup.BackgroundBackup | None]:
    """A resume backs the database up before it changes anything: the copy starts now
    (the lock is held), its snapshot is waited for before the first write (`_open_record`),
    the rest of the copy runs beside the session and is waited for at its end."""
    if d.intent is Intent.NEW:
        yield None
        return
    with backup.BackgroundBackup(d.request.db_path) as pending:
        try:
            yield pending
        finally:
            _report_backup(pending)


def _report_backup(pending: backup.BackgroundBackup) -> None:
    """Say where the backup went, or (once the session has written) that it failed: the
    database itself is whole, only the copy of how it was is missing."""
    try:
        made = pending.result()
    except Exception as exc:  # noqa: BLE001 - reported; the session's own outcome stands
        if pending.snapshot_taken:
            log.error("backup", message=f"the backup taken at the start of this session "
                                        f"failed: {_describe(exc)}")
        return
    log.info("backup", message=f"backup written: {made}")


def _progress_for(plan: RunPlan, on_commit: Callable[[Snapshot], None] | None
                  ) -> Callable[[Snapshot], None] | None:
    """A retry of error rows shows its own progress (k of E errors), not the experiment's
    N/N, which is complete from its first second."""
    if on_commit is None or plan.intent is not Intent.RETRY_ERRORS:
        return on_commit
    callback = on_commit

    def retry_progress(s: Snapshot) -> None:
        callback(replace(s, done=s.session_done, total=plan.target))

    return retry_progress


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
                 out: IO[str], session_id: str, backup_path: Path | None,
                 pending: backup.BackgroundBackup | None) -> None:
    """Check the disk (for a resume's backup, which may still be under way, too), wait for
    that backup's snapshot, then create or reopen the experiment's record and the session
    row (one transaction) and say so: the first line on stdout is the experiment id.
    `backup_path`: a new run's backup, already written."""
    cfg, experiment_id = plan.config, plan.experiment_id
    backup.check_disk(plan.db_path, plan.target, with_backup=pending is not None,
                      output_dir=Path(cfg.run.output_dir), export_rows=plan.total)
    if pending is not None:
        pending.snapshot()
    record_session(conn, plan, session_id, plan.intent)
    print(f"experiment_id: {experiment_id}", file=out, flush=True)
    logs.open_run_log(cfg.run.log_dir, experiment_id)
    logs.bind(experiment_id=experiment_id, session=session_id)
    if lock.stale_holder:
        pid = lock.stale_holder.get("pid")
        who = f"PID {pid}, not running" if pid is not None else "unreadable content"
        log.warning("stale_lock", pid=pid, message=f"stale lock from {who}; replaced")
    for warning in plan.drift:
        log.warning("config_drift", message=warning)
    for warning in plan.warnings:
        log.warning("plan_warning", message=warning)
    if backup_path:
        log.info("backup", message=f"backup written: {backup_path}")
    _log_data(conn, plan)
    _log_start(plan)
    _log_config(cfg)
    diff = _session_diff(cfg, plan.settings_diff)
    if diff:
        log.info("session_settings", message="this session differs from the stored "
                 "configuration in: " + ", ".join(
                     f"{k} {_brief(v['stored'])} -> {_brief(v['session'])}"
                     for k, v in diff.items()),
                 diff=diff)


def record_session(conn: sqlite3.Connection, plan: RunPlan, session_id: str,
                   intent: str) -> None:
    """In one transaction: a new experiment's record (URLs redacted) and its sample, or
    what a resume changes; then the session's row. Also `batch-file`'s record."""
    cfg = plan.config
    with transaction(conn):
        if plan.is_new:
            assert plan.ingest is not None
            experiments.create(
                conn, _redacted(cfg), experiment_id=plan.experiment_id,
                data_file=str(cfg.data.file), checksum=plan.ingest.data_checksum,
                n_total=plan.total, api_url=_stored_url(cfg),
                log_dir=str(Path(cfg.run.log_dir) / plan.experiment_id),
                study=_study_tag(plan),
                sample_json=(json.dumps(cfg.data.sample) if cfg.data.sample is not None
                             else None))
            if plan.sample_keys is not None:
                sample.store(conn, plan.experiment_id, list(plan.sample_keys))
        else:
            _record_resume(conn, plan, session_id)
        checksums.remember(conn, plan.data_file)
        settings = _session_settings(cfg)
        sessions.open_session(
            conn, session_id=session_id, experiment_id=plan.experiment_id, intent=intent,
            target=plan.target, settings=settings, settings_hash=settings_hash(settings),
            diff=_session_diff(cfg, plan.settings_diff), allowed_drift=list(plan.allowed_drift),
            retry_categories=(list(plan.retry_categories)
                              if plan.retry_categories is not None else None))


def _study_tag(plan: RunPlan) -> tuple[str, str, int] | None:
    tag = plan.request.study
    return (tag.study_id, tag.cell, tag.repeat) if tag is not None else None


def _brief(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _session_settings(cfg: Config) -> dict[str, object]:
    """A session's effective settings as recorded: no secret (the key's variable name only),
    every URL redacted."""
    settings = _redacted(cfg).to_dict()
    settings["model"]["api_url"] = redact_url(normalize_api_url(cfg.model.api_url))
    return settings


def _redacted(cfg: Config) -> Config:
    """The configuration with its endpoint URLs redacted (api_url is redacted where it is
    stored: experiments.create takes it apart)."""
    endpoints = cfg.model.endpoints
    if endpoints is None:
        return cfg
    return replace(cfg, model=replace(cfg.model, endpoints=cast(
        list[dict[str, Any]], redact_endpoint_urls(endpoints))))


def _stored_url(cfg: Config) -> str:
    """experiments.api_url: model.api_url, or the first of model.endpoints, redacted."""
    m = cfg.model
    return redact_url(normalize_api_url(m.endpoints[0]["api_url"] if m.endpoints
                                        else m.api_url))


def _session_diff(cfg: Config, diff: Mapping[str, Any]) -> dict[str, Any]:
    """plan.settings_diff as recorded and logged: endpoint URLs redacted, and left out what
    only redaction told apart, or model.api_url beside model.endpoints (the experiment
    stores the first endpoint as its api_url; the session does not use api_url then)."""
    out: dict[str, Any] = {}
    for key, change in diff.items():
        if key == "model.endpoints" and isinstance(change, Mapping):
            change = {side: redact_endpoint_urls(v) for side, v in change.items()}
            if change.get("stored") == change.get("session"):
                continue
        elif key == "model.api_url" and cfg.model.endpoints:
            continue
        out[key] = change
    return out


def _record_resume(conn: sqlite3.Connection, plan: RunPlan, session_id: str) -> None:
    """What a resume changes besides the status, inside the session's opening transaction:
    an R-era experiment's narrative set and checksum, allowed drift, and the metrics of a
    completed experiment whose errors are retried (kept in metrics_history)."""
    experiment_id = plan.experiment_id
    if plan.legacy is not None:
        _record_legacy(conn, plan, session_id)
    if plan.stored_config is not None:
        stored = json.loads(json.dumps(dict(plan.stored_config), default=str))
        if isinstance(stored.get("model"), dict):
            stored["model"] = redact_model_urls(stored["model"])
        experiments.record_config(conn, experiment_id, session_id, stored,
                                  list(plan.config_changes))
    if plan.previous_status is Status.COMPLETED:
        experiments.archive_metrics(conn, experiment_id, session_id)
    if plan.finished_load:       # stopped while its file was loading: now it is whole
        experiments.set_total(conn, experiment_id, plan.total)
    experiments.set_status(conn, experiment_id, Status.RUNNING)


def _record_legacy(conn: sqlite3.Connection, plan: RunPlan, session_id: str) -> None:
    legacy = plan.legacy
    assert legacy is not None
    if legacy.tag_source is not None:
        if store.count_set(conn, legacy.checksum, None):
            raise RunFailed(f"data file checksum {legacy.checksum} was loaded by another "
                            "process meanwhile; run the resume again")
        conn.execute(f"UPDATE source_narratives AS s SET data_checksum = ? WHERE {LEGACY_ROWS}",
                     (legacy.checksum, legacy.tag_source))
    if conn.execute("SELECT 1 FROM ingests WHERE data_checksum = ?",
                    (legacy.checksum,)).fetchone() is None:
        conn.execute(
            "INSERT INTO ingests (data_checksum, mapping_json, data_source, n_narratives, "
            "loaded_at, data_path, origin) VALUES (?, ?, ?, ?, "
            "(SELECT MIN(loaded_at) FROM source_narratives WHERE data_checksum = ?), ?, ?)",
            (legacy.checksum, mapping_json(plan.config.data), plan.config.data.file,
             legacy.n_rows, legacy.checksum, str(Path(plan.config.data.file).resolve()),
             ORIGIN_ADOPTED))
    experiments.record_checksum(conn, plan.experiment_id, session_id, legacy.checksum,
                                legacy.max_narratives, plan.total)


def _log_data(conn: sqlite3.Connection, plan: RunPlan) -> None:
    """What the data file held and what it lost, in the run log of every session (the
    `ingest` event; its `dropped` field is db/drops.py's summary)."""
    checksum = plan.selection.checksum
    summary = drops.drop_summary(conn, checksum)
    lost = "not sent to the model: " + drops.describe(summary)[0]
    if plan.background is not None:
        log.info("loading", message=(
            f"data {plan.config.data.file}: loading beside the run; the first "
            f"{plan.background.progress.n_narratives} narratives are in"), checksum=checksum)
    elif plan.is_new:
        assert plan.ingest is not None
        _log_ingest(plan, plan.ingest, summary)
    else:
        log.info("ingest", message=f"data {plan.config.data.file} (checksum {checksum}); "
                 f"{lost}", checksum=checksum, dropped=summary)


def _log_ingest(plan: RunPlan, report: IngestReport, summary: dict[str, Any] | None) -> None:
    """A new experiment's `ingest` event (`summary`: db/drops.py's), with what changed
    since the file's last version and the warnings about what it lost."""
    for line in file_change_lines(report, plan.prior_loads):
        log.warning("data_file_changed", message=line)
    log.info("ingest", message=(
        f"data {plan.config.data.file}: {report.n_narratives} narratives"
        + ("" if report.loaded else " (already in the database; file not re-read)")
        + "; not sent to the model: " + drops.describe(summary)[0]),
        checksum=report.data_checksum, dropped=summary)
    for line in drops.warnings(summary):
        log.warning("dropped_warning", message=line)


def _log_loaded(conn: sqlite3.Connection, plan: RunPlan, report: IngestReport) -> None:
    """The data file loaded beside the run has been committed whole: the `ingest` event
    other runs log at their start, once its counts are final."""
    _log_ingest(plan, report, drops.drop_summary(conn, report.data_checksum))


def _settle_total(conn: sqlite3.Connection, plan: RunPlan, session_id: str) -> None:
    """The experiment's size once its data file is loaded whole (the writer's commits
    carried it so far), and the session's target with it."""
    with transaction(conn):
        experiments.set_total(conn, plan.experiment_id, plan.total_now)
        conn.execute("UPDATE sessions SET target = ? WHERE session_id = ?",
                     (plan.total_now, session_id))


def _log_start(plan: RunPlan) -> None:
    cfg = plan.config
    if plan.is_new:
        size = (f"{plan.total} narratives so far (the file is still loading)"
                if plan.background is not None else f"{plan.total} narratives")
        log.info("run_start", message=f"experiment {plan.experiment_id} "
                 f"'{cfg.experiment.name}': {size}, {cfg.run.workers} workers",
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
    log.info("config", model=m.name, provider=m.provider, api_url=_stored_url(cfg),
             endpoints=redact_endpoint_urls(m.endpoints), endpoint_down_s=r.endpoint_down_s,
             api_key_env=m.api_key_env, temperature=m.temperature, max_tokens=m.max_tokens,
             timeout_s=m.timeout_s, prompt_version=cfg.prompt.version, workers=r.workers,
             batch_size=r.batch_size, max_attempts=r.max_attempts, seed=r.seed,
             max_narratives=r.max_narratives, data_file=cfg.data.file)


def _endpoints(plan: RunPlan) -> tuple[EndpointSettings, ...]:
    return endpoints_from(plan.config, plan.request.env)


def _client_settings(plan: RunPlan) -> ClientSettings:
    return client_settings(plan.config, plan.request.env)


def pipeline_spec(plan: RunPlan, session_id: str | None = None) -> PipelineSpec:
    r = plan.config.run
    return PipelineSpec(
        db_path=str(plan.db_path), selection=plan.selection,
        writer=WriterSettings(experiment_id=plan.experiment_id, total=plan.total,
                              session_target=plan.target, batch_size=r.batch_size,
                              interval_s=r.commit_interval_s,
                              retry_errors_only=plan.intent is Intent.RETRY_ERRORS,
                              max_tokens=plan.config.model.max_tokens,
                              session_id=session_id,
                              total_now=(lambda: plan.total_now)
                              if plan.feed is not None else None),
        client=_client_settings(plan),
        prompt=Prompt(plan.config.prompt.system_prompt, plan.config.prompt.user_template,
                      r.parse_retry),
        workers=r.workers, grace_s=r.grace_period_s,
        requests_per_minute=r.requests_per_minute, tokens_per_minute=r.tokens_per_minute,
        breaker_window=r.breaker_window, auto_workers=r.auto_workers,
    )


def _probe_setting(conn: sqlite3.Connection, plan: RunPlan) -> str:
    """What the probe tries: a new experiment its configured setting (auto falls back); a
    resume the experiment's setting, and for `auto` only the mode its first probe chose
    (an experiment from before the probe has its stored setting, `none` when it had none)."""
    setting = plan.config.model.response_format or "none"
    if not plan.is_new and setting == "auto":
        row = conn.execute("SELECT response_format_used FROM experiments "
                           "WHERE experiment_id = ?", (plan.experiment_id,)).fetchone()
        if row is not None and row[0]:
            return str(row[0])
    return setting


def _record_probe(conn: sqlite3.Connection, plan: RunPlan, result: ProbeResult) -> None:
    """Store the chosen mode (column and config_json) and say it."""
    log.info("response_format", message=result.summary(), mode=result.mode,
             tries=[{"mode": t.mode, "verdict": str(t.verdict), "status": t.status}
                    for t in result.tries])
    experiments.record_response_format(conn, plan.experiment_id, result.mode)


def _unverified(setting: str, exc: ProbeError) -> ProbeResult:
    """The endpoint was busy or unreachable for every try (not a refusal): the run goes
    ahead with the setting's first mode, unverified; its own retries and the circuit
    breaker deal with an endpoint that stays down."""
    mode = candidate_formats(setting)[0]
    log.warning("probe_unanswered", message=(
        f"{exc}; going ahead with response_format {mode} (not verified)"))
    return ProbeResult(mode, exc.tries)


async def _serve_pipeline(plan: RunPlan, spec: PipelineSpec,
                          on_commit: Callable[[Snapshot], None] | None,
                          transport: httpx.AsyncBaseTransport | None,
                          setting: str, on_probe: Callable[[ProbeResult], None],
                          on_pool: Callable[[EndpointPool], None] | None = None,
                          first_page: FirstPage | None = None,
                          loading: Loading | None = None) -> PipelineOutcome:
    """Bring up the HTTP side (and the simulator for `provider: mock`), probe the response
    format on it, run the pipeline. Requests go through one endpoint pool (router.py):
    model.endpoints, or the one api_url; the probe too (to the first healthy endpoint).
    `on_pool` is handed the pool, for its final figures; `first_page`: the producer's
    first page, read meanwhile; `loading`: the data file's load, to finish beside it."""
    batch = plan.config.model.provider == "openai-batch"
    async with AsyncExitStack() as stack:
        if plan.config.model.provider == "mock" and transport is None:
            from asyncrunner.sim import MockServer

            server = await stack.enter_async_context(
                MockServer(latency_ms=0.0, model=spec.client.model))
            spec = _with_url(spec, server.url)
        http = await stack.enter_async_context(
            make_http_client(spec.workers, spec.client.timeout_s, transport=transport,
                             # a batch's output file holds every answer of its chunk
                             max_response_bytes=None if batch
                             else plan.config.model.max_response_bytes))
        if batch and plan.target > 0:
            from asyncrunner.pipeline.batch import run_batches

            return await run_batches(plan, spec, http, on_commit=on_commit)
        pool = _pool(plan, spec)
        if on_pool is not None:
            on_pool(pool)
        spec = replace(spec, client=replace(spec.client, pool=pool),
                       writer=replace(spec.writer, endpoint_stats=pool.snapshot_json))
        if plan.target == 0:      # nothing to send (a resume that only finalizes)
            found = ProbeResult(candidate_formats(setting)[0], ())
        else:
            try:
                found = await probe(spec.client, http, spec.prompt.system_prompt,
                                    spec.prompt.user_template, setting=setting)
            except ProbeError as exc:
                if exc.fatal:
                    raise EndpointCannotServe(
                        f"the endpoint cannot serve this run: {exc}") from None
                down = pool.down_message()
                if down is not None:
                    raise EndpointCannotServe(down) from None
                found = _unverified(setting, exc)
            on_probe(found)
        mode = None if found.mode == "none" else found.mode
        spec = replace(spec, client=replace(spec.client, response_format=mode))
        return await run_pipeline(spec, http, on_commit=on_commit, first_page=first_page,
                                  loading=loading)


def _with_url(spec: PipelineSpec, url: str) -> PipelineSpec:
    return replace(spec, client=replace(spec.client, api_url=url))


def _pool(plan: RunPlan, spec: PipelineSpec) -> EndpointPool:
    """The session's endpoints: model.endpoints, or the client's one URL (the simulator's
    for `provider: mock`); each endpoint's own limiter bounded by run.workers."""
    endpoints = (_endpoints(plan) if plan.config.model.provider != "mock"
                 else (endpoint_settings(spec.client.api_url, api_key=spec.client.api_key),))
    return EndpointPool(endpoints, workers=spec.workers,
                        down_s=plan.config.run.endpoint_down_s,
                        probe_hold_s=spec.client.timeout_s + 1.0,
                        resume_hint=f"asyncrunner resume {plan.experiment_id}")


def _store_endpoints(conn: sqlite3.Connection, session_id: str,
                     pools: list[EndpointPool]) -> None:
    """The pool's figures as the session ended (the writer stores them at each commit; a
    session that committed nothing, say every endpoint down, has them only from here)."""
    if not pools:
        return
    try:
        with conn:
            conn.execute("UPDATE sessions SET endpoints_json = ? WHERE session_id = ?",
                         (pools[-1].snapshot_json(), session_id))
    except sqlite3.Error as exc:
        log.warning("session_row", message=f"endpoint figures not recorded: {exc}")


def _carry_out(conn: sqlite3.Connection, plan: RunPlan, session_id: str,
               on_commit: Callable[[Snapshot], None] | None,
               transport: httpx.AsyncBaseTransport | None,
               reserve: SpaceReserve | None = None) -> RunSummary:
    experiment_id = plan.experiment_id
    pools: list[EndpointPool] = []
    spec = pipeline_spec(plan, session_id)
    # Read while the HTTP side comes up and the probe runs (batch mode reads no pages; a
    # file still loading has its first rows just committed, a cheap read).
    first_page = (FirstPage(spec.db_path, spec.selection)
                  if plan.target > 0 and plan.config.model.provider != "openai-batch"
                  and plan.feed is None else None)
    loading = (Loading(plan.background, plan.feed, lambda report: _log_loaded(conn, plan, report))
               if plan.background is not None and plan.feed is not None else None)
    try:
        try:
            outcome = anyio.run(_serve_pipeline, plan, spec, on_commit, transport,
                                _probe_setting(conn, plan),
                                lambda found: _record_probe(conn, plan, found), pools.append,
                                first_page, loading)
        finally:
            if first_page is not None:
                first_page.wait()      # a session stopped before its pipeline
            _store_endpoints(conn, session_id, pools)
        # The event loop put the default SIGTERM action back when it closed.
        signal.signal(signal.SIGTERM, _raise_stopped)
        if outcome.stopped_by is not None:
            raise Stopped(outcome.stopped_by)
        if outcome.halted is not None:
            raise EndpointCannotServe(outcome.halted)
        done, _ = store.count_results(conn, experiment_id)
        if plan.feed is not None:
            _settle_total(conn, plan, session_id)
        if done < plan.total_now:
            raise RunFailed(f"work ran out with {done}/{plan.total_now} narratives stored")
        result = finalize(conn, experiment_id, Path(plan.config.run.output_dir))
        sessions.end_session(conn, session_id, SessionEnd.COMPLETED)
    except (Stopped, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        _end_interrupted(conn, plan, session_id, signum)
        raise Stopped(signum) from None
    except EndpointCannotServe as exc:
        _end_cannot_serve(conn, plan, session_id, str(exc))
        raise
    except AsyncRunnerError as exc:
        _end_failed(conn, experiment_id, session_id, str(exc))
        raise
    except BaseException as exc:
        full = disk_full_cause(exc, plan.db_path)
        if full is not None:
            raise _end_disk_full(conn, plan, session_id, full, reserve) from None
        reason = _describe(exc)
        _end_failed(conn, experiment_id, session_id, reason)
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
    summary = RunSummary(experiment_id, Status.COMPLETED, result["metrics"], result["exports"])
    _check_error_share(conn, plan, summary)
    return summary


def _check_error_share(conn: sqlite3.Connection, plan: RunPlan, summary: RunSummary) -> None:
    """A completed run whose error share is above run.max_error_share stays completed with
    everything stored, and says so (exit 4)."""
    done, errors = store.count_results(conn, plan.experiment_id)
    limit = plan.config.run.max_error_share
    if not done or errors / done <= limit:
        return
    by_category = ", ".join(f"{k} {v}" for k, v in sorted(
        store.errors_by_category(conn, plan.experiment_id).items(), key=lambda kv: -kv[1]))
    message = (f"{errors} of {done} narratives ({errors / done:.1%}) ended in an error "
               f"({by_category}), above run.max_error_share={limit:g}; the experiment is "
               "completed and every result is stored; retry the errors with RESUME=1 "
               f"RETRY_ERRORS_ONLY=1 EXPERIMENT_ID={plan.experiment_id}")
    log.warning("error_share", message=message, errors=errors, done=done, limit=limit)
    raise TooManyErrors(message, summary)


def _end_interrupted(conn: sqlite3.Connection, plan: RunPlan, session_id: str,
                     signum: int) -> None:
    name = signal.Signals(signum).name
    experiments.set_status(conn, plan.experiment_id, Status.INTERRUPTED, f"stopped by {name}")
    _end_session(conn, session_id, SessionEnd.INTERRUPTED, f"stopped by {name}")
    done, _ = store.count_results(conn, plan.experiment_id)
    log.warning("run_interrupted", message=(
        f"interrupted: {done}/{plan.total_now} narratives stored; resume with "
        f"RESUME=1 EXPERIMENT_ID={plan.experiment_id} or "
        f"`asyncrunner resume {plan.experiment_id}`"))


def _end_cannot_serve(conn: sqlite3.Connection, plan: RunPlan, session_id: str,
                      reason: str) -> None:
    """Stopped because the endpoint cannot serve: like a signal, resumable once it can."""
    experiments.set_status(conn, plan.experiment_id, Status.INTERRUPTED, reason[:500])
    _end_session(conn, session_id, SessionEnd.INTERRUPTED, reason[:500])
    done, _ = store.count_results(conn, plan.experiment_id)
    log.error("endpoint_cannot_serve", message=(
        f"stopped: {reason[:300]}; {done}/{plan.total_now} narratives stored; fix it, then "
        f"`asyncrunner resume {plan.experiment_id}`"))


def _end_disk_full(conn: sqlite3.Connection, plan: RunPlan, session_id: str,
                   cause: BaseException, reserve: SpaceReserve | None) -> DiskFull:
    """The disk filled up: every committed result stays, the experiment stays resumable.
    Recording that is a write too: the reserve is given back to make room for it. Should
    it still fail, the record says running, `status` shows it as running (dead), and a
    resume takes it up all the same."""
    if reserve is not None:
        reserve.release()
    # SQLite's error is the database's disk; a file write that names no file is an export's.
    fallback = (plan.db_path if isinstance(cause, sqlite3.Error)
                else Path(plan.config.run.output_dir))
    error = disk_full_error(cause, fallback, then=(
        f"free some space, then `asyncrunner resume {plan.experiment_id}`"))
    try:
        experiments.set_status(conn, plan.experiment_id, Status.INTERRUPTED, str(error)[:500])
    except sqlite3.Error as exc:
        log.warning("status_not_recorded", message=f"status not recorded: {exc}")
    _end_session(conn, session_id, SessionEnd.INTERRUPTED, str(error)[:500])
    log.error("disk_full", message=str(error))
    return error


def _end_failed(conn: sqlite3.Connection, experiment_id: str, session_id: str,
                reason: str) -> None:
    experiments.set_status(conn, experiment_id, Status.FAILED, reason[:500])
    _end_session(conn, session_id, SessionEnd.FAILED, reason[:500])
    log.error("run_failed", message=f"run failed: {reason[:300]}")


def _end_session(conn: sqlite3.Connection, session_id: str, ended_as: SessionEnd,
                 reason: str | None = None) -> None:
    """Record how the session ended; a failure to do so must not hide why it ended."""
    try:
        sessions.end_session(conn, session_id, ended_as, reason)
    except sqlite3.Error as exc:
        log.warning("session_row", message=f"session end not recorded: {exc}")


def _write_report(conn: sqlite3.Connection, experiment_id: str, output_dir: Path) -> str | None:
    """The HTML report is a convenience: if it cannot be drawn the run has still finished."""
    try:
        from asyncrunner.results.report import default_report_path, write_report

        out = default_report_path(output_dir, experiment_id)
        return str(write_report(conn, experiment_id, out))
    except Exception as exc:  # noqa: BLE001 - any failure here must not fail a finished run
        full = disk_full_cause(exc)
        why = (str(disk_full_error(full, output_dir, then="free some space"))
               if full is not None else _describe(exc))
        log.warning("report_failed", message=f"report not written: {why}; "
                    f"run `asyncrunner report {experiment_id}` to retry")
        return None


def _describe(exc: BaseException) -> str:
    """A one-line reason, looking inside exception groups for the first real cause."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:500]
