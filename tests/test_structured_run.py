"""Issue #15 wired into the run: the probe in the session, parse retries, fail fast, the
circuit breaker, the error-share exit, the truncation warning, token totals, migration 7.

In-process sessions against the simulator (a MockServer in a thread, real HTTP) or FakeLLM
(httpx.MockTransport); the exit codes through the real CLI in a subprocess.
"""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from conftest import cli_env, experiment_id_from, run_cli, write_config, write_fixture_csv
from fake_llm import FakeLLM, experiment_row
from test_runner import cases

from asyncrunner.db.schema import MIGRATIONS, SCHEMA_VERSION, connect
from asyncrunner.errors import EndpointCannotServe, TooManyErrors
from asyncrunner.llm.answer_schema import response_format_payload
from asyncrunner.llm.client import ClientSettings, make_http_client
from asyncrunner.llm.parsing import resample_seed
from asyncrunner.llm.probe import PROBE_TEXT, probe
from asyncrunner.plan import RunRequest
from asyncrunner.session import RunSummary, execute
from asyncrunner.sim import FaultConfig, MockServer
from asyncrunner.vocab import Status

N_CASES = 10
TOTAL = 2 * N_CASES
MAX_TOKENS = 256
SEED = 1024


def config(tmp_path: Path, url: str, *, n_cases: int = N_CASES,
           model: dict[str, Any] | None = None, **run: Any) -> Path:
    data = write_fixture_csv(tmp_path / "data.csv", cases(n_cases))
    return write_config(tmp_path, data, url, model={"max_tokens": MAX_TOKENS} | (model or {}),
                        **({"workers": 4, "batch_size": 4, "max_attempts": 1,
                            "commit_interval_s": 0.05, "seed": SEED} | run))


def run(db: Path, cfg: Path, *, fake: FakeLLM | None = None, **kw: Any) -> tuple[RunSummary, str]:
    out = io.StringIO()
    summary = execute(RunRequest(db_path=db, config_path=str(cfg), env={}, **kw), out,
                      transport=fake.transport() if fake else None)
    return summary, out.getvalue()


def rows(db: Path, experiment_id: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(
            "SELECT * FROM narrative_results WHERE experiment_id = ? ORDER BY result_id",
            (experiment_id,))]
    finally:
        conn.close()


def only_experiment(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("SELECT experiment_id FROM experiments").fetchone()[0])
    finally:
        conn.close()


def probe_tokens(cfg_model: dict[str, Any], **server: Any) -> tuple[int, int]:
    """What the session's probe costs on a simulator like this one: the same request
    against a fresh one (the simulator is deterministic)."""
    async def go() -> tuple[int, int]:
        async with MockServer(**server) as sim, make_http_client(1, 5.0) as http:
            settings = ClientSettings(api_url=sim.url, model="mock-classifier", temperature=0.0,
                                      max_tokens=MAX_TOKENS, timeout_s=5, max_attempts=1,
                                      seed=SEED, **cfg_model)
            from asyncrunner.config import PromptSection
            p = PromptSection()
            await probe(settings, http, p.system_prompt, p.user_template, setting="auto")
            stats = sim.stats()
            return stats.prompt_tokens, stats.completion_tokens
    return anyio.run(go)


# --- the probe in the session ---------------------------------------------------------------


def test_auto_falls_back_when_json_schema_is_rejected_and_records_the_mode(
        tmp_path: Path, server_factory: Callable[..., MockServer],
        console: io.StringIO) -> None:
    sim = server_factory(reject_response_formats=("json_schema",))
    db = tmp_path / "runs.db"
    summary, out = run(db, config(tmp_path, sim.url))
    assert summary.status is Status.COMPLETED
    stats = sim.stats()
    # the probe: json_schema refused (400, not retried), json_object accepted; then the run
    assert stats.completion_requests == 2 + TOTAL
    assert stats.by_response_format == {"json_schema": 1, "json_object": 1 + TOTAL}
    assert stats.last_response_format == {"type": "json_object"}
    record = experiment_row(db, summary.experiment_id)
    assert record["response_format_used"] == "json_object"
    stored = json.loads(str(record["config_json"]))
    assert stored["model"]["response_format"] == "auto"
    assert stored["model"]["response_format_used"] == "json_object"
    shown = console.getvalue()
    assert "response_format: json_object (json_schema: unsupported, HTTP 400" in shown
    assert out.splitlines()[0] == f"experiment_id: {summary.experiment_id}"


