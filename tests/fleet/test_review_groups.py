"""Review of the PostgreSQL store's two group commits in flight (``WRITE_DEPTH = 2``): writes
that the kernel issues one after the other, for the same row, must be stored in that order
(the kernel's memory follows the order it issued them in). Real database."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import pytest

from kernel.app import Kernel
from kernel.clock import SystemClock
from kernel.fleet import FleetSettings
from kernel.hookspecs import PluginContext
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import ScheduleState
from kernel.store.pg_fleet import Rescue
from kernel.store.pg_schema import quote_ident
from kernel.store.postgres import PostgresStore

from ..harness import make_config
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


def _start_kernel(store: PostgresStore) -> tuple[Kernel, asyncio.Task[None], asyncio.Event]:
    """A fleet kernel with no tasks on ``store``, fast heartbeats; its run task is started."""
    plugins = load_plugins(PluginContext(), extra=[], use_entry_points=False)
    kernel = build(make_config(""), clock=SystemClock(), plugins=plugins, store=store)
    assert kernel.fleet is not None
    kernel.fleet.settings = FleetSettings(heartbeat=0.05, ttl=30.0, horizon=0.5, batch=50)
    started = asyncio.Event()
    return kernel, asyncio.create_task(kernel.run(started=started)), started


class _LeaveRace(PostgresStore):
    """A real PostgresStore that makes one interleaving happen on purpose (events, no fakes):
    once ``armed``, the next heartbeat reaches the database just after ``expire_kernel``
    (the kernel leaving the fleet) deleted the kernel's row, and its answer comes back before
    ``expire_kernel``'s does. Both are pool operations on their own connections: any order
    of the two is possible in production."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.armed = False
        self.left = asyncio.Event()
        self.beat_answered = asyncio.Event()
        self.registered_after_leaving: list[str] = []

    async def heartbeat(self, kernel_id: str, now: float | None) -> bool:
        if self.armed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.left.wait(), 10)
        alive = await super().heartbeat(kernel_id, now)
        if self.left.is_set():
            self.beat_answered.set()
        return alive

    async def expire_kernel(self, kernel_id: str) -> Rescue:
        r = await super().expire_kernel(kernel_id)
        if self.armed:
            self.left.set()
            with contextlib.suppress(TimeoutError):  # (fixed: no heartbeat comes any more)
                await asyncio.wait_for(self.beat_answered.wait(), 2)
        return r

    async def register_kernel(self, kernel_id: str, host: str, pid: int,
                              now: float | None) -> None:
        if self.left.is_set():
            self.registered_after_leaving.append(kernel_id)
        await super().register_kernel(kernel_id, host, pid, now)


@pytest.mark.slow
async def test_a_kernel_that_left_the_fleet_does_not_register_again(fleet: Fleet) -> None:
    """``Kernel.run`` now starts the heartbeats right after ``join()`` and cancels them in
    its ``finally``, i.e. after ``_serve`` called ``fleet.leave()``. A heartbeat in flight
    while the kernel leaves finds its row deleted, answers "declared dead", and the member
    fences and registers again under a fresh id: a stopped kernel leaves a live-looking
    registration behind (and logs a fencing error at an orderly stop). Before, heartbeats
    were service tasks, cancelled before ``leave()``."""
    store = _LeaveRace(fleet.cluster.dsn, schema=fleet.schema)
    kernel, task, started = _start_kernel(store)
    try:
        await asyncio.wait_for(started.wait(), 30)
        store.armed = True
        kernel.stop("test")
        await asyncio.wait_for(task, 30)
    finally:
        if not task.done():
            task.cancel()
    assert store.left.is_set()
    assert store.registered_after_leaving == [], (
        "the kernel registered again after it left the fleet (a heartbeat ran after leave())")


@pytest.mark.slow
async def test_a_failed_heartbeat_service_does_not_stop_the_store_from_closing(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_heartbeats_ended`` says a heartbeat service that ends with an exception is a bug to
    log at once, and the kernel carries on. But ``Kernel.run``'s ``finally`` then does
    ``await beats``, which raises that exception again: ``store.close()`` is skipped (the
    writer task and connections stay open) and ``_stopped`` is never set, so
    ``wait_stopped()`` hangs. The fault is injected (a bug in the upkeep, as a RuntimeError
    from ``FleetMember._view``: nothing else in a real fleet raises it on demand)."""
    failed = asyncio.Event()

    def broken(self: object) -> None:
        failed.set()  # the heartbeat task ends in this same step, with the error
        raise RuntimeError("injected: a bug in the heartbeat's upkeep")

    monkeypatch.setattr("kernel.fleet.FleetMember._view", broken)
    store = PostgresStore(fleet.cluster.dsn, schema=fleet.schema)
    kernel, task, started = _start_kernel(store)
    try:
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.wait_for(failed.wait(), 10)
        kernel.stop("test")
        with contextlib.suppress(Exception):  # however it ends, it must close the store
            await asyncio.wait_for(task, 30)
    finally:
        if not task.done():
            task.cancel()
        opened = store._open
        await store.close()
    assert not opened, "the store was left open: run()'s finally re-raised the heartbeat error"
    assert kernel._stopped.is_set(), "wait_stopped() would hang"
