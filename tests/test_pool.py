"""Endpoint pools (issue #13): routing, health, failover, the all-down stop, what is recorded.

Routing and health are unit-tested on router.EndpointPool with a fake clock; the client's
failover over httpx.MockTransport; whole runs in-process (session.execute) against
simulators on 127.0.0.1 over real HTTP, with one endpoint refusing connections, stopped
mid-run and started again, or every endpoint stopped; and one run through the real CLI.
In-process runs shorten the first cooldown step (router.COOLDOWN_BASE_S) so that an
endpoint goes down and comes back within a second.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from conftest import ROOT, ServerThread, cli_env, experiment_id_from, run_cli, write_fixture_csv
from pipeline_helpers import EXPERIMENT_ID, make_result, open_database
from test_runner import cases

from asyncrunner.config import build_config
from asyncrunner.errors import ConfigError, EndpointCannotServe
from asyncrunner.llm import router
from asyncrunner.llm.client import (
    ClientSettings,
    Completion,
    LLMClient,
    RequestFailure,
    describe_fatal,
    endpoint_settings,
)
from asyncrunner.llm.router import (
    COOLDOWN,
    DOWN,
    FAILURES_TO_COOL,
    UP,
    EndpointPool,
    cooldown_s,
    endpoint_lines,
)
from asyncrunner.llm.throttle import AdaptiveLimiter
from asyncrunner.pipeline.writer import ResultWriter, WriterSettings
from asyncrunner.plan import RunRequest
from asyncrunner.session import RunSummary, _redacted, _session_diff, _session_settings, execute
from asyncrunner.vocab import Status

# --- helpers -----------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def pool_of(*endpoints: tuple[float, int | None], clock: Clock | None = None,
            **kw: Any) -> EndpointPool:
    """A pool of (weight, max_concurrency) endpoints http://epN.test/v1."""
    return EndpointPool([endpoint_settings(f"http://ep{i}.test/v1", weight=w, max_concurrency=c)
                         for i, (w, c) in enumerate(endpoints)],
                        workers=64, clock=clock or Clock(), **kw)


def fail(pool: EndpointPool, index: int, clock: Clock, times: int = FAILURES_TO_COOL,
         reason: str = "HTTP 503: busy") -> None:
    for _ in range(times):
        pool.failed(pool.endpoints[index], clock(), clock(), reason)


def test_the_config_takes_a_list_of_endpoint_mappings() -> None:
    cfg = build_config({"model": {"endpoints": [{"api_url": "http://127.0.0.1:1/v1",
                                                 "weight": 2}]}}, env={})
    assert cfg.model.endpoints == [{"api_url": "http://127.0.0.1:1/v1", "weight": 2.0,
                                    "max_concurrency": None, "api_key_env": None}]
    with pytest.raises(ConfigError, match=r"model.endpoints\[0\]' must be a mapping"):
        build_config({"model": {"endpoints": ["http://127.0.0.1:1/v1"]}}, env={})


# Stopping a simulator while the run keeps connecting to it can hit a race in asyncio
# itself (Python 3.11: a connection accepted just before Server.close() fails in
# Server._attach's assertion, and its half-made transport is left for the garbage collector
# as a ResourceWarning). The tests that stop simulators under load let that one pass.
STOPPED_UNDER_LOAD = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def quick_cooldown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router, "COOLDOWN_BASE_S", 0.05)


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def servers() -> Iterator[Callable[..., ServerThread]]:
    """Simulators in threads the test can stop and start again (stop_soon, restart)."""
    started: list[ServerThread] = []

    def make(**kwargs: Any) -> ServerThread:
        st = ServerThread(**kwargs)
        st.__enter__()
        started.append(st)
        return st

    yield make
    for st in started:
        st.__exit__()


def stop_soon(st: ServerThread) -> Future[None]:
    """Stop a simulator without waiting for it (callable from the run's event loop)."""
    return asyncio.run_coroutine_threadsafe(st.server.stop(), st.loop)


