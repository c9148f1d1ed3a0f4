"""The pipeline: one task group holding producer, workers and writer, and the two-stage stop.

    producer --(hand-out)--> N workers --(bounded stream)--> writer

A narrative starts only when a worker takes it from the hand-out (handout.py); what is left
there on a stop is dropped like the rest of the producer's page, so on a stop nothing but
the requests in flight is under way. Stopping:

1. first SIGINT/SIGTERM: cancel the producer, which ends the hand-out dropping what is
   left; workers finish the request in hand and leave; after `grace_s` still-running
   requests are cancelled.
2. a second signal: cancel the workers now.

Either way the writer sees its stream close when the last worker leaves and commits what it
holds (shielded), so every result that reached it is durable (a worker waiting to hand a
finished result to a full writer stream finishes handing it over, shielded, first).
Cancelled requests produce no row and are simply redone on resume.

The endpoint can stop a run as well (`StopControl.halt`, like a second signal: producer
and requests in flight cancelled at once), seen by the workers' gate as results come in:
  * a fatal failure (401/403/404, a refused request field: `Result.fatal`); its result is
    not stored, the narrative stays remaining;
  * the circuit breaker: the last `breaker_window` results were all errors.
`PipelineOutcome.halted` says why, in one line.

With `auto_workers` (`--workers auto`), an `Autotuner` (llm/autotune.py) runs beside the
workers, measures the answers through a `Meter` around the HTTP session and sets the
limiter's target; `workers` is then the ceiling (that many workers, at most that many
requests at a time). It stops when the workers are done.
"""

from __future__ import annotations

import gc
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import anyio
import anyio.abc
import structlog

from asyncrunner.db.ingest import IngestReport
from asyncrunner.db.loading import BackgroundLoad
from asyncrunner.llm.autotune import DEFAULT_AUTOTUNE, Autotuner, AutotuneSettings, Meter
from asyncrunner.llm.client import ClientSettings, HttpSender, LLMClient
from asyncrunner.llm.throttle import AdaptiveLimiter, TokenBudget
from asyncrunner.pipeline.handout import Handout
from asyncrunner.pipeline.loading import LoadFeed, keep_loading
from asyncrunner.pipeline.messages import Result
from asyncrunner.pipeline.producer import FirstPage, WorkSelection, produce
from asyncrunner.pipeline.progress import Snapshot
from asyncrunner.pipeline.workers import Prompt, worker
from asyncrunner.pipeline.writer import ResultWriter, WriterSettings

log = structlog.get_logger("asyncrunner.pipeline.runner")


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """Everything the pipeline needs besides its resources (database path, HTTP client)."""

    db_path: str
    selection: WorkSelection
    writer: WriterSettings
    client: ClientSettings
    prompt: Prompt
    workers: int
    grace_s: float = 30.0
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    handle_signals: bool = True
    breaker_window: int | None = 50     # None: no breaker
    auto_workers: bool = False          # tune the concurrency, `workers` is the ceiling
    autotune: AutotuneSettings = DEFAULT_AUTOTUNE


@dataclass(frozen=True, slots=True)
class PipelineOutcome:
    stopped_by: int | None          # signal number, or None when the work ran out
    last: Snapshot | None
    halted: str | None = None       # why the endpoint stopped the run (one line), if it did
    halt_kind: str | None = None    # HALT_FATAL | HALT_BREAKER


HALT_FATAL = "fatal"
HALT_BREAKER = "breaker"


class Breaker:
    """Trips when the last `window` results were all errors."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._streak: Counter[str] = Counter()
        self._length = 0

    def add(self, result: Result) -> str | None:
        """The reason it trips on this result, or None."""
        if result.error_category is None:
            self._streak.clear()
            self._length = 0
            return None
        self._streak[str(result.error_category)] += 1
        self._length += 1
        if self._length < self.window:
            return None
        counts = ", ".join(f"{k} {v}" for k, v in self._streak.most_common())
        return (f"circuit breaker: the last {self._length} results were all errors "
                f"({counts}); check the endpoint and the model settings")


class StopControl:
    """The two-stage stop, driven by signals, or by whoever holds it calling request()."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self.producer_scope = anyio.CancelScope()
        self.load_scope = anyio.CancelScope()     # a data file still loading (loading.py)
        self.work_scope: anyio.CancelScope | None = None
        self.watch_scope = anyio.CancelScope()
        self.grace_scope = anyio.CancelScope()
        self.halted: str | None = None
        self.halt_kind: str | None = None

    def halt(self, kind: str, reason: str) -> None:
        """The endpoint cannot serve: stop now, as a second signal would."""
        if self.halted is None:
            self.halted, self.halt_kind = reason, kind
            log.error("halt", kind=kind, message=f"stopping now: {reason}")
        self.producer_scope.cancel()
        self.load_scope.cancel()
        if self.work_scope is not None:
            self.work_scope.cancel()

    def request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("signal", signal=signal.Signals(signum).name,
                        message=f"{signal.Signals(signum).name} received: stopping after "
                                f"requests in flight (up to {self.grace_s:g}s); "
                                "press Ctrl-C again to stop now")
            self.producer_scope.cancel()
            self.load_scope.cancel()
        elif self.work_scope is not None:
            log.warning("signal", signal=signal.Signals(signum).name,
                        message="second signal: cancelling requests in flight")
            self.work_scope.cancel()

    async def watch(self) -> None:
        with self.watch_scope, anyio.open_signal_receiver(signal.SIGINT,
                                                          signal.SIGTERM) as signals:
            async for signum in signals:
                self.request(signum)

    async def grace_timer(self) -> None:
        """After the first signal, give in-flight requests `grace_s`, then cancel them."""
        with self.grace_scope:
            await anyio.sleep(self.grace_s)
            if self.work_scope is not None:
                self.work_scope.cancel()

    def finished(self) -> None:
        self.watch_scope.cancel()
        self.grace_scope.cancel()


