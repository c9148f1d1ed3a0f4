"""The command line: parse, delegate, and turn errors into one line and an exit code.

Exit codes (the contract): 0 finished · 2 bad usage, config or input · 3 refused by a guard ·
130 / 143 stopped by SIGINT / SIGTERM after a clean checkpoint · 1 the run failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any, NoReturn

from asyncrunner import __version__, logs, refusals
from asyncrunner.config import DEFAULT_DB, env_flag
from asyncrunner.db import experiments, store
from asyncrunner.db.schema import connect, connect_existing, connect_readonly, migrate_existing
from asyncrunner.diskspace import disk_full_error, is_disk_full
from asyncrunner.errors import AsyncRunnerError, Stopped, TooManyErrors, UsageError
from asyncrunner.ids import require_uuid
from asyncrunner.results import status
from asyncrunner.textsafe import for_terminal


def say(text: str, *, file: IO[str] | None = None, flush: bool = False) -> None:
    """Print to the console with control characters made visible (see textsafe)."""
    print(for_terminal(text), file=file or sys.stdout, flush=flush)


def db_path(args: argparse.Namespace) -> Path:
    return Path(args.db or os.environ.get("EXPERIMENTS_DB") or DEFAULT_DB)


# Commands that only read. They open the database read-only, so they never create,
# migrate or write it: an operator may point them at a backup, a copy on a read-only
# share, or a database a newer or older asyncrunner is still using.
READ_ONLY_COMMANDS = frozenset({"status", "export", "report", "compare",
                                "adjudicate-export"})


def _existing_db(args: argparse.Namespace) -> sqlite3.Connection:
    """The database of a command that needs one to exist (never created here).

    Read-only commands get a read-only connection that refuses an old schema; the others
    (cancel writes, `resume --latest` is about to run, which migrates anyway) get a
    writable one, migrated.
    """
    path = db_path(args)
    if getattr(args, "command", None) in READ_ONLY_COMMANDS:
        return connect_readonly(path)
    return connect_existing(path)


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    workers = getattr(args, "workers", None)
    auto = workers == AUTO
    return {
        "run.workers": None if auto else workers,
        "run.auto_workers": True if auto else None,
        "run.batch_size": getattr(args, "batch_size", None),
        "run.max_narratives": getattr(args, "max_narratives", None),
    }


def cmd_run(args: argparse.Namespace) -> int:
    from asyncrunner.plan import check_categories
    from asyncrunner.progress_view import ProgressView
    from asyncrunner.session import RunSummary, execute, request_from_env

    categories = check_categories(args.category) if args.category else None
    req = request_from_env(
        db_path(args), args.config, _run_overrides(args), resume=args.resume,
        experiment_id=args.experiment_id, retry_errors_only=args.retry_errors_only,
        force=args.force, env=os.environ, allow_drift=tuple(args.allow_drift or ()),
        categories=categories,
    )
    if categories is not None and not req.retry_errors_only:
        raise UsageError("--category chooses which errors --retry-errors-only retries; "
                         "give --retry-errors-only (or RETRY_ERRORS_ONLY=1) too")
    too_many: TooManyErrors | None = None
    with ProgressView.for_stream(sys.stdout) as view:
        try:
            summary = execute(req, on_commit=view.update)
        except TooManyErrors as exc:     # completed: reported as usual, then exit 4
            if not isinstance(exc.summary, RunSummary):
                raise
            summary, too_many = exc.summary, exc
    with closing(connect(req.db_path)) as conn:
        info = status.collect(conn, req.db_path, summary.experiment_id)
    if info:
        say(status.render_detail(info))
    say(f"exports: {summary.exports.get('csv')} {summary.exports.get('json')}")
    if summary.exports.get("report"):
        say(f"report: {summary.exports['report']}")
    if too_many is not None:
        raise too_many
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    if args.latest == bool(args.experiment_id):
        raise UsageError("resume takes an EXPERIMENT_ID or --latest (one of them)")
    if args.latest:
        conn = _existing_db(args)
        try:
            record = store.latest_resumable(conn, db_path(args))
        finally:
            conn.close()
        if record is None:
            raise refusals.no_resumable()
        say(f"latest resumable: {record.experiment_id} '{record.experiment_name}' "
              f"status {record.status}, {record.n_narratives_completed or 0}/"
              f"{record.n_narratives_total or 0} done, started {record.start_time}")
        if sys.stdin.isatty() and not args.yes:
            answer = input("resume it? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                say("not resumed")
                return 0
        args.experiment_id = record.experiment_id
    args.resume = True
    return cmd_run(args)


def cmd_status(args: argparse.Namespace) -> int:
    path = db_path(args)
    if args.experiment_id:
        require_uuid(args.experiment_id)
    while True:
        conn = _existing_db(args)
        try:
            if args.experiment_id:
                info = status.collect(conn, path, args.experiment_id, labels=args.labels)
                if info is None:
                    raise refusals.no_experiment(args.experiment_id, path)
                text = json.dumps(info, indent=2) if args.json else status.render_detail(info)
            else:
                rows = status.list_rows(conn, path)
                text = json.dumps(rows, indent=2) if args.json else status.render_list(rows)
        finally:
            conn.close()
        if args.watch and sys.stdout.isatty():
            print("\x1b[2J\x1b[H" + time.strftime("%H:%M:%S  ") + for_terminal(text), flush=True)
        else:
            say(text, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def cmd_export(args: argparse.Namespace) -> int:
    from asyncrunner.results.finalize import export

    experiment_id = require_uuid(args.experiment_id)
    conn = _existing_db(args)
    try:
        if store.get_experiment(conn, experiment_id) is None:
            raise refusals.no_experiment(experiment_id, db_path(args))
        out = args.out or Path(f"{experiment_id}.{args.format}")
        with _writing(out):
            written = export(conn, experiment_id, args.format, out, with_text=args.with_text)
    finally:
        conn.close()
    say(f"wrote {written}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from asyncrunner.results.report import default_report_path, write_report

    experiment_id = require_uuid(args.experiment_id)
    conn = _existing_db(args)
    try:
        record = store.get_experiment(conn, experiment_id)
        if record is None:
            raise refusals.no_experiment(experiment_id, db_path(args))
        output_dir = Path(record.config.get("run", {}).get("output_dir") or ".")
        out = args.out or default_report_path(output_dir, experiment_id)
        with _writing(out):
            written = write_report(conn, experiment_id, out, labels=args.labels)
    finally:
        conn.close()
    say(f"report: {written}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from asyncrunner.results import leaderboard

    ids = [require_uuid(i) for i in args.ids]
    study_id = require_uuid(args.study, "study") if args.study else None
    if study_id is None and len(ids) < 2:
        raise UsageError("compare needs two or more experiment ids, or --study STUDY_ID")
    conn = _existing_db(args)
    try:
        board = leaderboard.build(conn, ids, study_id=study_id, labels=args.labels)
    finally:
        conn.close()
    if args.html:
        with _writing(args.html):
            say(f"leaderboard: {leaderboard.write_html(board, args.html)}")
    say(json.dumps(leaderboard.to_json(board), indent=2) if args.json
        else leaderboard.render_text(board))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from asyncrunner.study.sweep import SweepRequest, run_sweep

    env = os.environ
    resume_id = args.resume or (env.get("STUDY_ID") if env_flag(env, "RESUME") else None)
    if resume_id is None and not args.sweep:
        raise UsageError("sweep needs a SWEEP.yaml, or --resume STUDY_ID "
                         "(or RESUME=1 with STUDY_ID)")
    request = SweepRequest(db_path=db_path(args), sweep_path=args.sweep,
                           resume_study_id=require_uuid(resume_id, "study") if resume_id else None,
                           workers=args.workers, env=env)
    return run_sweep(request, sys.stdout)


def cmd_adjudicate_export(args: argparse.Namespace) -> int:
    from asyncrunner.results import adjudicate

    ids = [require_uuid(i) for i in args.ids]
    study_id = require_uuid(args.study, "study") if args.study else None
    if study_id is None and not ids:
        raise UsageError("adjudicate export needs experiment ids or --study STUDY_ID")
    conn = _existing_db(args)
    try:
        with _writing(args.out):
            summary = adjudicate.export_workbook(conn, ids, study_id=study_id, out=args.out)
    finally:
        conn.close()
    say(summary)
    return 0


def cmd_adjudicate_import(args: argparse.Namespace) -> int:
    from asyncrunner.results import adjudicate

    conn = _existing_db(args)
    try:
        summary = adjudicate.import_workbook(conn, Path(args.workbook))
    finally:
        conn.close()
    say(summary)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from asyncrunner.estimate import plan_command

    return plan_command(args.config, probe=args.probe, overrides=_run_overrides(args),
                        env=os.environ, out=sys.stdout)


def cmd_batch_file(args: argparse.Namespace) -> int:
    from asyncrunner.pipeline.batch import batch_file_command

    with _writing(args.out):
        return batch_file_command(db_path(args), args.config, args.out,
                                  overrides=_run_overrides(args), env=os.environ,
                                  out=sys.stdout)


def cmd_batch_import(args: argparse.Namespace) -> int:
    from asyncrunner.pipeline.batch import batch_import_command

    return batch_import_command(db_path(args), require_uuid(args.experiment_id),
                                Path(args.results), out=sys.stdout)


def cmd_cancel(args: argparse.Namespace) -> int:
    experiment_id = require_uuid(args.experiment_id)
    path = db_path(args)
    conn = _existing_db(args)
    try:
        experiments.cancel(conn, path, experiment_id)
    finally:
        conn.close()
    say(f"experiment {experiment_id} cancelled (resume it later with --force)")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    path = db_path(args)
    applied, copy = migrate_existing(path)
    if copy is not None:
        say(f"backup written: {copy}")
    say(f"migrated {path}: " + (", ".join(applied) if applied else "already up to date"))
    return 0


MOCK_FAULT_FLAGS = {
    "rate-429": "share answered 429 with Retry-After",
    "rate-503": "share answered 503",
    "rate-502-html": "share answered 502 with an HTML page",
    "hang-rate": "share never answered (until the client gives up)",
    "reset-rate": "share whose connection is reset without an answer",
    "malformed-rate": "share answered with content that is not JSON",
    "fenced-rate": "share answered with JSON in code fences and prose",
    "reasoning-rate": "share answered in harmony reasoning format",
    "truncate-rate": "share answered with truncated JSON, finish_reason=length",
    "invalid-first-rate": "share of narratives whose first answer is invalid JSON (a repair "
                          "turn or a resample then gets the valid one)",
    "object-indicators-rate": "share answered with indicators as {indicator, evidence} objects",
}


def cmd_mock_server(args: argparse.Namespace) -> int:
    from asyncrunner.sim import serve_forever

    faults = {flag.replace("-", "_"): getattr(args, flag.replace("-", "_"))
              for flag in MOCK_FAULT_FLAGS}
    serve_forever(args.port, args.latency_ms, args.error_rate, **faults,
                  retry_after_s=None if args.retry_after_s < 0 else args.retry_after_s,
                  max_concurrent=args.max_concurrent, capacity=args.capacity, seed=args.seed,
                  latency_jitter_ms=args.latency_jitter_ms, model=args.model,
                  reject_response_formats=tuple(args.reject_response_format or ()),
                  fail_status=args.fail_status, api_key=args.api_key,
                  truncate_at_max_tokens=args.truncate_at_max_tokens,
                  max_context_chars=args.max_context_chars, batch_delay_s=args.batch_delay_s,
                  batch_expire_after_s=args.batch_expire_after_s)
    return 0


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=argparse.SUPPRESS,
                   help="SQLite database (default: $EXPERIMENTS_DB or data/experiments.db)")


def _add_labels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", choices=("manual", "adjudicated"), default="manual",
                   help="score against the manual labels, or the manual labels with the "
                        "reviewers' decisions (adjudicate import) in their place")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where help is)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, for_terminal(f"{self.prog}: error: {message} (see {self.prog} --help)")
                  + "\n")


def _interval(text: str) -> float:
    """A refresh interval in seconds: a finite number from 0.5 to a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not 0.5 <= value <= 86_400:
        raise argparse.ArgumentTypeError("must be between 0.5 and 86400 seconds")
    return value


