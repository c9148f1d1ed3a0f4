"""produce() in-process against a real SQLite file: narrative_id order across pages, the
anti-join on stored results, the cutoff, retry-errors-only, ending the hand-out, and leaving
cleanly (no open connection, no read transaction) however the consumer ends."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from pathlib import Path

import anyio
import pytest
from pipeline_helpers import (
    CHECKSUM,
    EXPERIMENT_ID,
    NARRATIVE_TYPE,
    add_narratives,
    add_result_rows,
    aiosqlite_threads,
    incident,
    open_database,
    query,
)

from asyncrunner.db.schema import connect
from asyncrunner.pipeline.handout import Handout
from asyncrunner.pipeline.messages import Narrative
from asyncrunner.pipeline.producer import FirstPage, WorkSelection, produce

Consume = Callable[[Handout], Awaitable[list[Narrative]]]


def selection(*, cutoff: int | None = None, retry: bool = False) -> WorkSelection:
    return WorkSelection(experiment_id=EXPERIMENT_ID, checksum=CHECKSUM, cutoff=cutoff,
                         retry_errors_only=retry)


async def drain(handout: Handout) -> list[Narrative]:
    async with handout:
        return [n async for n in handout]


async def run_producer(path: Path, work: WorkSelection, consume: Consume = drain, *,
                       page_size: int = 3, first: FirstPage | None = None) -> list[Narrative]:
    """produce() into a hand-out refilled only once it is empty, consumed by `consume`."""
    handout = Handout()
    received: list[Narrative] = []

    async def consumer() -> None:
        received.extend(await consume(handout))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            await produce(path, work, handout, page_size=page_size, first=first)
    return received


def narrative_id(path: Path, i: int) -> int:
    [row] = query(path, "SELECT narrative_id FROM source_narratives WHERE incident_id = ? "
                        "AND data_checksum = ?", (incident(i), CHECKSUM))
    return int(row[0])


def numbers(narratives: list[Narrative]) -> list[int]:
    return [int(n.incident_id.split("-")[1]) for n in narratives]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    """Ten narratives of this data set (incidents 0..9) interleaved with another file's."""
    with open_database(tmp_path) as path:
        add_narratives(path, [pair for i in range(10)
                              for pair in ((i, CHECKSUM), (100 + i, "another-file"))])
        yield path


async def test_every_narrative_in_id_order_across_pages(db: Path) -> None:
    got = await run_producer(db, selection(), page_size=3)
    assert numbers(got) == list(range(10))
    ids = [n.narrative_id for n in got]
    assert ids == sorted(ids)
    first = got[0]
    assert (first.narrative_type, first.text) == (NARRATIVE_TYPE, "narrative text 0")
    assert (first.manual_flag_ind, first.manual_flag) == (0, 0)
    assert (got[1].manual_flag_ind, got[1].manual_flag) == (1, 1)
    assert aiosqlite_threads() == []


@pytest.mark.parametrize("page_size", [1, 4, 10, 256])
async def test_page_size_changes_nothing_but_the_reads(db: Path, page_size: int) -> None:
    add_result_rows(db, [2, 3, 7])
    got = await run_producer(db, selection(), page_size=page_size)
    assert numbers(got) == [0, 1, 4, 5, 6, 8, 9]


async def test_narratives_with_a_result_of_this_experiment_are_skipped(db: Path) -> None:
    add_result_rows(db, [0, 4, 5])
    add_result_rows(db, [1, 6], error=True)               # an error row is a stored result too
    add_result_rows(db, [2, 3], experiment_id="other")    # another experiment's results
    got = await run_producer(db, selection())
    assert numbers(got) == [2, 3, 7, 8, 9]


async def test_the_cutoff_ends_the_set(db: Path) -> None:
    got = await run_producer(db, selection(cutoff=narrative_id(db, 4)))
    assert numbers(got) == [0, 1, 2, 3, 4]


async def test_retry_errors_only_selects_this_experiments_errored_results(db: Path) -> None:
    add_result_rows(db, [1, 5, 8], error=True)
    add_result_rows(db, [2, 3])
    add_result_rows(db, [4], experiment_id="other", error=True)
    got = await run_producer(db, selection(retry=True))
    assert numbers(got) == [1, 5, 8]
    assert numbers(await run_producer(db, selection(retry=True, cutoff=narrative_id(db, 3)))) == [1]


async def test_each_page_is_a_fresh_read(db: Path) -> None:
    """Results stored while the producer runs remove narratives from the pages still to come,
    and no read transaction is held in between: a full WAL checkpoint succeeds."""
    checkpoints: list[int] = []

    async def consume(handout: Handout) -> list[Narrative]:
        async with handout:
            first = await handout.take()            # page 1 (0, 1, 2) has been read
            add_result_rows(db, [2, 7])             # 2 is in the page read, 7 is not
            with closing(connect(db)) as conn:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                checkpoints.append(busy)
            return [first, *[n async for n in handout]]

    got = await run_producer(db, selection(), consume, page_size=3)
    assert numbers(got) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert checkpoints == [0]                      # busy = 0: no reader pins the WAL