def test_an_accepted_json_schema_is_sent_verbatim_and_a_resume_probes_only_it(
        tmp_path: Path, server_factory: Callable[..., MockServer]) -> None:
    sim = server_factory()
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, sim.url, max_narratives=6)
    summary, _ = run(db, cfg)
    stats = sim.stats()
    assert stats.completion_requests == 1 + 6
    assert stats.last_response_format == response_format_payload("json_schema", MAX_TOKENS)
    assert experiment_row(db, summary.experiment_id)["response_format_used"] == "json_schema"
    # a retry of one error row probes the stored mode only
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE narrative_results SET error_occurred = 1, error_category = "
                     "'api_error' WHERE result_id = (SELECT MIN(result_id) FROM "
                     "narrative_results)")
    conn.close()
    sim.reset_stats()
    again = execute(RunRequest(db_path=db, config_path=None, resume=True,
                               retry_errors_only=True, experiment_id=summary.experiment_id,
                               env={}), io.StringIO())
    assert again.status is Status.COMPLETED
    assert sim.stats().by_response_format == {"json_schema": 2}     # the probe, the retry
    assert sim.stats().completion_requests == 2


def test_system_role_user_puts_the_system_prompt_into_the_user_turn(tmp_path: Path) -> None:
    fake = FakeLLM()
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, "http://llm.invalid/v1", model={"response_format": "none"})
    raw = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump(raw | {"prompt": {"system_role": "user"}}))
    run(db, cfg, fake=fake)
    assert fake.probes == 1 and fake.requests == TOTAL
    for body in fake.bodies:
        messages = body["messages"]
        assert isinstance(messages, list) and [m["role"] for m in messages] == ["user"]
        assert "response_format" not in body


# --- parse retries ---------------------------------------------------------------------------


def test_invalid_then_valid_is_recovered_by_repair_and_totals_match_the_simulator(
        tmp_path: Path, server_factory: Callable[..., MockServer]) -> None:
    faults = FaultConfig(invalid_first_rate=1.0)
    sim = server_factory(faults=faults)
    db = tmp_path / "runs.db"
    summary, _ = run(db, config(tmp_path, sim.url))
    stored = rows(db, summary.experiment_id)
    assert len(stored) == TOTAL
    assert {r["answer_source"] for r in stored} == {"repair"}
    assert all(r["error_occurred"] == 0 for r in stored)
    stats = sim.stats()
    assert stats.repair_turns == TOTAL
    for r in stored:
        assert r["prompt_tokens_total"] > r["prompt_tokens"]
        assert r["completion_tokens_total"] > r["completion_tokens"]
        assert r["attempt_count"] == 2 and r["finish_reason"] == "stop"
    probe_p, probe_c = probe_tokens({"response_format": "json_schema"}, faults=faults)
    assert sum(r["prompt_tokens_total"] for r in stored) == stats.prompt_tokens - probe_p
    assert sum(r["completion_tokens_total"] for r in stored) == (
        stats.completion_tokens - probe_c)
    # status and the report show the totals, per answer, and the repairs
    from asyncrunner.db.schema import connect_readonly
    from asyncrunner.results import status
    from asyncrunner.results.report import write_report

    conn = connect_readonly(db)
    try:
        info = status.collect(conn, db, summary.experiment_id)
        html = write_report(conn, summary.experiment_id, tmp_path / "r.html").read_text()
    finally:
        conn.close()
    assert info is not None
    assert info["tokens"]["prompt"] == stats.prompt_tokens - probe_p
    assert info["tokens"]["completion"] == stats.completion_tokens - probe_c
    per_answer = (stats.prompt_tokens - probe_p + stats.completion_tokens - probe_c) / TOTAL
    assert info["tokens"]["per_answer"] == round(per_answer, 1)
    assert info["answers"] == {"answers": TOTAL, "repair": TOTAL, "resample": 0, "cut_off": 0}
    assert info["response_format"] == {"setting": "auto", "used": "json_schema"}
    detail = status.render_detail(info)
    assert f"after a repair turn {TOTAL}, after a resample 0" in detail
    assert f"{per_answer:.0f} tokens per answer" in detail
    assert "Tokens per successful answer" in html and f"{per_answer:.0f}" in html
    assert "json_schema (setting auto)" in html


def test_resample_uses_another_seed(tmp_path: Path,
                                    server_factory: Callable[..., MockServer]) -> None:
    sim = server_factory(faults=FaultConfig(invalid_first_rate=1.0))
    db = tmp_path / "runs.db"
    summary, _ = run(db, config(tmp_path, sim.url, workers=1, parse_retry="resample"))
    stored = rows(db, summary.experiment_id)
    assert {r["answer_source"] for r in stored} == {"resample"}
    stats = sim.stats()
    assert stats.repair_turns == 0
    assert stats.last_seed == resample_seed(SEED, 2) != SEED