def write_cfg(tmp_path: Path, endpoints: list[dict[str, Any]] | None, *, n_cases: int = 20,
              name: str = "cfg.yaml", api_url: str = "http://127.0.0.1:9/v1",
              model: dict[str, Any] | None = None, **run: Any) -> Path:
    data = tmp_path / "data.csv"
    if not data.exists():
        write_fixture_csv(data, cases(n_cases))
    cfg = {
        "experiment": {"name": "pool"},
        "model": {"name": "mock-classifier", "api_url": api_url, "api_key_env": None,
                  "temperature": 0.0, "timeout_s": 5, "max_tokens": 256,
                  "response_format": "json_object"}
                 | ({"endpoints": endpoints} if endpoints is not None else {}) | (model or {}),
        "data": {"file": str(data)},
        "run": {"workers": 4, "batch_size": 4, "commit_interval_s": 0.05, "max_attempts": 1,
                "retry_backoff_s": 0.01, "output_dir": str(tmp_path / "out"),
                "log_dir": str(tmp_path / "logs")} | run,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(db: Path, cfg: Path, on_commit: Callable[[Any], None] | None = None,
        env: dict[str, str] | None = None, **kw: Any) -> RunSummary:
    return execute(RunRequest(db_path=db, config_path=str(cfg), env=env or {}, **kw),
                   io.StringIO(), on_commit)


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def endpoint_counts(db: Path) -> Counter[str]:
    return Counter(str(e) for (e,) in query(db, "SELECT endpoint FROM narrative_results"))


def assert_exactly_once(db: Path, total: int) -> None:
    keys = query(db, "SELECT incident_id, narrative_type FROM narrative_results")
    assert len(keys) == total and len(set(keys)) == total


def session_endpoints(db: Path) -> list[dict[str, Any]]:
    """The latest session's endpoints_json, by endpoint."""
    (raw,) = query(db, "SELECT endpoints_json FROM sessions ORDER BY started_at DESC LIMIT 1")[0]
    stats: list[dict[str, Any]] = json.loads(raw)["endpoints"]
    return stats


# --- routing --------------------------------------------------------------------------------------


def test_outstanding_over_weight_sends_three_to_one_ties_by_order() -> None:
    pool = pool_of((3, None), (1, None))
    picked = [pool.pick() for _ in range(8)]
    assert [ep.index for ep in picked if ep] == [0, 1, 0, 0, 0, 1, 0, 0]
    # a steady stream with equal latency keeps the share: 6 of 8 in flight, 3:1 of traffic
    flying = [ep for ep in picked if ep]
    sent: Counter[int] = Counter()
    for _ in range(4000):
        pool.release(flying.pop(0))
        ep = pool.pick()
        assert ep is not None
        flying.append(ep)
        sent[ep.index] += 1
    assert sent[0] == 3 * sent[1]


def test_max_concurrency_caps_an_endpoint_and_a_full_pool_queues_at_the_least_loaded() -> None:
    pool = pool_of((1, 2), (1, None))
    assert [ep.index for ep in (pool.pick() for _ in range(6)) if ep] == [0, 1, 0, 1, 1, 1]
    assert pool.endpoints[0].in_flight == 2
    full = pool_of((1, 1), (1, 1))
    assert [ep.index for ep in (full.pick() for _ in range(4)) if ep] == [0, 1, 0, 1]


def test_the_endpoints_own_aimd_limit_routes_around_it_after_a_429() -> None:
    pool = pool_of((1, 4), (1, 4))
    a, b = pool.endpoints
    assert a.limiter is not None
    a.limiter.on_slow_down(None)                 # a 429 from a: its limit 4 -> 2, not b's
    assert (a.limiter.allowed, b.limiter.allowed if b.limiter else 0) == (2, 4)
    assert [ep.index for ep in (pool.pick() for _ in range(6)) if ep] == [0, 1, 0, 1, 1, 1]


def test_a_retry_avoids_the_endpoint_it_failed_on_while_another_can_take_it() -> None:
    clock = Clock()
    pool = pool_of((1, None), (1, None), clock=clock)
    a, b = pool.endpoints
    assert pool.pick(avoid=a) is b
    fail(pool, 1, clock)                          # b cools down: a is all there is
    assert pool.pick(avoid=a) is a


def test_cooldown_grows_on_failed_probes_and_a_success_resets_it() -> None:
    clock = Clock(100.0)
    pool = pool_of((1, None), (1, None), clock=clock)
    a, b = pool.endpoints
    fail(pool, 0, clock, FAILURES_TO_COOL - 1)
    assert a.state == UP                          # a failure or two: still up
    fail(pool, 0, clock, 1)
    assert (a.state, a.retry_at) == (COOLDOWN, 101.0)
    assert all(pool.pick() is b for _ in range(3))
    clock.t = 101.0
    assert pool.pick() is a                        # the half-open probe
    assert pool.pick() is b                        # and nothing else while it is out
    waits = []
    for _ in range(8):                            # each failed probe doubles the wait
        pool.failed(a, clock(), clock(), "ConnectError: connection failed or dropped")
        pool.release(a)
        waits.append(a.retry_at - clock())
        clock.t = a.retry_at
        assert pool.pick() is a
    assert waits == [2, 4, 8, 16, 32, 60, 60, 60]
    assert a.state == DOWN and [cooldown_s(n) for n in (1, 2, 7)] == [1, 2, 60]
    pool.succeeded(a, clock(), 0.2)
    pool.release(a)
    assert (a.state, a.fails, a.streak, a.retry_at) == (UP, 0, 0, 0.0)
    assert pool.pick() is a                        # full traffic again (b has 4 in flight)


def test_failures_sent_before_the_cooldown_do_not_lengthen_it() -> None:
    clock = Clock(100.0)
    pool = pool_of((1, None), (1, None), clock=clock)
    a = pool.endpoints[0]
    fail(pool, 0, clock)                           # cooling since 100, until 101
    clock.t = 100.5
    pool.failed(a, clock(), 99.9, "HTTP 502: bad gateway")   # was in flight when it died
    assert (a.retry_at, a.streak, a.errors) == (101.0, 1, FAILURES_TO_COOL + 1)


def test_a_probe_that_never_reports_frees_the_endpoint_after_the_hold() -> None:
    clock = Clock(100.0)
    pool = pool_of((1, None), (1, None), clock=clock, probe_hold_s=10.0)
    a = pool.endpoints[0]
    fail(pool, 0, clock)
    clock.t = 101.0
    assert pool.pick() is a
    pool.release(a)                                # cancelled: nothing reported
    clock.t = 110.9
    assert pool.pick() is not a
    clock.t = 111.0
    assert pool.pick() is a


def test_an_answer_that_is_an_error_still_counts_as_the_endpoint_answering() -> None:
    clock = Clock()
    pool = pool_of((1, None), (1, None), clock=clock)
    a = pool.endpoints[0]
    fail(pool, 0, clock)
    clock.t += 1
    pool.answered(a, clock())                      # a 400 or a 429 to its probe
    assert (a.state, a.errors, a.completed) == (UP, FAILURES_TO_COOL + 1, 0)
    assert pool.last_answer == clock()


def test_the_down_message_when_no_endpoint_has_answered_for_down_s() -> None:
    clock = Clock(100.0)
    pool = pool_of((1, None), (1, None), clock=clock, down_s=300.0,
                   resume_hint="asyncrunner resume abc")
    fail(pool, 0, clock, reason="ConnectError: connection failed or dropped")
    clock.t = 500.0
    assert pool.down_message() is None             # b never failed: it may still answer
    fail(pool, 1, clock, 1, reason="HTTP 503: overloaded")
    message = pool.down_message()
    assert message == (
        "no endpoint has answered for 300 s (http://ep0.test/v1/chat/completions: "
        "ConnectError: connection failed or dropped; http://ep1.test/v1/chat/completions: "
        "HTTP 503: overloaded); fix them, then `asyncrunner resume abc`")
    pool.succeeded(pool.endpoints[1], clock(), 0.1)
    assert pool.down_message() is None
    clock.t = 799.0
    fail(pool, 1, clock, 1)
    assert pool.down_message() is None             # answered 299 s ago


def test_a_pool_of_one_takes_every_request_whatever_its_health() -> None:
    clock = Clock()
    pool = EndpointPool([endpoint_settings("http://only.test/v1")], clock=clock)
    only = pool.endpoints[0]
    fail(pool, 0, clock, 5)
    assert only.state == DOWN and only.limiter is None
    assert pool.pick() is only and pool.pick(avoid=only) is only
    assert pool.max_failovers == 0 and not pool.other_healthy(only)


async def test_wait_takes_the_probe_when_a_cooldown_ends_or_says_the_pool_is_down() -> None:
    pool = EndpointPool([endpoint_settings("http://a.test/v1"),
                         endpoint_settings("http://b.test/v1")], cooldown_base_s=0.05)
    clock = Clock(pool.started)
    clock.t = pool.started
    for ep in pool.endpoints:
        for _ in range(FAILURES_TO_COOL):
            pool.failed(ep, pool.started, pool.started, "HTTP 500: boom")
    assert pool.pick() is None
    with anyio.fail_after(2):
        got = await pool.wait()
    assert got is pool.endpoints[0]                # the probe, after 0.05 s
    down = EndpointPool([endpoint_settings("http://a.test/v1"),
                         endpoint_settings("http://b.test/v1")], down_s=0.1,
                        cooldown_base_s=30.0)
    for ep in down.endpoints:
        fail(down, ep.index, Clock(down.started))
    with anyio.fail_after(2):
        said = await down.wait()
    assert isinstance(said, str) and said.startswith("no endpoint has answered for 0.1 s")


async def test_a_waiting_request_wakes_when_an_endpoint_answers_again() -> None:
    pool = EndpointPool([endpoint_settings("http://a.test/v1"),
                         endpoint_settings("http://b.test/v1")], cooldown_base_s=30.0)
    start = Clock(pool.started)
    for ep in pool.endpoints:
        fail(pool, ep.index, start)
    got: list[object] = []

    async def waiter() -> None:
        got.append(await pool.wait())

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.05)
            pool.succeeded(pool.endpoints[1], start(), 0.3)   # a late answer from b
    assert got == [pool.endpoints[1]]


