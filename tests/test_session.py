"""Sessions in-process: plan, guards, the shared tail and how each session ends.

The real session, pipeline and SQLite file; only the HTTP boundary is injected (FakeLLM over
httpx.MockTransport). What only a separate process can show (exit codes, kill -9, lock
contention between processes, SIGTERM) stays in the subprocess suites.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config, write_fixture_csv
from fake_llm import FakeLLM, experiment_row, result_keys
from test_runner import cases

from asyncrunner.db import checksums, experiments
from asyncrunner.db.locks import lock_path
from asyncrunner.db.schema import connect
from asyncrunner.errors import InputError, RefusedError, RunFailed, Stopped, UsageError
from asyncrunner.plan import RunRequest, request_from_env
from asyncrunner.session import RunSummary, execute
from asyncrunner.vocab import Status

N_CASES = 20
TOTAL = 2 * N_CASES


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    data = write_fixture_csv(tmp_path / "data.csv", cases(N_CASES))
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1", workers=4, batch_size=4,
                       max_attempts=1, commit_interval_s=0.05)
    return tmp_path / "runs.db", cfg


def start(db: Path, cfg: Path, fake: FakeLLM, **kw: Any) -> tuple[RunSummary, str]:
    out = io.StringIO()
    summary = execute(RunRequest(db_path=db, config_path=str(cfg), env={}, **kw), out,
                      transport=fake.transport())
    return summary, out.getvalue()


def resume(db: Path, experiment_id: str, fake: FakeLLM, **kw: Any) -> RunSummary:
    req = RunRequest(db_path=db, config_path=kw.pop("config_path", None), resume=True,
                     experiment_id=experiment_id, env={}, **kw)
    return execute(req, io.StringIO(), transport=fake.transport())


def interrupted_run(db: Path, cfg: Path, after: int = 9) -> str:
    """Start a run and stop it with a real SIGINT at the `after`-th request."""
    out = io.StringIO()
    fake = FakeLLM(delay_s=0.01).after(after, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(Stopped) as stopped:
        execute(RunRequest(db_path=db, config_path=str(cfg), env={}), out,
                transport=fake.transport())
    assert stopped.value.exit_code == 130
    return out.getvalue().splitlines()[0].removeprefix("experiment_id: ")


def test_new_run_completes_with_metrics_exports_and_report(
        setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup
    fake = FakeLLM()
    summary, out = start(db, cfg, fake)
    assert out.splitlines()[0] == f"experiment_id: {summary.experiment_id}"
    assert summary.status is Status.COMPLETED and fake.requests == TOTAL
    assert summary.metrics is not None and summary.metrics["overall"]["n"] == TOTAL
    for key in ("csv", "json", "report"):
        assert Path(summary.exports[key]).is_file()
    row = experiment_row(db, summary.experiment_id)
    assert row["status"] == "completed" and row["n_narratives_completed"] == TOTAL
    assert row["f1"] is not None and row["end_time"]
    assert not lock_path(db, summary.experiment_id).exists()
    log = (cfg.parent / "logs" / summary.experiment_id / "run.jsonl").read_text()
    assert "husband was arrested" not in log and '"event": "run_finished"' in log
    assert "run_start" not in console.getvalue() or "narratives" in console.getvalue()


def test_stopped_run_is_interrupted_and_resume_sends_only_the_rest(
        setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup
    experiment_id = interrupted_run(db, cfg)
    row = experiment_row(db, experiment_id)
    assert row["status"] == "interrupted" and row["failure_reason"] == "stopped by SIGINT"
    assert not lock_path(db, experiment_id).exists()
    first = len(result_keys(db, experiment_id))
    assert 0 < first < TOTAL
    rest = FakeLLM()
    summary = resume(db, experiment_id, rest)
    assert summary.status is Status.COMPLETED
    assert rest.requests == TOTAL - first
    keys = result_keys(db, experiment_id)
    assert len(keys) == len(set(keys)) == TOTAL
    assert list(db.parent.glob("runs.db.resume_backup_*"))
    assert "RESUMING" in console.getvalue()


def test_retry_errors_resends_only_error_rows(setup: tuple[Path, Path],
                                              console: io.StringIO) -> None:
    db, cfg = setup
    summary, _ = start(db, cfg, FakeLLM(fail=lambda t: 503 if "case 7" in t else None))
    assert summary.metrics is not None and summary.metrics["unscored"]["errors"] == 1
    again = FakeLLM()
    req = request_from_env(db, None, {}, resume=False, experiment_id=None,
                           retry_errors_only=False, force=False,
                           env={"RESUME": "1", "EXPERIMENT_ID": summary.experiment_id,
                                "RETRY_ERRORS_ONLY": "1"})
    retried = execute(req, io.StringIO(), transport=again.transport())
    assert retried.status is Status.COMPLETED and again.requests == 1
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT error_occurred, attempt_count, first_error_message "
                           "FROM narrative_results WHERE incident_id = '0007' "
                           "AND narrative_type = 'LE'").fetchone()
    finally:
        conn.close()
    assert row[0] == 0 and row[1] == 2 and "503" in row[2]
    with pytest.raises(RefusedError, match="no error rows"):
        resume(db, summary.experiment_id, FakeLLM(), retry_errors_only=True)


def test_unexpected_failure_marks_failed_releases_lock_and_resumes(
        setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup

    def boom() -> None:
        raise RuntimeError("transport bug")

    out = io.StringIO()
    with pytest.raises(RunFailed, match="RuntimeError: transport bug"):
        execute(RunRequest(db_path=db, config_path=str(cfg), env={}), out,
                transport=FakeLLM().after(5, boom).transport())
    experiment_id = out.getvalue().split()[1]
    row = experiment_row(db, experiment_id)
    assert row["status"] == "failed" and "transport bug" in str(row["failure_reason"])
    assert not lock_path(db, experiment_id).exists()
    assert resume(db, experiment_id, FakeLLM()).status is Status.COMPLETED
    assert len(result_keys(db, experiment_id)) == TOTAL


def test_resume_refusals(setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup
    summary, _ = start(db, cfg, FakeLLM())
    with pytest.raises(RefusedError, match="is completed"):
        resume(db, summary.experiment_id, FakeLLM())
    with pytest.raises(RefusedError, match="needs EXPERIMENT_ID"):
        execute(RunRequest(db_path=db, config_path=None, resume=True, env={}))
    with pytest.raises(RefusedError, match="not a valid experiment id"):
        resume(db, "not-a-uuid", FakeLLM())
    with pytest.raises(RefusedError, match="does not exist"):
        resume(db.with_name("other.db"), summary.experiment_id, FakeLLM())
    with pytest.raises(RefusedError, match="no experiment"):
        resume(db, "00000000-0000-4000-8000-000000000000", FakeLLM())


def test_cancelled_needs_force_and_changed_data_is_refused(
        setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup
    experiment_id = interrupted_run(db, cfg)
    conn = connect(db)
    try:
        experiments.cancel(conn, db, experiment_id)
        with pytest.raises(RefusedError, match="nothing to cancel"):
            experiments.cancel(conn, db, experiment_id)
    finally:
        conn.close()
    with pytest.raises(RefusedError, match="--force"):
        resume(db, experiment_id, FakeLLM())
    data = cfg.parent / "data.csv"
    original = data.read_bytes()
    data.write_bytes(original + b"9999,extra,row,0,0,0\n")
    with pytest.raises(RefusedError, match="checksum mismatch"):
        resume(db, experiment_id, FakeLLM(), force=True)
    data.unlink()
    with pytest.raises(RefusedError, match="is missing"):
        resume(db, experiment_id, FakeLLM(), force=True)
    data.write_bytes(original)
    assert resume(db, experiment_id, FakeLLM(), force=True).status is Status.COMPLETED
    assert experiment_row(db, experiment_id)["status"] == "completed"


def test_an_unchanged_data_file_is_not_read_again_and_an_edited_one_is(
        setup: tuple[Path, Path], console: io.StringIO,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The run records the data file's checksum with its identity (db/checksums.py); a
    resume of the unchanged file takes it from there without reading the file, and an
    edit that keeps the size (the times move, as every write moves them) is refused."""
    db, cfg = setup
    data = cfg.parent / "data.csv"
    # The file was written a moment ago: count it as settled (the margin is for
    # timestamp granularity, tested in test_checksums.py).
    monkeypatch.setattr(checksums, "SETTLED_S", 0.0)
    first = interrupted_run(db, cfg)
    second = interrupted_run(db, cfg)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT path, data_checksum FROM data_file_checksums").fetchall()
    conn.close()
    assert rows == [(str(data.resolve()), experiment_row(db, first)["data_checksum"])]

    def not_read(path: Path) -> str:
        raise AssertionError(f"{path} was read again")

    with monkeypatch.context() as m:
        m.setattr(checksums, "readable_checksum", not_read)
        assert resume(db, first, FakeLLM()).status is Status.COMPLETED
    st = data.stat()
    original = data.read_bytes()
    data.write_bytes(original.replace(b"0", b"1", 1))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(RefusedError, match="checksum mismatch"):
        resume(db, second, FakeLLM())


