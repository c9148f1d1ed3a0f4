"""Every endpoint fault over real HTTP against the mock server: each ends as a correct
result or a correctly categorised error row, and the run goes on.

Before the narratives the session probes the response format (one request per candidate
of `auto` while the endpoint does not answer: see llm/probe.py); those requests are counted
here too. A run that finishes with more errors than run.max_error_share exits 4."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import (
    FIXTURE_ROWS,
    cli_env,
    experiment_id_from,
    run_cli,
    write_config,
    write_fixture_csv,
)

from asyncrunner.sim import FaultConfig


def rows_of(db: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM narrative_results").fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("faults", "category", "attempts", "message", "probe_requests"),
    [
        # an endpoint that does not answer: the probe tries all three modes of auto, each
        # with max_attempts, then the run goes ahead unverified
        (FaultConfig(error_rate=1.0), "api_error", 2, "HTTP 500", 6),
        (FaultConfig(rate_429=1.0, retry_after_s=0.05), "rate_limit", 2, "HTTP 429", 6),
        (FaultConfig(rate_503=1.0, retry_after_s=None), "api_error", 2, "HTTP 503", 6),
        (FaultConfig(rate_502_html=1.0), "api_error", 2, "Bad Gateway", 6),
        (FaultConfig(hang_rate=1.0), "timeout", 2, "no response within", 6),
        (FaultConfig(reset_rate=1.0), "api_error", 2, "connection", 6),
        # an answer that does not parse gets one repair turn (malformed again here)...
        (FaultConfig(malformed_rate=1.0), "parse_error", 2, "no JSON object", 1),
        # ...but a cut-off one none: a repair cannot recover it
        (FaultConfig(truncate_rate=1.0), "parse_error", 1, "finish_reason=length", 1),
        (FaultConfig(fenced_rate=1.0), None, 1, None, 1),
        (FaultConfig(reasoning_rate=1.0), None, 1, None, 1),
    ],
    ids=["500", "429", "503", "502html", "hang", "reset", "malformed", "truncated", "fenced",
         "reasoning"],
)
def test_each_fault_ends_as_the_right_row(tmp_path: Path, server_factory, faults: FaultConfig,  # type: ignore[no-untyped-def]
                                          category: str | None, attempts: int,
                                          message: str | None, probe_requests: int) -> None:
    server = server_factory(faults=faults)
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, server.url, max_attempts=2, model={"timeout_s": 0.5})
    db = tmp_path / "exp.db"
    proc = run_cli("run", str(cfg), "--db", str(db))
    # errored narratives are recorded, not fatal: the run completes; with every one of them
    # an error (above run.max_error_share) it exits 4
    assert proc.returncode == (0 if category is None else 4), proc.stderr
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT status FROM experiments").fetchone()[0] == "completed"
    finally:
        conn.close()
    rows = rows_of(db)
    assert len(rows) == 9
    for row in rows:
        assert row["error_category"] == category
        assert row["attempt_count"] == attempts
        assert row["error_occurred"] == (category is not None)
        if message:
            assert message in row["error_message"]
        else:
            assert row["detected"] in (0, 1) and row["rationale"]
    if category == "parse_error":
        assert all(r["raw_response"] for r in rows)  # the raw answer is kept for diagnosis
    assert server.stats().completion_requests == 9 * attempts + probe_requests


def test_fault_mix_completes_with_bounded_retry_load(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    faults = FaultConfig(rate_429=0.10, error_rate=0.05, hang_rate=0.01, malformed_rate=0.05,
                         retry_after_s=0.05)
    server = server_factory(faults=faults, seed=11, latency_ms=2)
    rows_in = [(f"{i:04d}", f"Case {i}: her husband was jealous." if i % 3 == 0 else
                f"Case {i}: found at home.", f"Exam {i}.", "1" if i % 3 == 0 else "0", "0", "")
               for i in range(150)]
    data = write_fixture_csv(tmp_path / "mix.csv", rows_in)
    cfg = write_config(tmp_path, data, server.url, workers=16, batch_size=20, max_attempts=3,
                       model={"timeout_s": 0.5})
    db = tmp_path / "exp.db"
    proc = run_cli("run", str(cfg), "--db", str(db), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = rows_of(db)
    assert len(rows) == len({(r["incident_id"], r["narrative_type"]) for r in rows}) == 300
    stats = server.stats()
    per_narrative = (stats.completion_requests - 1) / 300     # the probe's one request aside
    assert per_narrative <= 3 + 3                              # a repair request retried too
    assert per_narrative < 1.5  # ~21% faulty draws, most succeed on a retry
    for r in rows:
        if r["error_category"] == "parse_error":
            # a malformed answer, and its one repair turn malformed too (or failed)
            assert 2 <= r["attempt_count"] <= 6 and r["raw_response"]
        elif r["error_category"] is not None:
            # a transient fault three times in a row
            assert r["error_category"] in ("rate_limit", "api_error", "timeout")
            assert r["attempt_count"] == 3
    # about 5 % of first answers are malformed: a repair turn recovers most of them
    repaired = sum(r["answer_source"] == "repair" for r in rows)
    n_parse = sum(r["error_category"] == "parse_error" for r in rows)
    assert 3 <= repaired + n_parse <= 35
    assert n_parse <= repaired
    assert stats.repair_turns >= repaired + n_parse    # a repair request may be retried


def test_overloaded_server_gets_less_traffic_not_a_retry_storm(tmp_path: Path,
                                                               server_factory) -> None:  # type: ignore[no-untyped-def]
    """32 workers against a server that takes 4 at a time: without shared back-pressure
    28 of every 32 requests would bounce and be retried. With it, the workers slow down."""
    server = server_factory(max_concurrent=4, latency_ms=20,
                            faults=FaultConfig(retry_after_s=0.05))
    rows_in = [(str(i), f"Case {i}.", f"Exam {i}.", "0", "0", "0") for i in range(150)]
    data = write_fixture_csv(tmp_path / "load.csv", rows_in)
    cfg = write_config(tmp_path, data, server.url, workers=32, batch_size=20, max_attempts=8)
    db = tmp_path / "exp.db"
    proc = run_cli("run", str(cfg), "--db", str(db), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = rows_of(db)
    assert len(rows) == 300 and not any(r["error_occurred"] for r in rows)
    stats = server.stats()
    bounced = stats.outcome("overloaded")
    assert stats.completion_requests == 1 + 300 + bounced    # the probe, the narratives
    assert bounced < 150, f"{bounced} requests bounced: back-pressure is not shared"
    assert max(stats.arrivals_per_second) < 600


def test_api_key_never_stored_logged_or_exported(tmp_path: Path, mock_server) -> None:  # type: ignore[no-untyped-def]
    sentinel = "sk-SENTINEL-7f3a9c"
    data = write_fixture_csv(tmp_path / "cases.csv")
    cfg = write_config(tmp_path, data, mock_server.url)
    db = tmp_path / "exp.db"
    proc = run_cli("run", str(cfg), "--db", str(db),
                   env=cli_env(ASYNCRUNNER_TEST_KEY=sentinel))
    assert proc.returncode == 0, proc.stderr
    eid = experiment_id_from(proc.stdout)
    status = run_cli("status", eid, "--json", "--db", str(db))
    outputs = [proc.stdout, proc.stderr, status.stdout]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "run.jsonl" for p in files)
    for p in files:
        outputs.append(p.read_bytes().decode("utf-8", "replace"))
    narratives = [text for row in FIXTURE_ROWS for text in row[1:3] if text]
    for text in outputs:
        assert sentinel not in text
    logs = [p.read_text() for p in files if p.suffix == ".jsonl"]
    for log in logs:
        for narrative in narratives:
            assert narrative not in log
