"""ResultWriter in-process against a real SQLite file: batching, the commit interval, the
final flush, idempotent inserts, retry-errors-only updates, the progress row, snapshots, and
what survives a cancellation at any moment (a batch taken off the queue is committed whole)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.streams.memory import MemoryObjectSendStream
from pipeline_helpers import (
    EXPERIMENT_ID,
    add_experiment,
    aiosqlite_threads,
    database,
    experiment_row,
    incident,
    make_result,
    stored_incidents,
    stored_results,
)
from structlog.testing import capture_logs

from asyncrunner.clock import LOCAL_FORMAT
from asyncrunner.db.schema import connect
from asyncrunner.pipeline.messages import Result
from asyncrunner.pipeline.progress import Snapshot
from asyncrunner.pipeline.writer import (
    PENDING_CAP,
    ROWS_PER_INSERT,
    ResultWriter,
    WriterSettings,
    _row,
    insert_rows,
)

db = pytest.fixture(name="db")(database)
Feed = Callable[[MemoryObjectSendStream[Result], anyio.CancelScope], Awaitable[None]]


@dataclass
class CommitLog:
    """The on_commit callback: each snapshot and what a second connection saw at that moment."""

    path: Path
    experiment_id: str = EXPERIMENT_ID
    snapshots: list[Snapshot] = field(default_factory=list)
    stored: list[list[str]] = field(default_factory=list)
    progress: list[tuple[int, int, str | None, str | None]] = field(default_factory=list)
    cancel_requested_after: int | None = None   # commits seen when the test cancelled
    committed_event: anyio.Event = field(default_factory=anyio.Event)

    def __call__(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)
        with closing(sqlite3.connect(self.path)) as conn:   # one short read per commit
            self.stored.append([row[0] for row in conn.execute(
                "SELECT incident_id FROM narrative_results WHERE experiment_id = ? "
                "ORDER BY result_id", (self.experiment_id,))])
            self.progress.append(conn.execute(
                "SELECT n_narratives_completed, n_narratives_processed, last_progress_update, "
                "estimated_completion_time FROM experiments WHERE experiment_id = ?",
                (self.experiment_id,)).fetchone())
        self.committed_event.set()
        self.committed_event = anyio.Event()

    @property
    def sizes(self) -> list[int]:
        done = [s.session_done for s in self.snapshots]
        return [b - a for a, b in pairwise([0, *done])]

    @property
    def committed(self) -> int:
        return self.snapshots[-1].session_done if self.snapshots else 0

    def mark_cancel(self) -> None:
        self.cancel_requested_after = len(self.snapshots)

    async def wait_for(self, commits: int) -> None:
        with anyio.fail_after(2):
            while len(self.snapshots) < commits:
                await self.committed_event.wait()

    async def wait_for_results(self, n: int) -> None:
        with anyio.fail_after(2):
            while self.committed < n:
                await self.committed_event.wait()


def writer_settings(experiment_id: str = EXPERIMENT_ID, **kw: Any) -> WriterSettings:
    base: dict[str, Any] = dict(total=100, session_target=100, batch_size=5, interval_s=30.0)
    return WriterSettings(experiment_id, **(base | kw))


async def drive(path: Path, feed: Feed, log: CommitLog | None = None, *,
                experiment_id: str = EXPERIMENT_ID, **kw: Any) -> ResultWriter:
    """Run a writer in a task group; `feed` sends results and may cancel the group."""
    writer = ResultWriter(path, writer_settings(experiment_id, **kw), on_commit=log,
                          concurrency=lambda: 3.0)
    send, recv = anyio.create_memory_object_stream[Result]()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, recv)
            async with send:
                await feed(send, tg.cancel_scope)
    return writer


def sending(results: Sequence[Result]) -> Feed:
    async def feed(send: MemoryObjectSendStream[Result], _: anyio.CancelScope) -> None:
        for r in results:
            await send.send(r)
    return feed


async def write_all(path: Path, results: Sequence[Result], log: CommitLog | None = None,
                    **kw: Any) -> ResultWriter:
    return await drive(path, sending(results), log, **kw)


def results(n: int, start: int = 0) -> list[Result]:
    return [make_result(i) for i in range(start, start + n)]


# --- batching, interval, final flush -------------------------------------------------------


async def test_a_full_batch_commits_at_once_and_the_rest_waits_for_the_close(
        db: Path) -> None:
    log = CommitLog(db)
    sent = results(9)

    async def feed(send: MemoryObjectSendStream[Result], _: anyio.CancelScope) -> None:
        for r in sent[:5]:
            await send.send(r)
        await log.wait_for(1)           # the stream is open and the interval is 30 s
        assert stored_incidents(db) == [r.incident_id for r in sent[:5]]
        for r in sent[5:]:
            await send.send(r)
        await anyio.sleep(0.1)          # 4 < batch_size: nothing is committed yet
        assert len(log.snapshots) == 1 and len(stored_results(db)) == 5

    await drive(db, feed, log)
    assert log.sizes == [5, 4]          # the final flush when the stream closed
    assert stored_incidents(db) == [r.incident_id for r in sent]


async def test_many_results_are_committed_in_batches_of_at_least_batch_size(
        db: Path) -> None:
    log = CommitLog(db)
    await write_all(db, results(23), log)
    assert sum(log.sizes) == 23 and all(size >= 5 for size in log.sizes[:-1])
    assert len(log.snapshots) <= 5
    assert len(stored_results(db)) == 23


async def test_fewer_than_batch_size_are_committed_after_the_interval(db: Path) -> None:
    log = CommitLog(db)

    async def feed(send: MemoryObjectSendStream[Result], _: anyio.CancelScope) -> None:
        started = time.monotonic()
        for r in results(3):
            await send.send(r)
        await log.wait_for_results(3)   # stream still open, batch_size 100
        assert time.monotonic() - started >= 0.04
        assert len(stored_results(db)) == 3
        await send.send(make_result(3))
        await log.wait_for_results(4)   # and again one interval later

    await drive(db, feed, log, batch_size=100, interval_s=0.05)
    assert sum(log.sizes) == 4 and len(log.sizes) >= 2   # all while the stream was open


async def test_an_empty_stream_commits_nothing_and_closes_its_connection(
        db: Path) -> None:
    log = CommitLog(db)
    writer = await write_all(db, [], log)
    assert log.snapshots == [] and writer.last is None
    assert experiment_row(db)["n_narratives_completed"] == 0
    assert aiosqlite_threads() == []


# --- idempotence and retry-errors-only -----------------------------------------------------


async def test_the_same_result_twice_is_stored_once(db: Path) -> None:
    log = CommitLog(db)
    first = make_result(1)
    await write_all(db, [first, make_result(2), first], log, batch_size=2)
    await write_all(db, [first], log)          # a replay in a later session
    assert stored_incidents(db) == [incident(1), incident(2)]
    assert experiment_row(db)["n_narratives_completed"] == 2
    assert [s.done for s in log.snapshots][-1] == 2


async def test_insert_records_the_first_error_and_the_attempts(db: Path) -> None:
    await write_all(db, [make_result(1, error_category="timeout", attempts=3,
                                       error_message="no response within 5s")])
    [row] = stored_results(db)
    assert (row["error_occurred"], row["error_category"]) == (1, "timeout")
    assert row["attempt_count"] == 3
    assert row["error_message"] == row["first_error_message"] == "no response within 5s"
    assert row["detected"] is None and row["raw_response"] == "raw 1"
    assert row["last_attempt_at"] == row["processed_at"]


def retry_result(i: int, processed_at: str, **kw: Any) -> Result:
    return replace(make_result(i, **kw), processed_at=processed_at)


async def test_retry_errors_only_updates_only_errored_rows(db: Path) -> None:
    await write_all(db, [
        make_result(1, error_category="timeout", attempts=2, error_message="first failure"),
        make_result(2, error_category="rate_limit", attempts=3, error_message="HTTP 429"),
        make_result(3, detected=0),
    ])
    later = "2025-02-02T00:00:00.000000Z"
    log = CommitLog(db)
    await write_all(db, [
        retry_result(1, later, detected=1),                                  # now succeeds
        retry_result(2, later, error_category="api_error", attempts=2,
                     error_message="HTTP 500"),                              # fails again
        retry_result(3, later, detected=1),                                  # was never an error
        retry_result(4, later),                                              # has no row
    ], log, retry_errors_only=True)
    rows = {row["incident_id"]: row for row in stored_results(db)}
    assert sorted(rows) == [incident(1), incident(2), incident(3)]        # nothing inserted
    fixed, again, untouched = rows[incident(1)], rows[incident(2)], rows[incident(3)]
    assert fixed["error_occurred"] == 0
    assert fixed["error_message"] is None and fixed["error_category"] is None
    assert (fixed["detected"], fixed["attempt_count"]) == (1, 3)
    assert fixed["first_error_message"] == "first failure"
    assert fixed["last_attempt_at"] == fixed["processed_at"] == later
    assert (again["error_category"], again["error_message"]) == ("api_error", "HTTP 500")
    assert (again["first_error_message"], again["attempt_count"]) == ("HTTP 429", 5)
    assert (untouched["detected"], untouched["attempt_count"]) == (0, 1)
    assert untouched["processed_at"] != later
    assert log.snapshots[-1].done == 3 and log.snapshots[-1].session_done == 4

    # a third attempt still remembers the first error; a replayed success is a no-op
    latest = "2025-03-03T00:00:00.000000Z"
    await write_all(db, [retry_result(2, latest, detected=1),
                         retry_result(1, latest, detected=0)], retry_errors_only=True)
    rows = {row["incident_id"]: row for row in stored_results(db)}
    assert (rows[incident(2)]["first_error_message"], rows[incident(2)]["error_occurred"]) == (
        "HTTP 429", 0)
    assert rows[incident(2)]["attempt_count"] == 6
    assert tuple(rows[incident(1)]) == tuple(fixed)


async def test_retry_errors_only_keeps_the_progress_row_equal_to_the_stored_rows(
        db: Path) -> None:
    """Updates in place add no rows: after every commit of a retry session the progress row
    still counts what is stored (a running count that added the updated rows would drift)."""
    await write_all(db, [make_result(i, error_category="timeout") for i in range(12)]
                    + [make_result(i) for i in range(12, 15)])
    log = CommitLog(db)
    later = "2025-02-02T00:00:00.000000Z"
    await write_all(db, [retry_result(i, later, detected=1) for i in range(14)], log,
                    retry_errors_only=True, batch_size=5)
    assert len(log.snapshots) >= 2 and log.snapshots[-1].session_done == 14
    for snapshot, stored, (completed, processed, _, _) in zip(
            log.snapshots, log.stored, log.progress, strict=True):
        assert completed == processed == len(stored) == snapshot.done == 15
    assert sum(row["error_occurred"] for row in stored_results(db)) == 0


async def test_a_batch_that_cannot_be_written_is_rolled_back_whole(db: Path) -> None:
    log = CommitLog(db)
    unwritable = make_result(7, tokens=(2**64, 0))          # no SQLite INTEGER holds it

    async def feed(send: MemoryObjectSendStream[Result], _: anyio.CancelScope) -> None:
        for r in results(5):
            await send.send(r)
        await log.wait_for(1)
        for r in [*results(2, start=5), unwritable]:
            await send.send(r)

    with pytest.RaisesGroup(OverflowError, flatten_subgroups=True):
        await drive(db, feed, log, batch_size=5)
    assert log.sizes == [5]
    assert stored_incidents(db) == [incident(i) for i in range(5)]
    assert experiment_row(db)["n_narratives_completed"] == 5
    assert aiosqlite_threads() == []


# --- progress row and snapshots ------------------------------------------------------------


async def test_progress_row_counts_all_stored_results_after_each_commit(db: Path) -> None:
    await write_all(db, results(4, start=100))                      # an earlier session
    await write_all(db, results(6, start=200), experiment_id="other")
    log = CommitLog(db)
    await write_all(db, results(12), log, batch_size=5, total=16, session_target=12)
    for snapshot, stored, (completed, processed, updated, eta) in zip(
            log.snapshots, log.stored, log.progress, strict=True):
        assert completed == processed == len(stored) == snapshot.done
        assert snapshot.done == 4 + snapshot.session_done
        assert updated is not None and eta is not None
        datetime.strptime(eta, LOCAL_FORMAT)
    assert log.snapshots[-1].done == 16 and log.snapshots[-1].percent == 100.0
    assert experiment_row(db, "other")["n_narratives_completed"] == 6


async def test_eta_lies_ahead_while_work_remains(db: Path) -> None:
    log = CommitLog(db)
    await write_all(db, results(5), log, batch_size=5, session_target=1_000_000)
    snapshot = log.snapshots[-1]
    assert snapshot.rate > 0 and snapshot.eta is not None
    assert snapshot.eta > datetime.now().astimezone()
    assert experiment_row(db)["estimated_completion_time"] == snapshot.eta.strftime(LOCAL_FORMAT)


async def test_snapshot_counts_errors_by_category_and_tokens(db: Path) -> None:
    log = CommitLog(db)
    batch = [
        make_result(1, tokens=(100, 20)),
        make_result(2, error_category="timeout", tokens=(0, 0)),
        make_result(3, error_category="parse_error", tokens=(90, 30)),
        make_result(4, error_category="timeout", tokens=(0, 0)),
        make_result(5, tokens=(110, 10)),
    ]
    writer = await write_all(db, batch, log, batch_size=5, total=40)
    snapshot = log.snapshots[-1]
    assert writer.last == snapshot
    assert snapshot.errors == {"timeout": 2, "parse_error": 1}
    assert (snapshot.prompt_tokens, snapshot.completion_tokens) == (300, 60)
    assert (snapshot.done, snapshot.total, snapshot.session_done) == (5, 40, 5)
    assert snapshot.concurrency == 3.0 and snapshot.elapsed_s > 0


# --- cancellation --------------------------------------------------------------------------

BATCH = 7


async def until_receiving(send: MemoryObjectSendStream[Result]) -> None:
    """Wait until the writer has opened its connection and waits for results."""
    with anyio.fail_after(2):
        # nothing to wait on but the stream's own statistics
        while send.statistics().tasks_waiting_receive == 0:  # noqa: ASYNC110
            await anyio.sleep(0.001)


def cancel_after(sent: Sequence[Result], log: CommitLog, yields: int) -> Feed:
    """Once the writer is up, send `sent`, let the event loop run `yields` steps, then cancel
    the writer's task group."""
    async def feed(send: MemoryObjectSendStream[Result], scope: anyio.CancelScope) -> None:
        await until_receiving(send)
        for r in sent:
            await send.send(r)
        for _ in range(yields):
            await anyio.lowlevel.checkpoint()
        log.mark_cancel()
        scope.cancel()
    return feed


