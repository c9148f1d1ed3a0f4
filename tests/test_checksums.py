"""db/checksums.py: a data file's MD5 is read again unless the file's identity (device,
inode, size, modification and status-change times) is the one recorded with it, and an
identity is recorded only when it had settled before the hashing began."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from asyncrunner.db import checksums
from asyncrunner.db.schema import connect, transaction
from asyncrunner.errors import InputError

LATER = 3600.0   # a clock this far ahead: every file on disk has settled


def later() -> float:
    return time.time() + LATER


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with closing(connect(tmp_path / "runs.db")) as c:
        yield c


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def remembered(conn: sqlite3.Connection, path: Path) -> checksums.Checked:
    checked = checksums.checksum(conn, path, clock=later)
    with transaction(conn):
        checksums.remember(conn, checked)
    return checked


def pretend_recorded(conn: sqlite3.Connection, checksum: str) -> None:
    """Overwrite the recorded checksum: whatever comes back as it was not read."""
    conn.execute("UPDATE data_file_checksums SET data_checksum = ?", (checksum,))


def test_a_settled_file_is_recorded_and_then_not_read_again(conn: sqlite3.Connection,
                                                            tmp_path: Path) -> None:
    data = tmp_path / "cases.csv"
    data.write_text("IncidentID,NarrativeLE\n1,text\n")
    first = remembered(conn, data)
    assert first.checksum == md5(data) and first.identity is not None
    assert first.path == str(data.resolve())
    pretend_recorded(conn, "recorded")
    again = checksums.checksum(conn, data)
    assert (again.checksum, again.identity) == ("recorded", None)
    # The same file by another spelling of its path.
    other = checksums.checksum(conn, tmp_path / "." / "cases.csv")
    assert other.checksum == "recorded"


def test_a_fresh_file_is_read_but_not_recorded(conn: sqlite3.Connection,
                                               tmp_path: Path) -> None:
    """Written just now: an edit within the timestamp granularity could keep its identity."""
    data = tmp_path / "cases.csv"
    data.write_text("IncidentID,NarrativeLE\n1,text\n")
    checked = checksums.checksum(conn, data)
    assert checked.checksum == md5(data) and checked.identity is None
    with transaction(conn):
        checksums.remember(conn, checked)
    assert conn.execute("SELECT COUNT(*) FROM data_file_checksums").fetchone()[0] == 0


@pytest.mark.parametrize("edit", ["longer", "same size, later time", "replaced, same times"])
def test_an_edited_or_replaced_file_is_read_again(conn: sqlite3.Connection, tmp_path: Path,
                                                  edit: str) -> None:
    data = tmp_path / "cases.csv"
    data.write_text("IncidentID,NarrativeLE\n1,text\n")
    remembered(conn, data)
    pretend_recorded(conn, "recorded")
    st = data.stat()
    if edit == "longer":
        data.write_text("IncidentID,NarrativeLE\n1,text\n2,more\n")
    elif edit == "same size, later time":
        data.write_text("IncidentID,NarrativeLE\n1,TEXT\n")
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    else:
        # Another file with the same size and modification time, renamed over it.
        other = tmp_path / "copy.csv"
        other.write_text("IncidentID,NarrativeLE\n1,TEXT\n")
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(other, data)
    checked = checksums.checksum(conn, data, clock=later)
    assert checked.checksum == md5(data) != "recorded"
    assert checked.identity is not None


def test_a_copy_elsewhere_is_read(conn: sqlite3.Connection, tmp_path: Path) -> None:
    data = tmp_path / "cases.csv"
    data.write_text("IncidentID,NarrativeLE\n1,text\n")
    remembered(conn, data)
    pretend_recorded(conn, "recorded")
    copy = tmp_path / "elsewhere.csv"
    shutil.copy2(data, copy)
    assert checksums.checksum(conn, copy).checksum == md5(data)


def test_nothing_to_record_writes_nothing(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        checksums.remember(conn, None)
        checksums.remember(conn, checksums.Checked("/x.csv", "abc"))
    assert conn.execute("SELECT COUNT(*) FROM data_file_checksums").fetchone()[0] == 0


def test_an_unreadable_file_is_one_line(conn: sqlite3.Connection, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^data file .*missing\.csv cannot be read: ") as err:
        checksums.checksum(conn, tmp_path / "missing.csv")
    assert "\n" not in str(err.value)
