"""Honest status (issue #10, item 6): the rate over the real window, no ETA without a live
process, `running (dead)`, a retry's own progress, and `resume --latest` skipping live runs."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sqlite3
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import experiment_id_from, run_cli, write_config, write_fixture_csv
from fake_llm import FakeLLM, experiment_row
from test_locks import hold_in_subprocess, stop
from test_resume import cases, finish, start

from asyncrunner.db.schema import connect
from asyncrunner.errors import Stopped
from asyncrunner.plan import RunRequest
from asyncrunner.results import status
from asyncrunner.session import execute
from asyncrunner.sim import FaultConfig

EID = "55555555-5555-4555-8555-555555555555"
FMT = "%Y-%m-%dT%H:%M:%S.%fZ"


def add_experiment(db: Path, eid: str = EID, *, status_: str = "running",
                   eta: str | None = None, start_time: str = "2026-01-01 10:00:00") -> None:
    with closing(connect(db)) as conn:
        conn.execute("INSERT INTO experiments (experiment_id, experiment_name, status, "
                     "n_narratives_total, estimated_completion_time, start_time) "
                     "VALUES (?, 'x', ?, 1000, ?, ?)", (eid, status_, eta, start_time))


def add_results(db: Path, n: int, *, since: datetime, span_s: float, eid: str = EID) -> None:
    with closing(connect(db)) as conn:
        conn.executemany(
            "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
            "detected, error_occurred, processed_at) VALUES (?, ?, 'LE', 1, 0, ?)",
            [(eid, f"{i:05d}", (since + timedelta(seconds=span_s * i / n)).strftime(FMT))
             for i in range(n)])


def add_session(db: Path, started: datetime, *, intent: str = "new", target: int = 1000,
                eid: str = EID) -> None:
    with closing(connect(db)) as conn:
        conn.execute("INSERT INTO sessions (session_id, experiment_id, intent, pid, "
                     "started_at, target) VALUES (?, ?, ?, ?, ?, ?)",
                     (os.urandom(8).hex(), eid, intent, os.getpid(), started.strftime(FMT),
                      target))


def test_recent_rate_uses_the_real_window(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    add_experiment(db)
    now = datetime.now(UTC)
    started = now - timedelta(seconds=11)
    add_results(db, 114, since=started, span_s=10.5)
    with closing(connect(db)) as conn:
        rate, window = status.recent_rate(conn, EID, started.strftime(FMT), now=now)
        assert rate == pytest.approx(114 / 11, rel=0.01) and window == pytest.approx(11)
        # without a session: from the first result in the window
        rate, _ = status.recent_rate(conn, EID, None, now=now)
        assert rate == pytest.approx(114 / 11, rel=0.05)
        # an old session: the five-minute window
        rate, window = status.recent_rate(conn, EID, (now - timedelta(hours=2)).strftime(FMT),
                                          now=now)
        assert window == pytest.approx(300) and rate == pytest.approx(114 / 300, rel=0.01)


def test_live_run_shows_the_real_rate_and_its_eta(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    future = (datetime.now() + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    add_experiment(db, eta=future)
    started = datetime.now(UTC) - timedelta(seconds=11)
    add_session(db, started)
    add_results(db, 114, since=started, span_s=10.0)
    holder = hold_in_subprocess(db, EID)
    try:
        with closing(connect(db)) as conn:
            info = status.collect(conn, db, EID)
            rows = status.list_rows(conn, db)
    finally:
        stop(holder)
    assert info is not None and info["alive"] and info["lock"]["pid"] == holder.pid
    assert 8 < info["rate_per_s"] < 12 and 10 <= info["rate_window_s"] <= 13
    assert info["eta"] == future and rows[0]["eta"] == future
    assert rows[0]["status_display"] == "running"
    text = status.render_detail(info)
    assert "recent rate" in text and f"ETA {future}" in text


def test_dead_and_interrupted_experiments_show_no_eta(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    past = "2026-01-01 11:00:00"
    add_experiment(db, eta=past)                                   # killed: still 'running'
    other = "66666666-6666-4666-8666-666666666666"
    add_experiment(db, other, status_="interrupted", eta=past, start_time="2025-01-01 1:00")
    started = datetime.now(UTC) - timedelta(seconds=30)
    add_session(db, started)
    add_results(db, 50, since=started, span_s=20)
    with closing(connect(db)) as conn:
        rows = {r["experiment_id"]: r for r in status.list_rows(conn, db)}
        info = status.collect(conn, db, EID)
    assert rows[EID]["status_display"] == "running (dead)" and rows[EID]["eta"] is None
    assert rows[other]["status_display"] == "interrupted" and rows[other]["eta"] is None
    assert info is not None and info["eta"] is None and info["rate_per_s"] == 0.0
    text = status.render_detail(info)
    assert "running (dead)" in text and "ETA" not in text and "recent rate" not in text
    assert "died (no clean end)" in text
    listing = status.render_list(list(rows.values()))
    assert "running (dead)" in listing and past not in listing


def test_an_interrupted_session_clears_its_eta(tmp_path: Path) -> None:
    data = write_fixture_csv(tmp_path / "d.csv", cases(40))
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1", workers=1, batch_size=2,
                       commit_interval_s=0.05)
    db = tmp_path / "runs.db"
    out = io.StringIO()
    fake = FakeLLM(delay_s=0.01).after(12, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(Stopped):
        execute(RunRequest(db_path=db, config_path=str(cfg), env={}), out,
                transport=fake.transport())
    eid = out.getvalue().split()[1]
    row = experiment_row(db, eid)
    assert row["status"] == "interrupted" and row["estimated_completion_time"] is None
    assert row["last_progress_update"]


def test_a_retry_shows_its_own_progress(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    flaky = server_factory(faults=FaultConfig(error_rate=0.3), seed=3)
    data = write_fixture_csv(tmp_path / "cases.csv", cases(40))
    cfg = write_config(tmp_path, data, flaky.url, max_attempts=1)
    db = tmp_path / "exp.db"
    eid = experiment_id_from(run_cli("run", str(cfg), "--db", str(db)).stdout)
    with closing(sqlite3.connect(db)) as conn:
        errors = conn.execute("SELECT COUNT(*) FROM narrative_results WHERE "
                              "error_occurred = 1").fetchone()[0]
    assert errors >= 5
    slow = server_factory(latency_ms=250)
    cfg2 = write_config(tmp_path, data, slow.url, name="slow.yaml", workers=1, batch_size=1,
                        commit_interval_s=0.05)
    proc = start(["resume", eid, "--retry-errors-only", "--config", str(cfg2), "--db",
                  str(db)])
    seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        detail = json.loads(run_cli("status", eid, "--json", "--db", str(db)).stdout)
        if detail["retry"] and 0 < detail["retry"]["done"] < errors:
            seen = detail
            text = run_cli("status", eid, "--db", str(db)).stdout
            listing = run_cli("status", "--db", str(db)).stdout
            break
        time.sleep(0.1)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert seen is not None, "never saw the retry in progress"
    assert seen["retry"]["target"] == errors and seen["alive"]
    assert seen["status_display"] == f"running (retry {seen['retry']['done']}/{errors})"
    # read a moment later: k may have moved on, E has not
    assert re.search(rf"progress   retrying errors: \d+ of {errors} \(\d+\.\d%\); "
                     rf"experiment 80/80 stored, recent rate", text), text
    assert re.search(rf"running \(retry \d+/{errors}\)", listing), listing
    progress = [line for line in out.splitlines() if line.startswith("[PROGRESS]")]
    assert progress[0].startswith("[PROGRESS] 1/") and progress[-1].startswith(
        f"[PROGRESS] {errors}/{errors} (100.0%)")
    final = json.loads(run_cli("status", eid, "--json", "--db", str(db)).stdout)
    retry = final["sessions"][-1]
    assert (retry["intent"], retry["target"], retry["n_done"], retry["ended_as"]) == (
        "retry-errors", errors, errors, "completed")
    assert final["metrics_history"] and final["retry"] is None


def test_resume_latest_skips_an_experiment_a_live_process_works_on(
        tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    older, newer = "77777777-7777-4777-8777-777777777777", EID
    add_experiment(db, older, status_="interrupted", start_time="2026-01-01 09:00:00")
    add_experiment(db, newer, status_="running", start_time="2026-01-01 10:00:00")
    holder = hold_in_subprocess(db, newer)
    try:
        with closing(connect(db)) as conn:
            from asyncrunner.db import store
            picked = store.latest_resumable(conn, db)
        proc = run_cli("resume", "--latest", "--yes", "--db", str(db))
    finally:
        stop(holder)
    assert picked is not None and picked.experiment_id == older
    # it picked the older one (which then fails for want of a data file, not for the lock)
    assert f"latest resumable: {older}" in proc.stdout
    assert "is locked" not in proc.stderr
