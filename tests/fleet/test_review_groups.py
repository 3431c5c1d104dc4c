"""Review of the PostgreSQL store's two group commits in flight (``WRITE_DEPTH = 2``): writes
that the kernel issues one after the other, for the same row, must be stored in that order
(the kernel's memory follows the order it issued them in). Real database."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from kernel.records import ScheduleState
from kernel.store.pg_schema import quote_ident

from .conftest import Fleet


async def _wait_for(cond: object, bound: float = 5.0) -> bool:
    """Poll ``cond()`` (an async callable) until it holds or ``bound`` seconds passed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    while loop.time() < end:
        if await cond():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.slow
async def test_a_later_state_write_of_one_task_is_not_overwritten_by_an_earlier_one(
        fleet: Fleet) -> None:
    """The kernel's loop saves task T's state after a tick (not paused) while ``pause(T)``
    saves T paused: two ``set_schedule_state`` writes of one task issued in that order,
    the second before the first committed (``pause`` takes the kernel's lock, the loop does
    not). The store must end with the last one issued, as the kernel's memory does; else
    the fleet's heartbeat (``_follow_pauses``) resumes the task the user just paused, and a
    restart finds it not paused.

    To make the first group slow (under load it is the big one: hundreds of starts and
    finishes), another connection holds a row lock that the first group meets before T."""
    s = await fleet.store()
    await s.set_schedule_state(ScheduleState(task_id="u", last_scheduled_at=1.0))
    blocker = await asyncpg.connect(fleet.cluster.dsn)
    try:
        await blocker.execute(f"SET search_path = {quote_ident(fleet.schema)}")
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT 1 FROM schedule_state WHERE task_id = 'u' FOR UPDATE")

        # group 1: another task's state (waits for the lock), then T as the loop saves it
        first = asyncio.ensure_future(asyncio.gather(
            s.set_schedule_state(ScheduleState(task_id="u", last_scheduled_at=2.0)),
            s.set_schedule_state(ScheduleState(task_id="t", last_scheduled_at=10.0,
                                               paused=False, next_due_at=11.0)),
        ))

        async def group_one_waits() -> bool:
            n = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'INSERT INTO schedule_state%'")
            return bool(n)

        assert await _wait_for(group_one_waits)
        # then pause(T): issued after the loop's write, while that one is not committed
        second = asyncio.ensure_future(s.set_schedule_state(
            ScheduleState(task_id="t", last_scheduled_at=10.0, paused=True, next_due_at=None)))

        async def second_done() -> bool:
            return second.done()

        await _wait_for(second_done, bound=2.0)  # the bug: it commits before group 1
        await blocker.execute("ROLLBACK")
        await asyncio.wait_for(first, 10)
        await asyncio.wait_for(second, 10)
    finally:
        await blocker.close()
    st = (await s.schedule_states())["t"]
    assert st.paused, ("the pause, issued last, was overwritten by the state write issued "
                       "before it (two groups in flight committed out of order)")
