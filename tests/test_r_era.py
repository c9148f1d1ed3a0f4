"""Databases and lock files written by the R version (issue #10, items 4 and 5), from the CLI.

The database is built by hand from the R schema of the design documents (tests/test_schema.py
LEGACY_DDL: UNIQUE(incident_id, narrative_type) on source_narratives, no checksum anywhere,
no unique index on results): one completed R experiment, one that R left `running` with
duplicate results, and R's narratives of the data file (no checksum, R's timestamps).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from conftest import cli_env, experiment_id_from, run_cli, write_config, write_fixture_csv
from test_resume import cases
from test_schema import LEGACY_DDL

from asyncrunner.db.locks import lock_path
from asyncrunner.sim import MockServer

R_DONE = "11111111-1111-4111-8111-111111111111"
R_RUNNING = "22222222-2222-4222-8222-222222222222"
R_SUBSET = "33333333-3333-4333-8333-333333333333"
N_CASES = 15
TOTAL = 2 * N_CASES
R_PROMPT = "You classify narratives (R version prompt)."


def r_narratives(data: Path) -> list[tuple[str, str, str, int, int]]:
    """(incident, type, text, flag_ind, flag) as R loaded them: file order, LE then CME."""
    out = []
    for row in cases(N_CASES):
        out.append((row[0], "LE", row[1], int(row[3]), int(row[5])))
        out.append((row[0], "CME", row[2], int(row[4]), int(row[5])))
    return out


def build_r_database(db: Path, data: Path, api_url: str, *, checksum: str | None = None,
                     ddl: str = LEGACY_DDL) -> None:
    """An R database: narratives of `data` (no checksum unless given, as R v2 stored it),
    a completed experiment, an unfinished one with duplicate results and an error, and an
    unfinished smoke test over the first 8 narratives."""
    rows = r_narratives(data)
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(ddl)
        if checksum is not None:
            conn.execute("ALTER TABLE source_narratives ADD COLUMN data_checksum TEXT")
        conn.executemany(
            "INSERT INTO source_narratives (incident_id, narrative_type, narrative_text, "
            "manual_flag_ind, manual_flag, data_source, loaded_at) VALUES (?, ?, ?, ?, ?, ?, "
            "'2025-10-27 09:00:00')", [(*r, str(data)) for r in rows])
        if checksum is not None:
            conn.execute("UPDATE source_narratives SET data_checksum = ?", (checksum,))
        for eid, status, total, start in ((R_DONE, "completed", TOTAL, "2025-10-27 10:00:00"),
                                          (R_RUNNING, "running", TOTAL, "2025-10-28 10:00:00"),
                                          (R_SUBSET, "failed", 8, "2025-10-26 10:00:00")):
            conn.execute(
                "INSERT INTO experiments (experiment_id, experiment_name, status, model_name, "
                "model_provider, temperature, api_url, system_prompt, user_template, "
                "prompt_version, run_seed, data_file, n_narratives_total, "
                "n_narratives_processed, start_time) VALUES (?, ?, ?, 'mock-classifier', "
                "'openai', 0.0, ?, ?, 'Narrative:\n<<TEXT>>', 'v1', 1024, ?, ?, 0, ?)",
                (eid, f"R {status}", status, api_url, R_PROMPT, str(data), total, start))

        def result(eid: str, r: tuple[str, str, str, int, int], detected: int,
                   error: bool = False) -> tuple[object, ...]:
            return (eid, r[0], r[1], None if error else detected, 0.8, "r", int(error),
                    "HTTP 500" if error else None, "2025-10-28 11:00:00", r[3], r[4])

        sql = ("INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
               "detected, confidence, rationale, error_occurred, error_message, processed_at, "
               "manual_flag_ind, manual_flag) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        conn.executemany(sql, [result(R_DONE, r, 0) for r in rows])
        partial = [result(R_RUNNING, r, 0) for r in rows[:12]]
        partial += [result(R_RUNNING, rows[3], 1),                # a duplicate (newer)
                    result(R_RUNNING, rows[12], 0, error=True)]   # an error, no category
        conn.executemany(sql, partial)
        conn.executemany(sql, [result(R_SUBSET, r, 0) for r in rows[:5]])
        conn.commit()


@pytest.fixture
def r_db(tmp_path: Path, mock_server: MockServer) -> Iterator[tuple[Path, Path, Path]]:
    data = write_fixture_csv(tmp_path / "narratives.csv", cases(N_CASES))
    db = tmp_path / "production.db"
    build_r_database(db, data, mock_server.url)
    cfg = write_config(tmp_path, data, mock_server.url)
    yield db, data, cfg


def query(db: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        return [tuple(r) for r in conn.execute(sql, params)]


def test_migrated_r_database_shows_counters_and_no_leftover_constraint(
        r_db: tuple[Path, Path, Path]) -> None:
    db, _, _ = r_db
    proc = run_cli("migrate", "--db", str(db))
    assert proc.returncode == 0 and "rebuild_r_era_source" in proc.stdout
    backups = list(db.parent.glob("production.db.pre_migration_backup_*"))
    assert len(backups) == 1 and f"backup written: {backups[0]}" in proc.stdout
    with closing(sqlite3.connect(backups[0])) as conn:        # the R database as it was
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0] == 49
    listing = {r["experiment_id"]: r for r in json.loads(
        run_cli("status", "--json", "--db", str(db)).stdout)}
    assert (listing[R_DONE]["done"], listing[R_DONE]["total"]) == (TOTAL, TOTAL)
    assert listing[R_RUNNING]["done"] == 13       # 14 rows, the older duplicate dropped
    assert listing[R_RUNNING]["status_display"] == "running (dead)"
    assert listing[R_RUNNING]["eta"] is None
    text = run_cli("status", "--db", str(db)).stdout
    assert f"{R_DONE}  completed" in text and f"{TOTAL}/{TOTAL}" in text
    detail = json.loads(run_cli("status", R_RUNNING, "--json", "--db", str(db)).stdout)
    assert detail["dropped"] is None and detail["errors_by_category"] == {"unknown": 1}


def test_run_on_an_r_database_loads_beside_r_rows(r_db: tuple[Path, Path, Path]) -> None:
    db, _, cfg = r_db
    proc = run_cli("run", str(cfg), "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "IntegrityError" not in proc.stderr
    eid = experiment_id_from(proc.stdout)
    assert query(db, "SELECT COUNT(*) FROM source_narratives WHERE data_checksum IS NULL") == [
        (TOTAL,)]                                              # R's rows untouched
    assert query(db, "SELECT n_narratives_completed FROM experiments WHERE experiment_id = ?",
                 eid) == [(TOTAL,)]
    assert list(db.parent.glob("production.db.pre_migration_backup_*"))   # before migrating
    assert list(db.parent.glob("production.db.pre_run_backup_*"))   # it held experiments


def test_resume_an_unfinished_r_experiment(r_db: tuple[Path, Path, Path]) -> None:
    db, data, _ = r_db
    md5 = hashlib.md5(data.read_bytes()).hexdigest()
    proc = run_cli("resume", R_RUNNING, "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert "checksum mismatch" not in proc.stderr
    assert (f"has no stored data checksum (written by the R version): its narratives are the "
            f"{TOTAL} loaded from {data}") in proc.stderr
    assert f"the file's checksum {md5} is stored now" in proc.stderr
    assert "has no stored configuration (written by the R version)" in proc.stderr
    exp = query(db, "SELECT status, data_checksum, n_narratives_completed, system_prompt, "
                    "config_json FROM experiments WHERE experiment_id = ?", R_RUNNING)[0]
    assert exp[:4] == ("completed", md5, TOTAL, R_PROMPT)
    stored = json.loads(str(exp[4]))
    assert stored["prompt"]["system_prompt"] == R_PROMPT and stored["model"]["max_tokens"]
    # R's rows are now this checksum's load; nothing was loaded a second time
    assert query(db, "SELECT COUNT(*), COUNT(DISTINCT data_checksum) FROM source_narratives"
                 ) == [(TOTAL, 1)]
    assert query(db, "SELECT origin FROM ingests") == [("adopted",)]
    keys = query(db, "SELECT incident_id, narrative_type FROM narrative_results "
                     "WHERE experiment_id = ?", R_RUNNING)
    assert len(keys) == len(set(keys)) == TOTAL
    hist = [r[0] for r in query(db, "SELECT key FROM config_history WHERE experiment_id = ?",
                                R_RUNNING)]
    assert "data_checksum" in hist
    # a later run on the same file reuses the adopted rows instead of loading them again
    cfg = write_config(data.parent, data, "http://unused.invalid/v1", name="again.yaml",
                       model={"provider": "mock"})
    again = run_cli("run", str(cfg), "--db", str(db))
    assert again.returncode == 0, again.stderr
    assert "were loaded by the R version" in again.stderr
    assert query(db, "SELECT COUNT(*) FROM source_narratives") == [(TOTAL,)]


def test_resume_an_r_experiment_after_a_new_run_loaded_the_file(
        r_db: tuple[Path, Path, Path]) -> None:
    db, _data, cfg = r_db
    assert run_cli("run", str(cfg), "--db", str(db)).returncode == 0
    proc = run_cli("resume", R_RUNNING, "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert "as it is now was already loaded" in proc.stderr
    assert query(db, "SELECT COUNT(*) FROM narrative_results WHERE experiment_id = ?",
                 R_RUNNING) == [(TOTAL,)]
    assert query(db, "SELECT COUNT(*) FROM source_narratives") == [(2 * TOTAL,)]


def test_an_r_smoke_test_resumes_on_its_first_narratives_only(
        r_db: tuple[Path, Path, Path]) -> None:
    db, _, _ = r_db
    proc = run_cli("resume", R_SUBSET, "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert "(the first 8)" in proc.stderr
    assert query(db, "SELECT COUNT(*) FROM narrative_results WHERE experiment_id = ?",
                 R_SUBSET) == [(8,)]
    assert query(db, "SELECT max_narratives, n_narratives_total FROM experiments "
                     "WHERE experiment_id = ?", R_SUBSET) == [(8, 8)]


def test_an_r_experiment_whose_file_changed_is_refused(tmp_path: Path,
                                                       mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "narratives.csv", cases(N_CASES))
    db = tmp_path / "production.db"
    build_r_database(db, data, mock_server.url, checksum="0" * 32)   # R v2 stored an MD5
    assert run_cli("migrate", "--db", str(db)).returncode == 0
    before = query(db, "SELECT COUNT(*) FROM narrative_results")
    proc = run_cli("resume", R_RUNNING, "--db", str(db))
    assert proc.returncode == 3 and "checksum mismatch" in proc.stderr and "0" * 32 in \
        proc.stderr
    assert query(db, "SELECT COUNT(*) FROM narrative_results") == before


# --------------------------------------------------------------------------- locks


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("how", ["resume", "run-env"])
@pytest.mark.parametrize("content", ["{pid}\n", "\x00\x01 not a pid"])
def test_stale_r_format_lock_files_are_replaced_from_the_cli(
        r_db: tuple[Path, Path, Path], how: str, content: str) -> None:
    db, _, cfg = r_db
    pid = dead_pid()
    lock = lock_path(db, R_RUNNING)
    lock.write_text(content.replace("{pid}", str(pid)))
    if how == "resume":
        proc = run_cli("resume", R_RUNNING, "--db", str(db))
    else:
        proc = run_cli("run", str(cfg), "--db", str(db),
                       env=cli_env(RESUME="1", EXPERIMENT_ID=R_RUNNING))
    assert proc.returncode == 0, proc.stderr
    expected = (f"stale lock from PID {pid}, not running; replaced" if "{pid}" in content
                else "stale lock from unreadable content; replaced")
    assert expected in proc.stderr
    assert not lock.exists()


def test_a_live_r_format_pid_holds_the_lock(r_db: tuple[Path, Path, Path]) -> None:
    db, _, cfg = r_db
    assert run_cli("migrate", "--db", str(db)).returncode == 0
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = lock_path(db, R_RUNNING)
        lock.write_text(f"{sleeper.pid}\n")          # R: writeLines(Sys.getpid()), no flock
        before = query(db, "SELECT COUNT(*) FROM narrative_results")
        for args in (["resume", R_RUNNING], ["cancel", R_RUNNING]):
            proc = run_cli(*args, "--db", str(db))
            assert proc.returncode == 3, (args, proc.stderr)
            assert f"PID {sleeper.pid}" in proc.stderr and "bare PID" in proc.stderr
            assert "Traceback" not in proc.stderr
        env_run = run_cli("run", str(cfg), "--db", str(db),
                          env=cli_env(RESUME="1", EXPERIMENT_ID=R_RUNNING))
        assert env_run.returncode == 3
        assert lock.read_text() == f"{sleeper.pid}\n"   # left as the R run wrote it
        assert query(db, "SELECT COUNT(*) FROM narrative_results") == before
        detail = json.loads(run_cli("status", R_RUNNING, "--json", "--db", str(db)).stdout)
        assert detail["lock"] == {"held": True, "pid": sleeper.pid}
        assert detail["status_display"] == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    time.sleep(0.05)
    proc = run_cli("resume", R_RUNNING, "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert f"stale lock from PID {sleeper.pid}, not running; replaced" in proc.stderr
