"""A data file's MD5 without reading the file again when it cannot have changed.

Every run and every resume checks the data file against the checksum it was loaded under:
for a 150 MiB file that is a quarter of a second of hashing before the first request, and
a study pays it once per cell. Like git's index, the checksum is remembered with the
file's identity as the file system reports it (device, inode, size, modification and
status-change times, to the nanosecond) and trusted while that identity is unchanged:
every write changes the modification time, and the status-change time cannot be set back
by anyone. The one window where an identity can stay the same across an edit is a write
within the file system's timestamp granularity (up to 2 s on FAT) of the last one; so an
identity is remembered only when both of its times are older than the hashing by more
than that. A file replaced by another (copied, renamed over) has another inode and
status-change time and is hashed.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asyncrunner.db.ingest import readable_checksum
from asyncrunner.errors import InputError

# Older than this before hashing began, or the identity is not remembered (see above).
SETTLED_S = 2.0


@dataclass(frozen=True, slots=True)
class Identity:
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> Identity:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise InputError(f"data file {path} cannot be read: {exc.strerror or exc}") from None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class Checked:
    """A file's checksum, and the identity to remember it by (None: nothing to record,
    because it came from the record or the file was too fresh to trust)."""

    path: str               # resolved
    checksum: str
    identity: Identity | None = None


def checksum(conn: sqlite3.Connection, path: Path,
             clock: Callable[[], float] = time.time,
             read: Callable[[Path], str] = readable_checksum) -> Checked:
    """The MD5 of `path`: remembered, when its identity is the one recorded with it;
    otherwise `read` (an unreadable file is an InputError, one line; a reading that checks
    the file as it hashes it may refuse it too)."""
    resolved = str(Path(path).resolve())
    before = Identity.of(path)
    row = conn.execute(
        "SELECT data_checksum, device, inode, size, mtime_ns, ctime_ns "
        "FROM data_file_checksums WHERE path = ?", (resolved,)).fetchone()
    if row is not None and Identity(*row[1:]) == before:
        return Checked(resolved, row[0])
    started_ns = int(clock() * 1e9)
    digest = read(path)
    settled = started_ns - int(SETTLED_S * 1e9)
    trusted = (Identity.of(path) == before and before.mtime_ns < settled
               and before.ctime_ns < settled)
    return Checked(resolved, digest, before if trusted else None)


def remember(conn: sqlite3.Connection, checked: Checked | None) -> None:
    """Record a freshly read checksum with its identity (inside the caller's transaction,
    so it is written only by a session that writes anyway)."""
    if checked is None or checked.identity is None:
        return
    i = checked.identity
    conn.execute(
        "INSERT OR REPLACE INTO data_file_checksums (path, data_checksum, device, inode, "
        "size, mtime_ns, ctime_ns, checked_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))",
        (checked.path, checked.checksum, i.device, i.inode, i.size, i.mtime_ns, i.ctime_ns))