def test_stats_json_and_the_status_lines() -> None:
    clock = Clock(100.0)
    pool = pool_of((2, 8), (1, None), clock=clock)
    a = pool.endpoints[0]
    for latency in (0.5, 1.0, 2.0):
        pool.pick()
        pool.succeeded(a, clock(), latency)
        pool.release(a)
    fail(pool, 1, clock, reason="ConnectError: connection failed or dropped")
    clock.t = 100.5
    assert pool.pick() is a
    stats = pool.stats()
    assert stats[0] == {"endpoint": "http://ep0.test/v1/chat/completions", "weight": 2.0,
                        "max_concurrency": 8, "state": UP, "in_flight": 1, "completed": 3,
                        "errors": 0, "rate": 6.0, "median_latency_s": 1.0, "retry_in_s": None,
                        "last_error": None}
    assert stats[1]["retry_in_s"] == 0.5
    assert (stats[1]["state"], stats[1]["errors"], stats[1]["median_latency_s"]) == (
        COOLDOWN, FAILURES_TO_COOL, None)
    snapshot = json.loads(pool.snapshot_json())
    assert snapshot["as_of"].endswith("Z") and len(snapshot["endpoints"]) == 2
    lines = endpoint_lines(pool.snapshot_json())
    assert lines[0] == ("endpoint http://ep0.test/v1/chat/completions: up, 1 in flight, "
                        "3 completed (6.00/s), median 1.00 s, 0 errors")
    assert lines[1].startswith("endpoint http://ep1.test/v1/chat/completions: cooldown "
                               "(next try in 0.5 s), 0 in flight, ")
    assert lines[1].endswith("; last error: ConnectError: connection failed or dropped")
    assert endpoint_lines(None) == [] and endpoint_lines("{oops") == ["endpoints: (not readable)"]