async def run_pipeline(spec: PipelineSpec, http: HttpSender, *,
                       on_commit: Callable[[Snapshot], None] | None = None,
                       stop: StopControl | None = None,
                       first_page: FirstPage | None = None,
                       loading: Loading | None = None) -> PipelineOutcome:
    """Classify the selection's narratives through `http` (owned and closed by the caller)
    and commit every result; return how it ended. `stop` lets the caller stop it too;
    `first_page`: the selection's first page, already being read; `loading`: the data
    file's load still to finish beside the pipeline (its feed bounds the producer)."""
    stop = stop or StopControl(spec.grace_s)
    limiter = AdaptiveLimiter(spec.workers, requests_per_minute=spec.requests_per_minute)
    budget = (TokenBudget(spec.tokens_per_minute, spec.client.max_tokens)
              if spec.tokens_per_minute else None)
    meter = Meter(http) if spec.auto_workers else None
    tuner = Autotuner(limiter, meter, spec.autotune) if meter is not None else None
    client = LLMClient(spec.client, meter or http, limiter, budget=budget)
    breaker = Breaker(spec.breaker_window) if spec.breaker_window else None

    def gate(result: Result) -> bool:
        """Whether a worker sends this result on to the writer; halts the run on a fatal one
        (dropped) or when the breaker trips. Checked in the worker, before it can start
        another request."""
        if result.fatal is not None:
            stop.halt(HALT_FATAL, result.fatal)
            return False
        reason = breaker.add(result) if breaker is not None else None
        if reason is not None:
            stop.halt(HALT_BREAKER, reason)
        return True

    writer = ResultWriter(spec.db_path, spec.writer, on_commit=on_commit,
                          concurrency=lambda: limiter.stats().limit,
                          waiting=lambda: _waiting(limiter))

    def announce(seconds: float, reason: str) -> None:
        until = datetime.now() + timedelta(seconds=seconds)
        log.warning("waiting", wait_s=round(seconds, 1), reason=reason,
                    message=f"waiting for the server ({reason}): every request waits "
                            f"until {until:%H:%M:%S}")
        writer.publish()

    limiter.on_pause = announce
    # Refilled while a row per worker is left, so a worker rarely finds it empty.
    handout = Handout(low=spec.workers)
    results_send, results_recv = anyio.create_memory_object_stream[Result](
        max(2 * spec.writer.batch_size, 2 * spec.workers))
    with _collector_tuned_for_the_run():
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, results_recv)
            if spec.handle_signals:
                tg.start_soon(stop.watch)
            if tuner is not None:
                tg.start_soon(tuner.run)
            async with anyio.create_task_group() as work:
                stop.work_scope = work.cancel_scope
                if loading is not None:
                    work.start_soon(_load, spec, loading, stop)
                work.start_soon(_produce, spec, handout, stop, tg, first_page,
                                loading.feed if loading is not None else None)
                scope = work.cancel_scope
                async with results_send:
                    for _ in range(spec.workers):
                        work.start_soon(worker, client, spec.prompt, handout,
                                        results_send.clone(), gate, lambda: scope.cancel_called)
            if tuner is not None:
                tuner.stop()
            stop.finished()
    return PipelineOutcome(stopped_by=stop.signum, last=writer.last, halted=stop.halted,
                           halt_kind=stop.halt_kind)


@dataclass(frozen=True, slots=True)
class Loading:
    """A data file's load to finish beside the pipeline (db/loading.py), its feed, and
    what to do with its final report."""

    load: BackgroundLoad
    feed: LoadFeed
    on_loaded: Callable[[IngestReport], None] | None = None


async def _load(spec: PipelineSpec, loading: Loading, stop: StopControl) -> None:
    # Stopped with the producer: a load stopped halfway is finished by the next session.
    with stop.load_scope:
        await keep_loading(loading.load, loading.feed, spec.db_path, loading.on_loaded)


def _waiting(limiter: AdaptiveLimiter) -> tuple[datetime, str] | None:
    stats = limiter.stats()
    if stats.paused_for_s <= 0 or stats.pause_reason is None:
        return None
    return datetime.now() + timedelta(seconds=stats.paused_for_s), stats.pause_reason


# Allocations (net of frees) between two young-generation collections during a run.
GC_YOUNG_THRESHOLD = 10_000


@contextmanager
def _collector_tuned_for_the_run() -> Iterator[None]:
    """Keep Python's cyclic garbage collector from costing as much as the requests.

    With hundreds of requests in flight, many of each request's objects outlive a
    young-generation collection (every 700 allocations by default) and get promoted, so
    collections come often and scan much: they took as much time as everything else the
    loop does per request. For the run, everything alive before it (modules, config) is
    frozen out of the collector's sight and collections come every GC_YOUNG_THRESHOLD
    allocations; cyclic garbage is still collected, in bigger rounds. Garbage left from
    before (an ingest leaves tens of MiB) is collected first: frozen, it would stay for
    the whole run. Both settings are put back afterwards."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], GC_YOUNG_THRESHOLD), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def _produce(spec: PipelineSpec, handout: Handout,
                   stop: StopControl, outer: anyio.abc.TaskGroup,
                   first_page: FirstPage | None, feed: LoadFeed | None) -> None:
    # produce() ends the hand-out however it ends, which is what lets idle workers leave.
    with stop.producer_scope:
        await produce(spec.db_path, spec.selection, handout, first=first_page, feed=feed)
    if stop.signum is not None:
        outer.start_soon(stop.grace_timer)
