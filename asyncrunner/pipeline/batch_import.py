"""`asyncrunner batch-import`: the answers of a batch output JSONL (OpenAI's or vLLM's
format) stored exactly as live answers are, and the experiment finalized once complete.

    the file, read whole first (`_check_file`): a line that is not JSON, or a custom_id that
    is not one of the experiment's narratives, refuses it (exit 2, nothing stored); for a key
    on several lines the first wins
    -> a session row -> each first line through BatchCodec.result and the writer
    (pipeline.batch_results; INSERT OR IGNORE, so importing a file twice changes nothing)
    -> every narrative answered: finalize (metrics, exports, report, error share);
       otherwise the experiment waits again, `interrupted`, for another answer file.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio
import structlog

from asyncrunner import logs, refusals
from asyncrunner.config import Config, config_from_dict
from asyncrunner.db import batches, experiments, sample, sessions, store
from asyncrunner.db.locks import ExperimentLock
from asyncrunner.db.schema import connect_existing, transaction
from asyncrunner.errors import EndpointCannotServe, InputError, RefusedError, TooManyErrors
from asyncrunner.llm.client import ClientSettings, normalize_api_url
from asyncrunner.pipeline.batch_codec import BatchCodec
from asyncrunner.pipeline.batch_file import WAITING_REASON
from asyncrunner.pipeline.batch_results import LineTally, experiment_narratives, store_results
from asyncrunner.pipeline.messages import Narrative, Result
from asyncrunner.pipeline.producer import WorkSelection
from asyncrunner.pipeline.workers import Prompt
from asyncrunner.pipeline.writer import WriterSettings
from asyncrunner.settings import settings_hash
from asyncrunner.vocab import SessionEnd, Status

log = structlog.get_logger("asyncrunner.pipeline.batch_import")


@dataclass(frozen=True, slots=True)
class _Checked:
    """An answer file that passed the checks: which line of each key to read."""

    first_line: dict[str, int]
    lines: int
    duplicates: int


def _check_file(path: Path, narratives: Mapping[str, Narrative], experiment_id: str
                ) -> _Checked:
    """Read the whole file once before anything is stored: a line that is not a batch
    answer, or a key that is not one of the experiment's narratives, refuses the file."""
    first: dict[str, int] = {}
    lines = duplicates = foreign = 0
    first_foreign: tuple[int, str] | None = None
    for number, raw in _file_lines(path):
        if not raw.strip():
            continue
        lines += 1
        try:
            line = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{path} line {number}: not valid JSON; nothing imported"
                             ) from None
        key = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(key, str):
            raise InputError(f"{path} line {number}: not a batch answer (no custom_id); "
                             "nothing imported")
        if key not in narratives:
            foreign += 1
            first_foreign = first_foreign or (number, key)
        elif key in first:
            duplicates += 1
        else:
            first[key] = number
    if first_foreign is not None:
        number, key = first_foreign
        raise InputError(
            f"{path} line {number}: custom_id {key[:120]!r} is not a narrative of experiment "
            f"{experiment_id} ({foreign} such line{'s' if foreign != 1 else ''}); nothing "
            "imported: is this the answer file of this experiment's batch file?")
    return _Checked(first, lines, duplicates)


