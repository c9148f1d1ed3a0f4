"""The writer: the only code that writes results.

It owns one write connection. Results arrive as messages; they are committed in
batches of `batch_size`, or every `interval_s` seconds, whichever comes first, and the
experiment's progress row (counts, last update, ETA) is updated in the same transaction, so
a commit is the one point where work becomes durable and the monitoring query never sees
counts that disagree with the rows. Inserts are `INSERT OR IGNORE` against the unique
(experiment, incident, type) index; retry-errors-only updates errored rows in place. Both are
idempotent, so replaying any batch after a crash changes nothing twice.

Each row records the endpoint that answered (`Result.endpoint`, a redacted URL). With a
`session_id` and `endpoint_stats` (router.EndpointPool.snapshot_json), every commit also
stores the per-endpoint figures of the session in sessions.endpoints_json, in the same
transaction.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite
import anyio
import structlog
from anyio import EndOfStream, WouldBlock
from anyio.streams.memory import MemoryObjectReceiveStream

from asyncrunner.clock import LOCAL_FORMAT, local_now
from asyncrunner.db.schema import open_async, transaction
from asyncrunner.pipeline.messages import Result
from asyncrunner.pipeline.progress import RateWindow, Snapshot, eta_from

log = structlog.get_logger("asyncrunner.pipeline.writer")

FINAL_FLUSH_TIMEOUT_S = 60.0

_T = TypeVar("_T")

# Column of narrative_results -> key of `_row` holding its value (a new row's
# first_error_message is its error_message, its last attempt is when it was processed).
INSERT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("experiment_id", "experiment_id"), ("incident_id", "incident_id"),
    ("narrative_type", "narrative_type"), ("detected", "detected"),
    ("confidence", "confidence"), ("indicators", "indicators"), ("rationale", "rationale"),
    ("raw_response", "raw_response"), ("response_sec", "response_sec"),
    ("prompt_tokens", "prompt_tokens"), ("completion_tokens", "completion_tokens"),
    ("error_occurred", "error_occurred"), ("error_message", "error_message"),
    ("error_category", "error_category"), ("attempt_count", "attempt_count"),
    ("first_error_message", "error_message"), ("last_attempt_at", "processed_at"),
    ("processed_at", "processed_at"), ("manual_flag_ind", "manual_flag_ind"),
    ("manual_flag", "manual_flag"), ("finish_reason", "finish_reason"),
    ("answer_source", "answer_source"), ("prompt_tokens_total", "prompt_tokens_total"),
    ("completion_tokens_total", "completion_tokens_total"), ("endpoint", "endpoint"),
)
_INSERT_HEAD = ("INSERT OR IGNORE INTO narrative_results ("
                + ", ".join(column for column, _ in INSERT_COLUMNS) + ") VALUES ")
_ONE_ROW = "(" + ", ".join("?" * len(INSERT_COLUMNS)) + ")"
_values = itemgetter(*(key for _, key in INSERT_COLUMNS))
# A Result's values in INSERT_COLUMNS order after experiment_id, read in C (one per result).
_result_values = attrgetter(*(key for _, key in INSERT_COLUMNS[1:]))
# Rows per INSERT statement. sqlite3 hands the GIL back to the event loop after every step
# of a statement and must win it back before the next; while the loop is busy each of
# those waits can last the interpreter's switch interval (5 ms), so a row per step made a
# 100-row commit take up to half a second and let results pile up behind it. A few dozen
# rows per statement make it a few steps; at most this many distinct statements are
# prepared (one per row count), all within sqlite3's statement cache.
ROWS_PER_INSERT = 50


@lru_cache(maxsize=ROWS_PER_INSERT)
def _insert_sql(n_rows: int) -> str:
    return _INSERT_HEAD + ", ".join([_ONE_ROW] * n_rows)

# SET expressions read the row's old values, so first_error_message keeps the first failure
# and `error_occurred = 1` in WHERE makes a replayed success a no-op.
RETRY_UPDATE_SQL = """
UPDATE narrative_results SET
    detected = :detected, confidence = :confidence, indicators = :indicators,
    rationale = :rationale, raw_response = :raw_response, response_sec = :response_sec,
    prompt_tokens = :prompt_tokens, completion_tokens = :completion_tokens,
    finish_reason = :finish_reason, answer_source = :answer_source, endpoint = :endpoint,
    prompt_tokens_total = COALESCE(prompt_tokens_total, prompt_tokens, 0)
        + COALESCE(:prompt_tokens_total, 0),
    completion_tokens_total = COALESCE(completion_tokens_total, completion_tokens, 0)
        + COALESCE(:completion_tokens_total, 0),
    first_error_message = COALESCE(first_error_message, error_message),
    error_occurred = :error_occurred, error_message = :error_message,
    error_category = :error_category,
    attempt_count = COALESCE(attempt_count, 1) + :attempt_count,
    last_attempt_at = :processed_at, processed_at = :processed_at