def assert_whole_committed_prefix(path: Path, experiment_id: str, sent: Sequence[Result],
                                  log: CommitLog) -> None:
    """The database holds exactly the batches reported committed: a prefix of what was sent."""
    stored = stored_incidents(path, experiment_id)
    assert stored == [r.incident_id for r in sent[:len(stored)]]
    completed = experiment_row(path, experiment_id)["n_narratives_completed"]
    assert len(stored) == log.committed == completed
    for snapshot, seen in zip(log.snapshots, log.stored, strict=True):
        assert len(seen) == snapshot.done == snapshot.session_done    # each commit: all or nothing
    # Before the cancellation a batch is taken only when full (the interval is 30 s and the
    # stream never closes). After it the writer finishes the commit in progress and may still
    # take what it holds in one more (the cancellation reaches it at its next checkpoint).
    assert log.cancel_requested_after is not None
    assert all(size >= BATCH for size in log.sizes[:log.cancel_requested_after])
    assert len(log.snapshots) - log.cancel_requested_after <= 2


@pytest.mark.parametrize("yields", [0, 1, 4])
async def test_cancellation_at_any_moment_leaves_only_whole_reported_batches(
        db: Path, yields: int) -> None:
    finished_after_cancel = 0
    with closing(connect(db)) as conn:
        for k in range(40):
            add_experiment(conn, f"k{k}")
    for k in range(40):
        experiment_id = f"k{k}"
        log = CommitLog(db, experiment_id)
        sent = results(k)
        with capture_logs() as events:
            await drive(db, cancel_after(sent, log, yields), log, experiment_id=experiment_id,
                        batch_size=BATCH, total=k, session_target=k)
        assert [e["rows"] for e in events if e["event"] == "commit"] == log.sizes
        assert_whole_committed_prefix(db, experiment_id, sent, log)
        assert log.cancel_requested_after is not None
        finished_after_cancel += len(log.snapshots) - log.cancel_requested_after
    assert aiosqlite_threads() == []
    assert finished_after_cancel > 0   # the grid did hit commits in progress at the cancel


