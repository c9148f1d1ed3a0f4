"""data.sample (#12): a seeded, stratified sample whose keys are stored with the experiment,
so a resume and every other experiment with the same definition score the same narratives."""

from __future__ import annotations

import io
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_llm import FakeLLM
from test_structured_run import config, only_experiment, rows

from asyncrunner.config import build_config
from asyncrunner.db.sample import _allocate
from asyncrunner.errors import ConfigError, Stopped
from asyncrunner.plan import RunRequest
from asyncrunner.session import execute
from asyncrunner.vocab import Status

SAMPLE = {"n": 15, "stratify": ["narrative_type", "manual_flag_ind"], "seed": 7}


def sampled_config(tmp_path: Path, sample: dict[str, Any] = SAMPLE, **run: Any) -> Path:
    cfg = config(tmp_path, "http://llm.invalid/v1", n_cases=30, **run)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["sample"] = sample
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def keys(db: Path, experiment_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        got = [tuple(r) for r in conn.execute(
            "SELECT incident_id, narrative_type FROM experiment_sample WHERE experiment_id = ? "
            "ORDER BY incident_id, narrative_type", (experiment_id,))]
    conn.close()
    return got  # type: ignore[return-value]


def test_allocation_is_proportional_and_exact() -> None:
    assert _allocate(15, [40, 20]) == [10, 5]
    assert sum(_allocate(7, [3, 3, 3])) == 7 and _allocate(7, [3, 3, 3]) == [3, 2, 2]
    assert _allocate(1, [1, 1000]) == [0, 1]


def test_a_sample_is_stratified_stored_and_scored_alone(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    summary = execute(RunRequest(db_path=db, config_path=str(sampled_config(tmp_path)),
                                 env={}), io.StringIO(), transport=FakeLLM().transport())
    assert summary.status is Status.COMPLETED
    experiment_id = only_experiment(db)
    stored = keys(db, experiment_id)
    results = rows(db, experiment_id)
    assert len(stored) == 15
    assert sorted((r["incident_id"], r["narrative_type"]) for r in results) == stored
    # 60 narratives: LE 10 positive, 20 negative; CME 30 negative. A quarter of each is
    # 2.5, 5 and 7.5; the half left over goes to the stratum listed first (CME, 0).
    strata = Counter((r["narrative_type"], r["manual_flag_ind"]) for r in results)
    assert strata == {("LE", 1): 2, ("LE", 0): 5, ("CME", 0): 8}
    with sqlite3.connect(db) as conn:
        total, sample_json = conn.execute(
            "SELECT n_narratives_total, sample_json FROM experiments").fetchone()
    conn.close()
    assert total == 15 and '"seed": 7' in sample_json


def test_the_same_definition_draws_the_same_keys_and_a_resume_keeps_them(
        tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    cfg = sampled_config(tmp_path, workers=1, batch_size=1)
    fake = FakeLLM(delay_s=0.01)
    fake.after(6, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(Stopped):
        execute(RunRequest(db_path=db, config_path=str(cfg), env={}), io.StringIO(),
                transport=fake.transport())
    first = only_experiment(db)
    assert 0 < len(rows(db, first)) < 15
    done = execute(RunRequest(db_path=db, config_path=None, resume=True, experiment_id=first,
                              env={}), io.StringIO(), transport=FakeLLM().transport())
    assert done.status is Status.COMPLETED
    assert sorted((r["incident_id"], r["narrative_type"]) for r in rows(db, first)) == keys(
        db, first)
    again = execute(RunRequest(db_path=db, config_path=str(cfg), env={}), io.StringIO(),
                    transport=FakeLLM().transport())
    assert keys(db, again.experiment_id) == keys(db, first)
    other = sampled_config(tmp_path, {**SAMPLE, "seed": 8})
    third = execute(RunRequest(db_path=db, config_path=str(other), env={}), io.StringIO(),
                    transport=FakeLLM().transport())
    assert keys(db, third.experiment_id) != keys(db, first)


@pytest.mark.parametrize(("sample", "message"), [
    ({"n": 0}, "data.sample.n"),
    ({"n": 5, "stratify": ["colour"]}, "data.sample.stratify"),
    ({"n": 5, "seed": "x"}, "data.sample.seed"),
    ({"n": 5, "size": 3}, "unknown config key 'data.sample.size'"),
])
def test_a_bad_sample_is_one_line(sample: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"data": {"sample": sample}}, env={})