def _file_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with path.open("rb") as fh:
            yield from enumerate(fh, start=1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


async def _import_lines(codec: BatchCodec, path: Path, checked: _Checked,
                        narratives: Mapping[str, Narrative], tally: LineTally
                        ) -> AsyncIterator[Result]:
    for number, raw in _file_lines(path):
        line = json.loads(raw) if raw.strip() else None
        if not isinstance(line, dict):
            continue
        key = str(line["custom_id"])
        if checked.first_line.get(key) != number:
            continue
        result = tally.count(await codec.result(narratives[key], line))
        if result is not None:
            yield result


def _stored_config(record: store.ExperimentRecord) -> Config:
    return config_from_dict(record.config)


def _reading_settings(cfg: Config, mode: str | None) -> ClientSettings:
    """What reading an answer needs of the client: max_tokens (a cut-off answer's message)
    and the request's fields (an error naming one is fatal)."""
    m = cfg.model
    return ClientSettings(
        api_url=normalize_api_url(m.api_url), model=m.name, temperature=m.temperature,
        max_tokens=m.max_tokens, timeout_s=m.timeout_s, max_attempts=1, seed=cfg.run.seed,
        response_format=None if mode in (None, "none") else mode,
        extra_body=dict(m.extra_body or {}), system_role=cfg.prompt.system_role)


def batch_import_command(db_path: str | Path, experiment_id: str, path: str | Path,
                         out: IO[str] = sys.stdout) -> int:
    """`asyncrunner batch-import`: store the answers of a batch output JSONL (OpenAI's or
    vLLM's format) through the live reading and the writer; finalize the experiment once
    every narrative has its result. Idempotent: results already stored are kept (INSERT OR
    IGNORE), so importing a file twice changes nothing. Refused as a whole (exit 2, nothing
    stored) when a line is not JSON or its custom_id is not one of the experiment's
    narratives; for a key on several lines the first wins."""
    db = Path(db_path)
    source = Path(path)
    with closing(connect_existing(db)) as conn:
        record = store.get_experiment(conn, experiment_id)
        if record is None:
            raise refusals.no_experiment(experiment_id, db)
        if record.status == Status.CANCELLED:
            raise refusals.cancelled(experiment_id)
        if not record.data_checksum:
            raise RefusedError(f"experiment {experiment_id} has no data checksum (made by the "
                               "R version); batch-import takes experiments of batch-file")
        with ExperimentLock(db, experiment_id):
            return _import(conn, db, record, source, out)


def _import(conn: sqlite3.Connection, db: Path, record: store.ExperimentRecord,
            source: Path, out: IO[str]) -> int:
    experiment_id = record.experiment_id
    cfg = _stored_config(record)
    selection = WorkSelection(
        experiment_id, str(record.data_checksum),
        store.set_cutoff(conn, str(record.data_checksum), record.max_narratives),
        sampled=sample.stored_count(conn, experiment_id) > 0)
    narratives = experiment_narratives(conn, selection)
    checked = _check_file(source, narratives, experiment_id)
    total = len(narratives)
    done_before, _ = store.count_results(conn, experiment_id)
    codec = BatchCodec(_reading_settings(cfg, batches.response_format_used(conn, experiment_id)),
                       Prompt(cfg.prompt.system_prompt, cfg.prompt.user_template),
                       max_answer_bytes=cfg.model.max_response_bytes)
    completed_before = record.status == Status.COMPLETED
    session_id = uuid.uuid4().hex
    settings = cfg.to_dict()
    try:
        logs.open_run_log(cfg.run.log_dir, experiment_id)
        logs.bind(experiment_id=experiment_id, session=session_id)

        def open_session() -> None:
            if not completed_before:
                experiments.set_status(conn, experiment_id, Status.RUNNING)
            sessions.open_session(
                conn, session_id=session_id, experiment_id=experiment_id,
                intent="batch-import", target=max(0, total - done_before), settings=settings,
                settings_hash=settings_hash(settings), diff={}, allowed_drift=[],
                retry_categories=None)

        with transaction(conn):
            open_session()
        tally = LineTally(lines=checked.lines, duplicates=checked.duplicates)
        writer = WriterSettings(experiment_id=experiment_id, total=total,
                                session_target=max(0, total - done_before),
                                batch_size=cfg.run.batch_size,
                                interval_s=cfg.run.commit_interval_s,
                                max_tokens=cfg.model.max_tokens)
        try:
            anyio.run(store_results, str(db), writer,
                      _import_lines(codec, source, checked, narratives, tally))
        except BaseException as exc:
            reason = f"batch-import failed: {type(exc).__name__}: {exc}"[:500]
            if not completed_before:
                experiments.set_status(conn, experiment_id, Status.FAILED, reason)
            sessions.end_session(conn, session_id, SessionEnd.FAILED, reason)
            raise
        done, errors = store.count_results(conn, experiment_id)
        log.info("batch_import", file=str(source), lines=tally.lines, new=done - done_before,
                 duplicates=tally.duplicates, no_answer=tally.no_answer, fatal=tally.fatal)
        print(_import_summary(source, tally, done - done_before, done, total), file=out)
        return _finish_import(conn, record, cfg, session_id, tally, done, errors, total,
                              completed_before, out)
    finally:
        logs.close_run_log()
        logs.clear()


def _import_summary(source: Path, tally: LineTally, new: int, done: int, total: int) -> str:
    extra = []
    if tally.duplicates:
        extra.append(f"{tally.duplicates} duplicate lines ignored (the first line wins)")
    if tally.no_answer:
        extra.append(f"{tally.no_answer} lines without an answer (expired or cancelled)")
    if tally.fatal:
        extra.append(f"{tally.fatal} fatal answers not stored")
    if tally.stored - new > 0:
        extra.append(f"{tally.stored - new} already stored")
    return (f"imported {source}: {tally.lines} lines, {new} new results; {done}/{total} "
            "narratives stored" + (f" ({'; '.join(extra)})" if extra else ""))


def _finish_import(conn: sqlite3.Connection, record: store.ExperimentRecord, cfg: Config,
                   session_id: str, tally: LineTally, done: int, errors: int, total: int,
                   completed_before: bool, out: IO[str]) -> int:
    experiment_id = record.experiment_id
    if completed_before:
        sessions.end_session(conn, session_id, SessionEnd.COMPLETED)
        print(f"experiment {experiment_id} was already completed; nothing else changed",
              file=out)
        return 0
    if done < total:
        reason = f"{WAITING_REASON}: {done}/{total} narratives stored"
        experiments.set_status(conn, experiment_id, Status.INTERRUPTED, reason)
        sessions.end_session(conn, session_id, SessionEnd.INTERRUPTED, reason)
        print(f"remaining: {total - done} narratives without a result; import another answer "
              f"file, or `asyncrunner resume {experiment_id}`", file=out)
    else:
        _finalize(conn, experiment_id, cfg, session_id, out)
        _check_error_share(experiment_id, cfg, done, errors)
    if tally.fatal_reason is not None:
        raise EndpointCannotServe(f"{tally.fatal} answers not stored: {tally.fatal_reason}")
    return 0


def _finalize(conn: sqlite3.Connection, experiment_id: str, cfg: Config, session_id: str,
              out: IO[str]) -> None:
    from asyncrunner.results.finalize import finalize

    output_dir = Path(cfg.run.output_dir)
    result = finalize(conn, experiment_id, output_dir)
    sessions.end_session(conn, session_id, SessionEnd.COMPLETED)
    o = result["metrics"]["overall"]
    print(f"completed: n={o['n']} precision={_fmt(o['precision'])} recall={_fmt(o['recall'])} "
          f"f1={_fmt(o['f1'])} accuracy={_fmt(o['accuracy'])}", file=out)
    print(f"exports: {result['exports']['csv']} {result['exports']['json']}", file=out)
    try:
        from asyncrunner.results.report import default_report_path, write_report

        report = write_report(conn, experiment_id,
                              default_report_path(output_dir, experiment_id))
        print(f"report: {report}", file=out)
    except Exception as exc:  # noqa: BLE001 - the experiment is finished all the same
        log.warning("report_failed", message=f"report not written: {type(exc).__name__}: "
                    f"{exc}; run `asyncrunner report {experiment_id}` to retry")


def _check_error_share(experiment_id: str, cfg: Config, done: int, errors: int) -> None:
    limit = cfg.run.max_error_share
    if done and errors / done > limit:
        raise TooManyErrors(
            f"{errors} of {done} narratives ({errors / done:.1%}) ended in an error, above "
            f"run.max_error_share={limit:g}; the experiment is completed and every result is "
            f"stored; retry the errors with RESUME=1 RETRY_ERRORS_ONLY=1 "
            f"EXPERIMENT_ID={experiment_id}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
