"""Consistent database backups before a resume, a new run into a database holding
experiments, or a migration changes anything.

SQLite's online backup API copies a consistent snapshot even while the database is in WAL
mode with a `-wal` file beside it; a plain file copy of the main file would miss committed
pages still in the WAL. The newest `KEEP` backups of a database are kept.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from types import TracebackType

from asyncrunner.diskspace import check_free_space

KEEP = 3
# A result row with its raw response is a few KiB; this is generous on purpose.
BYTES_PER_RESULT = 8 * 1024
HEADROOM_BYTES = 50 * 1024 * 1024
# The CSV and JSON exports each hold every result again (without the narrative text).
EXPORT_BYTES_PER_RESULT = 2 * 4 * 1024
REPORT_BYTES = 16 * 1024 * 1024


RESUME_BACKUP = "resume_backup"
RUN_BACKUP = "pre_run_backup"   # a new run into a database holding experiments


def backup_pattern(db_path: Path, label: str = RESUME_BACKUP) -> str:
    return f"{db_path.name}.{label}_*"


def check_disk(db_path: Path, remaining: int, *, with_backup: bool,
               output_dir: Path | None = None, export_rows: int = 0) -> None:
    """Refuse to start a run that cannot fit on its disks: the backup of the database,
    room for the remaining results, and (at `output_dir`, possibly another disk) the
    exports and report of `export_rows` results."""
    size = db_path.stat().st_size if db_path.exists() else 0
    wal = db_path.with_name(db_path.name + "-wal")
    size += wal.stat().st_size if wal.exists() else 0
    needs = [(db_path.parent, remaining * BYTES_PER_RESULT + HEADROOM_BYTES,
              "room for the remaining results")]
    if with_backup and size:
        needs.append((db_path.parent, size, "backup of the database"))
    if output_dir is not None:
        needs.append((output_dir, export_rows * EXPORT_BYTES_PER_RESULT + REPORT_BYTES,
                      "exports and report"))
    check_free_space(needs)


def backup_before_new_writes(conn: sqlite3.Connection, db_path: Path) -> Path | None:
    """Before a new experiment (or a study, or a batch file) writes into a database that
    holds other experiments' results: check the disk and copy it, as a resume does.
    None when the database holds no experiment yet (nothing to protect)."""
    if conn.execute("SELECT 1 FROM experiments LIMIT 1").fetchone() is None:
        return None
    check_disk(db_path, 0, with_backup=True)
    return make_backup(db_path, label=RUN_BACKUP)


def make_backup(db_path: Path, *, keep: int = KEEP, label: str = RESUME_BACKUP,
                on_snapshot: Callable[[], None] | None = None) -> Path:
    """`<db>.<label>_<time>`: before a resume writes (resume_backup), before a new run
    writes into a database holding experiments (pre_run_backup), before a migration
    (pre_migration_backup); the newest `keep` of each label are kept, so a series of new
    runs never rotates a resume's backups away.

    The copy is the database as of one read snapshot, taken first: `on_snapshot()` is
    called once it is, and from then on other connections may write (WAL mode: they do not
    disturb a reader, and the whole copy is one backup step inside that read)."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    target = db_path.with_name(f"{db_path.name}.{label}_{stamp}")
    n = 1
    while target.exists():
        target = db_path.with_name(f"{db_path.name}.{label}_{stamp}_{n}")
        n += 1
    partial = target.with_name(target.name + ".partial")
    try:
        with closing(sqlite3.connect(str(db_path), isolation_level=None)) as src, \
                closing(sqlite3.connect(str(partial))) as dst:
            src.execute("BEGIN")
            src.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # the snapshot
            if on_snapshot is not None:
                on_snapshot()
            src.backup(dst)
            src.execute("COMMIT")
    except BaseException:
        # A half-written copy (disk full, interrupted) is no backup, and prune() never
        # sees `.partial` files: remove it here or it stays forever.
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    prune(db_path, keep=keep, label=label)
    return target


class BackgroundBackup:
    """`make_backup` on a thread of its own, started once the disk has room for it. What a
    resume does first (hash the data file, plan, send its first requests) runs beside the
    copy instead of after it; SQLite's backup and hashlib both run without the GIL.

    `snapshot()` waits only until the copy's read snapshot is taken: the database may
    change from then on and the backup still shows it as it was, which is what a resume
    must have before it writes. `result()` waits for the whole copy and raises what stopped
    it; leaving the block waits for it too, so no copy is left half-written behind the
    process."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._made: Path | None = None
        self._error: BaseException | None = None
        self._taken = threading.Event()   # the snapshot is taken, or the copy ended
        self.snapshot_taken = False
        self._thread = threading.Thread(target=self._copy, name="resume-backup", daemon=True)

    def _copy(self) -> None:
        try:
            self._made = make_backup(self.db_path, on_snapshot=self._on_snapshot)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            self._error = exc
        finally:
            self._taken.set()

    def _on_snapshot(self) -> None:
        self.snapshot_taken = True
        self._taken.set()

    def snapshot(self) -> None:
        """Return once the backup's snapshot is taken; raise what stopped it before."""
        self._taken.wait()
        if not self.snapshot_taken:
            self.result()        # raises the copy's error

    def __enter__(self) -> BackgroundBackup:
        check_disk(self.db_path, 0, with_backup=True)
        self._thread.start()
        return self

    def result(self) -> Path:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._made is not None
        return self._made

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._thread.join()


def list_backups(db_path: Path, label: str = RESUME_BACKUP) -> list[Path]:
    found = [p for p in db_path.parent.glob(backup_pattern(db_path, label))
             if not p.name.endswith(".partial")]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def prune(db_path: Path, *, keep: int = KEEP, label: str = RESUME_BACKUP) -> None:
    for old in list_backups(db_path, label)[:-keep]:
        old.unlink(missing_ok=True)
