"""The PID lock: exclusive, names its holder, survives kill -9 of the holder as stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyncrunner.db.locks import ExperimentLock, lock_path, probe
from asyncrunner.errors import RefusedError
from asyncrunner.ids import new_experiment_id, require_uuid

HOLD = """
import sys, time
from asyncrunner.db.locks import ExperimentLock
lock = ExperimentLock(sys.argv[1], sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def hold_in_subprocess(db: Path, eid: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(db), eid],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_file_beside_db_and_released(tmp_path: Path) -> None:
    db, eid = tmp_path / "x.db", new_experiment_id()
    with ExperimentLock(db, eid):
        path = lock_path(db, eid)
        assert path.name == f".resume_lock_{eid}.pid"
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert probe(db, eid).held
    assert not path.exists()
    assert not probe(db, eid).held


def test_second_holder_refused_naming_pid(tmp_path: Path) -> None:
    db, eid = tmp_path / "x.db", new_experiment_id()
    proc = hold_in_subprocess(db, eid)
    try:
        started = time.monotonic()
        with pytest.raises(RefusedError, match=f"PID {proc.pid}"):
            ExperimentLock(db, eid).acquire()
        assert time.monotonic() - started < 1.0
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def test_lock_of_killed_process_is_stale_and_replaced(tmp_path: Path) -> None:
    db, eid = tmp_path / "x.db", new_experiment_id()
    proc = hold_in_subprocess(db, eid)
    stop(proc)
    assert lock_path(db, eid).exists()  # kill -9 leaves the file behind
    assert not probe(db, eid).held
    lock = ExperimentLock(db, eid).acquire()
    try:
        assert lock.stale_holder is not None and lock.stale_holder["pid"] == proc.pid
    finally:
        lock.release()


@pytest.mark.parametrize("bad", ["", "abc", "../../etc/passwd", "1234", "{" + "0" * 32 + "}",
                                 "3F2B8C1E-0000-4000-8000-000000000000x"])
def test_ids_must_be_uuids(bad: str) -> None:
    with pytest.raises(RefusedError, match="not a"):
        require_uuid(bad)
    with pytest.raises(RefusedError):
        lock_path("/tmp/x.db", bad)
