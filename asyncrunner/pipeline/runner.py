"""The pipeline: one task group holding producer, workers and writer, and the two-stage stop.

    producer --(unbuffered stream)--> N workers --(bounded stream)--> writer

The narrative stream has no buffer, so a narrative leaves the producer only when a worker
is free to start it: on a stop nothing sits in a queue, only requests in flight. Stopping:

1. first SIGINT/SIGTERM: cancel the producer, which closes its stream; workers finish the
   request in hand and leave; after `grace_s` still-running requests are cancelled.
2. a second signal: cancel the workers now.

Either way the writer sees its stream close when the last worker leaves and commits what it
holds (shielded), so every result that reached it is durable. Cancelled requests produce
no row and are simply redone on resume.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import anyio.abc
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from asyncrunner.llm.client import ClientSettings, HttpSender, LLMClient
from asyncrunner.llm.throttle import AdaptiveLimiter, TokenBudget
from asyncrunner.pipeline.messages import Narrative, Result
from asyncrunner.pipeline.producer import WorkSelection, produce
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


@dataclass(frozen=True, slots=True)
class PipelineOutcome:
    stopped_by: int | None          # signal number, or None when the work ran out
    last: Snapshot | None


class StopControl:
    """The two-stage stop, driven by signals, or by whoever holds it calling request()."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self.producer_scope = anyio.CancelScope()
        self.work_scope: anyio.CancelScope | None = None
        self.watch_scope = anyio.CancelScope()
        self.grace_scope = anyio.CancelScope()

    def request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("signal", signal=signal.Signals(signum).name,
                        message=f"{signal.Signals(signum).name} received: stopping after "
                                f"requests in flight (up to {self.grace_s:g}s); "
                                "press Ctrl-C again to stop now")
            self.producer_scope.cancel()
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
                       stop: StopControl | None = None) -> PipelineOutcome:
    """Classify the selection's narratives through `http` (owned and closed by the caller)
    and commit every result; return how it ended. `stop` lets the caller stop it too."""
    stop = stop or StopControl(spec.grace_s)
    limiter = AdaptiveLimiter(spec.workers, requests_per_minute=spec.requests_per_minute)
    budget = (TokenBudget(spec.tokens_per_minute, spec.client.max_tokens)
              if spec.tokens_per_minute else None)
    client = LLMClient(spec.client, http, limiter, budget=budget)
    writer = ResultWriter(spec.db_path, spec.writer, on_commit=on_commit,
                          concurrency=lambda: limiter.stats().limit)
    narratives_send, narratives_recv = anyio.create_memory_object_stream[Narrative](0)
    results_send, results_recv = anyio.create_memory_object_stream[Result](
        max(2 * spec.writer.batch_size, 2 * spec.workers))
    with _collector_tuned_for_the_run():
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, results_recv)
            if spec.handle_signals:
                tg.start_soon(stop.watch)
            async with anyio.create_task_group() as work:
                stop.work_scope = work.cancel_scope
                work.start_soon(_produce, spec, narratives_send, stop, tg)
                async with narratives_recv, results_send:
                    for _ in range(spec.workers):
                        work.start_soon(worker, client, spec.prompt, narratives_recv.clone(),
                                        results_send.clone())
            stop.finished()
    return PipelineOutcome(stopped_by=stop.signum, last=writer.last)


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


async def _produce(spec: PipelineSpec, send: MemoryObjectSendStream[Narrative],
                   stop: StopControl, outer: anyio.abc.TaskGroup) -> None:
    # produce() closes `send` however it ends, which is what lets idle workers leave.
    with stop.producer_scope:
        await produce(spec.db_path, spec.selection, send)
    if stop.signum is not None:
        outer.start_soon(stop.grace_timer)