def test_truncation_is_named_not_repaired_and_warned_about_once(
        tmp_path: Path, server_factory: Callable[..., MockServer],
        console: io.StringIO) -> None:
    sim = server_factory(truncate_at_max_tokens=True)
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, sim.url, n_cases=60, model={"max_tokens": 12},
                 breaker_window=1000, max_error_share=1.0)
    summary, _ = run(db, cfg)
    stored = rows(db, summary.experiment_id)
    cut = [r for r in stored if r["finish_reason"] == "length"]
    assert len(cut) > 5
    assert all(r["error_category"] == "parse_error" for r in cut)
    assert all("answer cut off at max_tokens=12" in r["error_message"] for r in cut)
    assert sim.stats().repair_turns == 0        # a repair cannot un-cut an answer
    shown = console.getvalue()
    assert shown.count("of the first 100 answers were cut off at max_tokens=12; "
                       "consider a larger model.max_tokens") == 1


def test_object_shaped_indicators_are_stored_as_a_json_array_of_strings(
        tmp_path: Path, server_factory: Callable[..., MockServer]) -> None:
    sim = server_factory(faults=FaultConfig(object_indicators_rate=1.0))
    db = tmp_path / "runs.db"
    summary, _ = run(db, config(tmp_path, sim.url))
    flagged = [r for r in rows(db, summary.experiment_id) if r["detected"] == 1]
    assert flagged
    for r in flagged:
        items = json.loads(r["indicators"])
        assert isinstance(items, list) and items
        assert all(isinstance(i, str) and not i.startswith("{") for i in items)


# --- fail fast, breaker, error share ---------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_fatal_status_stops_at_the_probe_with_exit_4(
        tmp_path: Path, server_factory: Callable[..., MockServer], status: int) -> None:
    sim = server_factory(fail_status=status)
    db = tmp_path / "runs.db"
    proc = run_cli("run", str(config(tmp_path, sim.url, max_attempts=3)), "--db", str(db),
                   env=cli_env())
    assert proc.returncode == 4, proc.stderr
    assert sim.stats().completion_requests == 1       # not retried, no narrative sent
    experiment_id = experiment_id_from(proc.stdout)
    record = experiment_row(db, experiment_id)
    assert record["status"] == "interrupted"
    assert f"HTTP {status}" in str(record["failure_reason"])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("asyncrunner: ")]
    assert len(errors) == 1 and "cannot serve" in errors[0]
    assert rows(db, experiment_id) == []


def test_a_fatal_answer_during_the_run_is_not_stored_and_stops_it(tmp_path: Path) -> None:
    broken = [True]
    fake = FakeLLM(fail=lambda text: 401 if broken[0] and PROBE_TEXT not in text else None)
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, "http://llm.invalid/v1", workers=1)
    with pytest.raises(EndpointCannotServe) as stopped:
        run(db, cfg, fake=fake)
    assert stopped.value.exit_code == 4
    assert "API key" in str(stopped.value) and "HTTP 401" in str(stopped.value)
    assert (fake.probes, fake.requests) == (1, 1)
    experiment_id = only_experiment(db)
    assert rows(db, experiment_id) == []
    record = experiment_row(db, experiment_id)
    assert record["status"] == "interrupted" and "HTTP 401" in str(record["failure_reason"])
    broken[0] = False
    done = execute(RunRequest(db_path=db, config_path=None, resume=True,
                              experiment_id=experiment_id, env={}), io.StringIO(),
                   transport=fake.transport())
    assert done.status is Status.COMPLETED and len(rows(db, experiment_id)) == TOTAL


def test_the_breaker_trips_when_every_result_is_an_error_and_a_resume_finishes(
        tmp_path: Path) -> None:
    down = [True]
    fake = FakeLLM(fail=lambda text: 500 if down[0] and PROBE_TEXT not in text else None)
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, "http://llm.invalid/v1", n_cases=40, workers=2, batch_size=2,
                 breaker_window=6)
    with pytest.raises(EndpointCannotServe) as stopped:
        run(db, cfg, fake=fake)
    assert stopped.value.exit_code == 4
    assert "circuit breaker: the last 6 results were all errors (api_error 6)" in str(
        stopped.value)
    experiment_id = only_experiment(db)
    stored = rows(db, experiment_id)
    assert 6 <= len(stored) < 80 and all(r["error_category"] == "api_error" for r in stored)
    record = experiment_row(db, experiment_id)
    assert record["status"] == "interrupted"
    assert "circuit breaker" in str(record["failure_reason"])
    down[0] = False
    execute(RunRequest(db_path=db, config_path=None, resume=True, experiment_id=experiment_id,
                       env={}), io.StringIO(), transport=fake.transport())
    done = execute(RunRequest(db_path=db, config_path=None, resume=True,
                              retry_errors_only=True, experiment_id=experiment_id, env={}),
                   io.StringIO(), transport=fake.transport())
    assert done.status is Status.COMPLETED
    final = rows(db, experiment_id)
    assert len(final) == 80 and all(r["error_occurred"] == 0 for r in final)


