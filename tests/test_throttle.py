"""AIMD back-pressure: one burst of slow-downs halves once, successes climb back, never
above the ceiling; the common pause delays every worker."""

from __future__ import annotations

import time

import anyio
import pytest

from asyncrunner.llm.throttle import AdaptiveLimiter


def test_one_round_of_refusals_is_one_decrease_and_recovers_to_ceiling() -> None:
    limiter = AdaptiveLimiter(16)
    sent = time.monotonic()
    for _ in range(20):
        limiter.on_slow_down(None, sent_at=sent)
    assert limiter.stats().limit == 8 and limiter.stats().decreases == 1
    for _ in range(1000):
        limiter.on_success()
    assert limiter.stats().limit == 16


def test_floor_is_one() -> None:
    limiter = AdaptiveLimiter(4)
    for _ in range(10):
        limiter.on_slow_down(None)
    assert limiter.stats().limit == 1


async def test_concurrency_never_exceeds_limit() -> None:
    limiter = AdaptiveLimiter(8)
    limiter.on_slow_down(None)  # limit 4
    peak = 0
    active = 0

    async def job() -> None:
        nonlocal peak, active
        await limiter.acquire()
        active += 1
        peak = max(peak, active)
        await anyio.sleep(0.01)
        active -= 1
        await limiter.release()

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(job)
    assert peak == 4


async def test_retry_after_pauses_new_requests() -> None:
    limiter = AdaptiveLimiter(4)
    limiter.on_slow_down(0.2)
    started = time.monotonic()
    await limiter.acquire()
    await limiter.release()
    assert time.monotonic() - started >= 0.19


async def test_requests_per_minute_paces() -> None:
    limiter = AdaptiveLimiter(4, requests_per_minute=600)  # one per 0.1 s
    started = time.monotonic()
    for _ in range(4):
        await limiter.acquire()
        await limiter.release()
    assert time.monotonic() - started >= 0.29


async def test_token_budget_waits_when_the_window_is_spent_and_learns_usage() -> None:
    from asyncrunner.llm.throttle import TokenBudget

    budget = TokenBudget(tokens_per_minute=1000, max_completion_tokens=100)
    assert budget.estimate(400) == 400 / 4 + 50
    entry = await budget.reserve(900)
    budget.settle(entry, 400, prompt_tokens=200, completion_tokens=20)
    assert entry[1] == 220  # the reported usage replaces the estimate
    # 2 chars/token seen pulls the ratio from 4 toward 2; completions of 20 pull 50 down
    assert budget.estimate(400) == pytest.approx(400 / 3.6 + 44)
    await budget.reserve(700)  # 220 + 700 fits
    with anyio.move_on_after(0.2) as scope:
        await budget.reserve(500)  # would exceed 1000 within the window
    assert scope.cancelled_caught


def test_a_refusal_of_a_request_sent_after_the_decrease_halves_again() -> None:
    limiter = AdaptiveLimiter(16)
    before = time.monotonic()
    limiter.on_slow_down(None, sent_at=before)
    limiter.on_slow_down(None, sent_at=before)           # same round: ignored
    assert (limiter.stats().limit, limiter.stats().decreases) == (8, 1)
    limiter.on_slow_down(None, sent_at=time.monotonic())  # a later round
    assert (limiter.stats().limit, limiter.stats().decreases) == (4, 2)


def test_the_floor_can_be_raised() -> None:
    limiter = AdaptiveLimiter(8, floor=3)
    for _ in range(5):
        limiter.on_slow_down(None)
    assert limiter.stats().limit == 3


def test_stats_show_the_common_pause_and_slots_in_use() -> None:
    limiter = AdaptiveLimiter(4)
    assert limiter.stats().paused_for_s == 0
    limiter.on_slow_down(30.0)
    limiter.on_slow_down(5.0)                            # a shorter pause never shortens it
    assert 29 < limiter.stats().paused_for_s <= 30
    assert limiter.stats().ceiling == 4 and limiter.stats().in_flight == 0


async def test_a_request_cancelled_during_the_pause_gives_back_its_slot() -> None:
    """BUG: acquire() takes a slot, then waits out the pause; cancelled there, its
    `except BaseException: await self.release()` runs inside the cancelled scope, and
    release() raises at once when it takes the condition's lock, so the slot is never
    returned (in_flight stays 1; with ceiling 1 the next acquire() would wait forever)."""
    limiter = AdaptiveLimiter(1)
    limiter.on_slow_down(10.0)
    with anyio.move_on_after(0.05):
        await limiter.acquire()
    assert limiter.stats().in_flight == 0


# --- the slow path: every slot taken ---------------------------------------------------------


async def test_requests_waiting_for_a_slot_get_one_in_arrival_order() -> None:
    limiter = AdaptiveLimiter(2)
    await limiter.acquire()
    await limiter.acquire()
    order: list[int] = []

    async def job(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(job, i)
                await anyio.wait_all_tasks_blocked()
            assert order == [] and limiter.stats().in_flight == 2
            for _ in range(4):
                await limiter.release()
                await anyio.wait_all_tasks_blocked()
    assert order == [0, 1, 2, 3] and limiter.stats().in_flight == 2


async def test_a_request_cancelled_while_queued_takes_no_slot() -> None:
    limiter = AdaptiveLimiter(1)
    await limiter.acquire()
    with anyio.move_on_after(0.05) as scope:
        await limiter.acquire()                 # queued behind the slot in use
    assert scope.cancelled_caught
    await limiter.release()
    assert limiter.stats().in_flight == 0
    with anyio.fail_after(1):
        await limiter.acquire()                 # free at once: nobody else holds it
    assert limiter.stats().in_flight == 1


async def test_a_slot_handed_over_while_the_group_is_cancelled_is_given_back() -> None:
    """The request is handed a slot by release() and cancelled in the same step; either way
    (it gets the slot and releases it when cancelled later, or it is cancelled in acquire)
    nothing stays taken."""
    limiter = AdaptiveLimiter(1)
    await limiter.acquire()

    async def request() -> None:
        await limiter.acquire()
        try:
            await anyio.sleep_forever()
        finally:
            await limiter.release()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(request)
            await anyio.wait_all_tasks_blocked()
            await limiter.release()             # the slot now belongs to the waiting request
            assert limiter.stats().in_flight == 1
            tg.cancel_scope.cancel()            # ... which is cancelled before it resumes
    assert limiter.stats().in_flight == 0


async def test_a_limit_that_grows_back_lets_waiting_requests_in() -> None:
    limiter = AdaptiveLimiter(2)
    limiter.on_slow_down(None)                  # limit 1
    await limiter.acquire()
    got: list[bool] = []

    async def job() -> None:
        await limiter.acquire()
        got.append(True)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(job)
            await anyio.wait_all_tasks_blocked()
            assert got == []
            for _ in range(2):
                limiter.on_success()            # 1 -> 2 without any release
            await anyio.wait_all_tasks_blocked()
            assert got == [True] and limiter.stats().in_flight == 2