async def test_a_commit_in_progress_when_cancelled_still_completes_and_is_reported(
        db: Path) -> None:
    log = CommitLog(db)
    sent = results(10)
    with closing(connect(db)) as blocker:
        async def feed(send: MemoryObjectSendStream[Result], scope: anyio.CancelScope) -> None:
            blocker.execute("BEGIN IMMEDIATE")        # the writer's commit will have to wait
            try:
                for r in sent[:BATCH]:
                    await send.send(r)
                await anyio.wait_all_tasks_blocked()  # the writer holds the batch, waiting
                for r in sent[BATCH:]:
                    await send.send(r)                # queued behind the commit in progress
                log.mark_cancel()
                scope.cancel()
            finally:
                blocker.execute("COMMIT")             # now let the commit proceed

        await drive(db, feed, log, batch_size=BATCH)
    assert log.cancel_requested_after == 0 and log.sizes[0] == BATCH   # done and reported
    assert_whole_committed_prefix(db, EXPERIMENT_ID, sent, log)
    assert aiosqlite_threads() == []


async def test_a_writer_cancelled_while_opening_the_database_still_closes_its_stream(
        db: Path) -> None:
    """BUG: run() closes the result stream only once `_collect` has started, i.e. after the
    connection is open; cancelled before that (a failing run, a stop during start-up) the
    receive end is never closed: senders are not told (BrokenResourceError) and the stream is
    left for the garbage collector (ResourceWarning, an error under this suite's filters)."""
    send, recv = anyio.create_memory_object_stream[Result](1)
    writer = ResultWriter(db, writer_settings())
    with anyio.fail_after(5), send, recv:   # closing recv here is a no-op if run() did
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, recv)
            await anyio.lowlevel.checkpoint()     # run() has started: it owns `recv` now
            tg.cancel_scope.cancel()
        with pytest.raises(anyio.BrokenResourceError):
            send.send_nowait(make_result(1))


