"""A new experiment on a CSV starts before the file is loaded (db/loading.py,
pipeline/loading.py): the rest is committed step by step beside the pipeline, and however
the run ends the database holds exactly what a whole load in one transaction holds.

In-process sessions (FakeLLM over httpx.MockTransport, real SQLite files) with small steps,
so that a 100-case file takes dozens of them; a real process killed with SIGKILL mid-load
at the end."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli_env, run_cli, write_config, write_fixture_csv
from fake_llm import FakeLLM, experiment_row

from asyncrunner.config import load_config
from asyncrunner.db import checksums, loading
from asyncrunner.db.ingest import (
    ORIGIN_LOADING,
    Loader,
    check_csv,
    file_checksum,
    ingest,
    mapping_json,
)
from asyncrunner.db.schema import connect, transaction
from asyncrunner.errors import InputError, Stopped
from asyncrunner.plan import RunRequest
from asyncrunner.session import RunSummary, execute
from asyncrunner.sim import MockServer
from asyncrunner.vocab import Status


def rows(n: int) -> list[tuple[str, ...]]:
    """n cases: every 7th LE text blank, every 11th CME a placeholder-free punctuation
    mark (dropped), every 13th case repeating the id before it (a duplicate)."""
    out = []
    for i in range(n):
        case = f"{i - 1 if i % 13 == 12 else i:05d}"
        le = "" if i % 7 == 3 else f"Her partner was arrested, case {i}" if i % 3 == 0 \
            else f"Found at home, case {i}"
        cme = "--" if i % 11 == 5 else f"Examiner notes {i}"
        out.append((case, le, cme, "1" if i % 3 == 0 else "0", "no", "True" if i % 3 == 0
                    else "False"))
    return out


@pytest.fixture
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "STEP_NARRATIVES", 3)


def start(db: Path, cfg: Path, fake: FakeLLM) -> RunSummary:
    return execute(RunRequest(db_path=db, config_path=str(cfg), env={}), io.StringIO(),
                   transport=fake.transport())


def resume(db: Path, experiment_id: str, fake: FakeLLM) -> RunSummary:
    return execute(RunRequest(db_path=db, config_path=None, resume=True,
                              experiment_id=experiment_id, env={}),
                   io.StringIO(), transport=fake.transport())


def contents(db: Path) -> dict[str, Any]:
    """What a load leaves: narratives in id order, drops in order, the ingest record (the
    load's time aside)."""
    with closing(sqlite3.connect(db)) as conn:
        return {
            "narratives": conn.execute(
                "SELECT incident_id, narrative_type, narrative_text, manual_flag_ind, "
                "manual_flag, data_source, data_checksum FROM source_narratives "
                "ORDER BY narrative_id").fetchall(),
            "drops": conn.execute(
                "SELECT data_checksum, row_number, incident_id, narrative_type, reason, "
                "manual_flag_ind, manual_flag, kept_row_number, has_text, label_conflict, "
                "text_differs FROM ingest_drops ORDER BY rowid").fetchall(),
            "ingests": conn.execute(
                "SELECT data_checksum, mapping_json, data_source, n_rows, n_narratives, "
                "n_blank, n_duplicates, n_placeholder, n_no_id, rows_digest, content_digest, "
                "data_path, origin FROM ingests").fetchall(),
        }


def loaded_whole(tmp_path: Path, cfg: Path) -> dict[str, Any]:
    """The same file loaded by `ingest` in one transaction, into a database of its own."""
    db = tmp_path / "whole.db"
    config = load_config(cfg)
    with closing(connect(db)) as conn:
        ingest(conn, config.data, Path(config.data.file))
    return contents(db)


def results(db: Path, experiment_id: str) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT incident_id, narrative_type FROM narrative_results "
                            "WHERE experiment_id = ? ORDER BY incident_id, narrative_type",
                            (experiment_id,)).fetchall()


def run_log(tmp_path: Path, experiment_id: str) -> list[dict[str, Any]]:
    [path] = (tmp_path / "logs" / experiment_id).glob("*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_on(tmp_path: Path, n_cases: int, **run: Any) -> tuple[Path, Path, RunSummary]:
    """A new experiment on a CSV of `n_cases` cases, run to its end: (db, config, summary)."""
    data = write_fixture_csv(tmp_path / "cases.csv", rows(n_cases))
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1", **{"workers": 4,
                                                                  "batch_size": 4} | run)
    db = tmp_path / "runs.db"
    return db, cfg, start(db, cfg, FakeLLM())


def origin(db: Path) -> str | None:
    with closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT origin FROM ingests").fetchone()
    return row[0] if row else None


