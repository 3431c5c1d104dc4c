"""Fleet claims follow the room a kernel has (``FleetMember.room``, ``Kernel._room``).

A kernel claims, at insert or ahead, only what it can start within the claim horizon: its free
slots plus what it ends per second times the horizon. A burst posted to one busy box is left,
beyond that, to the others (``test_trial_fleet.py`` has the two-kernel case); a kernel that
runs short jobs fast still takes a burst at insert. Real PostgreSQL stores; waits are bounded
conditions.
"""

from __future__ import annotations

import asyncio
import time

from kernel.clock import FakeClock
from kernel.fleet import FleetMember
from kernel.hookspecs import PluginContext
from kernel.journal import Journal
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import Job
from kernel.store.postgres import PostgresStore

from ..harness import make_config
from .conftest import Fleet
from .test_kernel_fleet import until
from .test_review_fixes import SLOW_BEATS, cancelled, claimed_elsewhere


def member(store: PostgresStore, clock: FakeClock, room: list[int],
           claimed: list[Job]) -> FleetMember:
    """A fleet member alone (no kernel) with ``room[0]`` slots: its room is that less what it
    holds (what it claimed), as a kernel's is."""
    return FleetMember(store, clock, SLOW_BEATS, on_claimed=claimed.extend,
                       on_fenced=lambda: None, on_pauses=lambda _states: None,
                       max_gpu_memory_mb=lambda: None, gpu_held=list,
                       drop_queued=lambda _ids: None, room=lambda: room[0] - len(claimed))


def jobs(n: int, due: float, prefix: str = "j") -> list[Job]:
    return [Job(id=f"{prefix}{i}", action="rec", due_at=due) for i in range(n)]


async def test_a_submission_claims_at_insert_only_what_the_kernel_has_room_for(
        fleet: Fleet) -> None:
    store, other = await fleet.store(), await fleet.store()
    clock = FakeClock()
    room = [3]
    m = member(store, clock, room, [])
    await m.join()
    journal = Journal(store, clock, fleet=m, on_failed=lambda _e: None)
    now = time.time()
    results, mine = await journal.new_jobs(jobs(10, now), now)
    assert len(results) == 10 and [j.id for j in mine] == ["j0", "j1", "j2"]
    # the other seven are the fleet's: another kernel claims them
    assert sorted(await claimed_elsewhere(other, now)) == sorted(f"j{i}" for i in range(3, 10))
    # no room at all: nothing is claimed at insert; claim_all (follow-ups) ignores the room
    room[0] = 0
    _, mine = await journal.new_jobs(jobs(2, now, "k"), now)
    assert mine == []
    _, mine = await journal.new_jobs(jobs(2, now, "d"), now, claim_all=True)
    assert sorted(j.id for j in mine) == ["d0", "d1"]


async def test_claims_take_at_most_the_room_and_claim_again_when_room_frees_up(
        fleet: Fleet) -> None:
    store, feeder = await fleet.store(), await fleet.store()
    clock = FakeClock()
    room = [0]
    got: list[Job] = []
    m = member(store, clock, room, got)
    await m.join()
    now = clock.wall()
    await feeder.submit(jobs(10, now), now)  # unclaimed: the fleet's
    claims = asyncio.create_task(m.claims())
    try:
        for _ in range(20):  # a claims pass with no room claims nothing
            await asyncio.sleep(0)
        assert got == []
        room[0] = 4
        m.room_freed()  # runs ended here while jobs were left: claim again, at once
        await until(lambda: len(got) == 4)
        for _ in range(20):  # wakes (the submission's NOTIFY) claim nothing more: no room
            await asyncio.sleep(0)
        assert len(got) == 4
        room[0] = 100
        m.room_freed()
        await until(lambda: len(got) == 10)
    finally:
        await cancelled(claims)


async def test_the_room_counts_the_slots_and_the_runs_ended_per_second(fleet: Fleet) -> None:
    """``Kernel._room``: slots plus (runs ended per second x horizon) less what the kernel
    holds. Short jobs ended at a high rate make a room far beyond the slots (a burst is taken
    at insert, no claim round trip per batch); long runs holding the slots leave no room."""
    clock = FakeClock()
    store = PostgresStore(fleet.cluster.dsn, schema=fleet.schema)  # never opened: not used
    k = build(make_config("[scheduler]\nmax_concurrency = 4\n[fleet]\nclaim_horizon = \"2s\"\n"),
              clock=clock, store=store, plugins=load_plugins(PluginContext(),
                                                             use_entry_points=False))
    assert k.fleet is not None
    assert k._room() == 4  # idle: its slots
    k._dispatcher.ended += 1000  # 1,000 runs ended in the last half second
    await clock.advance(0.5)
    assert k._room() == 4 + 2 * 2000
    await clock.advance(0.5)  # none since: the rate falls back, the room to the slots
    assert k._room() == 4
    k.timers.arm_job(Job(id="ahead", action="log", due_at=clock.wall() + 1))  # claimed ahead
    assert k._room() == 3