async def test_issue_15_columns_are_written_and_a_retry_adds_to_the_token_totals(
        db: Path) -> None:
    first = replace(make_result(1, error_category="parse_error", error_message="no JSON"),
                    prompt_tokens=30, completion_tokens=9, prompt_tokens_total=50,
                    completion_tokens_total=20, finish_reason="stop")
    await write_all(db, [first, replace(make_result(2, detected=1), answer_source="repair",
                                        finish_reason="stop", prompt_tokens_total=7,
                                        completion_tokens_total=3)])
    rows = {row["incident_id"]: row for row in stored_results(db)}
    assert (rows[incident(1)]["prompt_tokens_total"],
            rows[incident(1)]["completion_tokens_total"]) == (50, 20)
    assert (rows[incident(1)]["finish_reason"], rows[incident(1)]["answer_source"]) == (
        "stop", None)
    assert (rows[incident(2)]["answer_source"], rows[incident(2)]["prompt_tokens_total"]) == (
        "repair", 7)
    later = "2025-02-02T00:00:00.000000Z"
    retried = replace(retry_result(1, later, detected=1), prompt_tokens=31,
                      completion_tokens=8, prompt_tokens_total=31, completion_tokens_total=8,
                      finish_reason="stop", answer_source="first")
    await write_all(db, [retried], retry_errors_only=True)
    row = {r["incident_id"]: r for r in stored_results(db)}[incident(1)]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (31, 8)   # the last request's
    assert (row["prompt_tokens_total"], row["completion_tokens_total"]) == (81, 28)   # all
    assert row["answer_source"] == "first" and row["error_occurred"] == 0