def test_a_run_starts_on_the_first_step_and_ends_with_the_whole_file(
        tmp_path: Path, small_steps: None, console: io.StringIO) -> None:
    db, cfg, summary = run_on(tmp_path, 100, commit_interval_s=0.05)
    data = tmp_path / "cases.csv"
    whole = loaded_whole(tmp_path, cfg)
    assert contents(db) == whole and whole["ingests"][0][-1] is None
    total = whole["ingests"][0][4]
    assert summary.status is Status.COMPLETED
    got = results(db, summary.experiment_id)
    assert len(got) == len(set(got)) == total == len(whole["narratives"])
    row = experiment_row(db, summary.experiment_id)
    assert row["n_narratives_total"] == row["n_narratives_completed"] == total
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT target FROM sessions").fetchone()[0] == total
    events = run_log(tmp_path, summary.experiment_id)
    [begun] = [e for e in events if e["event"] == "run_start"]
    assert "3 narratives so far (the file is still loading)" in begun["message"]
    [done] = [e for e in events if e["event"] == "ingest"]
    assert done["message"].startswith(f"data {data}: {total} narratives; not sent")
    assert [e["event"] for e in events].index("loading") < [
        e["event"] for e in events].index("ingest")


def test_max_narratives_are_the_first_ones_of_a_file_still_loading(
        tmp_path: Path, small_steps: None, console: io.StringIO) -> None:
    db, cfg, summary = run_on(tmp_path, 60, max_narratives=10)
    assert summary.status is Status.COMPLETED
    first_ten = sorted((r[0], r[1]) for r in loaded_whole(tmp_path, cfg)["narratives"][:10])
    assert results(db, summary.experiment_id) == first_ten
    assert experiment_row(db, summary.experiment_id)["n_narratives_total"] == 10
    assert origin(db) is None      # the file was still loaded whole


def interrupted_while_loading(tmp_path: Path, cfg: Path, db: Path) -> str:
    """A run stopped by a real SIGINT at its third request, its file still loading."""
    out = io.StringIO()
    fake = FakeLLM(delay_s=0.01).after(3, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(Stopped):
        execute(RunRequest(db_path=db, config_path=str(cfg), env={}), out,
                transport=fake.transport())
    assert origin(db) == ORIGIN_LOADING
    return out.getvalue().splitlines()[0].removeprefix("experiment_id: ")


@pytest.fixture
def one_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "STEP_NARRATIVES", 1)


def test_stopped_while_loading_the_resume_loads_the_rest_first(
        tmp_path: Path, one_per_step: None, console: io.StringIO) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv", rows(400))
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1", workers=2, batch_size=2)
    db = tmp_path / "runs.db"
    experiment_id = interrupted_while_loading(tmp_path, cfg, db)
    assert experiment_row(db, experiment_id)["status"] == "interrupted"
    summary = resume(db, experiment_id, FakeLLM())
    whole = loaded_whole(tmp_path, cfg)
    assert summary.status is Status.COMPLETED and contents(db) == whole
    total = whole["ingests"][0][4]
    got = results(db, experiment_id)
    assert len(got) == len(set(got)) == total
    assert experiment_row(db, experiment_id)["n_narratives_total"] == total


def test_another_run_on_the_file_finishes_the_load_before_it_starts(
        tmp_path: Path, one_per_step: None, console: io.StringIO) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv", rows(400))
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1", workers=2, batch_size=2,
                       max_narratives=5)
    db = tmp_path / "runs.db"
    first = interrupted_while_loading(tmp_path, cfg, db)
    second = start(db, cfg, FakeLLM())
    whole = loaded_whole(tmp_path, cfg)
    assert second.status is Status.COMPLETED and contents(db) == whole
    assert resume(db, first, FakeLLM()).status is Status.COMPLETED
    assert contents(db) == whole
    assert results(db, first) == results(db, second.experiment_id)
    assert len(results(db, first)) == 5


def test_a_step_stops_when_another_process_finished_the_load(
        tmp_path: Path, small_steps: None) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv", rows(50))
    cfg = load_config(write_config(tmp_path, data, "http://llm.invalid/v1"))
    db = tmp_path / "runs.db"
    checksum = file_checksum(data)
    with closing(connect(db)) as conn, closing(connect(db)) as other:
        begun = loading.start(conn, cfg.data, data, checksum, None)
        assert isinstance(begun, loading.BackgroundLoad)
        begun.step(db)
        ingest(other, cfg.data, data, checksum=checksum)       # finishes it
        progress = begun.step(db)
        assert begun.step(db) == progress
    whole = loaded_whole(tmp_path, write_config(tmp_path, data, "http://x/v1"))
    assert contents(db) == whole
    assert progress.finished and progress.n_narratives == len(whole["narratives"])


