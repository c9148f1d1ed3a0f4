"""The Batch API provider and offline batch files, against the simulator over 127.0.0.1.

In-process sessions (session.execute) for the submit -> poll -> import paths; real
processes for what only a process shows (kill -9 while polling, SIGINT, the CLI's exit
codes and one-line errors).
"""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, cli_env, experiment_id_from, run_cli, write_config, write_fixture_csv

from asyncrunner.db.batches import batch_info, batch_lines
from asyncrunner.errors import EndpointCannotServe
from asyncrunner.llm.batch_api import api_base
from asyncrunner.pipeline.batch_codec import BatchCodec, custom_id
from asyncrunner.plan import RunRequest
from asyncrunner.session import execute
from asyncrunner.sim import BatchOptions, FaultConfig, MockServer
from asyncrunner.sim.batch import parse_multipart
from asyncrunner.vocab import Status

RESULT_FIELDS = ("detected", "confidence", "indicators", "rationale", "error_occurred",
                 "error_category")


def cases(n: int) -> list[tuple[str, ...]]:
    return [(f"{i:04d}", f"Her husband was arrested, case {i}" if i % 3 == 0
             else f"Found at home, case {i}", f"Autopsy notes {i}", "1" if i % 3 == 0 else "0",
             "0", "0") for i in range(n)]


def batch_config(tmp_path: Path, server: MockServer, n_cases: int = 10,
                 name: str = "cfg.yaml", model: dict[str, Any] | None = None,
                 **run: Any) -> Path:
    data = tmp_path / "data.csv"
    if not data.exists():
        write_fixture_csv(data, cases(n_cases))
    return write_config(tmp_path, data, server.base_url, name=name,
                        model={"provider": "openai-batch", "batch_poll_s": 0.05} | (model or {}),
                        **({"max_error_share": 1.0} | run))


def start(db: Path, cfg: Path) -> tuple[str, Any]:
    out = io.StringIO()
    summary = execute(RunRequest(db_path=db, config_path=str(cfg), env={}), out)
    return experiment_id_from(out.getvalue()), summary


def resume(db: Path, experiment_id: str) -> Any:
    return execute(RunRequest(db_path=db, config_path=None, resume=True,
                              experiment_id=experiment_id, env={}), io.StringIO())