async def test_a_row_from_before_the_totals_counts_its_own_tokens_on_retry(db: Path) -> None:
    old = replace(make_result(1, error_category="timeout", error_message="x"),
                  prompt_tokens=12, completion_tokens=4)
    await write_all(db, [old])
    later = "2025-02-02T00:00:00.000000Z"
    await write_all(db, [replace(retry_result(1, later, detected=0), prompt_tokens=10,
                                 completion_tokens=5, prompt_tokens_total=10,
                                 completion_tokens_total=5)], retry_errors_only=True)
    [row] = stored_results(db)
    assert (row["prompt_tokens_total"], row["completion_tokens_total"]) == (22, 9)


# --- several rows per statement; a bound on what the writer holds ---------------------------


async def test_a_batch_across_statements_stores_every_row_once(db: Path) -> None:
    """More rows than one INSERT statement takes (ROWS_PER_INSERT), some stored already
    and one twice in the batch: each stored once, `changed` counts only the new ones, and
    each row holds the values a one-row insert would have."""
    n = 2 * ROWS_PER_INSERT + 7
    await write_all(db, results(10))
    log = CommitLog(db)
    batch = [*results(n), make_result(3)]
    with capture_logs() as logs:
        await write_all(db, batch, log, batch_size=len(batch))
    assert stored_incidents(db) == [incident(i) for i in range(n)]
    [commit] = [e for e in logs if e["event"] == "commit"]
    assert (commit["rows"], commit["changed"]) == (len(batch), n - 10)
    rows = {r["incident_id"]: dict(r) for r in stored_results(db)}
    one = tmp_db_with_one_row(db.parent / "one.db", make_result(n - 1))
    assert {k: v for k, v in rows[incident(n - 1)].items() if k != "result_id"} == one


