"""Resume, guards and stops, with real processes, real signals and real SQLite files."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, experiment_id_from, run_cli, write_config, write_fixture_csv

from asyncrunner.sim import MockServer


def cases(n: int) -> list[tuple[str, ...]]:
    rng = random.Random(n)
    rows = []
    for i in range(n):
        ipv = rng.random() < 0.4
        le = "Her boyfriend was arrested after an argument." if ipv else "Found by a neighbour."
        rows.append((f"{i:05d}", f"{le} Case {i}.", f"Examiner note {i}.",
                     "1" if ipv else "0", "0", "1" if ipv else "0"))
    return rows


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "asyncrunner", *args], cwd=ROOT,
                            env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for_results(db: Path, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            try:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
                try:
                    n = conn.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0]
                finally:
                    conn.close()
                if n >= at_least:
                    return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} results after {timeout}s")


def state(db: Path) -> dict[str, object]:
    conn = sqlite3.connect(db)
    try:
        exp = conn.execute("SELECT experiment_id, status, n_tp, n_fp, n_tn, n_fn, "
                           "n_narratives_total FROM experiments").fetchall()
        rows = conn.execute("SELECT COUNT(*), COUNT(DISTINCT incident_id || '/' || "
                            "narrative_type) FROM narrative_results").fetchone()
    finally:
        conn.close()
    return {"experiments": exp, "rows": rows[0], "distinct": rows[1]}


def resume_args(db: Path, eid: str) -> list[str]:
    return ["resume", eid, "--db", str(db)]


@pytest.fixture
def slow_server(server_factory) -> MockServer:  # type: ignore[no-untyped-def]
    return server_factory(latency_ms=30)


def test_kill_9_at_random_moments_then_resume_gives_the_full_result(
        tmp_path: Path, slow_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv", cases(60))
    cfg = write_config(tmp_path, data, slow_server.url, workers=4, batch_size=7)
    baseline_db = tmp_path / "baseline.db"
    assert run_cli("run", str(cfg), "--db", str(baseline_db)).returncode == 0
    baseline = state(baseline_db)
    metrics = baseline["experiments"][0][2:]  # type: ignore[index]
    rng = random.Random(20261123)
    partial = 0
    for trial in range(20):
        db = tmp_path / f"trial{trial}.db"
        proc = start(["run", str(cfg), "--db", str(db)])
        time.sleep(rng.uniform(0.2, 1.6))
        proc.send_signal(signal.SIGKILL)
        finish(proc)
        if not db.exists():
            continue
        conn = sqlite3.connect(db)
        try:
            found = conn.execute("SELECT experiment_id, status FROM experiments").fetchall()
            done = conn.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0]
        except sqlite3.OperationalError:
            found, done = [], 0
        finally:
            conn.close()
        if not found:
            continue
        eid, status = found[0]
        if status != "completed":
            partial += 0 < done < 120
            res = run_cli(*resume_args(db, eid))
            assert res.returncode == 0, (trial, res.stderr)
            assert "stale lock" in res.stderr
        after = state(db)
        assert after["rows"] == after["distinct"] == 120, trial
        exp = after["experiments"][0]  # type: ignore[index]
        assert exp[1] == "completed" and exp[2:] == metrics, trial
    assert partial >= 5, f"only {partial} kills landed mid-run"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_resume_completes(tmp_path: Path, slow_server: MockServer,
                                                   signum: int, code: int) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv", cases(100))
    cfg = write_config(tmp_path, data, slow_server.url, workers=2, batch_size=5)
    db = tmp_path / "exp.db"
    proc = start(["run", str(cfg), "--db", str(db)])
    wait_for_results(db, 10)
    proc.send_signal(signum)
    out, err = finish(proc)
    assert proc.returncode == code, err
    eid = experiment_id_from(out)
    assert "Traceback" not in err
    s = state(db)
    assert s["experiments"][0][1] == "interrupted"  # type: ignore[index]
    assert 10 <= s["rows"] < 200  # type: ignore[operator]
    assert not list(tmp_path.glob(".resume_lock_*"))
    res = run_cli(*resume_args(db, eid))
    assert res.returncode == 0, res.stderr
    assert "RESUMING" in res.stderr
    s = state(db)
    assert s["rows"] == s["distinct"] == 200
    assert s["experiments"][0][1] == "completed"  # type: ignore[index]


def test_second_sigint_stops_at_once(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(latency_ms=3000)
    data = write_fixture_csv(tmp_path / "cases.csv", cases(20))
    cfg = write_config(tmp_path, data, server.url, workers=2, batch_size=1,
                       grace_period_s=60, model={"timeout_s": 30})
    db = tmp_path / "exp.db"
    proc = start(["run", str(cfg), "--db", str(db)])
    wait_for_results(db, 0)
    # the response-format probe (one request, 3 s) first, then both workers' requests
    deadline = time.monotonic() + 20
    while server.stats().completion_requests < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stats().completion_requests == 3
    time.sleep(0.5)  # requests in flight now, none finished
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # waiting for in-flight requests (grace period)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = finish(proc, timeout=20)
    assert time.monotonic() - started < 5
    assert proc.returncode == 130, err
    assert state(db)["experiments"][0][1] == "interrupted"  # type: ignore[index]


def test_lock_contention_between_two_processes(tmp_path: Path, slow_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv", cases(100))
    cfg = write_config(tmp_path, data, slow_server.url, workers=1, batch_size=1)
    db = tmp_path / "exp.db"
    first = start(["run", str(cfg), "--db", str(db)])
    try:
        wait_for_results(db, 1)
        conn = sqlite3.connect(db)
        eid = conn.execute("SELECT experiment_id FROM experiments").fetchone()[0]
        conn.close()
        started = time.monotonic()
        second = run_cli(*resume_args(db, eid))
        # process start-up included; the refusal itself is instant
        assert time.monotonic() - started < 5
        assert second.returncode == 3
        assert f"PID {first.pid}" in second.stderr
        env = cli_env(RESUME="1", EXPERIMENT_ID=eid)
        third = run_cli("run", str(cfg), "--db", str(db), env=env)
        assert third.returncode == 3
        cancel = run_cli("cancel", eid, "--db", str(db))
        assert cancel.returncode == 3
    finally:
        first.send_signal(signal.SIGTERM)
        finish(first)


@pytest.mark.parametrize("bad", ["not-a-uuid", "../../etc/passwd", "12345"])
def test_malformed_ids_refused_before_any_path(tmp_path: Path, bad: str) -> None:
    db = tmp_path / "exp.db"
    proc = run_cli("resume", bad, "--db", str(db))
    assert proc.returncode == 3 and "not a valid experiment id" in proc.stderr
    env = cli_env(RESUME="1", EXPERIMENT_ID=bad)
    proc = run_cli("run", "--db", str(db), env=env)
    assert proc.returncode == 3
    assert not db.exists()


def test_unknown_id_and_missing_id_refused(tmp_path: Path, mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, mock_server.url)
    db = tmp_path / "exp.db"
    assert run_cli("run", str(cfg), "--db", str(db)).returncode == 0
    unknown = "00000000-0000-4000-8000-000000000000"
    proc = run_cli("resume", unknown, "--db", str(db))
    assert proc.returncode == 3 and "no experiment" in proc.stderr
    proc = run_cli("run", str(cfg), "--db", str(db), env=cli_env(RESUME="1"))
    assert proc.returncode == 3 and "EXPERIMENT_ID" in proc.stderr


def test_completed_experiment_refused(tmp_path: Path, mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, mock_server.url)
    db = tmp_path / "exp.db"
    eid = experiment_id_from(run_cli("run", str(cfg), "--db", str(db)).stdout)
    proc = run_cli(*resume_args(db, eid))
    assert proc.returncode == 3 and "completed" in proc.stderr


def interrupted_run(tmp_path: Path, server: MockServer, n: int = 100,
                    **run: object) -> tuple[Path, Path, Path, str]:
    data = write_fixture_csv(tmp_path / "cases.csv", cases(n))
    cfg = write_config(tmp_path, data, server.url, **({"workers": 2, "batch_size": 5} | run))
    db = tmp_path / "exp.db"
    proc = start(["run", str(cfg), "--db", str(db)])
    wait_for_results(db, 10)
    proc.send_signal(signal.SIGINT)
    out, _ = finish(proc)
    return data, cfg, db, experiment_id_from(out)


def test_checksum_mismatch_refused(tmp_path: Path, slow_server: MockServer) -> None:
    data, _cfg, db, eid = interrupted_run(tmp_path, slow_server)
    before = state(db)
    with data.open("a") as fh:
        fh.write("99999,Edited in later.,Also edited.,0,0,0\n")
    proc = run_cli(*resume_args(db, eid))
    assert proc.returncode == 3 and "changed" in proc.stderr
    assert state(db) == before  # refused before anything was written


def test_config_drift_warned_and_stored_values_used(tmp_path: Path,
                                                    slow_server: MockServer) -> None:
    data, _cfg, db, eid = interrupted_run(tmp_path, slow_server)
    drifted = write_config(tmp_path, data, slow_server.url, name="drift.yaml", seed=7,
                           max_narratives=3)
    text = drifted.read_text().replace("temperature: 0.0", "temperature: 0.9")
    drifted.write_text(text)
    proc = run_cli("run", str(drifted), "--db", str(db),
                   env=cli_env(RESUME="1", EXPERIMENT_ID=eid))
    assert proc.returncode == 0, proc.stderr
    for key in ("model.temperature", "run.seed", "run.max_narratives"):
        assert f"config drift: {key}" in proc.stderr
    conn = sqlite3.connect(db)
    temp, seed, total = conn.execute("SELECT temperature, run_seed, n_narratives_total "
                                     "FROM experiments").fetchone()
    rows = conn.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0]
    conn.close()
    assert (temp, seed, total, rows) == (0.0, 1024, 200, 200)


def test_retry_errors_only_changes_exactly_the_errored_rows(tmp_path: Path,
                                                            server_factory) -> None:  # type: ignore[no-untyped-def]
    from asyncrunner.sim import FaultConfig

    flaky = server_factory(faults=FaultConfig(error_rate=0.3), seed=3)
    data = write_fixture_csv(tmp_path / "cases.csv", cases(40))
    cfg = write_config(tmp_path, data, flaky.url, max_attempts=1)
    db = tmp_path / "exp.db"
    first = run_cli("run", str(cfg), "--db", str(db))
    eid = experiment_id_from(first.stdout)
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    before = {(r["incident_id"], r["narrative_type"]): dict(r)
              for r in conn.execute("SELECT * FROM narrative_results")}
    conn.close()
    errored = {k for k, r in before.items() if r["error_occurred"]}
    assert 5 <= len(errored) <= 40
    # completed either way; above run.max_error_share (0.2) it exits 4
    assert first.returncode == (4 if len(errored) / len(before) > 0.2 else 0), first.stderr
    # the run completed with its errors recorded; retrying them is allowed on completed
    healthy = server_factory()
    cfg2 = write_config(tmp_path, data, healthy.url, name="healthy.yaml", max_attempts=1)
    proc = run_cli("run", str(cfg2), "--db", str(db),
                   env=cli_env(RESUME="1", EXPERIMENT_ID=eid, RETRY_ERRORS_ONLY="1"))
    assert proc.returncode == 0, proc.stderr
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    after = {(r["incident_id"], r["narrative_type"]): dict(r)
             for r in conn.execute("SELECT * FROM narrative_results")}
    conn.close()
    assert after.keys() == before.keys()
    for key, row in after.items():
        old = before[key]
        if key in errored:
            assert row["error_occurred"] == 0 and row["error_message"] is None
            assert row["attempt_count"] == old["attempt_count"] + 1
            assert row["first_error_message"] == old["error_message"]
            assert row["result_id"] == old["result_id"]  # updated in place
        else:
            assert row == old
    assert healthy.stats().completion_requests == len(errored) + 1   # + the probe
    again = run_cli("run", str(cfg2), "--db", str(db),
                    env=cli_env(RESUME="1", EXPERIMENT_ID=eid, RETRY_ERRORS_ONLY="1"))
    assert again.returncode == 3 and "no error rows" in again.stderr


def test_retry_errors_only_without_resume_is_a_warning(tmp_path: Path,
                                                       mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, mock_server.url)
    proc = run_cli("run", str(cfg), "--db", str(tmp_path / "x.db"),
                   env=cli_env(RETRY_ERRORS_ONLY="1"))
    assert proc.returncode == 0
    assert "RETRY_ERRORS_ONLY" in proc.stderr and "ignored" in proc.stderr


def test_resume_takes_backups_and_keeps_three(tmp_path: Path, slow_server: MockServer) -> None:
    _data, _cfg, db, eid = interrupted_run(tmp_path, slow_server, n=300, workers=1)
    for _ in range(4):
        proc = start(resume_args(db, eid))
        time.sleep(0.8)
        proc.send_signal(signal.SIGINT)
        finish(proc)
        time.sleep(1.1)  # distinct timestamps
    backups = sorted(tmp_path.glob("exp.db.resume_backup_*"))
    assert len(backups) == 3
    conn = sqlite3.connect(backups[-1])
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0] > 0
    conn.close()


def test_a_resume_backup_holds_the_database_as_it_was_before_the_resume(
        tmp_path: Path, mock_server: MockServer) -> None:
    """The copy runs beside the resume (its snapshot is taken before the resume writes):
    the backup has the interrupted experiment and its sessions, not the resume's."""
    _data, _cfg, db, eid = interrupted_run(tmp_path, mock_server, n=60)
    with sqlite3.connect(db) as conn:
        before = (conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0],
                  conn.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0])
    conn.close()
    proc = run_cli(*resume_args(db, eid))
    assert proc.returncode == 0, proc.stderr
    [made] = sorted(tmp_path.glob("exp.db.resume_backup_*"))
    with sqlite3.connect(made) as copy:
        assert copy.execute("SELECT status FROM experiments").fetchone()[0] == "interrupted"
        assert (copy.execute("SELECT COUNT(*) FROM sessions").fetchone()[0],
                copy.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0]) == before
    copy.close()
    assert f"backup written: {made}" in proc.stderr + (tmp_path / "logs" / eid / "run.jsonl"
                                                       ).read_text()