def test_an_error_share_above_the_limit_completes_and_exits_4(tmp_path: Path) -> None:
    fake = FakeLLM(fail=lambda text: 500 if "Autopsy" in text else None)   # every CME
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, "http://llm.invalid/v1", breaker_window=1000, max_error_share=0.4)
    with pytest.raises(TooManyErrors) as too_many:
        run(db, cfg, fake=fake)
    assert too_many.value.exit_code == 4
    assert f"{N_CASES} of {TOTAL} narratives (50.0%) ended in an error" in str(too_many.value)
    experiment_id = only_experiment(db)
    record = experiment_row(db, experiment_id)
    assert record["status"] == "completed" and record["f1"] is not None
    assert len(rows(db, experiment_id)) == TOTAL
    # at or below the limit: exit 0
    ok = config(tmp_path, "http://llm.invalid/v1", breaker_window=1000, max_error_share=0.5)
    summary, _ = run(db, ok, fake=FakeLLM(fail=lambda text: 500 if "Autopsy" in text else None))
    assert summary.status is Status.COMPLETED


def test_the_cli_reports_a_high_error_share_in_one_line_with_exit_4(
        tmp_path: Path, server_factory: Callable[..., MockServer]) -> None:
    sim = server_factory(faults=FaultConfig(malformed_rate=0.5), seed=3)
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, sim.url, breaker_window=1000, max_error_share=0.05,
                 parse_retry="off")
    proc = run_cli("run", str(cfg), "--db", str(db), env=cli_env())
    assert proc.returncode == 4, proc.stderr
    experiment_id = experiment_id_from(proc.stdout)
    assert experiment_row(db, experiment_id)["status"] == "completed"
    last = [line for line in proc.stderr.splitlines() if line.startswith("asyncrunner: ")]
    assert len(last) == 1 and "above run.max_error_share=0.05" in last[0]
    assert "exports:" in proc.stdout


# --- migration 7 -----------------------------------------------------------------------------


def test_migration_7_rewrites_stored_indicators_and_backfills_totals(tmp_path: Path) -> None:
    db = tmp_path / "v6.db"
    conn = sqlite3.connect(db)
    conn.isolation_level = None
    for number, step in enumerate(MIGRATIONS[:6], start=1):
        step(conn)
        conn.execute(f"PRAGMA user_version = {number}")
    conn.executemany(
        "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
        "indicators, prompt_tokens, completion_tokens) VALUES ('e', ?, 'LE', ?, 5, 3)",
        [("1", """["{'indicator': 'threat', 'evidence': 'x'}"]"""),
         ("2", """['x', {'indicator': 'choking'}]"""),
         ("3", '["already", "fine"]'),
         ("4", None)])
    conn.close()
    conn = connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 7
        got = dict(conn.execute("SELECT incident_id, indicators FROM narrative_results"))
        totals = set(tuple(r) for r in conn.execute(
            "SELECT prompt_tokens_total, completion_tokens_total FROM narrative_results"))
    finally:
        conn.close()
    assert json.loads(got["1"]) == [json.loads(got["1"])[0]]
    assert all(isinstance(i, str) and "{" not in i for i in json.loads(got["1"]))
    assert "threat" in json.loads(got["1"])[0]
    assert "choking" in " ".join(json.loads(got["2"]))
    assert json.loads(got["3"]) == ["already", "fine"] and got["4"] is None
    assert totals == {(5, 3)}


# --- mock-server flags ------------------------------------------------------------------------


