"""Backups: a consistent online copy of a WAL database, the newest three kept, and a
refusal when the disk cannot hold the backup and the run's growth."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from asyncrunner.db import backup
from asyncrunner.db.schema import connect
from asyncrunner.errors import RefusedError


def test_backup_of_a_wal_database_holds_uncheckpointed_commits(tmp_path: Path) -> None:
    db = tmp_path / "exp.db"
    conn = connect(db)
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # keep the commits in the -wal file
    conn.executemany("INSERT INTO narrative_results (experiment_id, incident_id, "
                     "narrative_type, error_occurred) VALUES ('e', ?, 'LE', 0)",
                     [(str(i),) for i in range(500)])
    assert (tmp_path / "exp.db-wal").stat().st_size > 0
    copy = backup.make_backup(db)
    conn.close()
    check = sqlite3.connect(copy)
    assert check.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0] == 500
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()


def test_keeps_the_newest_three(tmp_path: Path) -> None:
    db = tmp_path / "exp.db"
    connect(db).close()
    made = [backup.make_backup(db) for _ in range(5)]
    kept = backup.list_backups(db)
    assert len(kept) == 3 and set(kept) == set(made[-3:])


def test_refuses_when_the_disk_is_too_small(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "exp.db"
    connect(db).close()
    usage = shutil.disk_usage(tmp_path)

    def tiny(path: Any) -> Any:  # the one boundary a test cannot fill for real
        return usage._replace(free=10 * 1024 * 1024)

    monkeypatch.setattr("asyncrunner.diskspace.shutil.disk_usage", tiny)
    with pytest.raises(RefusedError, match=r"10 MiB free, \d+ MiB needed"):
        backup.check_disk(db, remaining=40_000, with_backup=True)


def test_a_failed_backup_leaves_no_partial_file(tmp_path: Path) -> None:
    db = tmp_path / "exp.db"
    db.write_text("not a database\n" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        backup.make_backup(db)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.db"]


def test_a_background_backup_is_whole_once_result_returns(tmp_path: Path) -> None:
    db = tmp_path / "exp.db"
    conn = connect(db)
    conn.executemany("INSERT INTO narrative_results (experiment_id, incident_id, "
                     "narrative_type, error_occurred) VALUES ('e', ?, 'LE', 0)",
                     [(str(i),) for i in range(2000)])
    conn.commit()
    with backup.BackgroundBackup(db) as pending:
        # the caller reads meanwhile, as a resume's planning does
        assert conn.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0] == 2000
        made = pending.result()
    conn.close()
    assert made.parent == tmp_path and not list(tmp_path.glob("*.partial"))
    check = sqlite3.connect(made)
    assert check.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0] == 2000
    check.close()


def test_a_background_backup_raises_its_error_in_the_caller(tmp_path: Path) -> None:
    db = tmp_path / "exp.db"
    db.write_text("not a database\n" * 100)
    with backup.BackgroundBackup(db) as pending, pytest.raises(sqlite3.DatabaseError):
        pending.result()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.db"]


def test_leaving_early_waits_for_the_background_backup(tmp_path: Path) -> None:
    """A refused resume (here any error before result()) does not leave a copy half-written
    behind the process: leaving the block waits for it."""
    db = tmp_path / "exp.db"
    connect(db).close()
    with pytest.raises(RuntimeError, match="refused"), backup.BackgroundBackup(db):
        raise RuntimeError("refused")
    assert len(backup.list_backups(db)) == 1 and not list(tmp_path.glob("*.partial"))


def test_a_background_backup_needs_room_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "exp.db"
    conn = connect(db)
    conn.execute("CREATE TABLE pad (x BLOB)")
    conn.execute("INSERT INTO pad VALUES (zeroblob(20 * 1024 * 1024))")
    conn.commit()
    conn.close()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("asyncrunner.diskspace.shutil.disk_usage",
                        lambda path: usage._replace(free=10 * 1024 * 1024))
    with pytest.raises(RefusedError, match="backup of the database"), \
            backup.BackgroundBackup(db):
        pass
    assert backup.list_backups(db) == []


def test_the_backup_is_the_database_as_of_its_snapshot(tmp_path: Path) -> None:
    """Writes committed once the snapshot is taken (here: by the callback itself, so at
    the worst moment) are in the database and not in the backup, which is whole."""
    db = tmp_path / "exp.db"
    insert = ("INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
              "error_occurred) VALUES ('e', ?, 'LE', 0)")
    with closing(connect(db)) as conn, conn:
        conn.executemany(insert, [(str(i),) for i in range(10)])

    def write_now() -> None:
        with closing(sqlite3.connect(db)) as other, other:
            other.executemany(insert, [(str(i),) for i in range(10, 15)])

    made = backup.make_backup(db, on_snapshot=write_now)
    with closing(sqlite3.connect(made)) as copy, closing(sqlite3.connect(db)) as now:
        assert copy.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0] == 10
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert now.execute("SELECT COUNT(*) FROM narrative_results").fetchone()[0] == 15


def test_a_background_backup_that_fails_before_its_snapshot_says_so_there(
        tmp_path: Path) -> None:
    db = tmp_path / "exp.db"
    db.write_text("not a database\n" * 100)
    with backup.BackgroundBackup(db) as pending, pytest.raises(sqlite3.DatabaseError):
        pending.snapshot()
    assert not pending.snapshot_taken