def test_a_bad_label_anywhere_refuses_before_anything_is_stored(
        tmp_path: Path, small_steps: None) -> None:
    bad = rows(80)
    bad[-1] = (*bad[-1][:3], "maybe", *bad[-1][4:])
    data = write_fixture_csv(tmp_path / "cases.csv", bad)
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1")
    db = tmp_path / "runs.db"
    fake = FakeLLM()
    with pytest.raises(InputError, match=r"row 81, column 'ManualFlagLE': cannot read 'maybe'"):
        start(db, cfg, fake)
    assert fake.requests == 0
    with closing(sqlite3.connect(db)) as conn:
        for table in ("experiments", "ingests", "source_narratives", "ingest_drops"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table


def test_kill_9_while_loading_then_resume_gives_the_whole_file_and_every_result(
        tmp_path: Path, server_factory: Any) -> None:
    """Real processes, default steps: a file of 24,000 narratives loads in five steps
    while a run of its first 300 goes on; SIGKILL lands at random moments, the resume
    finishes the load and the run."""
    server: MockServer = server_factory(latency_ms=0)
    data = write_fixture_csv(tmp_path / "cases.csv", rows(12_000))
    cfg = write_config(tmp_path, data, server.url, workers=8, batch_size=20,
                       max_narratives=300, model={"api_key_env": None})
    whole = loaded_whole(tmp_path, cfg)
    rng = random.Random(20261201)
    mid_load = 0
    for trial in range(5):
        db = tmp_path / f"trial{trial}.db"
        proc = subprocess.Popen([sys.executable, "-m", "asyncrunner", "run", str(cfg),
                                 "--db", str(db)], cwd=ROOT, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _has_experiment(db):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        mid_load += origin(db) == ORIGIN_LOADING
        with closing(sqlite3.connect(db)) as conn:
            [(experiment_id, status)] = conn.execute(
                "SELECT experiment_id, status FROM experiments")
        if status != "completed":         # else the kill came after the run's end
            res = run_cli("resume", experiment_id, "--db", str(db))
            assert res.returncode == 0, (trial, res.stderr)
        assert contents(db) == whole, trial
        got = results(db, experiment_id)
        assert len(got) == len(set(got)) == 300, trial
    assert mid_load >= 2, f"only {mid_load} kills landed while the file was loading"


def _has_experiment(db: Path) -> bool:
    if not db.exists():
        return False
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return bool(conn.execute("SELECT COUNT(*) FROM experiments").fetchone()[0])
    except sqlite3.OperationalError:
        return False


def test_an_unfinished_load_that_does_not_match_the_file_is_refused(
        tmp_path: Path, small_steps: None) -> None:
    """Finishing a load reads the file again past what was committed; if the last row
    committed is not the file's row at that place, nothing more is written."""
    data = write_fixture_csv(tmp_path / "cases.csv", rows(50))
    cfg = load_config(write_config(tmp_path, data, "http://llm.invalid/v1"))
    db = tmp_path / "runs.db"
    checksum = file_checksum(data)
    with closing(connect(db)) as conn:
        begun = loading.start(conn, cfg.data, data, checksum, None)
        assert isinstance(begun, loading.BackgroundLoad)
        begun.step(db)
        begun.close()
        conn.execute("UPDATE source_narratives SET incident_id = 'elsewhere' WHERE "
                     "narrative_id = (SELECT MAX(narrative_id) FROM source_narratives)")
        before = contents(db)
        with pytest.raises(InputError, match="its unfinished load does not match"):
            ingest(conn, cfg.data, data, checksum=checksum)
    assert contents(db) == before and origin(db) == ORIGIN_LOADING


def test_a_new_csv_is_checked_and_hashed_in_one_reading(
        tmp_path: Path, small_steps: None, console: io.StringIO,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the run starts the file is read once: the check that refuses bad content
    computes the checksum too (no second pass only to hash it)."""
    def not_read(path: Path) -> str:
        raise AssertionError(f"{path} was hashed in a pass of its own")

    monkeypatch.setattr(checksums, "readable_checksum", not_read)
    db, _, summary = run_on(tmp_path, 40, workers=2)
    assert summary.status is Status.COMPLETED
    assert experiment_row(db, summary.experiment_id)["data_checksum"] \
        == file_checksum(tmp_path / "cases.csv")


def test_the_check_names_the_repeated_ids_and_a_load_remembering_only_them_is_the_same(
        tmp_path: Path) -> None:
    """A load beside a run remembers only the narratives of ids the check saw on more than
    one row (the rest cannot be duplicates): it must store exactly what a load that
    remembers every narrative stores, drops and digests included."""
    cases = [
        *rows(60),
        (" 00005 ", "Again, case 5 with spaces", "", "1", "yes", "True"),  # the same id
        ("00007", "", "", "0", "no", "False"),       # a repeat with no narrative at all
        ("00003", "Seen a third time", "Examiner, third", "0", "no", "False"),
        ("00003", "Seen a fourth time", "", "1", "yes", "True"),
        ("", "No id, so never a duplicate", "x", "0", "no", "False"),
    ]
    data = write_fixture_csv(tmp_path / "cases.csv", cases)
    config = load_config(write_config(tmp_path, data, "http://llm.invalid/v1"))
    check = check_csv(config.data, data)
    ids = [case[0].strip() for case in cases if case[0].strip()]
    assert check.repeated_ids == {i for i in set(ids) if ids.count(i) > 1}
    assert {"00005", "00007", "00003", "00011"} <= check.repeated_ids
    assert check.checksum == file_checksum(data)

    db = tmp_path / "beside.db"
    with closing(connect(db)) as conn, transaction(conn), \
            closing(Loader(config.data, data, check.checksum,
                           repeated=check.repeated_ids)) as loader:
        while not loader.finished:
            loader.step(conn, 7)
        loader.record(conn, mapping_json(config.data))
    assert contents(db) == loaded_whole(tmp_path, tmp_path / "cfg.yaml")
    assert contents(db)["drops"]            # duplicates and blanks were recorded