def _output_file(text: str) -> Path:
    """An --out path that names a file (not a folder) in a folder that exists or can be made."""
    path = Path(text)
    if not text.strip() or text.endswith(("/", "\\")) or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; name a file")
    return path


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """An OS error while writing an output file is one line naming the file, exit 2."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None


AUTO = "auto"


def _workers(text: str) -> int | str:
    return AUTO if text.strip().lower() == AUTO else _positive_int(text)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_workers, metavar="N|auto",
                   help="concurrent requests in flight; auto: find where throughput stops "
                        "rising (run.workers is then the ceiling)")
    p.add_argument("--batch-size", type=_positive_int, help="results per commit")
    p.add_argument("--retry-errors-only", action="store_true",
                   help="with resume: reprocess only narratives whose result is an error")
    p.add_argument("--category", metavar="CATS",
                   help="with --retry-errors-only: the error categories to retry, comma-"
                        "separated (api_error,rate_limit,timeout,parse_error,data_error,"
                        "unknown) or all; default: all but data_error")
    p.add_argument("--allow-drift", action="append", metavar="KEY",
                   help="with resume: take this answer-changing setting (e.g. "
                        "model.max_tokens) from the given YAML/flags instead of the stored "
                        "experiment, and record the change; repeatable")
    p.add_argument("--force", action="store_true", help="allow resuming a cancelled experiment")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="asyncrunner",
        description="Concurrent, crash-safe LLM classification of case narratives.")
    parser.add_argument("--version", action="version", version=f"asyncrunner {__version__}")
    parser.add_argument("--db", help="SQLite database (default: $EXPERIMENTS_DB or "
                                     "data/experiments.db)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="start a new experiment, or resume one (RESUME=1)")
    p.add_argument("config", nargs="?", help="experiment CONFIG.yaml")
    _add_run_options(p)
    p.add_argument("--max-narratives", type=_positive_int, help="limit for a new experiment")
    p.add_argument("--resume", action="store_true", help="resume instead of starting anew")
    p.add_argument("--experiment-id", help="the experiment to resume")
    _add_db(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="resume an experiment by id, or the newest resumable")
    p.add_argument("experiment_id", nargs="?")
    p.add_argument("--latest", action="store_true", help="the newest resumable experiment")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--config", help="YAML for run settings (stored settings win; drift warned)")
    _add_run_options(p)
    _add_db(p)
    p.set_defaults(func=cmd_resume, max_narratives=None)

    p = sub.add_parser("status", help="list experiments, or show one")
    p.add_argument("experiment_id", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_labels(p)
    p.add_argument("--watch", type=_interval, metavar="SECONDS", help="refresh every SECONDS")
    _add_db(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write all results of an experiment")
    p.add_argument("experiment_id")
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--out", type=_output_file,
                   help="output file (default: <experiment_id>.<format>)")
    p.add_argument("--with-text", action="store_true",
                   help="add each result's narrative text (confidential: off by default)")
    _add_db(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="write a self-contained HTML report of an experiment")
    p.add_argument("experiment_id")
    p.add_argument("--out", type=_output_file,
                   help="output file (default: <output_dir>/<id>_report.html)")
    _add_labels(p)
    _add_db(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="leaderboard of two or more experiments, or a study")
    p.add_argument("ids", nargs="*", metavar="ID", help="experiment ids")
    p.add_argument("--study", metavar="STUDY_ID", help="every experiment of a study")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--html", type=_output_file, metavar="FILE",
                   help="also write the leaderboard as HTML with a chart")
    _add_labels(p)
    _add_db(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="run a grid of experiments (a study) from SWEEP.yaml")
    p.add_argument("sweep", nargs="?", metavar="SWEEP.yaml")
    p.add_argument("--resume", metavar="STUDY_ID", help="finish a study's unfinished cells")
    p.add_argument("--workers", type=_positive_int, help="concurrent requests in flight")
    _add_db(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("adjudicate", help="review workbook of disagreements, and back")
    adjudicate = p.add_subparsers(dest="adjudicate_command", required=True, metavar="ACTION")
    q = adjudicate.add_parser("export", help="write the review workbook (.xlsx)")
    q.add_argument("ids", nargs="*", metavar="ID", help="experiment ids")
    q.add_argument("--study", metavar="STUDY_ID", help="every experiment of a study")
    q.add_argument("--out", type=_output_file, required=True, metavar="FILE.xlsx")
    _add_db(q)
    q.set_defaults(func=cmd_adjudicate_export, command="adjudicate-export")
    q = adjudicate.add_parser("import", help="store a reviewed workbook's decisions")
    q.add_argument("workbook", metavar="FILE.xlsx")
    _add_db(q)
    q.set_defaults(func=cmd_adjudicate_import, command="adjudicate-import")

    p = sub.add_parser("plan", help="what a run would send, its tokens, time and cost "
                                    "(writes nothing to the database)")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--probe", type=_positive_int, default=None, metavar="K",
                   help="also send K real requests to measure latency and output tokens")
    p.add_argument("--workers", type=_workers, metavar="N|auto",
                   help="the concurrency to estimate the wall time at")
    p.add_argument("--max-narratives", type=_positive_int, help="limit, as for run")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("batch-file", help="write a new experiment's requests as OpenAI batch "
                                          "JSONL (custom_id = narrative key)")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--out", type=_output_file, required=True, metavar="FILE.jsonl")
    p.add_argument("--max-narratives", type=_positive_int, help="limit, as for run")
    _add_db(p)
    p.set_defaults(func=cmd_batch_file)

    p = sub.add_parser("batch-import", help="store the answers of a batch output JSONL")
    p.add_argument("experiment_id")
    p.add_argument("results", metavar="FILE.jsonl")
    _add_db(p)
    p.set_defaults(func=cmd_batch_import)

    p = sub.add_parser("cancel", help="mark an experiment cancelled")
    p.add_argument("experiment_id")
    _add_db(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("migrate", help="upgrade an older database in place")
    _add_db(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("mock-server", help="run the built-in simulated LLM on 127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="mean response latency")
    p.add_argument("--latency-jitter-ms", type=float, default=0.0)
    p.add_argument("--error-rate", type=float, default=0.0, help="share answered HTTP 500")
    for flag, text in MOCK_FAULT_FLAGS.items():
        p.add_argument(f"--{flag}", type=float, default=0.0, help=text)
    p.add_argument("--retry-after-s", type=float, default=1.0,
                   help="Retry-After sent with 429/overload answers; negative: no header")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="answer 429 beyond this many requests in flight")
    p.add_argument("--capacity", type=_positive_int, default=None,
                   help="serve at most this many requests at once and queue the rest "
                        "(throughput = capacity / latency)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    p.add_argument("--model", default="mock-classifier",
                   help="model name the simulator reports")
    p.add_argument("--reject-response-format", action="append",
                   choices=("json_schema", "json_object"),
                   help="answer requests with this response_format type with the 400 of a "
                        "server that does not take it (repeatable)")
    p.add_argument("--fail-status", type=int, choices=(401, 403, 404), default=None,
                   help="answer every completion request with this status")
    p.add_argument("--api-key", default=None,
                   help="answer 401 unless the request carries this bearer key")
    p.add_argument("--truncate-at-max-tokens", action="store_true",
                   help="cut answers longer than the request's max_tokens, "
                        "finish_reason=length")
    p.add_argument("--max-context-chars", type=_positive_int, default=None,
                   help="answer a prompt longer than this with the 400 of an exceeded "
                        "context length")
    p.add_argument("--batch-delay-s", type=float, default=0.0,
                   help="Batch API: seconds a batch stays in progress before it completes")
    p.add_argument("--batch-expire-after-s", type=float, default=None,
                   help="Batch API: a batch expires after this many seconds, with the "
                        "answers ready so far")
    p.set_defaults(func=cmd_mock_server)
    return parser


# The database, its -wal/-shm files, backups, exports, logs and reports hold narrative text
# or answers about it: private to the operator unless they ask for the umask's modes.
FILE_MODE_VARIABLE = "ASYNCRUNNER_FILE_MODE"
PRIVATE_UMASK = 0o077


def private_files(env: Mapping[str, str]) -> bool:
    """Files 0600 and directories 0700 (unset or `private`), or the umask's (`umask`)."""
    value = env.get(FILE_MODE_VARIABLE, "").strip().lower()
    if value not in ("", "private", "umask"):
        raise UsageError(f"{FILE_MODE_VARIABLE}={value!r}: use private (the default) or umask")
    return value != "umask"


