"""Disk space: the free-space check before a run, and a full disk named when it happens.

A full disk shows up in three guises: SQLite's "database or disk is full" (SQLITE_FULL,
from the writer's commits or any other statement), an OSError with errno ENOSPC (exports,
reports, backups), or EDQUOT on a quota. Wherever it surfaces, often wrapped in an
exception group or as the cause of another error, it is named the same way: "disk full:
N MiB free at PATH", so the operator knows what to free and where.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from asyncrunner.errors import DiskFull, RefusedError

SQLITE_IOERR = 10
SQLITE_FULL = 13
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
RESERVE_BYTES = 1024 * 1024


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether `exc` is a full disk. SQLite reports a failed write of its -wal or -shm
    file as a plain "disk I/O error" (SQLITE_IOERR, the errno not exposed): with `where`
    (the database) given, that counts as a full disk when its disk has (almost) no room."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code == SQLITE_FULL or "database or disk is full" in str(exc):
            return True
        io_error = (code is not None and code & 0xFF == SQLITE_IOERR) \
            or "disk I/O error" in str(exc)
        if where is not None and io_error:
            free = free_bytes(where)
            return free is not None and free < RESERVE_BYTES
        return False
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


def disk_full_cause(exc: BaseException, where: Path | None = None) -> BaseException | None:
    """The first disk-full error inside `exc`: itself, an exception group's members, or
    the chain of causes and contexts (bounded: chains can be cyclic)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 200:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if is_disk_full(e, where):
            return e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None


def existing_parent(path: Path) -> Path:
    """The nearest directory of `path` that exists (an output directory may not yet)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p if p.is_dir() else p.parent


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(existing_parent(path)).free
    except OSError:
        return None


def mib(n: int) -> str:
    return f"{n / 1024 / 1024:.0f} MiB"


def disk_full_error(exc: BaseException, fallback: Path, *, then: str) -> DiskFull:
    """A DiskFull naming where the disk is full: the file an OSError names, else
    `fallback` (the database, for SQLite's error); `then` says what to do next."""
    filename = getattr(exc, "filename", None)
    where = existing_parent(Path(filename)) if isinstance(filename, str) and filename \
        else existing_parent(fallback)
    free = free_bytes(where)
    amount = mib(free) if free is not None else "unknown space"
    return DiskFull(f"disk full: {amount} free at {where}; {then}")


def check_free_space(needs: Iterable[tuple[Path, int, str]]) -> None:
    """Refuse to start when the disks cannot hold what the run will write. `needs` are
    (path, bytes, what) triples; paths on the same filesystem share its free space."""
    by_device: dict[int, tuple[Path, int, list[str]]] = {}
    for path, n_bytes, what in needs:
        where = existing_parent(path)
        try:
            device = os.stat(where).st_dev
        except OSError:
            continue
        held = by_device.get(device)
        if held is None:
            by_device[device] = (where, n_bytes, [what])
        else:
            by_device[device] = (held[0], held[1] + n_bytes, [*held[2], what])
    for where, need, whats in by_device.values():
        free = free_bytes(where)
        if free is not None and free < need:
            raise RefusedError(
                f"not enough disk space at {where}: {mib(free)} free, {mib(need)} needed "
                f"({' + '.join(whats)}); free some space")



class SpaceReserve:
    """A small file beside the database, given back when the disk fills up.

    When a commit fails for lack of space, recording that the experiment is interrupted
    is a write too, and would fail the same way; deleting the reserve first leaves it room.
    The file is removed when the session ends (a kill -9 leaves it; the next session reuses
    it)."""

    def __init__(self, db_path: Path, experiment_id: str) -> None:
        # One per experiment: two experiments may run into one database at once.
        self.path = db_path.with_name(f"{db_path.name}-reserve-{experiment_id}")
        self.held = False

    def __enter__(self) -> SpaceReserve:
        try:
            with self.path.open("wb") as fh:
                fh.write(b"\0" * RESERVE_BYTES)
            self.held = True
        except OSError:
            self.path.unlink(missing_ok=True)     # no room even for this: go without
        return self

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.held = False

    def __exit__(self, *exc: object) -> None:
        self.release()
