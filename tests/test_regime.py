"""One experiment, one regime (issue #10, items 1 and 8).

A resume takes every setting that can change an answer from the stored experiment, warns
about each given value that differs (key, stored, given), records each session's effective
settings, and changes an answer setting only with --allow-drift KEY (recorded). Retrying
errors chooses categories, and keeps the metrics it replaces.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_env, experiment_id_from, run_cli, write_config, write_fixture_csv
from fake_llm import FakeLLM, experiment_row, result_keys
from test_runner import cases

from asyncrunner.config import Config
from asyncrunner.errors import RefusedError, Stopped, UsageError
from asyncrunner.plan import RunRequest, check_categories
from asyncrunner.session import execute
from asyncrunner.settings import Kind, flatten, kind
from asyncrunner.sim import MockServer
from asyncrunner.vocab import ErrorCategory, Status

N_CASES = 20
TOTAL = 2 * N_CASES
# response_format none: the stored regime sends no response_format field at all
STORED_MODEL = {"max_tokens": 256, "response_format": "none", "extra_body": {"top_p": 0.9}}
DRIFTED_MODEL = {"max_tokens": 1024, "response_format": "json_object",
                 "extra_body": {"top_p": 0.5}}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    data = write_fixture_csv(tmp_path / "data.csv", cases(N_CASES))
    cfg = write_config(tmp_path, data, "http://llm.invalid/v1", model=STORED_MODEL,
                       workers=4, batch_size=4, max_attempts=1, commit_interval_s=0.05)
    return tmp_path / "runs.db", cfg


def interrupted(db: Path, cfg: Path, after: int = 9) -> tuple[str, FakeLLM]:
    out = io.StringIO()
    fake = FakeLLM(delay_s=0.01).after(after, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(Stopped):
        execute(RunRequest(db_path=db, config_path=str(cfg), env={}), out,
                transport=fake.transport())
    return out.getvalue().splitlines()[0].removeprefix("experiment_id: "), fake


def resume(db: Path, experiment_id: str, fake: FakeLLM, **kw: Any) -> None:
    req = RunRequest(db_path=db, config_path=kw.pop("config_path", None), resume=True,
                     experiment_id=experiment_id, env=kw.pop("env", {}), **kw)
    execute(req, io.StringIO(), transport=fake.transport())


def drifted_yaml(cfg: Path, **run: Any) -> Path:
    return write_config(cfg.parent, cfg.parent / "data.csv", "http://elsewhere.invalid/v1",
                        name="drift.yaml", model=DRIFTED_MODEL, workers=2, batch_size=4,
                        max_attempts=1, commit_interval_s=0.05, **run)


def sessions(db: Path, experiment_id: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(
            "SELECT * FROM sessions WHERE experiment_id = ? ORDER BY started_at",
            (experiment_id,))]
    finally:
        conn.close()


def history(db: Path, experiment_id: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return [tuple(r) for r in conn.execute(
            "SELECT key, old_value, new_value, reason FROM config_history "
            "WHERE experiment_id = ? ORDER BY history_id", (experiment_id,))]
    finally:
        conn.close()


def test_resume_keeps_answer_settings_warns_and_records_the_session(
        setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup
    experiment_id, first = interrupted(db, cfg)
    assert {b["max_tokens"] for b in first.bodies} == {256}
    done_before = len(result_keys(db, experiment_id))
    fake = FakeLLM()
    resume(db, experiment_id, fake, config_path=str(drifted_yaml(cfg)))
    # every request of the resumed session is made under the stored regime
    assert fake.requests == TOTAL - done_before
    assert {b["max_tokens"] for b in fake.bodies} == {256}
    assert {b.get("top_p") for b in fake.bodies} == {0.9}
    assert not any("response_format" in b for b in fake.bodies)
    shown = console.getvalue()
    for key, stored, given in (("model.max_tokens", "256", "1024"),
                               ("model.response_format", "'none'", "'json_object'"),
                               ("model.extra_body.top_p", "0.9", "0.5")):
        assert (f"config drift: {key} is {given} in the YAML, the experiment ran with "
                f"{stored}; using the stored value (to change it: --allow-drift {key})"
                ) in shown, key
    # session settings may change and are not drift
    assert "config drift: run.workers" not in shown
    assert "config drift: model.api_url" not in shown
    stored = json.loads(str(experiment_row(db, experiment_id)["config_json"]))
    assert stored["model"]["max_tokens"] == 256 and stored["model"]["extra_body"] == {
        "top_p": 0.9}
    assert history(db, experiment_id) == []
    rows = sessions(db, experiment_id)
    assert [(r["intent"], r["ended_as"]) for r in rows] == [("new", "interrupted"),
                                                            ("resume", "completed")]
    assert rows[0]["n_done"] == done_before and rows[1]["n_done"] == TOTAL - done_before
    second = rows[1]
    assert second["pid"] == os.getpid() and second["settings_hash"]
    diff = json.loads(second["settings_diff"])
    assert diff["run.workers"] == {"stored": 4, "session": 2}
    assert diff["model.api_url"] == {
        "stored": "http://llm.invalid/v1/chat/completions",
        "session": "http://elsewhere.invalid/v1/chat/completions"}
    assert "model.max_tokens" not in diff
    settings = json.loads(second["settings_json"])
    assert settings["model"]["max_tokens"] == 256 and settings["run"]["workers"] == 2
    assert json.loads(second["allowed_drift"]) == []
    assert rows[0]["settings_hash"] != second["settings_hash"]


def test_allow_drift_changes_one_key_and_records_it(
        setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup
    experiment_id, _ = interrupted(db, cfg)
    fake = FakeLLM()
    resume(db, experiment_id, fake, config_path=str(drifted_yaml(cfg)),
           allow_drift=("model.max_tokens", "model.extra_body"))
    assert {b["max_tokens"] for b in fake.bodies} == {1024}
    assert {b.get("top_p") for b in fake.bodies} == {0.5}
    assert not any("response_format" in b for b in fake.bodies)  # not allowed: stored
    shown = console.getvalue()
    assert "allowed drift: model.max_tokens changes from 256 to 1024" in shown
    assert "config drift: model.response_format" in shown
    stored = json.loads(str(experiment_row(db, experiment_id)["config_json"]))
    assert stored["model"]["max_tokens"] == 1024
    assert stored["model"]["extra_body"] == {"top_p": 0.5}
    assert stored["model"]["response_format"] == "none"
    assert stored["model"]["api_url"] == "http://llm.invalid/v1/chat/completions"
    assert [(k, json.loads(o), json.loads(n)) for k, o, n, _ in history(
        db, experiment_id)] == [("model.extra_body.top_p", 0.9, 0.5),
                                ("model.max_tokens", 256, 1024)]
    second = sessions(db, experiment_id)[1]
    assert json.loads(second["allowed_drift"]) == ["model.max_tokens", "model.extra_body"]
    assert json.loads(second["settings_diff"])["model.max_tokens"] == {
        "stored": 256, "session": 1024}
    # a later resume without the flag keeps the new regime without warning
    conn = sqlite3.connect(db)
    conn.execute("UPDATE experiments SET status = 'interrupted'")
    conn.execute("DELETE FROM narrative_results WHERE incident_id = '0001'")
    conn.commit()
    conn.close()
    third = FakeLLM()
    resume(db, experiment_id, third)
    assert third.requests == 2 and {b["max_tokens"] for b in third.bodies} == {1024}


def test_allow_drift_a_column_key_updates_the_column(
        setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup
    experiment_id, _ = interrupted(db, cfg)
    hot = write_config(cfg.parent, cfg.parent / "data.csv", "http://llm.invalid/v1",
                       name="hot.yaml", model={**STORED_MODEL, "temperature": 0.7})
    fake = FakeLLM()
    resume(db, experiment_id, fake, config_path=str(hot), allow_drift=("model.temperature",))
    assert set(fake.temperatures) == {0.7}
    assert experiment_row(db, experiment_id)["temperature"] == 0.7


@pytest.mark.parametrize(("key", "message"), [
    ("data.file", "decides which narratives"), ("run.max_narratives", "decides which"),
    ("model.nope", "no such configuration key"), ("run.workers", "cannot change an answer"),
    ("nosection.key", "no such configuration key")])
def test_allow_drift_of_a_key_that_is_not_an_answer_setting_is_a_usage_error(
        setup: tuple[Path, Path], console: io.StringIO, key: str, message: str) -> None:
    db, cfg = setup
    experiment_id, _ = interrupted(db, cfg)
    with pytest.raises(UsageError, match=message):
        resume(db, experiment_id, FakeLLM(), allow_drift=(key,))


def test_environment_cannot_change_an_answer_setting_either(
        setup: tuple[Path, Path], console: io.StringIO) -> None:
    db, cfg = setup
    experiment_id, _ = interrupted(db, cfg)
    fake = FakeLLM()
    resume(db, experiment_id, fake, env={"ASYNCRUNNER_MODEL_MAX_TOKENS": "999",
                                         "ASYNCRUNNER_RUN_WORKERS": "1"})
    assert {b["max_tokens"] for b in fake.bodies} == {256}
    assert ("config drift: model.max_tokens is 999 in the environment or flags, the "
            "experiment ran with 256") in console.getvalue()
    second = sessions(db, experiment_id)[1]
    assert json.loads(second["settings_diff"]) == {"run.workers": {"stored": 4, "session": 1}}


def test_cli_resume_with_drift_and_allow_drift(tmp_path: Path, mock_server: MockServer) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv", cases(30))
    cfg = write_config(tmp_path, data, mock_server.url, model=STORED_MODEL)
    db = tmp_path / "exp.db"
    eid = experiment_id_from(run_cli("run", str(cfg), "--db", str(db)).stdout)
    conn = sqlite3.connect(db)  # as if stopped half-way
    conn.execute("UPDATE experiments SET status = 'interrupted'")
    conn.execute("DELETE FROM narrative_results WHERE incident_id >= '0015'")
    conn.commit()
    conn.close()
    drifted = write_config(tmp_path, data, mock_server.url, name="drift.yaml",
                           model=DRIFTED_MODEL, workers=3)
    bad = run_cli("resume", eid, "--config", str(drifted), "--allow-drift", "data.file",
                  "--db", str(db))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    proc = run_cli("resume", eid, "--config", str(drifted), "--allow-drift",
                   "model.max_tokens", "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    assert "config drift: model.extra_body.top_p is 0.5 in the YAML" in proc.stderr
    assert "allowed drift: model.max_tokens changes from 256 to 1024" in proc.stderr
    detail = json.loads(run_cli("status", eid, "--json", "--db", str(db)).stdout)
    assert [s["intent"] for s in detail["sessions"]] == ["new", "resume"]
    last = detail["sessions"][-1]
    assert last["allowed_drift"] == ["model.max_tokens"]
    assert last["settings_diff"]["run.workers"] == {"stored": 4, "session": 3}
    assert last["n_done"] == 30 and last["ended_as"] == "completed"
    assert detail["config_history"][0]["key"] == "model.max_tokens"
    text = run_cli("status", eid, "--db", str(db)).stdout
    assert "sessions" in text and "allowed drift model.max_tokens" in text
    env_run = run_cli("run", str(drifted), "--allow-drift", "model.max_tokens",
                      "--db", str(db), env=cli_env())
    assert env_run.returncode == 0 and "--allow-drift applies to a resume only" in \
        env_run.stderr


# --------------------------------------------------------------------------- item 8


def failing(text: str) -> int | tuple[int, str] | None:
    if text.endswith("case 3"):
        return 503                                    # api_error
    if text.endswith("case 6"):
        return 429                                    # rate_limit
    if text.endswith("case 9"):
        return 400, "This model's maximum context length is 8 tokens"   # data_error
    return None


def categories_of(db: Path, experiment_id: str) -> dict[str, str | None]:
    conn = sqlite3.connect(db)
    try:
        return {r[0]: r[1] for r in conn.execute(
            "SELECT incident_id, error_category FROM narrative_results WHERE experiment_id = ? "
            "AND narrative_type = 'LE' AND incident_id IN ('0003', '0006', '0009')",
            (experiment_id,))}
    finally:
        conn.close()


def test_retry_by_category_and_metrics_history(setup: tuple[Path, Path],
                                               console: io.StringIO) -> None:
    db, cfg = setup
    out = io.StringIO()
    first = execute(RunRequest(db_path=db, config_path=str(cfg), env={}), out,
                    transport=FakeLLM(fail=failing).transport())
    eid = first.experiment_id
    assert categories_of(db, eid) == {"0003": "api_error", "0006": "rate_limit",
                                      "0009": "data_error"}
    f1_before = experiment_row(db, eid)["f1"]
    with pytest.raises(UsageError, match="--category"):
        check_categories("api_error,bogus")
    assert check_categories("all") == tuple(str(c) for c in ErrorCategory)
    again = FakeLLM()
    resume(db, eid, again, retry_errors_only=True, categories=("rate_limit",))
    assert again.requests == 1
    assert categories_of(db, eid) == {"0003": "api_error", "0006": None,
                                      "0009": "data_error"}
    default = FakeLLM()
    resume(db, eid, default, retry_errors_only=True)     # data_error only when asked
    assert default.requests == 1
    assert categories_of(db, eid)["0009"] == "data_error"
    with pytest.raises(RefusedError, match="no error rows in categories api_error"):
        resume(db, eid, FakeLLM(), retry_errors_only=True, categories=("api_error",))
    asked = FakeLLM()
    resume(db, eid, asked, retry_errors_only=True, categories=("data_error",))
    assert asked.requests == 1 and categories_of(db, eid)["0009"] is None
    conn = sqlite3.connect(db)
    try:
        kept = conn.execute("SELECT f1, superseded_by_session, n_errors FROM metrics_history "
                            "WHERE experiment_id = ? ORDER BY history_id", (eid,)).fetchall()
        intents = [r[0] for r in conn.execute(
            "SELECT intent FROM sessions WHERE experiment_id = ? ORDER BY started_at", (eid,))]
        retry_row = conn.execute(
            "SELECT target, n_done, retry_categories FROM sessions WHERE experiment_id = ? "
            "AND intent = 'retry-errors' ORDER BY started_at LIMIT 1", (eid,)).fetchone()
    finally:
        conn.close()
    assert kept[0][0] == f1_before and kept[0][1] and kept[0][2] == 3
    assert len(kept) == len(intents) - 1                  # one per retry of the completed run
    assert intents[0] == "new" and set(intents[1:]) == {"retry-errors"}
    assert retry_row[0] == retry_row[1]
    assert json.loads(retry_row[2]) == ["rate_limit"]
    assert experiment_row(db, eid)["status"] == Status.COMPLETED


def test_every_configuration_key_has_a_kind() -> None:
    """A key someone adds later is an answer key (stored value wins) until listed."""
    fields = flatten(Config().to_dict())
    kinds = {key: kind(key) for key in fields}
    answer = {k for k, v in kinds.items() if v is Kind.ANSWER}
    assert answer >= {"model.name", "model.provider", "model.temperature", "model.max_tokens",
                      "model.response_format", "prompt.system_prompt", "prompt.user_template",
                      "prompt.version", "run.seed"}
    assert kind("model.extra_body.top_p") is Kind.ANSWER
    assert {k for k, v in kinds.items() if v is Kind.SESSION} >= {
        "model.api_url", "model.timeout_s", "model.api_key_env", "run.workers",
        "run.batch_size", "run.log_dir", "run.output_dir", "run.requests_per_minute"}
    assert kind("data.file") is Kind.SET and kind("run.max_narratives") is Kind.SET
    assert kind("data.placeholders") is Kind.SET
    assert kind("model.some_future_key") is Kind.ANSWER
    assert kind("run.some_future_key") is Kind.ANSWER