def rows(db: Path, experiment_id: str) -> dict[tuple[str, str], tuple[Any, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        found = conn.execute(
            f"SELECT incident_id, narrative_type, {', '.join(RESULT_FIELDS)} "
            "FROM narrative_results WHERE experiment_id = ?", (experiment_id,)).fetchall()
    out = {(r[0], r[1]): tuple(r[2:]) for r in found}
    assert len(out) == len(found), "two rows for one narrative"
    return out


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, params).fetchall()


def status_of(db: Path, experiment_id: str) -> tuple[str, str | None]:
    row = query(db, "SELECT status, failure_reason FROM experiments WHERE experiment_id = ?",
                experiment_id)[0]
    return row[0], row[1]


def download(server: MockServer, file_id: str) -> list[dict[str, Any]]:
    text = httpx.get(f"{server.base_url}/files/{file_id}/content", timeout=5).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- run_batches


def test_submit_poll_import_stores_what_the_live_model_answers(
        tmp_path: Path, server_factory: Any) -> None:
    server = server_factory(batch_delay_s=0.2)
    db = tmp_path / "runs.db"
    experiment_id, summary = start(db, batch_config(tmp_path, server))
    assert summary.status is Status.COMPLETED
    stats = server.stats()
    assert (stats.files_uploaded, stats.batches_created, stats.completion_requests) == (1, 1, 0)
    batch = rows(db, experiment_id)
    assert len(batch) == 20 and not any(r[4] for r in batch.values())

    # The same experiment, live, against the same simulated model: the same answers.
    live_cfg = batch_config(tmp_path, server, name="live.yaml", model={"provider": "openai"})
    live_id, _ = start(db, live_cfg)
    assert rows(db, live_id) == batch

    # The request lines are the live request bodies, keyed by narrative.
    with closing(sqlite3.connect(db)) as conn:
        info = batch_info(conn, experiment_id)
        lines = batch_lines(info)
    assert [(b["status"], b["n_requests"], b["pending"]) for b in info] == [
        ("completed", 20, False)]
    sent = download(server, info[0]["input_file_id"])
    assert {line["custom_id"] for line in sent} == {custom_id(i, t) for i, t in batch}
    body = sent[0]["body"]
    assert body["model"] == "mock-classifier" and body["seed"] == 1024
    assert body["response_format"]["type"] == "json_schema"
    assert stats.last_seed == 1024
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert status_of(db, experiment_id) == ("completed", None)
    assert lines[0] == "batches: 1 (0 pending, 1 imported)"
    assert info[0]["batch_id"] in lines[1] and "completed 20/20" in lines[1]


def test_chunks_of_batch_max_requests(tmp_path: Path, server_factory: Any) -> None:
    server = server_factory(batch_delay_s=0.1)
    db = tmp_path / "runs.db"
    experiment_id, summary = start(db, batch_config(
        tmp_path, server, model={"batch_max_requests": 7}))
    assert summary.status is Status.COMPLETED
    assert server.stats().batches_created == 3
    assert [r[0] for r in query(db, "SELECT n_requests FROM batches WHERE experiment_id = ? "
                                    "ORDER BY chunk", experiment_id)] == [7, 7, 6]
    items = query(db, "SELECT incident_id, narrative_type FROM batch_items")
    assert len(items) == len(set(items)) == 20
    assert len(rows(db, experiment_id)) == 20


def test_expired_batch_keeps_its_answers_and_resume_submits_only_the_rest(
        tmp_path: Path, server_factory: Any) -> None:
    server = server_factory(batch_delay_s=0.4, batch_expire_after_s=0.2)
    db = tmp_path / "runs.db"
    cfg = batch_config(tmp_path, server)
    with pytest.raises(EndpointCannotServe, match=r"10 narratives have no result.*expired"):
        start(db, cfg)
    experiment_id = query(db, "SELECT experiment_id FROM experiments")[0][0]
    status, reason = status_of(db, experiment_id)
    assert status == "interrupted" and "resume" in (reason or "")
    first = rows(db, experiment_id)
    assert len(first) == 10
    assert query(db, "SELECT status, imported_at IS NOT NULL FROM batches") == [
        ("expired", 1)]

    server.batches.options = BatchOptions(delay_s=0.1)
    assert resume(db, experiment_id).status is Status.COMPLETED
    assert server.stats().batches_created == 2
    second = query(db, "SELECT n_requests, status FROM batches ORDER BY chunk")
    assert second == [(20, "expired"), (10, "completed")]
    resubmitted = {(r[0], r[1]) for r in query(
        db, "SELECT i.incident_id, i.narrative_type FROM batch_items i JOIN batches b "
            "ON b.batch_id = i.batch_id WHERE b.chunk = 2")}
    assert resubmitted.isdisjoint(first)
    everything = rows(db, experiment_id)
    assert len(everything) == 20 and all(everything[k] == v for k, v in first.items())


def test_error_file_lines_become_error_rows_with_the_live_categories(
        tmp_path: Path, server_factory: Any) -> None:
    server = server_factory(batch_delay_s=0.1, seed=3, max_context_chars=1000,
                            faults=FaultConfig(error_rate=0.15, rate_429=0.15, hang_rate=0.1))
    data = tmp_path / "data.csv"
    long_case = ("9999", "Her husband was arrested. " + "x" * 1200, "Notes", "1", "0", "1")
    write_fixture_csv(data, [*cases(12), long_case])
    db = tmp_path / "runs.db"
    experiment_id, summary = start(db, batch_config(tmp_path, server))
    assert summary.status is Status.COMPLETED
    stored = rows(db, experiment_id)
    assert len(stored) == 26
    error_file = query(db, "SELECT error_file_id FROM batches")[0][0]
    expected = {400: "data_error", 429: "rate_limit", 500: "api_error"}
    seen = set()
    for line in download(server, error_file):
        key = tuple(line["custom_id"].rsplit("/", 1))
        if line["response"] is None:
            assert line["error"]["code"] == "request_timeout"
            category = "timeout"
        else:
            category = expected[line["response"]["status_code"]]
        assert stored[key][4:] == (1, category)
        seen.add(category)
    assert seen == {"data_error", "rate_limit", "api_error", "timeout"}
    messages = dict(query(db, "SELECT error_category, error_message FROM narrative_results "
                              "WHERE error_occurred = 1"))
    assert messages["rate_limit"].startswith("HTTP 429")
    assert messages["data_error"].startswith("HTTP 400: prompt too long")
    assert sum(1 for r in stored.values() if r[4]) == len(download(server, error_file))


def test_a_refused_batch_api_stops_the_run_resumably(tmp_path: Path,
                                                       server_factory: Any) -> None:
    server = server_factory(api_key="right-key")
    db = tmp_path / "runs.db"
    with pytest.raises(EndpointCannotServe, match="HTTP 401"):
        start(db, batch_config(tmp_path, server))
    experiment_id = query(db, "SELECT experiment_id FROM experiments")[0][0]
    assert status_of(db, experiment_id)[0] == "interrupted"
    assert query(db, "SELECT COUNT(*) FROM batches") == [(0,)]


def test_a_lost_chunk_the_provider_cannot_create_is_submitted_again(
        tmp_path: Path, server_factory: Any) -> None:
    server = server_factory(api_key="right-key", batch_delay_s=0.1)
    db = tmp_path / "runs.db"
    with pytest.raises(EndpointCannotServe):
        start(db, batch_config(tmp_path, server))
    experiment_id = query(db, "SELECT experiment_id FROM experiments")[0][0]
    # As if killed after recording a chunk whose file the provider no longer has.
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("INSERT INTO batches (batch_id, experiment_id, chunk, input_file_id, "
                     "status, n_requests, submitted_at) VALUES ('submitting:file-gone', ?, 1, "
                     "'file-gone', 'submitting', 1, 'then')", (experiment_id,))
        conn.execute("INSERT INTO batch_items VALUES ('submitting:file-gone', '0001', 'LE')")
    server.api_key = None
    assert resume(db, experiment_id).status is Status.COMPLETED
    assert server.stats().batches_created == 1
    assert query(db, "SELECT chunk, n_requests, status FROM batches") == [(1, 20, "completed")]
    assert len(rows(db, experiment_id)) == 20


def test_retry_errors_only_resubmits_the_error_rows(tmp_path: Path,
                                                    server_factory: Any) -> None:
    server = server_factory(batch_delay_s=0.05, max_context_chars=1000)
    write_fixture_csv(tmp_path / "data.csv", [
        *cases(3), ("9999", "Her husband was arrested. " + "x" * 1200, "Notes", "1", "0", "1")])
    db = tmp_path / "runs.db"
    experiment_id, _ = start(db, batch_config(tmp_path, server))
    errors = {k: r[5] for k, r in rows(db, experiment_id).items() if r[4]}
    assert errors == {("9999", "LE"): "data_error"}
    server.max_context_chars = None
    summary = execute(RunRequest(db_path=db, config_path=None, resume=True,
                                 experiment_id=experiment_id, retry_errors_only=True,
                                 categories=("data_error",), env={}), io.StringIO())
    assert summary.status is Status.COMPLETED
    assert not any(r[4] for r in rows(db, experiment_id).values())
    assert query(db, "SELECT n_requests FROM batches ORDER BY chunk") == [(8,), (1,)]


def test_max_response_bytes_bounds_each_answer_not_the_whole_output_file(
        tmp_path: Path, server_factory: Any) -> None:
    """The output file holds a chunk's answers and is far larger than one response may
    be; the limit applies to each answer in it, as to a live response."""
    server = server_factory()
    db = tmp_path / "runs.db"
    _, summary = start(db, batch_config(tmp_path, server, model={"max_response_bytes": 2048}))
    assert summary.status is Status.COMPLETED
    assert query(db, "SELECT COUNT(*), SUM(error_occurred) FROM narrative_results") == [
        (20, 0)]


# --------------------------------------------------------------------------- processes


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def submitted(db: Path) -> list[tuple[Any, ...]]:
    try:
        return query(db, "SELECT batch_id, status FROM batches WHERE status != 'submitting'")
    except sqlite3.Error:
        return []


@pytest.mark.parametrize("how", ["kill-9", "sigint", "kill-9-before-the-id-was-recorded"])
def test_a_stopped_run_resumes_polling_the_same_batch(tmp_path: Path, server_factory: Any,
                                                       how: str) -> None:
    server = server_factory(batch_delay_s=4.0)
    db = tmp_path / "runs.db"
    cfg = batch_config(tmp_path, server)
    proc = subprocess.Popen([sys.executable, "-m", "asyncrunner", "run", str(cfg), "--db",
                             str(db)], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: bool(submitted(db)))
        proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (130 if how == "sigint" else -9), stderr
    [(batch_id, _)] = submitted(db)
    experiment_id = experiment_id_from(stdout)
    if how == "sigint":
        assert status_of(db, experiment_id)[0] == "interrupted"
        assert "resume" in stderr.splitlines()[-1]
    if how.startswith("kill-9-before"):     # as if killed before the batch id was stored
        file_id = query(db, "SELECT input_file_id FROM batches")[0][0]
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("UPDATE batches SET batch_id = ?, status = 'submitting'",
                         (f"submitting:{file_id}",))
            conn.execute("UPDATE batch_items SET batch_id = ?", (f"submitting:{file_id}",))
    assert not query(db, "SELECT 1 FROM narrative_results")
    done = run_cli("resume", experiment_id, "--yes", "--db", str(db))
    assert done.returncode == 0, done.stderr
    stats = server.stats()
    assert (stats.batches_created, stats.files_uploaded) == (1, 1)
    assert query(db, "SELECT batch_id, status, imported_at IS NOT NULL FROM batches") == [
        (batch_id, "completed", 1)]
    assert len(rows(db, experiment_id)) == 20
    assert status_of(db, experiment_id)[0] == "completed"


# --------------------------------------------------------------------------- batch-file/import


def answer_file(server: MockServer, batch_file: Path, out: Path, *,
                extra: list[str] = ()) -> list[dict[str, Any]]:
    """What `vllm run-batch` writes for `batch_file`: each request answered by the
    simulator's chat endpoint, in the OpenAI batch output format."""
    answers = []
    with httpx.Client(timeout=5) as client:
        for i, raw in enumerate(batch_file.read_text().splitlines()):
            request = json.loads(raw)
            assert request["url"] == "/v1/chat/completions" and request["method"] == "POST"
            response = client.post(server.url, json=request["body"])
            answers.append({"id": f"vllm-{i}", "custom_id": request["custom_id"],
                            "response": {"status_code": response.status_code,
                                         "request_id": f"req-{i}", "body": response.json()},
                            "error": None})
    out.write_text("".join(json.dumps(a) + "\n" for a in answers) + "".join(extra))
    return answers


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_batch_file_then_batch_import_finishes_the_experiment(
        tmp_path: Path, server_factory: Any) -> None:
    server = server_factory()
    db = tmp_path / "runs.db"
    cfg = batch_config(tmp_path, server, model={"provider": "openai"})
    batch_file = tmp_path / "requests.jsonl"
    made = run_cli("batch-file", str(cfg), "--out", str(batch_file), "--db", str(db))
    assert made.returncode == 0, made.stderr
    assert made.stdout.splitlines()[0].startswith("experiment_id: ")
    experiment_id = experiment_id_from(made.stdout)
    assert str(batch_file) in made.stdout
    assert batch_file.stat().st_mode & 0o777 == 0o600
    assert status_of(db, experiment_id) == (
        "interrupted", f"waiting for batch-import: 20 requests in {batch_file}")

    answers = tmp_path / "answers.jsonl"
    lines = answer_file(server, batch_file, answers)
    # Partial first: the experiment waits for the rest.
    part = tmp_path / "part.jsonl"
    part.write_text("".join(json.dumps(a) + "\n" for a in lines[:5]))
    first = run_cli("batch-import", experiment_id, str(part), "--db", str(db))
    assert first.returncode == 0, first.stderr
    assert "5 new results; 5/20" in first.stdout and "remaining: 15" in first.stdout
    assert status_of(db, experiment_id)[0] == "interrupted"

    done = run_cli("batch-import", experiment_id, str(answers), "--db", str(db))
    assert done.returncode == 0, done.stderr
    assert "15 new results; 20/20" in done.stdout and "5 already stored" in done.stdout
    assert "completed: n=" in done.stdout and "exports:" in done.stdout
    assert status_of(db, experiment_id) == ("completed", None)
    imported = rows(db, experiment_id)

    # The same requests sent live give the same rows.
    live_id, _ = start(db, batch_config(tmp_path, server, name="live.yaml",
                                        model={"provider": "openai"}))
    assert rows(db, live_id) == imported

    again = run_cli("batch-import", experiment_id, str(answers), "--db", str(db))
    assert again.returncode == 0, again.stderr
    assert "0 new results" in again.stdout and "already completed" in again.stdout
    assert rows(db, experiment_id) == imported


def test_batch_import_refuses_foreign_keys_and_malformed_lines_and_keeps_the_first_duplicate(
        tmp_path: Path, server_factory: Any) -> None:
    server = server_factory()
    db = tmp_path / "runs.db"
    cfg = batch_config(tmp_path, server, n_cases=3, model={"provider": "openai"})
    batch_file = tmp_path / "requests.jsonl"
    made = run_cli("batch-file", str(cfg), "--out", str(batch_file), "--db", str(db))
    assert made.returncode == 0, made.stderr
    experiment_id = experiment_id_from(made.stdout)
    good = tmp_path / "answers.jsonl"
    answers = answer_file(server, batch_file, good)

    foreign = tmp_path / "foreign.jsonl"
    stranger = dict(answers[0], custom_id="nobody/LE")
    foreign.write_text(good.read_text() + json.dumps(stranger) + "\n")
    refused = run_cli("batch-import", experiment_id, str(foreign), "--db", str(db))
    assert refused.returncode == 2
    error = one_line_error(refused)
    assert "line 7" in error and "'nobody/LE'" in error and "nothing imported" in error

    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(good.read_text() + "{not json\n")
    refused = run_cli("batch-import", experiment_id, str(malformed), "--db", str(db))
    assert refused.returncode == 2
    assert "line 7: not valid JSON" in one_line_error(refused)
    assert not query(db, "SELECT 1 FROM narrative_results")

    # A second line for a key: the first wins. Here the second says the opposite.
    flipped = json.loads(json.dumps(answers[0]))
    message = flipped["response"]["body"]["choices"][0]["message"]
    answer = json.loads(message["content"])
    answer["detected"] = not answer["detected"]
    message["content"] = json.dumps(answer)
    duplicated = tmp_path / "duplicated.jsonl"
    duplicated.write_text(good.read_text() + json.dumps(flipped) + "\n")
    done = run_cli("batch-import", experiment_id, str(duplicated), "--db", str(db))
    assert done.returncode == 0, done.stderr
    assert "1 duplicate lines ignored (the first line wins)" in done.stdout
    incident, kind = answers[0]["custom_id"].rsplit("/", 1)
    assert rows(db, experiment_id)[(incident, kind)][0] == int(not answer["detected"])

    missing = run_cli("batch-import", "00000000-0000-4000-8000-000000000000", str(good),
                      "--db", str(db))
    assert missing.returncode == 3
    one_line_error(missing)


def test_batch_import_stores_expired_lines_as_remaining_and_errors_with_categories(
        tmp_path: Path, server_factory: Any) -> None:
    from asyncrunner.pipeline.batch_file import batch_file_command
    from asyncrunner.pipeline.batch_import import batch_import_command

    server = server_factory()
    db = tmp_path / "runs.db"
    cfg = batch_config(tmp_path, server, n_cases=2, model={"provider": "openai"})
    batch_file = tmp_path / "requests.jsonl"
    out = io.StringIO()
    assert batch_file_command(db, cfg, batch_file, overrides={}, env={}, out=out) == 0
    experiment_id = experiment_id_from(out.getvalue())
    keys = [json.loads(line)["custom_id"] for line in batch_file.read_text().splitlines()]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(line) + "\n" for line in [
        {"custom_id": keys[0], "response": {"status_code": 429, "body": {
            "error": {"message": "slow down"}}}, "error": None},
        {"custom_id": keys[1], "response": None,
         "error": {"code": "batch_expired", "message": "expired"}},
        {"custom_id": keys[2], "response": {"status_code": 400, "body": None},
         "error": "This model's maximum context length is 8 tokens"},
    ]))
    out = io.StringIO()
    assert batch_import_command(db, experiment_id, answers, out) == 0
    assert "2 new results; 2/4" in out.getvalue()
    assert "1 lines without an answer" in out.getvalue()
    stored = rows(db, experiment_id)
    assert sorted(r[5] for r in stored.values()) == ["data_error", "rate_limit"]