def entry() -> NoReturn:
    """The `asyncrunner` command: main(), then leave without the interpreter's slow tail.

    What is loaded by now (the modules, their functions and classes) lives as long as the
    process, so it is frozen out of the cyclic collector's sight first: every collection
    until the run (the ingest's, the one before the pipeline) then scans only what the
    command itself made. Only for the command's own process, like _before_exit."""
    gc.freeze()
    code = main()
    _before_exit()
    sys.exit(code)


def _before_exit() -> None:
    """At exit the interpreter runs full garbage collections while it tears the modules
    down; after a run they cost about 0.2 s of a 3 s command (measured with perf). One
    collection now, with finalizers, then everything left is frozen out of their sight.
    Only for the command's own process: in-process callers keep a normal collector."""
    gc.collect()
    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure()
    try:
        if private_files(os.environ):
            os.umask(PRIVATE_UMASK)
        return int(args.func(args))
    except (Stopped, TooManyErrors) as exc:
        say(f"asyncrunner: {exc}", file=sys.stderr)
        return exc.exit_code
    except AsyncRunnerError as exc:
        say(f"asyncrunner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        say("asyncrunner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except (sqlite3.Error, OSError) as exc:
        where = db_path(args) if hasattr(args, "db") else Path.cwd()
        if not is_disk_full(exc, where):
            if isinstance(exc, OSError):
                raise
            # Never a traceback; nothing half-written stays (every write is a transaction).
            say(f"asyncrunner: error: database error: {exc}", file=sys.stderr)
            return 1
        full = disk_full_error(exc, where, then="free some space and run it again")
        say(f"asyncrunner: error: {full}", file=sys.stderr)
        return full.exit_code