def test_resume_uses_stored_settings_and_warns_about_drift(
        setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup
    experiment_id = interrupted_run(db, cfg)
    data = cfg.parent / "data.csv"
    drifted = write_config(cfg.parent, data, "http://llm.invalid/v1", name="drift.yaml",
                           model={"temperature": 0.7}, workers=2, batch_size=4)
    fake = FakeLLM()
    resume(db, experiment_id, fake, config_path=str(drifted))
    assert set(fake.temperatures) == {0.0}
    assert ("config drift: model.temperature is 0.7 in the YAML, the experiment ran with 0.0; "
            "using the stored value") in console.getvalue()
    stored = json.loads(str(experiment_row(db, experiment_id)["config_json"]))
    assert stored["model"]["temperature"] == 0.0


def test_bad_new_runs_are_refused_before_anything_is_written(
        tmp_path: Path, setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, _ = setup
    with pytest.raises(InputError, match=r"needs a CONFIG\.yaml"):
        execute(RunRequest(db_path=db, config_path=None, env={}))
    missing = write_config(tmp_path, tmp_path / "nope.csv", "http://x/v1", name="m.yaml")
    with pytest.raises(UsageError, match="data file not found"):
        execute(RunRequest(db_path=db, config_path=str(missing), env={}))
    assert not db.exists()
    empty = write_fixture_csv(tmp_path / "empty.csv", [("1", "", "", "", "", "")])
    with pytest.raises(InputError, match="no narratives"):
        execute(RunRequest(db_path=db, config_path=str(
            write_config(tmp_path, empty, "http://x/v1", name="e.yaml")), env={}))


def test_retry_errors_without_resume_is_a_warning_and_a_new_run(
        setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup
    summary, _ = start(db, cfg, FakeLLM(), retry_errors_only=True)
    assert summary.status is Status.COMPLETED
    assert "RETRY_ERRORS_ONLY is set without RESUME" in console.getvalue()


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("content", ["{dead}\n", "{dead}", "\x00garbage{", '{"pid": 999999999}',
                                     "-1\n", "0\n", "99999999999999999999\n"])
def test_a_stale_lock_file_in_any_format_is_reported_and_replaced(
        setup: tuple[Path, Path], console: io.StringIO, content: str) -> None:
    db, cfg = setup
    experiment_id = interrupted_run(db, cfg)
    pid = dead_pid()
    lock_path(db, experiment_id).write_bytes(content.replace("{dead}", str(pid)).encode())
    assert resume(db, experiment_id, FakeLLM()).status is Status.COMPLETED
    shown = console.getvalue()
    assert "stale lock from" in shown and "; replaced" in shown
    if content.startswith("{dead}"):
        assert f"stale lock from PID {pid}, not running; replaced" in shown
    assert not lock_path(db, experiment_id).exists()


def test_provider_mock_starts_the_simulator_in_process(tmp_path: Path,
                                                      console: io.StringIO) -> None:
    data = write_fixture_csv(tmp_path / "data.csv", cases(5))
    cfg = write_config(tmp_path, data, "http://unused.invalid/v1", model={"provider": "mock"})
    summary = execute(RunRequest(db_path=tmp_path / "m.db", config_path=str(cfg), env={}),
                      io.StringIO())
    assert summary.status is Status.COMPLETED
    assert len(result_keys(tmp_path / "m.db", summary.experiment_id)) == 10


def test_a_report_that_cannot_be_drawn_does_not_fail_a_finished_run(
        setup: tuple[Path, Path], console: io.StringIO,
        monkeypatch: pytest.MonkeyPatch) -> None:
    db, cfg = setup
    from asyncrunner.results import report

    def cannot_draw(*_: Any, **__: Any) -> str:
        raise UsageError("the report cannot be drawn (simulated)")

    monkeypatch.setattr(report, "render_html", cannot_draw)
    summary, _ = start(db, cfg, FakeLLM())
    assert summary.status is Status.COMPLETED and "report" not in summary.exports
    assert "report not written" in console.getvalue()
    assert "the report cannot be drawn (simulated)" in console.getvalue()
