"""`asyncrunner sweep`: a grid of experiments run as one study, and `sweep --resume`.

    SWEEP.yaml -> Sweep -> every cell x repeat validated (nothing written before)
        -> the study row, with the whole resolved spec and a preset experiment id for every
           cell x repeat (one transaction) -> `study_id: <uuid>` (first line on stdout)
        -> each cell x repeat through session.execute, one after another -> summary table

Cells run one after another, in one process, cell by cell and each cell's repeats in turn.
The endpoint has one concurrency budget (run.workers / --workers is how much of it a
session uses); cells interleaved would only split that budget between them, finishing none
sooner, while mixing their throughput and latency figures. Run in turn, each cell is a
normal experiment with the endpoint to itself: its rate, latency and token figures are its
own, and every guard, lock, backup and resume of `run` applies to it unchanged. A study is
bounded by the model server either way. Cell by cell (rather than repeat by repeat) keeps
a local server from switching models more often than the matrix order requires.

Resume needs only the database: cells whose experiment is completed are skipped, those
interrupted, failed or left running by a dead process are resumed, those never started are
started with their preset id; a cancelled one is skipped and said so. How a cell ends
decides what the sweep does next:

    completed                     next cell
    completed, too many errors    next cell; the sweep exits 4 at the end (TooManyErrors)
    failed (RunFailed)            next cell; the sweep exits 1 at the end
    endpoint cannot serve         the sweep stops, exit 4: the endpoint is down (resume later)
    SIGINT / SIGTERM              the sweep stops at once, 130 / 143 (each cell is crash-safe)
    any other refusal or error    the sweep stops with it

One sweep process per study: the study holds a lock file as an experiment does
(`.resume_lock_<study_id>.pid` beside the database, db/locks.py) for as long as it runs.
"""

from __future__ import annotations

import io
import signal
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import IO

import structlog

from asyncrunner import refusals
from asyncrunner.config import Config, resolve_data_path
from asyncrunner.db import backup, locks, studies
from asyncrunner.db.schema import connect
from asyncrunner.errors import (
    ConfigError,
    EndpointCannotServe,
    RefusedError,
    RunFailed,
    Stopped,
    TooManyErrors,
    UsageError,
)
from asyncrunner.ids import require_uuid
from asyncrunner.llm.setup import endpoints_from
from asyncrunner.plan import RunRequest, StudyTag
from asyncrunner.study import matrix, spec
from asyncrunner.study.spec import Run, StudySpec
from asyncrunner.textsafe import for_terminal
from asyncrunner.vocab import Status

log = structlog.get_logger("asyncrunner.sweep")

# The summary table shows a cell label up to this many characters.
TABLE_LABEL_CHARS = 80


@dataclass(frozen=True, slots=True)
class SweepRequest:
    """What the operator asked for (cli.py builds it)."""

    db_path: Path
    sweep_path: str | None
    resume_study_id: str | None
    workers: int | None
    env: Mapping[str, str] = field(repr=False)


class Ended(StrEnum):
    """How one cell x repeat ended in this sweep."""

    COMPLETED = "completed"
    ERROR_SHARE = "completed, error share above run.max_error_share"
    FAILED = "failed"
    DONE_BEFORE = "completed earlier"
    CANCELLED = "cancelled"


def run_sweep(request: SweepRequest, out: IO[str]) -> int:
    """Start a study from SWEEP.yaml, or resume one; the exit code, or an AsyncRunnerError
    for the CLI to map."""
    if request.sweep_path and request.resume_study_id:
        raise UsageError("sweep takes a SWEEP.yaml or --resume STUDY_ID, not both")
    with _sigterm_as_stopped():
        if request.resume_study_id is not None:
            return _resume(request, out)
        if not request.sweep_path:
            raise UsageError("sweep needs a SWEEP.yaml, or --resume STUDY_ID")
        return _start(request, Path(request.sweep_path), out)


def _start(request: SweepRequest, path: Path, out: IO[str]) -> int:
    sweep, base_file = spec.read_sweep(path, request.env)
    study = spec.new_study(sweep, sweep_file=str(path), base_file=base_file)
    _new_configs(request, study, known={})      # the whole grid, before anything is written
    with closing(connect(request.db_path)) as conn, _study_lock(request.db_path,
                                                                study.study_id):
        # One backup per study, not one per cell (the session skips its pre-run backup
        # for a study's cells): sixteen cells would copy a large database sixteen times.
        backup.backup_before_new_writes(conn, request.db_path)
        existing = studies.create_study(
            conn, study_id=study.study_id, name=sweep.name, sweep_file=str(path),
            sweep_checksum=matrix.checksum(sweep), spec=study.to_json())
        if existing is not None:
            raise _already_started(conn, existing)
        _say(out, f"study_id: {study.study_id}")
        _say(out, f"study {_title(study)}: {len(sweep.cells)} cells x {sweep.repeats} "
                  f"repeats = {sweep.n_experiments} experiments, run one after another")
        return _run_study(conn, request, study, out)


