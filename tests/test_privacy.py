"""Files that hold narrative text or answers about it are private by default.

Real runs in real processes (the built-in simulator) under a permissive umask, then the mode
of everything they left: the database and its WAL/SHM files, the backup a second run takes,
the run log, exports and report, and the directories made for them.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, cli_env, write_config, write_fixture_csv


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_twice(tmp_path: Path, env: dict[str, str]) -> Path:
    """Two runs into one database (the second takes a backup first) under umask 022."""
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, "http://unused.invalid/v1", model={"provider": "mock"})
    db = tmp_path / "private" / "runs.db"
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", "import os, sys; os.umask(0o022); "
             "from asyncrunner.cli import main; sys.exit(main())", "run", str(cfg),
             "--db", str(db)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr
    return db


def test_everything_a_run_writes_is_private_by_default(tmp_path: Path) -> None:
    db = run_twice(tmp_path, cli_env())
    files = [*db.parent.iterdir(), *(tmp_path / "logs").rglob("*"),
             *(tmp_path / "out").rglob("*")]
    names = " ".join(p.name for p in files)
    # (the -wal and -shm files are gone after a clean close; they are made under the same umask)
    for part in ("pre_run_backup", "run.jsonl", ".csv", ".json", "_report.html"):
        assert part in names, part
    for path in files:
        assert mode(path) == (0o700 if path.is_dir() else 0o600), (path, oct(mode(path)))
    for folder in (db.parent, tmp_path / "out", tmp_path / "logs"):
        assert mode(folder) == 0o700, folder


def test_the_umask_is_kept_when_asked(tmp_path: Path) -> None:
    db = run_twice(tmp_path, cli_env(ASYNCRUNNER_FILE_MODE="umask"))
    assert mode(db) == 0o644 and mode(db.parent) == 0o755
    assert mode(next((tmp_path / "out").glob("*.csv"))) == 0o644
