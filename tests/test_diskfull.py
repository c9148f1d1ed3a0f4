"""A full disk is named and survivable (#11): the first error is kept and reads "disk full:
N MiB free at PATH", the experiment stays resumable, no partial file stays behind, and the
free-space check before a run counts the exports and the report.

Where the test may mount a small tmpfs (root with CAP_SYS_ADMIN), the disk fills for real;
the same paths are also driven everywhere by a real SQLite "database or disk is full"
(the writer's connection limited with max_page_count) and a real ENOSPC write error.
"""

from __future__ import annotations

import errno
import io
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiosqlite
import pytest
from conftest import cli_env, run_cli
from fake_llm import FakeLLM, experiment_row
from test_structured_run import TOTAL, config, only_experiment, rows

from asyncrunner.db import schema
from asyncrunner.diskspace import disk_full_cause, is_disk_full
from asyncrunner.errors import DiskFull, RefusedError
from asyncrunner.plan import RunRequest
from asyncrunner.session import execute
from asyncrunner.vocab import Status

MiB = 1024 * 1024


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Any]:
    """mount(name, size_mib) -> a fresh tmpfs of that size, or None where mounting is not
    allowed; every mount is undone afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size_mib: int) -> Path | None:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs",
                               str(point)], capture_output=True, check=False)
        if done.returncode != 0:
            return None
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of `folder`'s filesystem with one file."""
    filler = folder / "filler.bin"
    chunk = b"\0" * MiB
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with filler.open("ab", buffering=0) as fh:   # and the last partial MiB
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def request(db: Path, cfg: Path | None, *, experiment_id: str | None = None) -> RunRequest:
    if experiment_id is None:
        return RunRequest(db_path=db, config_path=str(cfg), env={})
    return RunRequest(db_path=db, config_path=None, resume=True, experiment_id=experiment_id,
                      env={})


def assert_resumes_to_the_full_set(db: Path, experiment_id: str) -> None:
    record = experiment_row(db, experiment_id)
    assert record["status"] == "interrupted", record["failure_reason"]
    assert str(record["failure_reason"]).startswith("disk full: ")
    done = execute(request(db, None, experiment_id=experiment_id), io.StringIO(),
                   transport=FakeLLM().transport())
    assert done.status is Status.COMPLETED
    final = rows(db, experiment_id)
    assert len(final) == TOTAL
    assert len({(r["incident_id"], r["narrative_type"]) for r in final}) == TOTAL


# -- real SQLite and OS errors, everywhere ----------------------------------------------------

