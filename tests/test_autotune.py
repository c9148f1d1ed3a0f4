"""`--workers auto`: the tuner's decisions on synthetic servers (a knee at K, a gradual
slowdown, a 429 limit, a server that changes under a held level), the limiter's target,
and the whole pipeline against the simulator with K slots, which it must find.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog.testing
from test_runner import prepare

from asyncrunner.llm.autotune import (
    HOLD,
    AutotuneSettings,
    Decision,
    Meter,
    Tuner,
    Window,
)
from asyncrunner.llm.client import make_http_client
from asyncrunner.llm.throttle import AdaptiveLimiter
from asyncrunner.pipeline.progress import Snapshot
from asyncrunner.pipeline.runner import StopControl, run_pipeline
from asyncrunner.sim import MockServer

SETTINGS = AutotuneSettings()
WINDOW_S = 2.0
# (rate per s, median latency s, slow-downs) at a level
Curve = Callable[[int], tuple[float, float, int]]


def knee(k: int, latency_s: float = 0.05, overhead_s: float = 0.002,
         noise: float = 0.0, seed: int = 0) -> Curve:
    """A server with k slots: the rate rises until k requests at a time, then requests
    queue: the latency grows with the level and the rate stays (Little's law)."""
    rng = random.Random(seed)

    def at(level: int) -> tuple[float, float, int]:
        latency = overhead_s + latency_s * max(1.0, level / k)
        jitter = 1.0 + rng.uniform(-noise, noise)
        return level / latency * jitter, latency * (1.0 + rng.uniform(-noise, noise)), 0
    return at


class Drive:
    """Feeds a tuner one window per WINDOW_S from a curve, which may change on the way."""

    def __init__(self, curve: Curve, ceiling: int = 256,
                 settings: AutotuneSettings = SETTINGS) -> None:
        self.curve = curve
        self.tuner = Tuner(settings, ceiling)
        self.now = 0.0
        self.decisions: list[Decision] = []

    def windows(self, n: int) -> list[Decision]:
        out = []
        for _ in range(n):
            level = self.tuner.level
            rate, latency, slowdowns = self.curve(level)
            self.now += WINDOW_S
            out.append(self.tuner.observe(Window(level, round(rate * WINDOW_S), WINDOW_S,
                                                 latency, slowdowns, self.now)))
        self.decisions += out
        return out

    def settle(self, max_windows: int = 40) -> int:
        for _ in range(max_windows):
            (decision,) = self.windows(1)
            if decision.settled:
                return decision.level
        raise AssertionError(f"not settled after {max_windows} windows: {self.decisions}")


def within(value: float, k: float, tolerance: float = 0.25) -> bool:
    return (1 - tolerance) * k <= value <= (1 + tolerance) * k


# --- the decision, on synthetic servers -----------------------------------------------------


@pytest.mark.parametrize("k", [2, 5, 8, 13, 24, 40, 100, 200])
def test_settles_within_a_quarter_of_the_knee(k: int) -> None:
    assert within(Drive(knee(k)).settle(), k)


@pytest.mark.parametrize("seed", range(10))
def test_settles_near_the_knee_despite_noisy_windows(seed: int) -> None:
    for k in (8, 24, 64):
        assert within(Drive(knee(k, noise=0.05, seed=seed)).settle(), k)


def test_a_gradual_slowdown_stops_the_climb_at_the_latency_bound() -> None:
    """No knee: the rate rises all the way, but the latency grows with the level; the
    climb stops once the median passes 1.5 x the latency at the first level."""
    def at(level: int) -> tuple[float, float, int]:
        latency = 0.05 * (1.0 + level / 40)
        return level / latency, latency, 0
    drive = Drive(at)
    level = drive.settle()
    assert at(level)[1] <= SETTINGS.latency_bound * at(SETTINGS.start)[1]
    assert level >= 10


def test_a_slow_down_settles_below_the_level_that_drew_it() -> None:
    """The server answers 429 beyond 10 at a time: the tuner stays at the last level
    that passed (the limiter's AIMD has halved already)."""
    base = knee(200)

    def at(level: int) -> tuple[float, float, int]:
        rate, latency, _ = base(level)
        return rate, latency, 5 if level > 10 else 0
    level = Drive(at).settle()
    assert level <= 10 and level >= 6


def test_never_above_the_ceiling() -> None:
    assert Drive(knee(500), ceiling=32).settle() == 32
    assert Drive(knee(8), ceiling=3).settle() == 3
    assert Tuner(SETTINGS, ceiling=2).level == 2


def test_holding_reprobes_and_follows_a_server_that_grew() -> None:
    """Settled at 8; the server grows to 40 slots: within a re-probe interval and a
    climb the level is near 40."""
    k = [8]
    drive = Drive(lambda level: knee(k[0])(level))
    assert within(drive.settle(), 8)
    k[0] = 40
    drive.windows(int(SETTINGS.reprobe_s / WINDOW_S) + 12)
    assert within(drive.tuner.level, 40)
    assert drive.tuner.phase == HOLD
    # Held, it probes once per interval and comes back to the same level each time.
    drive.windows(int(3 * SETTINGS.reprobe_s / WINDOW_S))
    assert within(drive.tuner.level, 40)


def test_a_latency_rise_while_holding_backs_off_to_the_new_knee() -> None:
    """Settled near 40; the server drops to 10 slots: the latency doubles and more, and
    after two such windows a cycle settles near 10 without waiting for the re-probe."""
    k = [40]
    drive = Drive(lambda level: knee(k[0])(level))
    assert within(drive.settle(), 40)
    k[0] = 10
    # The cycle halves the level until the rate drops (20 and 10 are still past the knee).
    assert within(drive.settle(), 10)
    assert drive.now < SETTINGS.reprobe_s


def test_a_latency_rise_that_is_not_queueing_does_not_collapse_the_level() -> None:
    """The model gets twice as slow for everyone (longer answers): same 24 slots. The
    cycles measure a new baseline and settle near 24 again, not lower and lower."""
    slow = [1.0]
    drive = Drive(lambda level: knee(24, latency_s=0.05 * slow[0])(level))
    assert within(drive.settle(), 24)
    slow[0] = 2.0
    drive.windows(int(2 * SETTINGS.reprobe_s / WINDOW_S))
    assert within(drive.tuner.level, 24)


def test_a_slow_down_while_holding_backs_off() -> None:
    refuse = [False]
    base = knee(30)

    def at(level: int) -> tuple[float, float, int]:
        rate, latency, _ = base(level)
        return rate, latency, 3 if refuse[0] else 0
    drive = Drive(at)
    held = drive.settle()
    refuse[0] = True
    (decision,) = drive.windows(1)
    assert decision.settled and decision.level == int(held * SETTINGS.backoff)


# --- the limiter's target -------------------------------------------------------------------


def test_the_target_caps_the_limit_and_aimd_works_below_it() -> None:
    limiter = AdaptiveLimiter(256)
    assert limiter.set_target(8) == 8
    assert limiter.stats().limit == 8 and limiter.stats().target == 8
    limiter.on_slow_down(None)
    assert limiter.stats().limit == 4
    for _ in range(200):
        limiter.on_success()
    assert limiter.stats().limit == 8          # climbs back to the target, not the ceiling
    assert limiter.set_target(1000) == 256     # never above the ceiling
    assert limiter.stats().limit == 256
    assert limiter.set_target(0) == 1


def test_a_limit_held_down_by_a_slow_down_climbs_to_a_raised_target() -> None:
    limiter = AdaptiveLimiter(64)
    limiter.set_target(16)
    limiter.on_slow_down(None)                 # 8
    limiter.set_target(24)
    assert limiter.stats().limit == 8          # no jump past what the server just refused
    for _ in range(1000):
        limiter.on_success()
    assert limiter.stats().limit == 24


async def test_raising_the_target_lets_waiting_requests_start() -> None:
    limiter = AdaptiveLimiter(8)
    limiter.set_target(1)
    await limiter.acquire()
    started: list[int] = []

    async def second() -> None:
        await limiter.acquire()
        started.append(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(0.01)
        assert not started
        limiter.set_target(2)
        await anyio.sleep(0.01)
        assert started
    assert limiter.stats().in_flight == 2


async def test_the_meter_counts_answers_latencies_and_slow_downs() -> None:
    statuses = iter([200, 429, 200, 503, 500, 200])

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(statuses))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        meter = Meter(http)
        request = httpx.Request("POST", "http://llm.invalid/v1/chat/completions")
        await meter.send(request)
        async with anyio.create_task_group() as tg:
            async def send_rest() -> None:
                for _ in range(5):
                    await meter.send(request)
            tg.start_soon(send_rest)
            window = await meter.window(4, 0.0, 2)
    assert (window.completions, window.slowdowns) == (2, 2)
    assert meter.completions == 3 and window.median_latency_s >= 0


# --- the pipeline against the simulator -----------------------------------------------------


async def tuned_run(tmp_path: Path, server_factory: Callable[..., MockServer], k: int,
                    narratives: int) -> tuple[int, list[dict[str, Any]], Snapshot | None]:
    """Run with a ceiling of 128 against a simulator with k slots of 50 ms; stop the run
    (as a first Ctrl-C would) once the tuner has settled. The settled value, the tuner's
    log, the last snapshot."""
    sim = server_factory(capacity=k, latency_ms=50.0)
    _, _, spec = prepare(tmp_path, narratives // 2)
    spec = replace(spec, workers=128, auto_workers=True,
                   client=replace(spec.client, api_url=sim.url),
                   writer=replace(spec.writer, batch_size=100, interval_s=0.25))
    stop = StopControl(spec.grace_s)
    snapshots: list[Snapshot] = []
    with structlog.testing.capture_logs() as logs:
        def on_commit(snapshot: Snapshot) -> None:
            snapshots.append(snapshot)
            if stop.signum is None and _settled(logs):
                stop.request(signal.SIGINT)

        async with make_http_client(spec.workers, spec.client.timeout_s) as http:
            await run_pipeline(spec, http, on_commit=on_commit, stop=stop)
    settled = _settled(logs)
    assert settled, f"the tuner did not settle within {narratives} narratives"
    return settled[0]["workers"], logs, snapshots[-1] if snapshots else None


def _settled(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "workers_auto" and e.get("phase") == "settled"]


@pytest.mark.parametrize(("k", "narratives"), [(8, 3000), (24, 8000)])
async def test_the_pipeline_finds_the_simulators_slots(
        tmp_path: Path, server_factory: Callable[..., MockServer], k: int,
        narratives: int) -> None:
    workers, logs, last = await tuned_run(tmp_path, server_factory, k, narratives)
    assert within(workers, k), [e for e in logs if e["event"].startswith("workers_auto")]
    said = _settled(logs)[0]
    assert said["log_level"] == "info" and f"{workers} requests at a time" in said["message"]
    assert last is not None and last.concurrency == workers   # what the progress shows

