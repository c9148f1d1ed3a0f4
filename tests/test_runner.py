"""The pipeline in-process: real producer, workers, client, writer and SQLite file; the HTTP
boundary is an httpx.MockTransport (tests/fake_llm.py). The two-stage stop is driven through
the pipeline's StopControl at exact request counts, and once through a real SIGINT.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import structlog.testing
from conftest import write_fixture_csv
from fake_llm import FakeLLM, experiment_row, result_keys

from asyncrunner.config import build_config
from asyncrunner.db import experiments
from asyncrunner.db.ingest import ingest
from asyncrunner.db.schema import connect
from asyncrunner.llm.client import ClientSettings
from asyncrunner.pipeline.producer import WorkSelection
from asyncrunner.pipeline.progress import Snapshot, progress_line
from asyncrunner.pipeline.runner import PipelineOutcome, PipelineSpec, StopControl, run_pipeline
from asyncrunner.pipeline.workers import Prompt
from asyncrunner.pipeline.writer import WriterSettings

EXPERIMENT = "6f1c1d2e-0000-4000-8000-000000000001"
WORKERS = 4


def cases(n: int) -> list[tuple[str, ...]]:
    return [(f"{i:04d}", f"Her husband was arrested, case {i}" if i % 3 == 0
             else f"Found at home, case {i}", f"Autopsy notes {i}", "1" if i % 3 == 0 else "0",
             "0", "0") for i in range(n)]


def prepare(tmp_path: Path, n_cases: int = 30) -> tuple[Path, int, PipelineSpec]:
    """A database with the narratives of `n_cases` cases and an experiment over them."""
    db = tmp_path / "runs.db"
    data = write_fixture_csv(tmp_path / "data.csv", cases(n_cases))
    cfg = build_config({"data": {"file": str(data)}}, env={})
    conn = connect(db)
    try:
        report = ingest(conn, cfg.data, data)
        experiments.create(conn, cfg, experiment_id=EXPERIMENT, data_file=str(data),
                           checksum=report.data_checksum, n_total=report.n_narratives,
                           api_url="http://llm.invalid/v1/chat/completions",
                           log_dir=str(tmp_path / "logs"))
    finally:
        conn.close()
    total = report.n_narratives
    spec = PipelineSpec(
        db_path=str(db), selection=WorkSelection(EXPERIMENT, report.data_checksum, None),
        writer=WriterSettings(EXPERIMENT, total=total, session_target=total, batch_size=4,
                              interval_s=0.05),
        client=ClientSettings(api_url="http://llm.invalid/v1/chat/completions", model="m",
                              temperature=0.0, max_tokens=64, timeout_s=5.0, max_attempts=2,
                              backoff_base_s=0.0),
        prompt=Prompt("Classify.", "Narrative: <<TEXT>>"), workers=WORKERS, grace_s=5.0,
        handle_signals=False)
    return db, total, spec


async def run(spec: PipelineSpec, fake: FakeLLM, stop: StopControl | None = None,
              snapshots: list[Snapshot] | None = None) -> PipelineOutcome:
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        return await run_pipeline(spec, http, stop=stop,
                                  on_commit=snapshots.append if snapshots is not None else None)


def stored(db: Path) -> int:
    return len(result_keys(db, EXPERIMENT))


def assert_consistent(db: Path) -> None:
    """The progress row agrees with the rows, and no narrative has two results."""
    keys = result_keys(db, EXPERIMENT)
    assert len(keys) == len(set(keys))
    assert experiment_row(db, EXPERIMENT)["n_narratives_completed"] == len(keys)


async def test_every_narrative_gets_exactly_one_result(tmp_path: Path) -> None:
    db, total, spec = prepare(tmp_path)
    fake, snapshots = FakeLLM(), []
    outcome = await run(spec, fake, snapshots=snapshots)
    assert outcome.stopped_by is None
    assert stored(db) == total == fake.requests
    assert outcome.last is not None and outcome.last.done == total
    assert [s.done for s in snapshots] == sorted(s.done for s in snapshots)
    assert_consistent(db)
    with sqlite3.connect(db) as conn:
        detected = dict(conn.execute(
            "SELECT incident_id || '/' || narrative_type, detected FROM narrative_results"))
    conn.close()
    assert detected["0003/LE"] == 1 and detected["0004/LE"] == 0


async def test_first_stop_finishes_requests_in_flight_and_resume_sends_only_the_rest(
        tmp_path: Path) -> None:
    db, total, spec = prepare(tmp_path)
    stop = StopControl(spec.grace_s)
    fake = FakeLLM(delay_s=0.02).after(10, lambda: stop.request(signal.SIGINT))
    outcome = await run(spec, fake, stop)
    assert outcome.stopped_by == signal.SIGINT
    first = stored(db)
    # Every request that was answered was stored; nothing new was started after the stop.
    assert first == fake.by_status[200] == fake.requests
    assert 10 <= first <= 10 + WORKERS
    assert_consistent(db)
    rest = FakeLLM()
    outcome = await run(spec, rest)
    assert outcome.stopped_by is None
    assert rest.requests == total - first
    assert stored(db) == total
    assert_consistent(db)


async def test_second_stop_cancels_requests_in_flight(tmp_path: Path) -> None:
    db, total, spec = prepare(tmp_path)
    stop = StopControl(spec.grace_s)

    def stop_twice() -> None:
        stop.request(signal.SIGINT)
        stop.request(signal.SIGINT)

    fake = FakeLLM(hang_from=9).after(9, stop_twice)
    outcome = await run(spec, fake, stop)
    assert outcome.stopped_by == signal.SIGINT
    assert stored(db) <= 8
    assert_consistent(db)
    await run(spec, FakeLLM())
    assert stored(db) == total
    assert_consistent(db)


async def test_grace_period_ends_hung_requests(tmp_path: Path) -> None:
    db, _, spec = prepare(tmp_path)
    stop = StopControl(grace_s=0.2)
    fake = FakeLLM(hang_from=6).after(6, lambda: stop.request(signal.SIGTERM))
    outcome = await run(spec, fake, stop)
    assert outcome.stopped_by == signal.SIGTERM
    assert stored(db) == 5
    assert_consistent(db)


async def test_a_real_sigint_stops_the_pipeline(tmp_path: Path) -> None:
    db, total, spec = prepare(tmp_path)
    spec = replace(spec, handle_signals=True)
    fake = FakeLLM(delay_s=0.01).after(5, lambda: os.kill(os.getpid(), signal.SIGINT))
    outcome = await run(spec, fake)
    assert outcome.stopped_by == signal.SIGINT
    assert 0 < stored(db) < total
    assert_consistent(db)


async def test_failed_requests_are_error_rows_not_exceptions(tmp_path: Path) -> None:
    db, total, spec = prepare(tmp_path)
    fake = FakeLLM(fail=lambda text: 500 if "case 7" in text else None)
    outcome = await run(spec, fake)
    assert outcome.stopped_by is None and stored(db) == total
    with sqlite3.connect(db) as conn:
        errors = conn.execute("SELECT incident_id, error_category, attempt_count "
                              "FROM narrative_results WHERE error_occurred = 1").fetchall()
    conn.close()
    assert errors == [("0007", "api_error", 2)]


async def test_an_unexpected_exception_propagates_and_leaves_committed_work_consistent(
        tmp_path: Path) -> None:
    db, _, spec = prepare(tmp_path)

    def boom() -> None:
        raise RuntimeError("bug in the transport")

    fake = FakeLLM(delay_s=0.01).after(12, boom)
    with pytest.raises(BaseExceptionGroup) as caught:
        await run(spec, fake)
    assert caught.group_contains(RuntimeError, match="bug in the transport")
    assert stored(db) < 12
    assert_consistent(db)


@pytest.mark.parametrize("delay_s", [0.0, 0.005])
async def test_no_request_starts_after_the_breaker_halts_the_run(
        tmp_path: Path, delay_s: float) -> None:
    db, _, spec = prepare(tmp_path, n_cases=60)
    spec = replace(spec, breaker_window=5,
                   client=replace(spec.client, max_attempts=1))
    fake = FakeLLM(fail=lambda text: 500, delay_s=delay_s)
    outcome = await run(spec, fake)
    assert outcome.halt_kind == "breaker"
    # Every request sent was either stored or was in flight on another worker when the
    # breaker tripped (and was cancelled): none was started after the halt.
    assert stored(db) <= fake.requests <= stored(db) + WORKERS - 1
    assert_consistent(db)


async def test_a_long_wait_for_the_server_is_shown_on_the_progress_and_in_the_log(
        tmp_path: Path) -> None:
    """Retry-After: 3600 on the first request, capped at 2.5 s: a snapshot says what every
    request waits for and until when, before the next commit; then the run completes."""
    db, total, spec = prepare(tmp_path)
    spec = replace(spec, client=replace(spec.client, max_retry_after_s=2.5, max_attempts=3))
    fake = FakeLLM()
    refused = [False]

    async def handler(request: httpx.Request) -> httpx.Response:
        if not refused[0]:
            refused[0] = True
            return httpx.Response(429, headers={"Retry-After": "3600"}, text="slow down")
        return await fake.handle(request)

    snapshots: list[Snapshot] = []
    with structlog.testing.capture_logs() as logs:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            outcome = await run_pipeline(spec, http, on_commit=snapshots.append)
    assert outcome.stopped_by is None and stored(db) == total
    waits = [s for s in snapshots if s.waiting_until is not None]
    assert waits and waits[0].session_done == 0          # shown before any commit
    assert waits[0].waiting_for == ("HTTP 429, Retry-After 3600s "
                                    "(capped at run.max_retry_after_s=2.5s)")
    assert "Waiting: until " in progress_line(waits[0])
    assert snapshots[-1].waiting_until is None
    said = [e for e in logs if e["event"] == "waiting"]
    assert len(said) == 1 and "every request waits until" in said[0]["message"]