def test_disk_full_is_recognised_inside_groups_and_chains() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    assert is_disk_full(full) and is_disk_full(OSError(errno.ENOSPC, "No space left"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    try:
        try:
            raise full
        except sqlite3.Error as exc:
            raise RuntimeError("cannot rollback - no transaction is active") from exc
    except RuntimeError as wrapped:
        group = BaseExceptionGroup("tasks", [ValueError("x"), wrapped])
    assert disk_full_cause(group) is full
    assert disk_full_cause(BaseExceptionGroup("tasks", [ValueError("x")])) is None


def test_the_writer_hitting_a_full_database_keeps_the_error_and_stays_resumable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLITE_FULL from a commit: before the fix the stored reason was "cannot rollback -
    no transaction is active"."""
    real_open = schema.open_async

    @asynccontextmanager
    async def limited(path: str | Path) -> AsyncIterator[aiosqlite.Connection]:
        async with real_open(path) as db:
            pages = (await (await db.execute("PRAGMA page_count")).fetchone())[0]  # type: ignore[index]
            await db.execute(f"PRAGMA max_page_count = {pages + 2}")
            yield db

    monkeypatch.setattr("asyncrunner.pipeline.writer.open_async", limited)
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, "http://llm.invalid/v1", n_cases=40, batch_size=2)
    with pytest.raises(DiskFull, match=r"^disk full: \d+ MiB free at ") as stopped:
        execute(request(db, cfg), io.StringIO(), transport=FakeLLM().transport())
    assert f"at {tmp_path}" in str(stopped.value)
    assert "cannot rollback" not in str(stopped.value)
    experiment_id = only_experiment(db)
    kept = len(rows(db, experiment_id))
    assert 0 < kept < 80
    monkeypatch.setattr("asyncrunner.pipeline.writer.open_async", real_open)
    done = execute(request(db, None, experiment_id=experiment_id), io.StringIO(),
                   transport=FakeLLM().transport())
    assert done.status is Status.COMPLETED and len(rows(db, experiment_id)) == 80


def test_exports_failing_for_space_leave_no_partial_file_and_a_resumable_experiment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from the export's write: before, the status was already completed and a
    .partial file stayed. Now the experiment is completed only with its exports."""
    import asyncrunner.results.finalize as finalize

    class FullWriter:
        def __init__(self, fh: Any) -> None:
            pass

        def writerow(self, row: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        writerows = writerow

    db = tmp_path / "runs.db"
    cfg = config(tmp_path, "http://llm.invalid/v1")
    monkeypatch.setattr(finalize, "csv", SimpleNamespace(writer=FullWriter))
    with pytest.raises(DiskFull, match=r"^disk full: \d+ MiB free at ") as stopped:
        execute(request(db, cfg), io.StringIO(), transport=FakeLLM().transport())
    assert str(tmp_path / "out") in str(stopped.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    monkeypatch.undo()
    experiment_id = only_experiment(db)
    assert_resumes_to_the_full_set(db, experiment_id)
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()
                  if p.stem == experiment_id) == [".csv", ".json"]


# -- a real full disk (tmpfs) --------------------------------------------------------------------

def test_a_disk_filling_up_mid_run_is_named_and_resume_finishes(
        tmp_path: Path, mount_tmpfs: Any) -> None:
    disk = mount_tmpfs("disk", 80)
    if disk is None:
        pytest.skip("cannot mount a tmpfs here; the simulated SQLITE_FULL test covers it")
    db = disk / "runs.db"
    cfg = config(tmp_path, "http://llm.invalid/v1", n_cases=40, batch_size=2,
                 output_dir=str(disk / "out"))
    filler: list[Path] = []
    fake = FakeLLM().after(20, lambda: filler.append(fill(disk)))
    with pytest.raises(DiskFull, match=rf"^disk full: [01] MiB free at {disk}") as stopped:
        execute(request(db, cfg), io.StringIO(), transport=fake.transport())
    assert "resume" in str(stopped.value)
    assert not list(disk.glob("out/*.partial"))
    filler[0].unlink()
    experiment_id = only_experiment(db)
    record = experiment_row(db, experiment_id)
    assert record["status"] == "interrupted", record["failure_reason"]
    done = execute(request(db, None, experiment_id=experiment_id), io.StringIO(),
                   transport=FakeLLM().transport())
    assert done.status is Status.COMPLETED and len(rows(db, experiment_id)) == 80


def test_exports_filling_their_own_disk_leave_the_run_resumable(
        tmp_path: Path, mount_tmpfs: Any) -> None:
    out = mount_tmpfs("out", 20)
    if out is None:
        pytest.skip("cannot mount a tmpfs here; the simulated ENOSPC test covers it")
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, "http://llm.invalid/v1", output_dir=str(out))
    filler: list[Path] = []
    fake = FakeLLM().after(TOTAL, lambda: filler.append(fill(out)))
    with pytest.raises(DiskFull, match=rf"^disk full: [01] MiB free at {out}"):
        execute(request(db, cfg), io.StringIO(), transport=fake.transport())
    assert [p.name for p in out.iterdir()] == ["filler.bin"]
    filler[0].unlink()
    experiment_id = only_experiment(db)
    assert_resumes_to_the_full_set(db, experiment_id)


def test_the_free_space_check_counts_the_exports_on_their_own_disk(
        tmp_path: Path, mount_tmpfs: Any) -> None:
    out = mount_tmpfs("out", 4)
    if out is None:
        pytest.skip("cannot mount a tmpfs here")
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, "http://llm.invalid/v1", output_dir=str(out / "results"))
    with pytest.raises(RefusedError, match=rf"not enough disk space at {out}: .*"
                                           r"\(exports and report\)"):
        execute(request(db, cfg), io.StringIO(), transport=FakeLLM().transport())
    proc = run_cli("run", str(cfg), "--db", str(tmp_path / "cli.db"), env=cli_env())
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr and "exports and report" in proc.stderr
    assert list(out.iterdir()) == []


def test_the_cli_names_a_full_disk_in_one_line(tmp_path: Path, mount_tmpfs: Any) -> None:
    """A new run into a database on a full disk: its ingest fails; one line, no traceback,
    the database as it was."""
    disk = mount_tmpfs("disk", 80)
    if disk is None:
        pytest.skip("cannot mount a tmpfs here")
    db = disk / "runs.db"
    cfg = config(tmp_path, "http://llm.invalid/v1", n_cases=40)
    schema.connect(db).close()
    filler = fill(disk)
    proc = run_cli("run", str(cfg), "--db", str(db), env=cli_env())
    assert proc.returncode == DiskFull.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith(f"asyncrunner: error: disk full: 0 MiB free at {disk}")
    filler.unlink()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM source_narratives").fetchone() == (0,)
    conn.close()
