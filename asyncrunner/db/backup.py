"""Consistent database backups before a resume, a new run into a database holding
experiments, or a migration changes anything.

SQLite's online backup API copies a consistent snapshot even while the database is in WAL
mode with a `-wal` file beside it; a plain file copy of the main file would miss committed
pages still in the WAL. The newest `KEEP` backups of a database are kept.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from asyncrunner.errors import RefusedError

KEEP = 3
# A result row with its raw response is a few KiB; this is generous on purpose.
BYTES_PER_RESULT = 8 * 1024
HEADROOM_BYTES = 50 * 1024 * 1024


RESUME_BACKUP = "resume_backup"
RUN_BACKUP = "pre_run_backup"   # a new run into a database holding experiments


def backup_pattern(db_path: Path, label: str = RESUME_BACKUP) -> str:
    return f"{db_path.name}.{label}_*"


def required_bytes(db_path: Path, remaining: int) -> int:
    size = db_path.stat().st_size if db_path.exists() else 0
    wal = db_path.with_name(db_path.name + "-wal")
    size += wal.stat().st_size if wal.exists() else 0
    return size + remaining * BYTES_PER_RESULT + HEADROOM_BYTES


def check_disk(db_path: Path, remaining: int, *, with_backup: bool) -> None:
    """Refuse to start a run that cannot fit its backup and its growth on the disk."""
    need = required_bytes(db_path, remaining)
    if not with_backup:
        need -= db_path.stat().st_size if db_path.exists() else 0
    free = shutil.disk_usage(db_path.resolve().parent).free
    if free < need:
        raise RefusedError(
            f"not enough disk space beside {db_path}: {_mib(free)} free, {_mib(need)} needed "
            "(backup of the database plus room for the remaining results); free some space"
        )


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.0f} MiB"


def make_backup(db_path: Path, *, keep: int = KEEP, label: str = RESUME_BACKUP) -> Path:
    """`<db>.<label>_<time>`: before a resume writes (resume_backup), before a new run
    writes into a database holding experiments (pre_run_backup), before a migration
    (pre_migration_backup); the newest `keep` of each label are kept, so a series of new
    runs never rotates a resume's backups away."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    target = db_path.with_name(f"{db_path.name}.{label}_{stamp}")
    n = 1
    while target.exists():
        target = db_path.with_name(f"{db_path.name}.{label}_{stamp}_{n}")
        n += 1
    partial = target.with_name(target.name + ".partial")
    try:
        with closing(sqlite3.connect(str(db_path))) as src, \
                closing(sqlite3.connect(str(partial))) as dst:
            src.backup(dst)
    except BaseException:
        # A half-written copy (disk full, interrupted) is no backup, and prune() never
        # sees `.partial` files: remove it here or it stays forever.
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    prune(db_path, keep=keep, label=label)
    return target


def list_backups(db_path: Path, label: str = RESUME_BACKUP) -> list[Path]:
    found = [p for p in db_path.parent.glob(backup_pattern(db_path, label))
             if not p.name.endswith(".partial")]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def prune(db_path: Path, *, keep: int = KEEP, label: str = RESUME_BACKUP) -> None:
    for old in list_backups(db_path, label)[:-keep]:
        old.unlink(missing_ok=True)
