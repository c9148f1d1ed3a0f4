"""Read-only commands (status, export, report, compare) never create, migrate or write a
database: the real CLI in a real process against real files, which are compared byte for
byte (and by mtime) before and after."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from conftest import run_cli
from test_schema import LEGACY_DDL, build_at_version

from asyncrunner.db.schema import SCHEMA_VERSION, connect

ID1 = "11111111-1111-4111-8111-111111111111"
ID2 = "22222222-2222-4222-8222-222222222222"

READ_COMMANDS: list[tuple[str, ...]] = [
    ("status",),
    ("status", ID1),
    ("export", ID1, "--format", "csv"),
    ("report", ID1),
    ("compare", ID1, ID2),
]


def build_r_era(path: Path) -> None:
    """An R-era database (user_version 0): two finished experiments over the same three
    labelled narratives."""
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(LEGACY_DDL)
        conn.executemany(
            "INSERT INTO source_narratives (incident_id, narrative_type, narrative_text, "
            "manual_flag_ind, manual_flag) VALUES (?, ?, 'text', ?, ?)",
            [("1", "LE", 1, 1), ("2", "LE", 0, 0), ("3", "CME", 1, 1)])
        for experiment_id, name in ((ID1, "first"), (ID2, "second")):
            conn.execute(
                "INSERT INTO experiments (experiment_id, experiment_name, status, model_name, "
                "n_narratives_total, n_narratives_processed, start_time, end_time) "
                "VALUES (?, ?, 'completed', 'm', 3, 3, '2025-10-27 10:00:00', "
                "'2025-10-27 11:00:00')", (experiment_id, name))
        rows = [(ID1, "1", "LE", 1, 1), (ID1, "2", "LE", 0, 0), (ID1, "3", "CME", 0, 1),
                (ID2, "1", "LE", 1, 1), (ID2, "2", "LE", 1, 0), (ID2, "3", "CME", 1, 1)]
        conn.executemany(
            "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
            "detected, manual_flag, manual_flag_ind, confidence, error_occurred, "
            "processed_at) VALUES (?, ?, ?, ?, ?, ?, 0.9, 0, '2025-10-27T10:30:00')",
            [(*r, r[4]) for r in rows])
        conn.commit()


def state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def refuse(tmp_path: Path, db: Path, command: tuple[str, ...]) -> str:
    """Run a read-only command that must refuse: exit 2, one line, nothing written."""
    out = tmp_path / "out"
    extra = ("--out", str(out)) if command[0] in ("export", "report") else ()
    proc = run_cli(*command, *extra, "--db", str(db), cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert not out.exists()
    return one_error_line(proc.stderr)


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: " ".join(c[:1]))
def test_missing_database_is_not_created(tmp_path: Path, command: tuple[str, ...]) -> None:
    db = tmp_path / "nowhere" / "exp.db"
    line = refuse(tmp_path, db, command)
    assert line == f"asyncrunner: error: database not found: {db} (set --db or EXPERIMENTS_DB)"
    assert not db.parent.exists()


def test_missing_database_from_the_environment(tmp_path: Path) -> None:
    from conftest import cli_env

    db = tmp_path / "exp.db"
    proc = run_cli("status", env=cli_env(EXPERIMENTS_DB=str(db)), cwd=tmp_path)
    assert proc.returncode == 2
    assert "database not found" in one_error_line(proc.stderr)
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: " ".join(c[:1]))
def test_empty_file_stays_empty(tmp_path: Path, command: tuple[str, ...]) -> None:
    db = tmp_path / "exp.db"
    db.touch()
    before = state(db)
    line = refuse(tmp_path, db, command)
    assert line == f"asyncrunner: error: {db} is not an asyncrunner database"
    assert db.stat().st_size == 0 and state(db) == before
    assert listing(tmp_path) == {"exp.db"}


def test_text_file_and_directory_and_foreign_database_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are not the tables you are looking for\n" * 100)
    foreign = tmp_path / "other.db"
    with closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE songs (title TEXT)")
    folder = tmp_path / "folder.db"
    folder.mkdir()
    for db in (text, foreign, folder):
        before = listing(tmp_path)
        saved = state(db) if db.is_file() else None
        for command in READ_COMMANDS:
            line = refuse(tmp_path, db, command)
            assert line == f"asyncrunner: error: {db} is not an asyncrunner database"
        assert listing(tmp_path) == before
        assert saved is None or state(db) == saved
    # migrate refuses them too, in one line, adding nothing to someone else's file
    for db in (text, foreign):
        saved = state(db)
        proc = run_cli("migrate", "--db", str(db), cwd=tmp_path)
        assert proc.returncode == 2
        assert one_error_line(proc.stderr).endswith("is not an asyncrunner database")
        assert state(db) == saved


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: " ".join(c[:1]))
def test_r_era_database_says_migrate_and_is_unchanged(tmp_path: Path,
                                                      command: tuple[str, ...]) -> None:
    db = tmp_path / "r.db"
    build_r_era(db)
    before, files = state(db), listing(tmp_path)
    line = refuse(tmp_path, db, command)
    assert line == (f"asyncrunner: error: database {db} is at schema version 0, this "
                    f"asyncrunner needs {SCHEMA_VERSION}: run `asyncrunner migrate`")
    assert state(db) == before
    assert listing(tmp_path) == files  # a rollback-journal database: nothing beside it


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_older_asyncrunner_database_says_migrate_and_is_unchanged(tmp_path: Path,
                                                                  version: int) -> None:
    db = tmp_path / "old.db"
    build_at_version(db, version)
    before = state(db)
    for command in READ_COMMANDS:
        line = refuse(tmp_path, db, command)
        assert f"is at schema version {version}, this asyncrunner needs" in line
    assert state(db) == before
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == version


def test_newer_database_is_refused_and_unchanged(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    connect(db).close()
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = state(db)
    line = refuse(tmp_path, db, ("status",))
    assert line == (f"asyncrunner: error: database {db} is at schema version "
                    f"{SCHEMA_VERSION + 1}, newer than this asyncrunner understands "
                    f"({SCHEMA_VERSION}): upgrade asyncrunner")
    assert state(db) == before
    proc = run_cli("migrate", "--db", str(db), cwd=tmp_path)
    assert proc.returncode == 2 and "newer" in one_error_line(proc.stderr)
    assert state(db) == before


def test_after_migrate_every_read_command_works_and_still_writes_nothing(
        tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    build_r_era(db)
    proc = run_cli("migrate", "--db", str(db), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert first.startswith(f"backup written: {db}.pre_migration_backup_")  # issue #10
    assert second.startswith(f"migrated {db}: m1_create_tables, m2_add_missing_columns")
    before = state(db)

    status = run_cli("status", "--db", str(db), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert ID1 in status.stdout and ID2 in status.stdout
    detail = run_cli("status", ID1, "--json", "--db", str(db), cwd=tmp_path)
    assert detail.returncode == 0, detail.stderr
    assert '"done": 3' in detail.stdout

    csv_out = tmp_path / "results.csv"
    export = run_cli("export", ID1, "--out", str(csv_out), "--db", str(db), cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    assert len(csv_out.read_text().splitlines()) == 4  # header and three results

    html = tmp_path / "report.html"
    report = run_cli("report", ID1, "--out", str(html), "--db", str(db), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert html.read_text().lstrip().lower().startswith("<!doctype html")

    compare = run_cli("compare", ID1, ID2, "--json", "--db", str(db), cwd=tmp_path)
    assert compare.returncode == 0, compare.stderr
    assert '"n_paired": 3' in compare.stdout

    assert state(db) == before
    again = run_cli("migrate", "--db", str(db), cwd=tmp_path)
    assert again.returncode == 0 and "already up to date" in again.stdout


def test_migrate_initialises_an_empty_file_then_status_works(tmp_path: Path) -> None:
    db = tmp_path / "exp.db"
    db.touch()
    assert run_cli("migrate", "--db", str(db), cwd=tmp_path).returncode == 0
    status = run_cli("status", "--db", str(db), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "no experiments" in status.stdout


def test_migrate_and_cancel_on_a_missing_database_create_nothing(tmp_path: Path) -> None:
    db = tmp_path / "exp.db"
    for command in (("migrate",), ("cancel", ID1)):
        proc = run_cli(*command, "--db", str(db), cwd=tmp_path)
        assert proc.returncode == 2
        assert "database not found" in one_error_line(proc.stderr)
    assert listing(tmp_path) == set()


def test_cancel_on_a_text_file_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "notes.txt"
    db.write_text("hello\n" * 200)
    before = state(db)
    proc = run_cli("cancel", ID1, "--db", str(db), cwd=tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).endswith("is not an asyncrunner database")
    assert state(db) == before


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """make_read_only(folder): from now on nothing can be written in `folder` (holding
    files made before). chmod where it binds (not root); for root, `folder` is a tmpfs
    mounted on it, filled, then remounted read-only. Skips only where neither works."""
    undo: list[Callable[[], None]] = []

    def make_read_only(folder: Path) -> None:
        if os.geteuid() != 0:
            for p in folder.iterdir():
                p.chmod(0o444)
            folder.chmod(0o555)
            undo.append(lambda: folder.chmod(0o755))
            return
        staged = tmp_path / f"{folder.name}.staged"
        folder.rename(staged)
        folder.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                          capture_output=True, check=False).returncode != 0:
            pytest.skip("running as root without the right to mount: chmod does not bind")
        undo.append(lambda: subprocess.run(["umount", "-l", str(folder)], check=False))
        for p in staged.iterdir():
            shutil.copy2(p, folder / p.name)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)

    yield make_read_only
    for step in reversed(undo):
        step()


def test_wal_database_in_a_read_only_directory_is_readable(
        tmp_path: Path, read_only: Callable[[Path], None]) -> None:
    """No -wal/-shm beside it and no right to create them: read without them."""
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "exp.db"
    connect(db).close()
    assert listing(folder) == {"exp.db"}
    read_only(folder)
    proc = run_cli("status", "--db", str(db), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no experiments" in proc.stdout


WRITE_COMMANDS: list[tuple[str, ...]] = [("migrate",), ("cancel", ID1), ("resume", ID1)]


@pytest.mark.parametrize("command", WRITE_COMMANDS, ids=lambda c: c[0])
def test_writing_commands_refuse_a_read_only_place_in_one_line(
        tmp_path: Path, read_only: Callable[[Path], None], command: tuple[str, ...]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "exp.db"
    build_r_era(db)
    read_only(folder)
    before = state(db)
    proc = run_cli(*command, "--db", str(db), cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = one_error_line(proc.stderr)
    assert "read-only" in line or "cannot write in" in line, line
    assert state(db) == before and listing(folder) == {"exp.db"}


def test_a_new_run_refuses_a_read_only_directory_in_one_line(
        tmp_path: Path, read_only: Callable[[Path], None]) -> None:
    from conftest import write_config, write_fixture_csv

    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(folder)
    data = write_fixture_csv(tmp_path / "data.csv", [("1", "He hit her", "", "1", "", "1")])
    cfg = write_config(tmp_path, data, "http://127.0.0.1:9/v1")
    proc = run_cli("run", str(cfg), "--db", str(folder / "new.db"), cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"cannot write in {folder}" in one_error_line(proc.stderr)
    assert listing(folder) == set()