def _resume(request: SweepRequest, out: IO[str]) -> int:
    assert request.resume_study_id is not None
    study_id = require_uuid(request.resume_study_id, "study")
    if not request.db_path.exists():
        raise refusals.database_missing(request.db_path)
    with closing(connect(request.db_path)) as conn:
        record = studies.get_study(conn, study_id)
        if record is None:
            raise RefusedError(f"no study {study_id} in {request.db_path}; check the id and "
                               "--db / EXPERIMENTS_DB")
        study = spec.from_json(study_id, record.spec)
        with _study_lock(request.db_path, study_id):
            _say(out, f"study_id: {study_id}")
            return _run_study(conn, request, study, out)


def _already_started(conn: sqlite3.Connection, study_id: str) -> RefusedError:
    record = studies.get_study(conn, study_id)
    when = f" on {record.created_at}" if record is not None else ""
    return RefusedError(f"this sweep (the same base, cells and repeats) was already started "
                        f"as study {study_id}{when}; continue it with "
                        f"`asyncrunner sweep --resume {study_id}`")


@contextmanager
def _study_lock(db_path: Path, study_id: str) -> Iterator[None]:
    """One sweep process per study (the experiment lock's mechanism, on the study id)."""
    state = locks.probe(db_path, study_id)
    if state.held:
        pid = (state.holder or {}).get("pid", "?")
        raise RefusedError(f"study {study_id} is being run by process PID {pid}; wait for it "
                           "to finish or stop it first")
    with locks.ExperimentLock(db_path, study_id) as lock:
        if lock.stale_holder:
            pid = lock.stale_holder.get("pid")
            log.warning("stale_lock", message=f"stale lock of study {study_id} from PID "
                        f"{pid}, not running; replaced")
        yield


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextmanager
def _sigterm_as_stopped() -> Iterator[None]:
    """Between cells (no session of its own running), SIGTERM must unwind like Ctrl-C so
    the study lock is released and the operator told how to go on."""
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- the cells


def _new_configs(request: SweepRequest, study: StudySpec,
                 known: Mapping[str, str | None]) -> dict[str, Config]:
    """The configuration of every cell x repeat not started yet, each validated and its
    data file found, so a bad cell refuses the sweep before any other runs."""
    found: dict[str, Config] = {}
    for run in study.runs:
        if run.experiment_id in known:
            continue
        cfg = matrix.cell_config(study.sweep, run.cell, run.repeat, workers=request.workers,
                                 env=request.env)
        if not resolve_data_path(cfg).is_file():
            raise ConfigError(f"sweep cell {run.cell.label}: config key 'data.file': data "
                              f"file not found: {cfg.data.file}")
        try:
            endpoints_from(cfg, request.env)
        except ConfigError as exc:
            raise ConfigError(f"sweep cell {run.cell.label}: {exc}") from None
        found[run.experiment_id] = cfg
    return found


def _run_study(conn: sqlite3.Connection, request: SweepRequest, study: StudySpec,
               out: IO[str]) -> int:
    known = {e.experiment_id: e.status for e in studies.experiments_of(conn, study.study_id)}
    configs = _new_configs(request, study, known)
    runs = study.runs
    if all(known.get(r.experiment_id) in (Status.COMPLETED, Status.CANCELLED) for r in runs):
        _say(out, f"study {_title(study)}: every experiment is completed"
                  + (" or cancelled" if Status.CANCELLED in known.values() else "")
                  + "; nothing to do")
        _summary(conn, study, out)
        return 0
    ended: dict[str, Ended] = {}
    for run in runs:
        try:
            ended[run.experiment_id] = _one(conn, request, study, run, known, configs, out)
        except EndpointCannotServe as exc:
            _summary(conn, study, out)
            raise EndpointCannotServe(
                f"study {study.study_id} stopped at experiment {run.number}/{len(runs)} "
                f"({run.cell.label}, repeat {run.repeat}): {exc}; once the endpoint serves, "
                f"`asyncrunner sweep --resume {study.study_id}` finishes the study (or "
                f"`asyncrunner cancel {run.experiment_id}` to skip this one)") from None
        except KeyboardInterrupt:
            _stopped_line(study, run, len(runs), out)
            raise Stopped(signal.SIGINT) from None
        except BaseException:
            _stopped_line(study, run, len(runs), out)
            raise
    _summary(conn, study, out)
    return _exit(study, ended)