# --- the client: failover ---------------------------------------------------------------------

OK_BODY = {"choices": [{"message": {"content": '{"detected": true}'}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 11, "completion_tokens": 7}}


def pooled_client(answers: dict[str, Callable[[httpx.Request], httpx.Response]], *,
                  attempts: int = 1, down_s: float = 300.0,
                  keys: tuple[str | None, ...] = (None, None),
                  ) -> tuple[LLMClient, EndpointPool, list[httpx.Request]]:
    """A client over endpoints http://<host>/v1 for each host in `answers`."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[request.url.host](request)

    pool = EndpointPool([endpoint_settings(f"http://{host}/v1", api_key=key)
                         for host, key in zip(answers, keys, strict=True)],
                        workers=4, down_s=down_s)
    settings = ClientSettings(api_url="http://unused.test/v1", model="m", temperature=0.0,
                              max_tokens=50, timeout_s=5, max_attempts=attempts,
                              backoff_base_s=0.0, pool=pool)
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return LLMClient(settings, http, AdaptiveLimiter(4)), pool, seen


def status(code: int, message: str = "x") -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(code, json={"error": {"message": message}})


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=OK_BODY)


async def test_an_endpoint_failure_is_retried_elsewhere_without_using_an_attempt() -> None:
    client, pool, seen = pooled_client({"a.test": status(503), "b.test": ok},
                                       keys=("key-A", "key-B"))
    out = await client.complete("s", "u")
    assert isinstance(out, Completion) and out.endpoint == "http://b.test/v1/chat/completions"
    assert out.attempts == 2                       # two requests, one of max_attempts=1
    assert [r.headers["authorization"] for r in seen] == ["Bearer key-A", "Bearer key-B"]
    a, b = pool.endpoints
    assert (a.errors, a.fails, b.completed, a.in_flight, b.in_flight) == (1, 1, 1, 0, 0)
    assert a.limiter is not None and a.limiter.stats().decreases == 1   # a 503 slows a
    assert client.limiter.stats().decreases == 0                         # not the run
    await client.http.aclose()


async def test_a_4xx_is_the_requests_failure_not_the_endpoints() -> None:
    client, pool, seen = pooled_client({"a.test": status(400, "content filtered"),
                                        "b.test": ok}, attempts=3)
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure) and out.status == 400 and not out.fatal
    assert out.endpoint == "http://a.test/v1/chat/completions" and len(seen) == 1
    assert pool.endpoints[0].fails == 0
    await client.http.aclose()


async def test_a_429_slows_its_endpoint_only_and_the_retry_goes_elsewhere() -> None:
    client, pool, seen = pooled_client({"a.test": status(429), "b.test": ok}, attempts=2)
    out = await client.complete("s", "u")
    assert isinstance(out, Completion) and out.attempts == 2
    assert [r.url.host for r in seen] == ["a.test", "b.test"]
    a = pool.endpoints[0]
    assert a.limiter is not None and a.limiter.stats().decreases == 1 and a.fails == 0
    assert client.limiter.stats().decreases == 0
    await client.http.aclose()


async def test_a_retry_elsewhere_does_not_wait_for_the_other_endpoints_retry_after() -> None:
    client, pool, seen = pooled_client({"a.test": lambda r: httpx.Response(
        429, headers={"Retry-After": "30"}), "b.test": ok}, attempts=2)
    with anyio.fail_after(5):
        out = await client.complete("s", "u")
    assert isinstance(out, Completion) and [r.url.host for r in seen] == ["a.test", "b.test"]
    a = pool.endpoints[0]
    assert a.limiter is not None and a.limiter.stats().paused_for_s > 25   # a waits, b not
    await client.http.aclose()


async def test_free_failovers_are_bounded() -> None:
    client, pool, seen = pooled_client({"a.test": status(502), "b.test": status(500)})
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure) and out.status in (500, 502)
    assert len(seen) == 1 + pool.max_failovers == 5 and out.attempts == 5
    await client.http.aclose()


async def test_no_endpoint_answering_for_down_s_is_a_fatal_failure() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client, _, seen = pooled_client({"a.test": refused, "b.test": status(503, "overloaded")},
                                    down_s=0.0)
    out = await client.complete("s", "u")
    assert isinstance(out, RequestFailure) and out.fatal and out.status is None
    assert len(seen) == 2
    assert describe_fatal(out) == out.message == (
        "no endpoint has answered for 0 s (http://a.test/v1/chat/completions: ConnectError: "
        "connection failed or dropped; http://b.test/v1/chat/completions: HTTP 503: "
        "overloaded); fix them, then `asyncrunner resume EXPERIMENT_ID`")
    await client.http.aclose()


# --- the writer: which endpoint answered, and the session's figures ----------------------------


async def test_the_writer_stores_the_endpoint_and_the_sessions_figures(tmp_path: Path) -> None:
    with open_database(tmp_path) as db:
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("INSERT INTO sessions (session_id, experiment_id, intent, started_at) "
                         "VALUES ('s1', ?, 'new', '2025-01-01T00:00:00Z')", (EXPERIMENT_ID,))
        calls: list[int] = []

        def figures() -> str:
            calls.append(1)
            return json.dumps({"endpoints": [{"endpoint": "http://a/x", "state": UP}]})

        async def write(results: list[Any], **kw: Any) -> None:
            settings = WriterSettings(EXPERIMENT_ID, total=4, session_target=4, batch_size=2,
                                      session_id="s1", endpoint_stats=figures, **kw)
            send, recv = anyio.create_memory_object_stream[Any](10)
            async with anyio.create_task_group() as tg:
                tg.start_soon(ResultWriter(db, settings).run, recv)
                async with send:
                    for r in results:
                        await send.send(r)

        await write([replace(make_result(1), endpoint="http://a/x"),
                     replace(make_result(2, error_category="timeout"), endpoint="http://b/x")])
        await write([replace(make_result(2), endpoint="http://a/x")], retry_errors_only=True)
        assert query(db, "SELECT incident_id, endpoint, error_occurred FROM narrative_results "
                         "ORDER BY incident_id") == [("inc-0001", "http://a/x", 0),
                                                     ("inc-0002", "http://a/x", 0)]
        (raw,), = query(db, "SELECT endpoints_json FROM sessions WHERE session_id = 's1'")
        assert endpoint_lines(raw)[0].startswith("endpoint http://a/x: up") and len(calls) == 2


# --- whole runs -------------------------------------------------------------------------------


def test_a_refusing_endpoint_is_failed_over_for_free_and_marked_down(
        tmp_path: Path, servers: Callable[..., ServerThread], quick_cooldown: None) -> None:
    live = [servers(latency_ms=20), servers(latency_ms=20)]
    dead = refused_url()
    db = tmp_path / "runs.db"
    cfg = write_cfg(tmp_path, [{"api_url": dead}] + [{"api_url": s.server.base_url}
                                                      for s in live], n_cases=40)
    summary = run(db, cfg)
    assert summary.status is Status.COMPLETED
    assert_exactly_once(db, 80)
    assert query(db, "SELECT COUNT(*) FROM narrative_results WHERE error_occurred = 1") == [(0,)]
    counts = endpoint_counts(db)
    assert set(counts) == {s.server.url for s in live}      # which endpoint answered
    stats = session_endpoints(db)
    assert [e["endpoint"] for e in stats] == [f"{dead}/chat/completions",
                                               *(s.server.url for s in live)]
    assert stats[0]["state"] == DOWN and stats[0]["completed"] == 0
    assert stats[0]["errors"] >= FAILURES_TO_COOL + 1
    assert "ConnectError" in stats[0]["last_error"]
    assert [e["state"] for e in stats[1:]] == [UP, UP]
    assert sum(e["completed"] for e in stats[1:]) == 80 + 1      # and the probe's
    assert all(e["in_flight"] == 0 for e in stats)


@STOPPED_UNDER_LOAD
def test_an_endpoint_stopped_mid_run_is_routed_around_and_gets_traffic_once_back(
        tmp_path: Path, servers: Callable[..., ServerThread], quick_cooldown: None) -> None:
    a, b = servers(latency_ms=30), servers(latency_ms=30)
    port = b.server.port
    db = tmp_path / "runs.db"
    cfg = write_cfg(tmp_path, [{"api_url": a.server.base_url}, {"api_url": b.server.base_url}],
                    n_cases=120)
    stopping: list[Future[None]] = []
    back: list[ServerThread] = []

    def on_commit(snapshot: Any) -> None:
        if snapshot.done >= 20 and not stopping:
            stopping.append(stop_soon(b))
        elif snapshot.done >= 60 and stopping and not back:
            stopping[0].result(timeout=5)
            back.append(servers(latency_ms=30, port=port))   # the same URL, a new server

    summary = run(db, cfg, on_commit)
    assert summary.status is Status.COMPLETED and back
    assert_exactly_once(db, 240)
    assert query(db, "SELECT COUNT(*) FROM narrative_results WHERE error_occurred = 1") == [(0,)]
    returned = back[0].server.stats()
    assert returned.status(200) >= 5          # its probe, then full traffic again
    stats = session_endpoints(db)
    assert stats[1]["state"] == UP and stats[1]["errors"] >= 1
    counts = endpoint_counts(db)
    served_by_b = counts[b.server.url]        # the same URL before and after
    assert served_by_b >= b.server.stats().status(200) + returned.status(200) - 1
    assert served_by_b + counts[a.server.url] == 240


@STOPPED_UNDER_LOAD
def test_every_endpoint_down_stops_the_run_resumable_and_a_resume_finishes_exactly(
        tmp_path: Path, servers: Callable[..., ServerThread], quick_cooldown: None) -> None:
    first = [servers(latency_ms=20), servers(latency_ms=20)]
    db = tmp_path / "runs.db"
    cfg = write_cfg(tmp_path, [{"api_url": s.server.base_url} for s in first], n_cases=60,
                    endpoint_down_s=0.3, breaker_window=1000, max_attempts=3)
    stopped: list[Future[None]] = []

    def on_commit(snapshot: Any) -> None:
        if snapshot.done >= 12 and not stopped:
            stopped.extend(stop_soon(s) for s in first)

    with pytest.raises(EndpointCannotServe) as caught:
        run(db, cfg, on_commit)
    message = str(caught.value)
    (eid, state, reason), = query(db, "SELECT experiment_id, status, failure_reason "
                                      "FROM experiments")
    assert state == Status.INTERRUPTED and reason == message
    assert message.startswith("no endpoint has answered for 0.3 s (")
    assert all(s.server.url in message for s in first)
    assert message.endswith(f"fix them, then `asyncrunner resume {eid}`")
    kept = query(db, "SELECT incident_id, narrative_type FROM narrative_results")
    assert len(kept) >= 12 and len(set(kept)) == len(kept)
    assert {e["state"] for e in session_endpoints(db)} == {DOWN}
    # The endpoints are back (elsewhere): a resume with them finishes, nothing twice.
    second = [servers(), servers()]
    cfg2 = write_cfg(tmp_path, [{"api_url": s.server.base_url} for s in second],
                     name="cfg2.yaml", endpoint_down_s=0.3, max_attempts=3)
    summary = run(db, cfg2, resume=True, experiment_id=eid)
    assert summary.status is Status.COMPLETED
    assert_exactly_once(db, 120)
    assert set(query(db, "SELECT incident_id, narrative_type FROM narrative_results")) >= set(
        kept)
    assert {e["state"] for e in session_endpoints(db)} == {UP}


def test_weights_share_the_traffic_and_max_concurrency_caps_an_endpoint(
        tmp_path: Path, servers: Callable[..., ServerThread]) -> None:
    heavy, light, capped = (servers(latency_ms=20), servers(latency_ms=20),
                            servers(latency_ms=20))
    db = tmp_path / "runs.db"
    cfg = write_cfg(tmp_path, [{"api_url": heavy.server.base_url, "weight": 3},
                               {"api_url": light.server.base_url, "weight": 1},
                               {"api_url": capped.server.base_url, "weight": 10,
                                "max_concurrency": 1}], n_cases=100, workers=9)
    assert run(db, cfg).status is Status.COMPLETED
    assert_exactly_once(db, 200)
    counts = endpoint_counts(db)
    assert 2.2 <= counts[heavy.server.url] / counts[light.server.url] <= 4.0
    assert capped.server.stats().max_in_flight == 1 and counts[capped.server.url] > 0


def test_keys_per_endpoint_and_no_secret_is_stored_or_logged(
        tmp_path: Path, servers: Callable[..., ServerThread], console: io.StringIO) -> None:
    a = servers(api_key="sk-ALPHA-4f1c")
    b = servers(api_key="sk-BRAVO-9e2d")
    db = tmp_path / "runs.db"
    cfg = write_cfg(tmp_path, [
        {"api_url": a.server.base_url + "?token=QUERY-SECRET-1", "api_key_env": "A_KEY"},
        {"api_url": b.server.base_url}], model={"api_key_env": "B_KEY"})
    env = {"A_KEY": "sk-ALPHA-4f1c", "B_KEY": "sk-BRAVO-9e2d"}
    assert run(db, cfg, env=env).status is Status.COMPLETED
    assert_exactly_once(db, 40)
    assert a.server.stats().status(401) == b.server.stats().status(401) == 0
    assert set(endpoint_counts(db)) == {a.server.url, b.server.url}
    stored = "\n".join(str(row) for table in ("experiments", "sessions", "narrative_results")
                       for row in query(db, f"SELECT * FROM {table}"))
    logged = "\n".join(p.read_text() for p in (tmp_path / "logs").rglob("*.jsonl"))
    logged += console.getvalue()
    for secret in ("sk-ALPHA-4f1c", "sk-BRAVO-9e2d", "QUERY-SECRET-1"):
        assert secret not in stored and secret not in logged
    assert a.server.url in stored and a.server.url in logged


def test_stored_settings_redact_every_endpoint_url() -> None:
    cfg = build_config({"model": {"endpoints": [
        {"api_url": "https://user:pw-S3CRET@gpu1.example/v1?key=Q-S3CRET"},
        {"api_url": "http://gpu2.example:8000/v1", "weight": 2}]}}, env={})
    settings = json.dumps(_session_settings(cfg))
    assert "S3CRET" not in settings and "S3CRET" not in json.dumps(_redacted(cfg).to_dict())
    assert "https://gpu1.example/v1/chat/completions" in settings
    given = [{"api_url": "http://u:pw-S3CRET@gpu1.example/v1/chat/completions"}]
    same = [{"api_url": "http://gpu1.example/v1/chat/completions"}]
    assert _session_diff(cfg, {"model.endpoints": {"stored": same, "session": given},
                               "model.api_url": {"stored": "a", "session": "b"}}) == {}


def test_the_single_api_url_form_records_its_endpoint(
        tmp_path: Path, servers: Callable[..., ServerThread]) -> None:
    only = servers()
    db = tmp_path / "runs.db"
    summary = run(db, write_cfg(tmp_path, None, api_url=only.server.base_url))
    assert summary.status is Status.COMPLETED
    assert endpoint_counts(db) == Counter({only.server.url: 40})
    (stats,) = session_endpoints(db)
    assert (stats["endpoint"], stats["state"], stats["completed"]) == (only.server.url, UP, 41)


def test_the_cli_runs_a_pool_of_two(tmp_path: Path,
                                    servers: Callable[..., ServerThread]) -> None:
    a, b = servers(latency_ms=10), servers(latency_ms=10)
    db = tmp_path / "runs.db"
    cfg = write_cfg(tmp_path, [{"api_url": a.server.base_url}, {"api_url": b.server.base_url}])
    done = run_cli("run", str(cfg), "--db", str(db))
    assert done.returncode == 0, done.stderr
    experiment_id_from(done.stdout)
    assert_exactly_once(db, 40)
    assert set(endpoint_counts(db)) == {a.server.url, b.server.url}
    assert [e["state"] for e in session_endpoints(db)] == [UP, UP]


def test_url_credentials_beside_an_api_key_are_refused_in_one_line(tmp_path: Path) -> None:
    """Basic auth in the URL and a bearer key cannot both be sent: run, plan and a resume
    refuse before anything is written (the transport used to fail mid-run)."""
    data = write_fixture_csv(tmp_path / "data.csv", cases(3))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": "m", "api_key_env": "POOL_TEST_KEY",
                  "endpoints": [{"api_url": "http://127.0.0.1:9/v1"},
                                {"api_url": "http://user:pw-SECRET@127.0.0.1:9/v1"}]},
        "data": {"file": str(data)},
        "run": {"output_dir": str(tmp_path / "out"), "log_dir": str(tmp_path / "logs")}}))
    env = cli_env(POOL_TEST_KEY="sk-POOL-SECRET")
    db = tmp_path / "runs.db"
    for args in (("run", str(cfg), "--db", str(db)), ("plan", str(cfg))):
        done = subprocess.run([sys.executable, "-m", "asyncrunner", *args],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and "SECRET" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(
            "asyncrunner: error: config key 'model.endpoints[1].api_url' carries user:password")
    assert not db.exists()
