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

import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import anyio.abc
import structlog

from .client import ClientSettings, LLMClient, make_http_client
from .messages import Narrative, Result
from .producer import WorkSelection, produce
from .progress import Snapshot
from .throttle import AdaptiveLimiter, TokenBudget
from .workers import Prompt, worker
from .writer import ResultWriter, WriterSettings

log = structlog.get_logger("asyncrunner.runner")


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    db_path: Path
    selection: WorkSelection
    writer: WriterSettings
    client: ClientSettings
    prompt: Prompt
    workers: int
    grace_s: float = 30.0
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    mock_server: bool = False
    mock_latency_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class PipelineOutcome:
    stopped_by: int | None          # signal number, or None when the work ran out
    last: Snapshot | None
    api_url: str


class _Stop:
    """The two-stage stop, driven by signals (or by tests calling request())."""

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
        with self.watch_scope:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
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


async def run_pipeline(spec: PipelineSpec,
                       on_commit: Callable[[Snapshot], None] | None = None,
                       on_start: Callable[[str], None] | None = None) -> PipelineOutcome:
    stop = _Stop(spec.grace_s)
    limiter = AdaptiveLimiter(spec.workers, requests_per_minute=spec.requests_per_minute)
    client_settings = spec.client
    async with AsyncExitStack() as stack:
        if spec.mock_server:
            from .mockserver import MockServer

            server = await stack.enter_async_context(
                MockServer(latency_ms=spec.mock_latency_ms, model=spec.client.model))
            client_settings = _with_url(client_settings, server.url)
        if on_start:
            on_start(client_settings.api_url)
        http = await stack.enter_async_context(
            make_http_client(spec.workers, client_settings.timeout_s))
        budget = (TokenBudget(spec.tokens_per_minute, client_settings.max_tokens)
                  if spec.tokens_per_minute else None)
        client = LLMClient(client_settings, http, limiter, budget=budget)
        writer = ResultWriter(spec.db_path, spec.writer, on_commit=on_commit,
                              concurrency=lambda: limiter.stats().limit)
        narratives_send, narratives_recv = anyio.create_memory_object_stream[Narrative](0)
        results_send, results_recv = anyio.create_memory_object_stream[Result](
            max(2 * spec.writer.batch_size, 2 * spec.workers))
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, results_recv)
            tg.start_soon(stop.watch)
            async with anyio.create_task_group() as work:
                stop.work_scope = work.cancel_scope
                work.start_soon(_produce, spec, narratives_send, stop, tg)
                async with narratives_recv, results_send:
                    for _ in range(spec.workers):
                        work.start_soon(worker, client, spec.prompt, narratives_recv.clone(),
                                        results_send.clone())
            stop.finished()
    return PipelineOutcome(stopped_by=stop.signum, last=writer.last,
                           api_url=client_settings.api_url)


async def _produce(spec: PipelineSpec, send: anyio.abc.ObjectSendStream[Narrative],
                   stop: _Stop, outer: anyio.abc.TaskGroup) -> None:
    # produce() closes `send` however it ends, which is what lets idle workers leave.
    with stop.producer_scope:
        await produce(spec.db_path, spec.selection, send)
    if stop.signum is not None:
        outer.start_soon(stop.grace_timer)


def _with_url(settings: ClientSettings, url: str) -> ClientSettings:
    return replace(settings, api_url=url)
