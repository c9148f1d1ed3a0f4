"""Session paths that the CLI suites reach only through subprocesses, in-process: resuming
an experiment written by the R version, and a flag that only applies to a resume."""

from __future__ import annotations

import io
import sqlite3
from contextlib import closing
from pathlib import Path

from conftest import write_config, write_fixture_csv
from fake_llm import FakeLLM, result_keys
from test_r_era import N_CASES, R_PROMPT, R_RUNNING, TOTAL, build_r_database
from test_resume import cases

from asyncrunner.plan import RunRequest
from asyncrunner.session import execute
from asyncrunner.vocab import Status


def test_an_unfinished_r_experiment_resumes_in_process(tmp_path: Path,
                                                       console: io.StringIO) -> None:
    data = write_fixture_csv(tmp_path / "narratives.csv", cases(N_CASES))
    db = tmp_path / "production.db"
    build_r_database(db, data, "http://llm.invalid/v1")
    fake = FakeLLM()
    summary = execute(RunRequest(db_path=db, config_path=None, resume=True,
                                 experiment_id=R_RUNNING, env={}), io.StringIO(),
                      transport=fake.transport())
    assert summary.status is Status.COMPLETED
    keys = result_keys(db, R_RUNNING)
    assert len(keys) == len(set(keys)) == TOTAL
    assert 0 < fake.requests < TOTAL                 # R's stored results were kept
    with closing(sqlite3.connect(db)) as conn:
        prompt, checksum = conn.execute(
            "SELECT system_prompt, data_checksum FROM experiments WHERE experiment_id = ?",
            (R_RUNNING,)).fetchone()
    assert prompt == R_PROMPT and checksum
    assert "written by the R version" in console.getvalue()


def test_allow_drift_on_a_new_run_is_a_warning(tmp_path: Path,
                                              console: io.StringIO) -> None:
    data = write_fixture_csv(tmp_path / "data.csv", cases(4))
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1")
    summary = execute(RunRequest(db_path=tmp_path / "r.db", config_path=str(cfg), env={},
                                 allow_drift=("model.max_tokens",)), io.StringIO(),
                      transport=FakeLLM().transport())
    assert summary.status is Status.COMPLETED
    assert "--allow-drift applies to a resume only" in console.getvalue()