def _one(conn: sqlite3.Connection, request: SweepRequest, study: StudySpec, run: Run,
         known: Mapping[str, str | None], configs: Mapping[str, Config],
         out: IO[str]) -> Ended:
    """Start, resume or skip one cell x repeat, with a line as it starts and as it ends."""
    status = known.get(run.experiment_id, None)
    where = _where(study, run)
    if status == Status.COMPLETED:
        _say(out, f"{where}: completed earlier, skipped")
        return Ended.DONE_BEFORE
    if status == Status.CANCELLED:
        _say(out, f"{where}: cancelled, skipped (`asyncrunner resume {run.experiment_id} "
                  "--force` runs it)")
        return Ended.CANCELLED
    if run.experiment_id in configs:
        _say(out, f"{where}: start")
        req = RunRequest(db_path=request.db_path, config_path=None, env=request.env,
                         config=configs[run.experiment_id],
                         new_experiment_id=run.experiment_id,
                         study=StudyTag(study.study_id, run.cell.label, run.repeat))
    else:
        _say(out, f"{where}: resume ({status})")
        req = RunRequest(db_path=request.db_path, config_path=None, env=request.env,
                         resume=True, experiment_id=run.experiment_id,
                         overrides={"run.workers": request.workers})
    ended = _execute(req, out)
    _say(out, f"{where}: {_result_text(conn, run.experiment_id, ended)}")
    return ended


def _execute(req: RunRequest, out: IO[str]) -> Ended:
    """One session. The sweep prints its own lines about the experiment; the session's
    `experiment_id:` line is not one of them (stdout starts with the study id)."""
    from asyncrunner.progress_view import ProgressView
    from asyncrunner.session import execute

    with ProgressView.for_stream(out) as view:
        try:
            execute(req, io.StringIO(), on_commit=view.update)
        except TooManyErrors:        # the experiment is completed, with everything stored
            return Ended.ERROR_SHARE
        except RunFailed:            # recorded as failed; the next cell may still run
            return Ended.FAILED
    return Ended.COMPLETED


def _exit(study: StudySpec, ended: Mapping[str, Ended]) -> int:
    """0, or the error a finished sweep ends with: failed cells (1) before too many
    errors (4)."""
    failed = [eid for eid, e in ended.items() if e is Ended.FAILED]
    noisy = [eid for eid, e in ended.items() if e is Ended.ERROR_SHARE]
    n = len(ended)
    if failed:
        raise RunFailed(f"{len(failed)} of {n} experiments of study {study.study_id} failed "
                        f"({', '.join(failed)}); `asyncrunner sweep --resume "
                        f"{study.study_id}` resumes them")
    if noisy:
        raise TooManyErrors(
            f"{len(noisy)} of {n} experiments of study {study.study_id} completed with an "
            f"error share above run.max_error_share ({', '.join(noisy)}); retry their errors "
            "with `asyncrunner resume <id> --retry-errors-only`")
    return 0


# --------------------------------------------------------------------------- output


def _say(out: IO[str], text: str) -> None:
    """Labels, names and paths come from the operator's files: made safe for a terminal."""
    print(for_terminal(text), file=out, flush=True)


def _title(study: StudySpec) -> str:
    name = study.sweep.name or (Path(study.sweep_file).name if study.sweep_file else None)
    return f"{study.study_id} '{name}'" if name else study.study_id


def _where(study: StudySpec, run: Run) -> str:
    n = len(study.sweep.cells) * study.sweep.repeats
    return (f"[{run.number}/{n}] cell {run.cell_number} ({run.cell.label}), repeat "
            f"{run.repeat}/{study.sweep.repeats}, experiment {run.experiment_id}")


def _result_text(conn: sqlite3.Connection, experiment_id: str, ended: Ended) -> str:
    found = studies.outcomes(conn, [experiment_id]).get(experiment_id)
    if found is None:
        return f"{ended} before the experiment was created"
    text = f"{ended}, {found.n_done}/{found.n_total} narratives, F1 {_f1(found.f1)}"
    if ended is Ended.FAILED and found.failure_reason:
        text += f" ({found.failure_reason[:200]})"
    return text


def _stopped_line(study: StudySpec, run: Run, total: int, out: IO[str]) -> None:
    _say(out, f"study {study.study_id} stopped at experiment {run.number}/{total}; finished "
              "experiments and every stored result are kept; continue with "
              f"`asyncrunner sweep --resume {study.study_id}`")


def _f1(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _summary(conn: sqlite3.Connection, study: StudySpec, out: IO[str]) -> None:
    """One row per cell x repeat, then where to see the leaderboard."""
    runs = study.runs
    found = studies.outcomes(conn, [r.experiment_id for r in runs])
    width = min(TABLE_LABEL_CHARS, max(len(r.cell.label) for r in runs))
    rows = [("cell", "repeat", "experiment_id", "status", "n", "F1")]
    for r in runs:
        o = found.get(r.experiment_id)
        label = r.cell.label if len(r.cell.label) <= width else r.cell.label[:width - 3] + "..."
        rows.append((label, f"{r.repeat}/{study.sweep.repeats}", r.experiment_id,
                     (o.status or "?") if o else "not started",
                     f"{o.n_done}/{o.n_total}" if o else "-", _f1(o.f1) if o else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    _say(out, f"study {_title(study)}:")
    for row in rows:
        _say(out, "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
             .rstrip())
    _say(out, f"leaderboard: asyncrunner compare --study {study.study_id}")