WHERE experiment_id = :experiment_id AND incident_id = :incident_id
  AND narrative_type = :narrative_type AND error_occurred = 1
"""

PROGRESS_SQL = """
UPDATE experiments SET n_narratives_completed = :done, n_narratives_processed = :done,
    n_narratives_total = COALESCE(:total, n_narratives_total),
    last_progress_update = :now, estimated_completion_time = :eta
WHERE experiment_id = :experiment_id
"""

ENDPOINTS_SQL = "UPDATE sessions SET endpoints_json = ? WHERE session_id = ?"


@dataclass(frozen=True, slots=True)
class WriterSettings:
    experiment_id: str
    total: int                 # narratives in the experiment
    session_target: int        # narratives this session set out to process
    batch_size: int = 100
    interval_s: float = 2.0
    retry_errors_only: bool = False
    max_tokens: int | None = None   # for the truncation warning
    session_id: str | None = None   # the sessions row whose endpoints_json commits update
    # The per-endpoint figures as JSON, read at each commit (EndpointPool.snapshot_json)
    endpoint_stats: Callable[[], str] | None = field(default=None, compare=False, repr=False)
    # The experiment's size while its data file is still loading (pipeline/loading.py),
    # read at each commit; `total` and `session_target` are then its size at the start.
    total_now: Callable[[], int] | None = field(default=None, compare=False, repr=False)

    def totals(self) -> tuple[int, int]:
        """(narratives in the experiment, narratives this session sets out to process)."""
        if self.total_now is None:
            return self.total, self.session_target
        total = self.total_now()
        return total, total - (self.total - self.session_target)


# Results the writer holds at most while a commit is under way (or 4 batches, if more).
PENDING_CAP = 1_000

# The truncation warning: once, after this many answers, when more than this share was cut
# off at max_tokens.
TRUNCATION_SAMPLE = 100
TRUNCATION_SHARE = 0.05


def _row(experiment_id: str, r: Result) -> dict[str, object]:
    return {
        "experiment_id": experiment_id, "incident_id": r.incident_id,
        "narrative_type": r.narrative_type, "detected": r.detected,
        "confidence": r.confidence, "indicators": r.indicators, "rationale": r.rationale,
        "raw_response": r.raw_response, "response_sec": r.response_sec,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
        "error_occurred": r.error_occurred, "error_message": r.error_message,
        "error_category": r.error_category, "attempt_count": r.attempt_count,
        "processed_at": r.processed_at, "manual_flag_ind": r.manual_flag_ind,
        "manual_flag": r.manual_flag, "finish_reason": r.finish_reason,
        "answer_source": r.answer_source, "prompt_tokens_total": r.prompt_tokens_total,
        "completion_tokens_total": r.completion_tokens_total, "endpoint": r.endpoint,
    }


class ResultWriter:
    def __init__(self, db_path: str | Path, settings: WriterSettings, *,
                 on_commit: Callable[[Snapshot], None] | None = None,
                 concurrency: Callable[[], float | None] | None = None,
                 waiting: Callable[[], tuple[datetime, str] | None] | None = None) -> None:
        """`concurrency` and `waiting` (until when, and why, every request waits for the
        server) are read into each snapshot."""
        self.db_path = str(db_path)
        self._answers = 0          # results holding a completion, up to TRUNCATION_SAMPLE
        self._cut_off = 0
        self.s = settings
        self._on_commit = on_commit
        self._concurrency = concurrency
        self._waiting = waiting
        self._pending: list[Result] = []
        self._wake = anyio.Event()
        self._room = anyio.Event()          # set when a flush takes the pending results
        self._max_pending = max(PENDING_CAP, 4 * settings.batch_size)
        self._closed = False
        self._rate = RateWindow()
        self._session_done = 0
        self._done: int | None = None     # results stored, as of the last commit
        self._errors: Counter[str] = Counter()
        self._tokens = [0, 0]
        self.last: Snapshot | None = None

    async def run(self, results: MemoryObjectReceiveStream[Result]) -> None:
        # The stream is closed however this ends (even cancelled while opening the database),
        # so senders learn at once that nobody reads any more.
        async with results, open_async(self.db_path) as db:
            await db.execute("PRAGMA synchronous = NORMAL")
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._collect, results)
                await self._flush_loop(db)

    async def _collect(self, results: MemoryObjectReceiveStream[Result]) -> None:
        try:
            async with results:
                while True:
                    if len(self._pending) >= self._max_pending:
                        # The disk is behind: results stay in the stream, whose bound then
                        # holds the workers back, instead of piling up here without one.
                        self._room = anyio.Event()
                        await self._room.wait()
                        continue
                    # What is already in the stream is taken at once; only an empty stream
                    # is waited on (a trip round the event loop per result costs more than
                    # the rest of collecting it).
                    try:
                        result = results.receive_nowait()
                    except WouldBlock:
                        result = await results.receive()
                    if self._answers < TRUNCATION_SAMPLE and result.finish_reason is not None:
                        self._count_truncation(result)
                    self._pending.append(result)
                    if len(self._pending) >= self.s.batch_size:
                        self._wake.set()
        except EndOfStream:
            pass
        finally:
            self._closed = True
            self._wake.set()

    def _count_truncation(self, result: Result) -> None:
        """Warn once, after the first TRUNCATION_SAMPLE answers, if too many were cut off."""
        self._answers += 1
        self._cut_off += result.finish_reason == "length"
        if (self._answers == TRUNCATION_SAMPLE
                and self._cut_off > TRUNCATION_SHARE * TRUNCATION_SAMPLE):
            limit = f"max_tokens={self.s.max_tokens}" if self.s.max_tokens else "max_tokens"
            log.warning("truncation", cut_off=self._cut_off, answers=self._answers,
                        message=f"{self._cut_off} of the first {TRUNCATION_SAMPLE} answers "
                                f"were cut off at {limit}; consider a larger "
                                "model.max_tokens")

    async def _flush_loop(self, db: aiosqlite.Connection) -> None:
        while True:
            with anyio.move_on_after(self.s.interval_s):
                await self._wake.wait()
            self._wake = anyio.Event()
            if self._pending:
                await self._flush(db)
            if self._closed and not self._pending:
                return

    async def _flush(self, db: aiosqlite.Connection) -> None:
        batch, self._pending = self._pending, []
        self._room.set()
        # Once a batch is taken off the queue it must reach the disk or be rolled back whole;
        # a cancellation in the middle would lose it, so the commit is shielded (bounded).
        with anyio.CancelScope(shield=True), anyio.fail_after(FINAL_FLUSH_TIMEOUT_S):
            await self._commit(db, batch)

    async def _commit(self, db: aiosqlite.Connection, batch: list[Result]) -> None:
        experiment_id = self.s.experiment_id
        rows = ([_row(experiment_id, r) for r in batch] if self.s.retry_errors_only
                else [(experiment_id, *_result_values(r)) for r in batch])
        session_done = self._session_done + len(batch)
        rate = self._rate.add(session_done)
        total, target = self.s.totals()
        remaining = max(0, target - session_done)
        eta = eta_from(rate, remaining)
        progress = {"now": local_now(), "experiment_id": self.s.experiment_id,
                    "eta": eta.strftime(LOCAL_FORMAT) if eta else None,
                    "total": total if self.s.total_now is not None else None}
        # The whole transaction is one trip to the connection's thread: each trip wakes that
        # thread and hands the GIL back and forth with the event loop, which costs the
        # workers more than the statements themselves.
        stats = self.s.endpoint_stats
        endpoints = stats() if stats is not None and self.s.session_id else None
        done, changed = await _on_connection_thread(
            db, self._transaction, rows, progress, self._done, endpoints)
        self._done = done
        self._session_done = session_done
        for r in batch:
            if r.error_category:
                self._errors[r.error_category] += 1
            self._tokens[0] += (r.prompt_tokens_total if r.prompt_tokens_total is not None
                                else r.prompt_tokens) or 0
            self._tokens[1] += (r.completion_tokens_total
                                if r.completion_tokens_total is not None
                                else r.completion_tokens) or 0
        self.last = Snapshot(
            done=done, total=total, session_done=session_done,
            errors=dict(self._errors), rate=rate, elapsed_s=self._rate.elapsed(), eta=eta,
            prompt_tokens=self._tokens[0], completion_tokens=self._tokens[1],
            concurrency=self._concurrency() if self._concurrency else None,
            **self._waiting_fields(),
        )
        log.info("commit", rows=len(batch), changed=changed, done=done, total=total,
                 rate=round(rate, 3), errors=sum(self._errors.values()))
        if self._on_commit:
            self._on_commit(self.last)

    def _waiting_fields(self) -> dict[str, Any]:
        waiting = self._waiting() if self._waiting else None
        if waiting is None:
            return {}
        return {"waiting_until": waiting[0], "waiting_for": waiting[1]}

    def publish(self) -> None:
        """Show a change between commits (a long wait for the server has begun): the last
        snapshot, or the session's starting point before the first commit, as it is now."""
        if self._on_commit is None:
            return
        total, target = self.s.totals()
        base = self.last or Snapshot(
            done=total - target if not self.s.retry_errors_only else total, total=total,
            session_done=0,
            concurrency=self._concurrency() if self._concurrency else None)
        self._on_commit(replace(base, **({"waiting_until": None, "waiting_for": None}
                                         | self._waiting_fields())))

    def _transaction(self, conn: sqlite3.Connection,
                     rows: list[dict[str, object]] | list[tuple[object, ...]],
                     progress: dict[str, object], done_before: int | None,
                     endpoints: str | None = None) -> tuple[int, int]:
        """On the connection's thread: write the batch (`_row` dicts for retry-errors-only
        updates, INSERT_COLUMNS value tuples otherwise), the progress row and the session's
        endpoint figures (`endpoints`, if any) in one transaction, or roll it back whole.
        Returns (results stored now, rows changed).

        The stored count is taken once, in the session's first commit; after that it is a
        running count: the writer is the only code that writes results and the experiment
        lock keeps other processes out, so only this batch's inserts change it (retry-errors
        -only updates rows in place: the count stays). Counting at every commit would cost a
        scan that grows with the table."""
        with transaction(conn):
            changed = (conn.executemany(RETRY_UPDATE_SQL, rows).rowcount
                       if self.s.retry_errors_only
                       else insert_values(conn, cast(list[tuple[object, ...]], rows)))
            if done_before is None:
                done = int(conn.execute(
                    "SELECT COUNT(*) FROM narrative_results WHERE experiment_id = ?",
                    (self.s.experiment_id,)).fetchone()[0])
            else:
                done = done_before if self.s.retry_errors_only else done_before + changed
            conn.execute(PROGRESS_SQL, {**progress, "done": done})
            if endpoints is not None:
                conn.execute(ENDPOINTS_SQL, (endpoints, self.s.session_id))
        return done, changed


def insert_rows(conn: sqlite3.Connection, rows: list[dict[str, object]]) -> int:
    """insert_values for `_row` dicts."""
    return insert_values(conn, [_values(row) for row in rows])


def insert_values(conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> int:
    """INSERT OR IGNORE every row (values in INSERT_COLUMNS order), ROWS_PER_INSERT to a
    statement; the rows inserted (a row already stored is ignored, as it would be alone)."""
    per = min(ROWS_PER_INSERT, max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
                                   // len(INSERT_COLUMNS)))
    changed = 0
    for start in range(0, len(rows), per):
        chunk = rows[start:start + per]
        values = [value for row in chunk for value in row]
        changed += conn.execute(_insert_sql(len(chunk)), values).rowcount
    return changed


async def _on_connection_thread(db: aiosqlite.Connection,
                                fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(sqlite3_connection, *args)` on the aiosqlite connection's own thread, as one
    queued call. aiosqlite has no public call for this; `_execute` is the one every one of
    its methods goes through (and the writer's tests exercise it on every commit)."""
    run = cast(Callable[..., Awaitable[_T]], db._execute)
    return await run(lambda: fn(db._conn, *args))
