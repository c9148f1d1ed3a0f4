"""The Batch API provider (`provider: openai-batch`): a run's requests sent as OpenAI batches,
polled until they end, and their answers stored exactly as live answers are.

    run_batches   (session._serve_pipeline calls it)
        pending batches of the experiment (`imported_at IS NULL`) are taken up first,
        never submitted again;
        the selection's remaining narratives not in a pending batch -> chunks of
        model.batch_max_requests lines (and at most BATCH_MAX_BYTES) -> per chunk:
            upload the JSONL (POST /v1/files)
            record the chunk: a `submitting` row and its batch_items     -- committed
            create the batch (POST /v1/batches)
            record the batch id                                          -- committed
        poll every model.batch_poll_s (GET /v1/batches/{id}) -> a batch that ended:
            its output and error files (GET /v1/files/{id}/content) -> every line through
            `BatchCodec.result` -> the ResultWriter -> the batch row's final status and
            `imported_at`                                                -- committed

Who owns what: the HTTP calls are llm.batch_api's, the rows db.batches', the line format
pipeline.batch_codec's, the answer lines -> writer step pipeline.batch_results'; this module
holds the loop and decides what a failure means. The offline commands `batch-file` /
`batch-import` (pipeline.batch_file, pipeline.batch_import) are re-exported here, with the
status helpers, for their callers.

A fatal answer is never stored (as in a live run); the session ends exit 4 with its reason.
There is no parse retry (no second turn inside a batch); `RETRY_ERRORS_ONLY=1` resubmits
error rows.

Crash safety (kill -9 anywhere):
  * before the `submitting` row: at most an uploaded file nobody uses; nothing is paid;
  * between the `submitting` row and the batch id: the resume looks for a batch made from
    that input file (GET /v1/batches) and adopts it, or creates it;
  * while polling or importing: the batch row is pending; the resume polls it, and an
    import starts again (INSERT OR IGNORE: nothing is stored twice).
A signal stops polling (the batches keep running at the provider; a resume picks them up);
an import under way finishes first, unless a second signal cancels it.

Output files are downloaded whole through the session's HTTP client, so
model.max_response_bytes bounds each answer in them, as it bounds a live response.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import structlog
from anyio.lowlevel import checkpoint

from asyncrunner.db import store
from asyncrunner.db.batches import (
    SUBMITTING,
    BatchRow,
    batch_info,
    batch_lines,
    discard_submitting,
    has_row,
    pending_batches,
    pending_keys,
    record_created,
    record_imported,
    record_polled,
    record_submitting,
)
from asyncrunner.db.schema import connect
from asyncrunner.llm.batch_api import TERMINAL, BatchApi, BatchApiError, request_counts
from asyncrunner.llm.client import HttpSender
from asyncrunner.pipeline.batch_codec import BatchCodec, error_parts, resolve_mode
from asyncrunner.pipeline.batch_file import batch_file_command
from asyncrunner.pipeline.batch_import import batch_import_command
from asyncrunner.pipeline.batch_results import (
    LineTally,
    answer_results,
    batch_narratives,
    store_results,
)
from asyncrunner.pipeline.handout import Handout
from asyncrunner.pipeline.producer import produce
from asyncrunner.pipeline.progress import Snapshot
from asyncrunner.pipeline.runner import PipelineOutcome, PipelineSpec

if TYPE_CHECKING:
    from asyncrunner.plan import RunPlan

log = structlog.get_logger("asyncrunner.pipeline.batch")

__all__ = [
    "batch_file_command",
    "batch_import_command",
    "batch_info",
    "batch_lines",
    "run_batches",
]

BATCH_MAX_BYTES = 190 * 1024 * 1024     # OpenAI takes input files up to 200 MB
HALT_BATCH = "batch"                    # PipelineOutcome.halt_kind: a batch left work undone
MAX_POLL_FAILURES = 10                  # polling rounds in a row that reached nobody
PAST_WINDOW_GRACE_S = 3600.0            # a batch still running this long after expires_at
MIN_POLL_S = 0.01

_T = TypeVar("_T")


class _Halt(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _Stop:
    """First SIGINT/SIGTERM: stop polling and submitting (the batches keep running at the
    provider); an import under way finishes. A second: cancel that import too."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.scope = anyio.CancelScope()
        self.import_scope: anyio.CancelScope | None = None

    def request(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log.warning("signal", signal=name, message=(
                f"{name} received: polling stops; submitted batches keep running at the "
                "provider and a resume picks them up"
                + ("; the import under way finishes first (again to stop now)"
                   if self.import_scope is not None else "")))
            self.scope.cancel()
        elif self.import_scope is not None:
            log.warning("signal", signal=name, message="second signal: import cancelled; "
                        "a resume imports that batch again")
            self.import_scope.cancel()

    async def watch(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.request(signum)


async def _in_thread(db_path: str, fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(connection, *args)` with a connection of its own, off the event loop. Not
    cancellable: a commit under way finishes."""
    def call() -> _T:
        with closing(connect(db_path, migrate_schema=False)) as conn:
            return fn(conn, *args)

    return await anyio.to_thread.run_sync(call)


async def run_batches(plan: RunPlan, spec: PipelineSpec, http: HttpSender, *,
                      on_commit: Callable[[Snapshot], None] | None = None) -> PipelineOutcome:
    """Carry out the plan through the Batch API; see the module docstring.
    Returns like run_pipeline: stopped by a signal, halted (a refusal of the Batch API,
    a fatal answer, or batches that ended with narratives left unanswered: resumable,
    exit 4), or neither when every narrative of the selection has its result."""
    return await _BatchRun(plan, spec, http, on_commit).run()


class _BatchRun:
    def __init__(self, plan: RunPlan, spec: PipelineSpec, http: HttpSender,
                 on_commit: Callable[[Snapshot], None] | None) -> None:
        self.model = plan.config.model
        self.total = int(plan.total)
        self.spec = spec
        self.experiment_id = spec.selection.experiment_id
        self.db_path = spec.db_path
        self.api = BatchApi(http, spec.client)
        self.on_commit = on_commit
        self.codec: BatchCodec | None = None
        self.last: Snapshot | None = None
        self.fatal: str | None = None
        self.unfinished: list[str] = []      # batches that ended without completing
        self.stop = _Stop()

    async def run(self) -> PipelineOutcome:
        halted: _Halt | None = None
        async with anyio.create_task_group() as tg:
            if self.spec.handle_signals:
                tg.start_soon(self.stop.watch)
            with self.stop.scope:
                try:
                    await self._work()
                except _Halt as exc:
                    halted = exc
            tg.cancel_scope.cancel()
        if halted is None and self.stop.signum is None:
            halted = await self._leftover()
        if halted is not None:
            log.error("batch_halt", message=halted.reason)
        return PipelineOutcome(
            stopped_by=self.stop.signum, last=self.last,
            halted=halted.reason if halted else None, halt_kind=halted.kind if halted else None)

    async def _work(self) -> None:
        mode = await _in_thread(self.db_path, resolve_mode, self.experiment_id,
                                self.model.response_format)
        client = replace(self.spec.client, response_format=None if mode == "none" else mode)
        self.codec = BatchCodec(client, self.spec.prompt,
                                max_answer_bytes=self.model.max_response_bytes)
        pending = await _in_thread(self.db_path, pending_batches, self.experiment_id)
        if pending:
            log.info("batch_resume", message=(
                f"{len(pending)} batch(es) submitted before are taken up: "
                + ", ".join(f"{b.batch_id} ({b.status})" for b in pending)))
        rows: list[BatchRow] = []
        for b in pending:
            adopted = await self._adopt(b) if b.status == SUBMITTING else b
            if adopted is not None:
                rows.append(adopted)
        rows += await self._submit_remaining()
        await self._poll(rows)

    async def _leftover(self) -> _Halt | None:
        if self.fatal is not None:
            return _Halt("fatal", self.fatal)
        if self.spec.selection.retry_errors_only:
            return None
        done, _ = await _in_thread(self.db_path, store.count_results, self.experiment_id)
        missing = self.total - done
        if missing <= 0:
            return None
        why = "; ".join(self.unfinished) or "their batches returned no answer for them"
        return _Halt(HALT_BATCH, (
            f"{missing} narratives have no result ({why}); "
            f"`asyncrunner resume {self.experiment_id}` submits them again"))

    # -- submitting ----------------------------------------------------------------------

    async def _submit_remaining(self) -> list[BatchRow]:
        assert self.codec is not None
        skip = await _in_thread(self.db_path, pending_keys, self.experiment_id)
        limit = self.model.batch_max_requests
        rows: list[BatchRow] = []
        keys: list[tuple[str, str]] = []
        parts: list[bytes] = []
        size = 0
        halt: _Halt | None = None
        handout = Handout()
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce, self.db_path, self.spec.selection, handout)
            async with handout:
                try:
                    async for n in handout:
                        if (n.incident_id, n.narrative_type) in skip:
                            continue
                        line = self.codec.line(n)
                        if keys and (len(keys) >= limit or size + len(line) > BATCH_MAX_BYTES):
                            rows.append(await self._submit(keys, parts))
                            keys, parts, size = [], [], 0
                        keys.append((n.incident_id, n.narrative_type))
                        parts.append(line)
                        size += len(line)
                    if keys:
                        rows.append(await self._submit(keys, parts))
                except _Halt as exc:
                    halt = exc
                    tg.cancel_scope.cancel()
        if halt is not None:
            raise halt
        return rows

    async def _submit(self, keys: list[tuple[str, str]], parts: list[bytes]) -> BatchRow:
        name = f"asyncrunner-{self.experiment_id}-{uuid.uuid4().hex[:8]}.jsonl"
        try:
            file_id = await self.api.upload(name, b"".join(parts))
        except BatchApiError as exc:
            raise _Halt(HALT_BATCH, f"batch file not uploaded: {exc}") from None
        row = await _in_thread(self.db_path, record_submitting, self.experiment_id, file_id,
                               keys)
        return await self._create(row)

    async def _create(self, row: BatchRow, found: Mapping[str, Any] | None = None) -> BatchRow:
        """Create the chunk's batch (unless `found`) and record its id. A refusal leaves
        no batch behind, so the chunk's record goes and its narratives stay remaining; after
        a failure that may have created one (no answer), the record stays for the resume to
        look for it."""
        assert row.input_file_id is not None
        batch = found
        if batch is None:
            try:
                batch = await self.api.create(row.input_file_id, self.model.batch_window, {
                    "experiment_id": self.experiment_id, "chunk": str(row.chunk)})
            except BatchApiError as exc:
                if not exc.transient:
                    await _in_thread(self.db_path, discard_submitting, row.batch_id)
                raise _Halt(HALT_BATCH, f"batch not created (chunk {row.chunk}, file "
                                        f"{row.input_file_id}): {exc}") from None
        await _in_thread(self.db_path, record_created, row.batch_id, batch)
        log.info("batch_submitted", batch_id=batch["id"], chunk=row.chunk,
                 requests=row.n_requests, message=(
                     f"batch {batch['id']} submitted: chunk {row.chunk}, "
                     f"{row.n_requests} requests"))
        return replace(row, batch_id=str(batch["id"]), status=str(batch.get("status")))

    async def _adopt(self, row: BatchRow) -> BatchRow | None:
        """A chunk recorded as submitting (killed around the batch's creation): the batch
        the provider made from its file, or a new one from that file; None when the
        provider refuses that (the chunk's narratives are submitted afresh)."""
        assert row.input_file_id is not None
        try:
            found = await self.api.find(row.input_file_id)
        except BatchApiError as exc:
            raise _Halt(HALT_BATCH, f"cannot look up the batch of chunk {row.chunk}: "
                                    f"{exc}") from None
        if found is not None:
            log.info("batch_adopted", batch_id=found.get("id"), chunk=row.chunk)
            return await self._create(row, found)
        try:
            return await self._create(row)
        except _Halt as halt:
            if await _in_thread(self.db_path, has_row, row.batch_id):
                raise
            log.warning("batch_resubmitted", chunk=row.chunk, message=(
                f"{halt.reason}; its narratives are submitted again"))
            return None

    # -- polling -------------------------------------------------------------------------

    async def _poll(self, rows: list[BatchRow]) -> None:
        waiting = {row.batch_id: row for row in rows}
        seen: dict[str, tuple[Any, ...]] = {}
        failures = 0
        interval = max(MIN_POLL_S, float(self.model.batch_poll_s))
        while waiting:
            failed: BatchApiError | None = None
            for batch_id, row in list(waiting.items()):
                try:
                    batch = await self.api.get(batch_id)
                except BatchApiError as exc:
                    if not exc.transient:
                        raise _Halt(HALT_BATCH, f"batch {batch_id}: {exc}") from None
                    failed = exc
                    continue
                status = str(batch.get("status"))
                state = (status, *request_counts(batch))
                if seen.get(batch_id) != state:
                    seen[batch_id] = state
                    await _in_thread(self.db_path, record_polled, batch_id, batch)
                    log.info("batch_status", batch_id=batch_id, status=status,
                             completed=state[1], failed=state[2], total=row.n_requests)
                if status in TERMINAL:
                    await self._import(row, batch)
                    del waiting[batch_id]
                else:
                    _check_window(batch_id, batch)
            failures = failures + 1 if failed is not None else 0
            if failures >= MAX_POLL_FAILURES:
                raise _Halt(HALT_BATCH, f"the Batch API did not answer {failures} polls in a "
                                        f"row: {failed}")
            if failed is not None:
                log.warning("batch_poll_failed", message=f"poll failed (tried again in "
                            f"{interval:g}s): {failed}")
            if waiting:
                await anyio.sleep(interval)

    # -- importing -----------------------------------------------------------------------

    async def _import(self, row: BatchRow, batch: Mapping[str, Any]) -> None:
        """Store what an ended batch holds; shielded from the first signal (a second one
        cancels it, and a resume imports the batch again)."""
        with anyio.CancelScope(shield=True):
            scope = anyio.CancelScope()
            self.stop.import_scope = scope
            try:
                with scope:
                    await self._store_batch(row, batch)
            finally:
                self.stop.import_scope = None
        if scope.cancelled_caught:
            await checkpoint()     # delivers the first signal's cancellation

    async def _store_batch(self, row: BatchRow, batch: Mapping[str, Any]) -> None:
        assert self.codec is not None
        batch_id, status = row.batch_id, str(batch.get("status"))
        try:
            contents = [await self.api.content(str(batch[name]))
                        for name in ("output_file_id", "error_file_id") if batch.get(name)]
        except BatchApiError as exc:
            raise _Halt(HALT_BATCH, f"batch {batch_id} ({status}): its files were not "
                                    f"downloaded: {exc}") from None
        narratives = await _in_thread(self.db_path, batch_narratives, batch_id,
                                      self.spec.selection.checksum)
        tally = LineTally()
        last = await store_results(self.db_path, self.spec.writer,
                                   answer_results(self.codec, narratives, contents, tally),
                                   self.on_commit)
        self.last = last or self.last
        await _in_thread(self.db_path, record_imported, batch_id, batch)
        missing = len(narratives) - tally.stored - tally.fatal
        log.info("batch_imported", batch_id=batch_id, status=status, stored=tally.stored,
                 missing=missing, message=(
                     f"batch {batch_id} {status}: {tally.stored} results stored"
                     + (f", {missing} narratives without an answer" if missing else "")))
        if tally.unknown or tally.malformed:
            log.warning("batch_lines_skipped", batch_id=batch_id, unknown=tally.unknown,
                        malformed=tally.malformed, message=(
                            f"batch {batch_id}: {tally.unknown} lines with a custom_id not "
                            f"in the batch and {tally.malformed} unreadable lines skipped"))
        if tally.fatal_reason is not None:
            self.fatal = self.fatal or (f"{tally.fatal} answers of batch {batch_id} not "
                                        f"stored: {tally.fatal_reason}")
        if status != "completed":
            errors = batch.get("errors")
            detail = ""
            if isinstance(errors, Mapping) and isinstance(errors.get("data"), list) \
                    and errors["data"]:
                first = errors["data"][0]
                detail = f": {error_parts(first)[1][:200]}" if first else ""
            self.unfinished.append(f"batch {batch_id} {status}{detail}")
            log.warning("batch_unfinished", batch_id=batch_id, status=status, message=(
                f"batch {batch_id} ended {status}{detail}: {tally.stored} of "
                f"{row.n_requests} answered; the rest stay remaining"))


def _check_window(batch_id: str, batch: Mapping[str, Any]) -> None:
    """Polling is bounded: a batch still running long after its window has closed."""
    expires = batch.get("expires_at")
    if isinstance(expires, int | float) and time.time() > expires + PAST_WINDOW_GRACE_S:
        raise _Halt(HALT_BATCH, f"batch {batch_id} is still {batch.get('status')} "
                                f"{PAST_WINDOW_GRACE_S / 3600:g} h after its completion "
                                "window ended; resume to poll it again")

