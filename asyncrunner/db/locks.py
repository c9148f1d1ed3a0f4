"""The per-experiment PID lock file: `.resume_lock_<experiment_id>.pid` beside the database.

Mutual exclusion comes from `flock` on the file, not from its contents: the kernel drops the
lock when its process dies, `kill -9` included, so there is no window in which two processes
both hold it and no PID-reuse guess. The file records who holds it (PID, process start time,
host, time) so a refusal can name the holder and a leftover file from a dead process can be
reported as stale before it is replaced.

Other writers: the R version wrote a bare PID and a newline and never took a `flock`. Such a
file whose PID is a running process (not this one) counts as held: the lock is refused
(exit 3) and the file left as it is, since nothing tells an R run from an unrelated process
that reused the PID; the message says to delete the file if that process is not a run of
this experiment. A bare PID of a process that is gone, or content nobody can read, is stale.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from asyncrunner import refusals
from asyncrunner.errors import RefusedError
from asyncrunner.ids import require_uuid


def lock_path(db_path: str | Path, experiment_id: str) -> Path:
    require_uuid(experiment_id)
    return Path(db_path).resolve().parent / f".resume_lock_{experiment_id}.pid"


def _process_start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux), to tell PID reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields resume after ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def parse_holder(text: str | bytes) -> dict[str, Any] | None:
    """Who a lock file names: our JSON record, or a bare PID as the R version wrote it;
    anything else (garbage, another program's format) names nobody."""
    try:
        data = json.loads(text or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, int) and not isinstance(data, bool):
        return {"pid": data, "format": BARE_PID}
    return data if isinstance(data, dict) else None


# `format` of a holder parsed from a bare PID (the R version's lock file).
BARE_PID = "bare-pid"


def foreign_holder(holder: dict[str, Any] | None) -> bool:
    """A bare-PID lock file (written without flock) naming another running process."""
    return bool(holder and holder.get("format") == BARE_PID
                and holder.get("pid") != os.getpid() and holder_alive(holder))


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return parse_holder(path.read_bytes())
    except OSError:
        return None


def holder_alive(holder: dict[str, Any] | None) -> bool:
    """Whether the process recorded in a lock file still runs (same PID *and* start time)."""
    if not holder or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    if pid <= 0:
        return False  # 0 and negatives name process groups, never a holder
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass
    started = holder.get("start_ticks")
    return started is None or _process_start_ticks(pid) in (None, started)


@dataclass(frozen=True, slots=True)
class LockState:
    held: bool
    holder: dict[str, Any] | None


def probe(db_path: str | Path, experiment_id: str) -> LockState:
    """Is the experiment's lock held by a live process right now? Takes nothing."""
    path = lock_path(db_path, experiment_id)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return LockState(False, None)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return LockState(True, read_holder(path))
    else:
        holder = read_holder(path)
        return LockState(foreign_holder(holder), holder)
    finally:
        os.close(fd)


class ExperimentLock:
    """Hold the experiment's lock for the lifetime of a run; released on every exit path."""

    def __init__(self, db_path: str | Path, experiment_id: str) -> None:
        self.path = lock_path(db_path, experiment_id)
        self.experiment_id = experiment_id
        self.stale_holder: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> ExperimentLock:
        # Bounded: each retry means another process unlinked the file between our open and
        # flock, which can only happen a handful of times before one of us wins.
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = read_holder(self.path) or {}
                raise refusals.locked(self.experiment_id, holder.get("pid", "?"),
                                      self.path) from None
            if self._same_file(fd):
                previous = os.read(fd, 4096)
                named = parse_holder(previous) if previous.strip() else None
                if named is not None and foreign_holder(named):
                    os.close(fd)  # not ours: released, the file left as it was
                    raise refusals.locked_by_pid_file(self.experiment_id, named["pid"],
                                                      self.path)
                self._fd = fd
                self._record_holder(fd, previous)
                return self
            os.close(fd)
        raise RefusedError(f"could not take the lock file {self.path}; try again")

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _record_holder(self, fd: int, previous: bytes) -> None:
        if previous.strip():
            self.stale_holder = parse_holder(previous) or {"pid": None}
        pid = os.getpid()
        info = {
            "pid": pid,
            "start_ticks": _process_start_ticks(pid),
            "host": socket.gethostname(),
            "acquired_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "experiment_id": self.experiment_id,
        }
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)

    def release(self) -> None:
        """Idempotent. Unlink while still holding the lock so no waiter grabs a dead inode."""
        if self._fd is None:
            return
        try:
            if self._same_file(self._fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ExperimentLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