# --------------------------------------------------------------------------- pieces


def test_simulator_batch_validation_cancel_and_counters(server_factory: Any) -> None:
    server = server_factory(batch_delay_s=30.0)
    base = server.base_url
    with httpx.Client(timeout=5) as client:
        line = json.dumps({"custom_id": "a/LE", "method": "POST",
                           "url": "/v1/chat/completions",
                           "body": {"messages": [{"role": "user", "content": "x"}]}})
        bad = client.post(f"{base}/files", files={"file": ("b.jsonl", f"{line}\n{line}\n")},
                          data={"purpose": "batch"}).json()
        failed = client.post(f"{base}/batches", json={
            "input_file_id": bad["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}).json()
        assert failed["status"] == "failed"
        assert "repeated" in failed["errors"]["data"][0]["message"]
        good = client.post(f"{base}/files", files={"file": ("g.jsonl", line + "\n")},
                           data={"purpose": "batch"}).json()
        batch = client.post(f"{base}/batches", json={
            "input_file_id": good["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}).json()
        assert batch["status"] == "validating"
        cancelled = client.post(f"{base}/batches/{batch['id']}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["output_file_id"] is None
        [expired] = download(server, cancelled["error_file_id"])
        assert expired["error"]["code"] == "batch_cancelled"
        listed = client.get(f"{base}/batches").json()["data"]
        assert [b["id"] for b in listed] == [batch["id"], failed["id"]]
        assert client.post(f"{base}/files", data={"purpose": "batch"}).status_code == 400
        assert client.get(f"{base}/batches/nope").status_code == 404
    stats = server.stats()
    assert (stats.files_uploaded, stats.batches_created) == (2, 2)
    server.reset_stats()
    assert server.stats().batches_created == 0


def test_parse_multipart_and_api_base() -> None:
    body = (b"--XY\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            b"--XY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.jsonl\"\r\n"
            b"Content-Type: application/jsonl\r\n\r\n{}\n\r\n--XY--\r\n")
    assert parse_multipart("multipart/form-data; boundary=XY", body) == {
        "purpose": (None, b"batch"), "file": ("f.jsonl", b"{}\n")}
    with pytest.raises(ValueError, match="boundary"):
        parse_multipart("multipart/form-data", body)
    assert api_base("http://h/v1") == "http://h/v1"
    assert api_base("http://h/v1/chat/completions") == "http://h/v1"


async def test_codec_reads_lines_as_the_live_client_does() -> None:
    from asyncrunner.llm.client import ClientSettings
    from asyncrunner.pipeline.messages import Narrative
    from asyncrunner.pipeline.workers import Prompt

    codec = BatchCodec(ClientSettings(api_url="http://h/v1", model="m", temperature=0.0,
                                      max_tokens=100, timeout_s=5, max_attempts=3, seed=7),
                       Prompt("sys", "Narrative: <<TEXT>>"))
    n = Narrative(1, "a/b", "LE", "text", 1, 1)
    line = json.loads(codec.line(n))
    assert line["custom_id"] == "a/b/LE" and line["body"]["seed"] == 7
    assert line["body"]["messages"][1]["content"] == "Narrative: text"
    fatal = await codec.result(n, {"response": {"status_code": 404, "body": {
        "error": {"message": "The model `m` does not exist"}}}})
    assert fatal is not None and fatal.fatal is not None
    cut = await codec.result(n, {"response": {"status_code": 200, "body": {
        "choices": [{"message": {"content": '{"detected": tr'}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 100}}}})
    assert cut is not None and cut.error_category == "parse_error"
    assert cut.response_sec is None and cut.completion_tokens == 100
    assert await codec.result(n, {"error": {"code": "batch_cancelled"}}) is None
    odd = await codec.result(n, {"error": {"code": "weird", "message": "boom"}})
    assert odd is not None and odd.error_message == "batch error weird: boom"
    bounded = BatchCodec(codec.client.settings, Prompt("sys", "Narrative: <<TEXT>>"),
                         max_answer_bytes=64)
    big = await bounded.result(n, {"response": {"status_code": 200, "body": {
        "choices": [{"message": {"content": '{"detected": true, "rationale": "' + "x" * 100
                                            + '"}'}, "finish_reason": "stop"}]}}})
    assert big is not None and big.error_category == "api_error"
    assert big.error_message == "answer larger than max_response_bytes=64"
