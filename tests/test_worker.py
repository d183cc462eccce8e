"""The worker pool's doorbell: one idle coroutine woken per queued job, no wake-up lost."""

from __future__ import annotations

import asyncio

from server.worker import Doorbell


async def _parked(bell: Doorbell, n: int) -> list[asyncio.Task[None]]:
    """n coroutines waiting on the bell (each has registered before this returns)."""
    tasks = [asyncio.create_task(bell.wait(60)) for _ in range(n)]
    async with asyncio.timeout(5):
        while len(bell.waiters) < n:
            await asyncio.sleep(0)
    return tasks


async def test_a_ring_wakes_exactly_one_idle_coroutine() -> None:
    bell = Doorbell()
    tasks = await _parked(bell, 3)
    bell.ring()
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and len(bell.waiters) == 2
    assert not any(w.done() for w in bell.waiters)  # the other two were never woken
    bell.ring(everyone=True)
    await asyncio.wait_for(asyncio.gather(*pending), 5)


async def test_a_ring_with_nobody_waiting_is_kept_for_the_next_wait() -> None:
    bell = Doorbell()
    bell.ring()  # every coroutine was busy claiming
    await asyncio.wait_for(bell.wait(60), 5)  # returns at once: it claims again
    assert not bell.pending
    [late] = await _parked(bell, 1)  # the ring was used up: this one waits
    assert not late.done()
    bell.ring()
    await asyncio.wait_for(late, 5)


async def test_a_waiter_that_times_out_leaves_no_trace() -> None:
    bell = Doorbell()
    await bell.wait(0.01)  # the poll interval passing, as when a notification was lost
    assert not bell.waiters
    bell.ring()
    assert bell.pending  # nobody was left waiting to take it