def test_mock_server_flags_reach_serve_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncrunner.sim
    from asyncrunner import cli

    seen: dict[str, Any] = {}

    def fake_serve(port: int, latency_ms: float, error_rate: float, **kw: Any) -> None:
        seen.update(kw, port=port)

    monkeypatch.setattr(asyncrunner.sim, "serve_forever", fake_serve)
    code = cli.main(["mock-server", "--port", "0", "--reject-response-format", "json_schema",
                     "--reject-response-format", "json_object", "--fail-status", "403",
                     "--api-key", "K", "--truncate-at-max-tokens", "--invalid-first-rate",
                     "0.5", "--object-indicators-rate", "0.25", "--model", "gemma-3"])
    assert code == 0
    assert seen["reject_response_formats"] == ("json_schema", "json_object")
    assert (seen["fail_status"], seen["api_key"], seen["truncate_at_max_tokens"]) == (
        403, "K", True)
    assert (seen["invalid_first_rate"], seen["object_indicators_rate"]) == (0.5, 0.25)
    assert seen["model"] == "gemma-3"
    seen.clear()
    assert cli.main(["mock-server", "--port", "0"]) == 0
    assert (seen["reject_response_formats"], seen["fail_status"], seen["api_key"]) == (
        (), None, None)
    assert seen["truncate_at_max_tokens"] is False and seen["model"] == "mock-classifier"


def test_mock_server_process_rejects_a_format_and_a_missing_key() -> None:
    import os
    import signal
    import subprocess
    import sys

    import httpx
    from conftest import ROOT

    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncrunner", "mock-server", "--port", "0",
         "--reject-response-format", "json_schema", "--api-key", "K"],
        cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip().rsplit(" ", 1)[1]
        body = {"model": "mock-classifier", "max_tokens": 64,
                "messages": [{"role": "user", "content": "Narrative:\nx"}]}
        with httpx.Client(timeout=5, trust_env=False) as client:
            url = base + "/chat/completions"
            assert client.post(url, json=body).status_code == 401
            auth = {"Authorization": "Bearer K"}
            schema = body | {"response_format": response_format_payload("json_schema", 64)}
            assert client.post(url, json=schema, headers=auth).status_code == 400
            plain = body | {"response_format": {"type": "json_object"}}
            assert client.post(url, json=plain, headers=auth).status_code == 200
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


@pytest.mark.parametrize("signum", [2, 15])
def test_a_signal_during_the_probe_interrupts_the_run(
        tmp_path: Path, server_factory: Callable[..., MockServer], signum: int) -> None:
    import time

    from test_resume import finish, start

    sim = server_factory(latency_ms=3000)
    db = tmp_path / "runs.db"
    proc = start(["run", str(config(tmp_path, sim.url, model={"timeout_s": 30})),
                  "--db", str(db)])
    deadline = time.monotonic() + 20
    while sim.stats().completion_requests < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.stats().completion_requests == 1        # the probe, in flight
    proc.send_signal(signum)
    out, err = finish(proc, timeout=20)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    record = experiment_row(db, experiment_id_from(out))
    assert record["status"] == "interrupted"
    assert rows(db, str(record["experiment_id"])) == []
    assert sim.stats().completion_requests == 1
    assert not list(tmp_path.glob(".resume_lock_*"))


def test_the_cli_stops_on_the_breaker_with_exit_4_and_a_resume_finishes(
        tmp_path: Path, server_factory: Callable[..., MockServer]) -> None:
    down = server_factory(faults=FaultConfig(error_rate=1.0))
    db = tmp_path / "runs.db"
    cfg = config(tmp_path, down.url, n_cases=40, workers=2, batch_size=2, breaker_window=5)
    proc = run_cli("run", str(cfg), "--db", str(db), env=cli_env())
    assert proc.returncode == 4, proc.stderr
    experiment_id = experiment_id_from(proc.stdout)
    record = experiment_row(db, experiment_id)
    assert record["status"] == "interrupted"
    assert "circuit breaker: the last 5 results were all errors (api_error 5)" in str(
        record["failure_reason"])
    # the probe (three modes, none answered) went ahead unverified with json_schema
    assert "going ahead with response_format json_schema (not verified)" in proc.stderr
    assert record["response_format_used"] == "json_schema"
    stored = rows(db, experiment_id)
    assert 5 <= len(stored) < 80
    # no retry (max_attempts 1); the other worker's request in flight was cancelled
    assert 3 + len(stored) <= down.stats().completion_requests <= 3 + len(stored) + 1
    up = server_factory()
    ok = config(tmp_path, up.url, n_cases=40, workers=2, batch_size=2, breaker_window=5)
    resumed = run_cli("resume", experiment_id, "--config", str(ok), "--db", str(db),
                      env=cli_env())
    assert resumed.returncode == 0, resumed.stderr
    assert experiment_row(db, experiment_id)["status"] == "completed"
    assert up.stats().by_response_format == {"json_schema": 1 + 80 - len(stored)}
    assert len(rows(db, experiment_id)) == 80
