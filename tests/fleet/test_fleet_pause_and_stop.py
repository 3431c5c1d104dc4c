"""Follow-ups of the review of the fleet's second pass (real PostgreSQL):

- a kernel's progress writes (start-up catch-up, clock steps) never undo a pause another kernel
  stored meanwhile: only pause and resume write the paused flag;
- a heartbeat service that fails stops the kernel (it would otherwise serve as a zombie the
  fleet has declared dead), and the kernel still closes its store;
- a kernel that is cancelled (the in-process stand-in for SIGKILL) does not leave the fleet:
  its jobs wait for the others' TTL rescue, as a killed process's do."""

from __future__ import annotations

import asyncio
import time

import pytest

from kernel.clock import SystemClock
from kernel.fleet import FleetMember
from kernel.hookspecs import PluginContext
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import ScheduleState
from kernel.store.postgres import PostgresStore

from ..harness import make_config
from .conftest import Fleet
from .test_kernel_fleet import FAST, Ledger, until

pytestmark = pytest.mark.slow


async def test_a_progress_write_keeps_the_stored_pause(fleet: Fleet) -> None:
    s = await fleet.store()
    await s.set_schedule_state(ScheduleState(task_id="t", last_scheduled_at=10.0, paused=True,
                                             next_due_at=None))
    # another kernel that has not followed the pause yet saves its progress
    await s.advance_schedule_state(ScheduleState(task_id="t", last_scheduled_at=20.0,
                                                 paused=False, next_due_at=21.0))
    st = (await s.schedule_states())["t"]
    assert (st.paused, st.last_scheduled_at, st.next_due_at) == (True, 20.0, None)
    await s.advance_schedule_state(ScheduleState(task_id="t", last_scheduled_at=15.0))
    assert (await s.schedule_states())["t"].last_scheduled_at == 20.0  # never backwards
    await s.set_schedule_state(ScheduleState(task_id="t", last_scheduled_at=20.0, paused=False,
                                             next_due_at=None))  # resume
    await s.advance_schedule_state(ScheduleState(task_id="t", last_scheduled_at=30.0,
                                                 paused=False, next_due_at=31.0))
    st = (await s.schedule_states())["t"]
    assert (st.paused, st.next_due_at) == (False, 31.0)
    await s.advance_schedule_state(ScheduleState(task_id="new", last_scheduled_at=1.0))
    assert not (await s.schedule_states())["new"].paused


class PausedMeanwhile(PostgresStore):
    """A real store whose first ``schedule_states`` read (the kernel's start-up) is followed at
    once by another kernel pausing task ``t``: the starting kernel holds a stale state."""

    def __init__(self, *a: object, other: PostgresStore, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.other = other
        self.done = False

    async def schedule_states(self) -> dict[str, ScheduleState]:
        states = await super().schedule_states()
        if not self.done:
            self.done = True
            st = states["t"]
            await self.other.set_schedule_state(ScheduleState(
                task_id="t", last_scheduled_at=st.last_scheduled_at, paused=True))
        return states


async def test_a_starting_kernel_does_not_undo_a_pause_made_during_its_start(
        fleet: Fleet) -> None:
    other = await fleet.store()
    # recorded an hour ahead (a wall clock that was wrong): the start-up clamps it and stores
    # the task's progress, a progress write made from the state read before the pause
    ahead = float(int(time.time()) + 3600)
    await other.set_schedule_state(ScheduleState(task_id="t", last_scheduled_at=ahead))
    store = PausedMeanwhile(fleet.cluster.dsn, schema=fleet.schema, other=other)
    plugins = load_plugins(PluginContext(), extra=[("rec", Ledger().plugin(0))],
                           use_entry_points=False)
    kernel = build(make_config("""
        [[tasks]]
        id = "t"
        schedule = "* * * * * *"
        action = "rec"
        """), clock=SystemClock(), plugins=plugins, store=store)
    assert kernel.fleet is not None
    kernel.fleet.settings = FAST
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))
    try:
        await asyncio.wait_for(started.wait(), 30)
        assert (await other.schedule_states())["t"].paused
        # and at its next heartbeat the kernel follows the stored pause
        await until(lambda: kernel.timetable.tasks["t"].paused, 10)
    finally:
        kernel.stop("test")
        await asyncio.wait_for(task, 30)


def _kernel(fleet: Fleet) -> tuple[object, PostgresStore]:
    store = PostgresStore(fleet.cluster.dsn, schema=fleet.schema)
    plugins = load_plugins(PluginContext(), extra=[("rec", Ledger().plugin(0))],
                           use_entry_points=False)
    kernel = build(make_config(""), clock=SystemClock(), plugins=plugins, store=store)
    assert kernel.fleet is not None
    kernel.fleet.settings = FAST
    return kernel, store


async def test_a_failed_heartbeat_service_stops_the_kernel(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: FleetMember) -> None:
        raise RuntimeError("injected: a bug in the heartbeat's upkeep")

    monkeypatch.setattr(FleetMember, "_view", broken)  # fault injection: nothing else raises it
    kernel, store = _kernel(fleet)
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))  # type: ignore[attr-defined]
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.wait_for(task, 30)  # it stops by itself
    assert not store._open
    assert kernel._stopped.is_set()  # type: ignore[attr-defined]


async def test_a_cancelled_kernel_does_not_leave_the_fleet(fleet: Fleet) -> None:
    kernel, _ = _kernel(fleet)
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))  # type: ignore[attr-defined]
    await asyncio.wait_for(started.wait(), 30)
    me = kernel.fleet.id  # type: ignore[attr-defined]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    other = await fleet.store()
    assert me in {k.id for k in await other.kernels()}  # still registered: rescued after the TTL
