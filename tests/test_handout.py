"""The hand-out between the producer and the workers, in-process: rows come out in the
order they went in, as Narratives; the producer is let in only once the rows left are down
to `low`; a normal end leaves the rest to be taken, a dropped one does not; consumers that
go away fail the producer instead of leaving it waiting."""

from __future__ import annotations

import anyio
import pytest

from asyncrunner.pipeline.handout import Handout
from asyncrunner.pipeline.messages import Narrative


def rows(*ids: int) -> list[tuple[object, ...]]:
    return [(i, f"inc-{i}", "LE", f"text {i}" if i % 3 else None, i % 2, None) for i in ids]


def ids(narratives: list[Narrative]) -> list[int]:
    return [n.narrative_id for n in narratives]


async def test_rows_come_out_in_order_as_narratives() -> None:
    handout = Handout()
    handout.put(rows(1, 2, 3))
    handout.end()
    got = [n async for n in handout]
    assert got == [Narrative(1, "inc-1", "LE", "text 1", 1, None),
                   Narrative(2, "inc-2", "LE", "text 2", 0, None),
                   Narrative(3, "inc-3", "LE", "", 1, None)]     # no text: empty, not None


async def test_the_producer_waits_until_the_rows_left_are_down_to_low() -> None:
    handout = Handout(low=2)
    handout.put(rows(*range(5)))
    waited: list[int] = []

    async def producer() -> None:
        await handout.wait_low()
        waited.append(len(handout._rows))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await anyio.wait_all_tasks_blocked()
            assert handout.take_nowait() is not None and handout.take_nowait() is not None
            await anyio.wait_all_tasks_blocked()
            assert waited == []                     # three left: still more than low
            assert handout.take_nowait() is not None
    assert waited == [2]


async def test_a_waiting_consumer_gets_the_next_put() -> None:
    handout = Handout()
    got: list[Narrative] = []

    async def consumer() -> None:
        got.append(await handout.take())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            tg.start_soon(consumer)
            await anyio.wait_all_tasks_blocked()
            assert handout.take_nowait() is None    # empty, not ended
            handout.put(rows(7, 8))
    assert sorted(ids(got)) == [7, 8]


async def test_a_normal_end_leaves_the_rest_to_be_taken_and_wakes_idle_consumers() -> None:
    handout = Handout()
    ended: list[bool] = []

    async def idle() -> None:
        with pytest.raises(anyio.EndOfStream):
            await handout.take()
        ended.append(True)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(idle)
            await anyio.wait_all_tasks_blocked()
            handout.end()
    assert ended == [True]
    left = Handout()
    left.put(rows(1, 2))
    left.end()
    assert ids([n async for n in left]) == [1, 2]
    with pytest.raises(anyio.ClosedResourceError):
        left.put(rows(3))


async def test_a_dropped_end_takes_nothing_more() -> None:
    handout = Handout()
    handout.put(rows(1, 2, 3))
    assert handout.take_nowait() is not None
    handout.end(drop=True)                  # a stop: 2 and 3 were never started
    with pytest.raises(anyio.EndOfStream):
        handout.take_nowait()


async def test_consumers_that_go_away_fail_the_producer() -> None:
    handout = Handout()
    handout.put(rows(1, 2, 3))

    async def producer() -> None:
        await handout.wait_low()

    with anyio.fail_after(5), pytest.RaisesGroup(anyio.BrokenResourceError):
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await anyio.wait_all_tasks_blocked()
            async with handout:
                assert handout.take_nowait() is not None
    with pytest.raises(anyio.BrokenResourceError):
        handout.put(rows(4))


def test_low_cannot_be_negative() -> None:
    with pytest.raises(ValueError):
        Handout(low=-1)