def test_resume_latest_and_cancel(tmp_path: Path, slow_server: MockServer) -> None:
    _data, _cfg, db, eid = interrupted_run(tmp_path, slow_server)
    cancel = run_cli("cancel", eid, "--db", str(db))
    assert cancel.returncode == 0
    latest = run_cli("resume", "--latest", "--yes", "--db", str(db))
    assert latest.returncode == 3  # cancelled is not resumable without --force
    forced = run_cli("resume", eid, "--force", "--db", str(db))
    assert forced.returncode == 0, forced.stderr
    _data2, _cfg2, db2, eid2 = interrupted_run(tmp_path / "b" if (tmp_path / "b").mkdir() is None
                                             else tmp_path, slow_server)
    latest = run_cli("resume", "--latest", "--yes", "--db", str(db2))
    assert latest.returncode == 0, latest.stderr
    assert eid2 in latest.stdout


def test_legacy_database_is_refused_read_only_then_migrated(tmp_path: Path) -> None:
    """Read-only commands never write: an older database gets the hint to migrate, and
    after `migrate` (which writing commands also do on open) every row is still there."""
    from test_schema import build_legacy

    db = tmp_path / "legacy.db"
    build_legacy(db)
    before = db.read_bytes()
    refused = run_cli("status", "--db", str(db))
    assert refused.returncode == 2 and "run `asyncrunner migrate`" in refused.stderr
    assert db.read_bytes() == before
    assert run_cli("migrate", "--db", str(db)).returncode == 0
    proc = run_cli("status", "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0] == 3
    conn.close()


def test_unexpected_error_marks_failed_with_reason_and_releases_lock(
        tmp_path: Path, slow_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv", cases(100))
    cfg = write_config(tmp_path, data, slow_server.url, workers=2, batch_size=2)
    db = tmp_path / "exp.db"
    proc = start(["run", str(cfg), "--db", str(db)])
    wait_for_results(db, 4)
    # Pull the results table from under the writer: its next commit fails.
    conn = sqlite3.connect(db, timeout=10)
    conn.execute("ALTER TABLE narrative_results RENAME TO narrative_results_moved")
    conn.commit()
    conn.close()
    _out, err = finish(proc)
    assert proc.returncode == 1, err
    assert "run failed" in err and "Traceback" not in err
    conn = sqlite3.connect(db)
    status, reason = conn.execute("SELECT status, failure_reason FROM experiments").fetchone()
    conn.close()
    assert status == "failed" and "narrative_results" in reason
    assert not list(tmp_path.glob(".resume_lock_*"))


def test_resume_with_nothing_remaining_just_finalizes(tmp_path: Path,
                                                     server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, server.url)
    db = tmp_path / "exp.db"
    eid = experiment_id_from(run_cli("run", str(cfg), "--db", str(db)).stdout)
    conn = sqlite3.connect(db)  # as if killed between the last commit and finalize
    conn.execute("UPDATE experiments SET status = 'running', n_tp = NULL, end_time = NULL")
    conn.commit()
    conn.close()
    sent = server.stats().completion_requests
    proc = run_cli(*resume_args(db, eid))
    assert proc.returncode == 0, proc.stderr
    assert server.stats().completion_requests == sent
    exp = state(db)["experiments"][0]  # type: ignore[index]
    assert exp[1] == "completed" and exp[2] == 2