def tmp_db_with_one_row(path: Path, result: Result) -> dict[str, Any]:
    """The row a single-row insert stores for `result`, by the statement insert_rows uses."""
    with closing(connect(path)) as conn:
        add_experiment(conn, EXPERIMENT_ID)
        with conn:
            assert insert_rows(conn, [_row(EXPERIMENT_ID, result)]) == 1
        conn.row_factory = sqlite3.Row
        row = dict(conn.execute("SELECT * FROM narrative_results").fetchone())
    del row["result_id"]
    return row


async def test_while_a_commit_waits_the_writer_holds_a_bounded_number_of_results(
        db: Path) -> None:
    """Another connection holds the write lock, so the first commit waits: the writer
    takes no more than its bound (PENDING_CAP, beside the batch of the waiting commit) off
    the stream, the stream fills, and the sender is held back; once the lock goes every
    result is stored."""
    settings = writer_settings(batch_size=10, total=5000, session_target=5000)
    writer = ResultWriter(db, settings)
    send, recv = anyio.create_memory_object_stream[Result](50)
    blocker = sqlite3.connect(db, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    sent = blocked_at = 0
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.run, recv)
                async with send:
                    for r in results(5000):
                        try:
                            send.send_nowait(r)
                        except anyio.WouldBlock:
                            await anyio.sleep(0.2)     # the writer had its chance to drain
                            try:
                                send.send_nowait(r)
                            except anyio.WouldBlock:
                                break                  # held back: the bound works
                        sent += 1
                        await anyio.lowlevel.checkpoint()
                    # held: at most the pending results, the batch in the waiting commit
                    # (no more than they were) and the stream's buffer
                    blocked_at = sent
                    blocker.rollback()
                    for r in results(5000)[sent:]:
                        await send.send(r)
    finally:
        blocker.close()
    assert blocked_at <= 2 * PENDING_CAP + 50
    assert len(stored_incidents(db)) == 5000
