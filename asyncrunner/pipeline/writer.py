"""The writer: the only code that writes results.

It owns one write connection. Results arrive as frozen messages; they are committed in
batches of `batch_size`, or every `interval_s` seconds, whichever comes first, and the
experiment's progress row (counts, last update, ETA) is updated in the same transaction, so
a commit is the one point where work becomes durable and the monitoring query never sees
counts that disagree with the rows. Inserts are `INSERT OR IGNORE` against the unique
(experiment, incident, type) index; retry-errors-only updates errored rows in place. Both are
idempotent, so replaying any batch after a crash changes nothing twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import anyio
import structlog
from anyio.abc import ObjectReceiveStream

from asyncrunner.clock import LOCAL_FORMAT, local_now
from asyncrunner.db.schema import open_async
from asyncrunner.pipeline.messages import Result
from asyncrunner.pipeline.progress import RateWindow, Snapshot, eta_from

log = structlog.get_logger("asyncrunner.pipeline.writer")

FINAL_FLUSH_TIMEOUT_S = 60.0

INSERT_SQL = """
INSERT OR IGNORE INTO narrative_results (
    experiment_id, incident_id, narrative_type, detected, confidence, indicators, rationale,
    raw_response, response_sec, prompt_tokens, completion_tokens, error_occurred,
    error_message, error_category, attempt_count, first_error_message, last_attempt_at,
    processed_at, manual_flag_ind, manual_flag
) VALUES (
    :experiment_id, :incident_id, :narrative_type, :detected, :confidence, :indicators,
    :rationale, :raw_response, :response_sec, :prompt_tokens, :completion_tokens,
    :error_occurred, :error_message, :error_category, :attempt_count, :error_message,
    :processed_at, :processed_at, :manual_flag_ind, :manual_flag
)
"""

# SET expressions read the row's old values, so first_error_message keeps the first failure
# and `error_occurred = 1` in WHERE makes a replayed success a no-op.
RETRY_UPDATE_SQL = """
UPDATE narrative_results SET
    detected = :detected, confidence = :confidence, indicators = :indicators,
    rationale = :rationale, raw_response = :raw_response, response_sec = :response_sec,
    prompt_tokens = :prompt_tokens, completion_tokens = :completion_tokens,
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
    last_progress_update = :now, estimated_completion_time = :eta
WHERE experiment_id = :experiment_id
"""


@dataclass(frozen=True, slots=True)
class WriterSettings:
    experiment_id: str
    total: int                 # narratives in the experiment
    session_target: int        # narratives this session set out to process
    batch_size: int = 100
    interval_s: float = 2.0
    retry_errors_only: bool = False


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
        "manual_flag": r.manual_flag,
    }


class ResultWriter:
    def __init__(self, db_path: str | Path, settings: WriterSettings, *,
                 on_commit: Callable[[Snapshot], None] | None = None,
                 concurrency: Callable[[], float | None] | None = None) -> None:
        self.db_path = str(db_path)
        self.s = settings
        self._on_commit = on_commit
        self._concurrency = concurrency
        self._pending: list[Result] = []
        self._wake = anyio.Event()
        self._closed = False
        self._rate = RateWindow()
        self._session_done = 0
        self._errors: Counter[str] = Counter()
        self._tokens = [0, 0]
        self.last: Snapshot | None = None

    async def run(self, results: ObjectReceiveStream[Result]) -> None:
        # The stream is closed however this ends (even cancelled while opening the database),
        # so senders learn at once that nobody reads any more.
        async with results, open_async(self.db_path) as db:
            await db.execute("PRAGMA synchronous = NORMAL")
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._collect, results)
                await self._flush_loop(db)

    async def _collect(self, results: ObjectReceiveStream[Result]) -> None:
        try:
            async with results:
                async for result in results:
                    self._pending.append(result)
                    if len(self._pending) >= self.s.batch_size:
                        self._wake.set()
        finally:
            self._closed = True
            self._wake.set()

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
        # Once a batch is taken off the queue it must reach the disk or be rolled back whole;
        # a cancellation in the middle would lose it, so the commit is shielded (bounded).
        with anyio.CancelScope(shield=True), anyio.fail_after(FINAL_FLUSH_TIMEOUT_S):
            await self._commit(db, batch)

    async def _commit(self, db: aiosqlite.Connection, batch: list[Result]) -> None:
        sql = RETRY_UPDATE_SQL if self.s.retry_errors_only else INSERT_SQL
        rows = [_row(self.s.experiment_id, r) for r in batch]
        session_done = self._session_done + len(batch)
        rate = self._rate.add(session_done)
        remaining = max(0, self.s.session_target - session_done)
        eta = eta_from(rate, remaining)
        await db.execute("BEGIN IMMEDIATE")
        try:
            cursor = await db.executemany(sql, rows)
            changed = cursor.rowcount
            async with db.execute(
                "SELECT COUNT(*) FROM narrative_results WHERE experiment_id = ?",
                (self.s.experiment_id,),
            ) as cur:
                done = int((await cur.fetchone())[0])  # type: ignore[index]
            await db.execute(PROGRESS_SQL, {
                "done": done, "now": local_now(), "experiment_id": self.s.experiment_id,
                "eta": eta.strftime(LOCAL_FORMAT) if eta else None,
            })
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        self._session_done = session_done
        for r in batch:
            if r.error_category:
                self._errors[r.error_category] += 1
            self._tokens[0] += r.prompt_tokens or 0
            self._tokens[1] += r.completion_tokens or 0
        self.last = Snapshot(
            done=done, total=self.s.total, session_done=session_done,
            errors=dict(self._errors), rate=rate, elapsed_s=self._rate.elapsed(), eta=eta,
            prompt_tokens=self._tokens[0], completion_tokens=self._tokens[1],
            concurrency=self._concurrency() if self._concurrency else None,
        )
        log.info("commit", rows=len(batch), changed=changed, done=done, total=self.s.total,
                 rate=round(rate, 3), errors=sum(self._errors.values()))
        if self._on_commit:
            self._on_commit(self.last)