async def test_nothing_to_do_ends_the_handout_at_once(db: Path) -> None:
    add_result_rows(db, range(10))
    assert await run_producer(db, selection()) == []
    assert await run_producer(db, selection(retry=True)) == []


async def test_the_consumer_sees_end_of_stream(db: Path) -> None:
    """A normal end leaves what was put in to be taken, then says so."""
    handout = Handout(low=20)
    with anyio.fail_after(5):
        await produce(db, selection(cutoff=None), handout, page_size=4)
    assert len([handout.take_nowait() for _ in range(10)]) == 10
    with pytest.raises(anyio.EndOfStream):
        handout.take_nowait()
    with pytest.raises(anyio.ClosedResourceError):
        handout.put([(0, "x", "t", "", None, None)])
    assert aiosqlite_threads() == []


async def test_cancelled_while_waiting_for_a_consumer_leaves_cleanly(db: Path) -> None:
    """A stop drops what was not taken: it was never started, and stays remaining."""
    handout = Handout()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce, db, selection(), handout)
            assert (await handout.take()).incident_id == incident(0)
            await anyio.wait_all_tasks_blocked()   # the producer waits for room
            tg.cancel_scope.cancel()
    with pytest.raises(anyio.EndOfStream):
        handout.take_nowait()                      # nine rows were left: dropped
    assert aiosqlite_threads() == []


async def test_a_consumer_that_stops_early_does_not_leave_the_producer_hanging(db: Path) -> None:
    async def take_two(handout: Handout) -> list[Narrative]:
        async with handout:
            return [await handout.take(), await handout.take()]

    with pytest.RaisesGroup(anyio.BrokenResourceError):   # produce() raises, it does not hang
        await run_producer(db, selection(), take_two)
    assert aiosqlite_threads() == []


async def test_text_ids_and_labels_arrive_exactly_as_stored(tmp_path: Path) -> None:
    """A page travels as one JSON value (one sqlite3 step, see producer.py): quotes,
    backslashes, line and paragraph separators, control characters, NUL, non-BMP text, an
    empty text, ids that look like numbers and unknown labels all come out as stored."""
    texts = ['quote " and back\\slash', "line\nbreak\r\nand\ttab \u2028 \u2029",
             "nul\x00inside \x01\x1f", "é ü ß 漢字 🙂", "", "   spaced   "]
    with open_database(tmp_path) as path, closing(connect(path)) as conn:
        conn.executemany(
            "INSERT INTO source_narratives (incident_id, narrative_type, narrative_text, "
            "manual_flag_ind, manual_flag, data_source, data_checksum) "
            "VALUES (?, ?, ?, ?, ?, 'test.csv', ?)",
            [(f"00{i}", "LE", text, None if i % 2 else 1, None, CHECKSUM)
             for i, text in enumerate(texts)])
        conn.commit()
        got = await run_producer(path, selection(), page_size=4)
    assert [(n.incident_id, n.narrative_type, n.text, n.manual_flag_ind, n.manual_flag)
            for n in got] == [(f"00{i}", "LE", text, None if i % 2 else 1, None)
                              for i, text in enumerate(texts)]


@pytest.mark.parametrize("page_size", [1, 3, 256])
async def test_a_first_page_read_ahead_gives_the_same_narratives(db: Path,
                                                                  page_size: int) -> None:
    """The session starts reading the first page before the pipeline exists (a resume's
    first page passes every narrative done): what it hands out is what produce() alone
    would, in the same order, the retry selection included."""
    add_result_rows(db, [0, 1, 4])
    add_result_rows(db, [6, 8], error=True)
    for work in (selection(), selection(retry=True), selection(cutoff=narrative_id(db, 7))):
        expected = await run_producer(db, work, page_size=page_size)
        ahead = FirstPage(db, work, page_size)
        got = await run_producer(db, work, page_size=page_size, first=ahead)
        assert got == expected and got
    assert aiosqlite_threads() == []


async def test_a_first_page_that_cannot_be_read_fails_the_producer(tmp_path: Path) -> None:
    """A read error on the read-ahead thread is the producer's error, raised once the
    producer takes the page, and the hand-out still ends (idle workers can leave)."""
    empty = tmp_path / "not-a-results-db.sqlite"
    with closing(connect(empty, migrate_schema=False)):
        pass
    ahead = FirstPage(empty, selection())
    ahead.wait()
    seen: list[list[Narrative]] = []

    async def watch(handout: Handout) -> list[Narrative]:
        seen.append(await drain(handout))
        return seen[-1]

    with pytest.raises(ExceptionGroup) as failed:
        await run_producer(empty, selection(), watch, first=ahead)
    assert failed.group_contains(sqlite3.OperationalError, match="no such table")
    assert seen == [[]]
