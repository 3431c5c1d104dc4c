"""A fleet kernel's start-up with many cron tasks (found by scripts/cron_chaos.py: a restart
with 2,000 every-second tasks took 13 s and was declared dead by the others meanwhile):

- it heartbeats from the moment it joined, however long the rest of its start-up takes;
- the catch-up of all its tasks is made durable in batches (one fire per ``FIRE_CHUNK``
  occurrences), not one store round trip per task.

Real PostgreSQL, real clock, short fleet intervals; waits are on conditions, bounded."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import pytest

from kernel import app as app_mod
from kernel.clock import SystemClock
from kernel.hookspecs import PluginContext
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import Job, ScheduleState
from kernel.store.postgres import PostgresStore

from ..harness import make_config
from .conftest import Fleet
from .test_kernel_fleet import FAST, Ledger, until

pytestmark = pytest.mark.slow


class StallingStore(PostgresStore):
    """A real PostgreSQL store whose first ``schedule_states`` (read during start-up, after
    the kernel joined the fleet) waits until the test lets it go; it counts ``fire`` calls."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.stall = asyncio.Event()
        self.stalled = asyncio.Event()
        self.fires: list[int] = []

    async def schedule_states(self) -> dict[str, ScheduleState]:
        if not self.stalled.is_set():
            self.stalled.set()
            await self.stall.wait()
        return await super().schedule_states()

    async def fire(self, jobs: Sequence[Job], now: float, *, owner: str | None = None,
                   claim_before: float | None = None) -> list[bool]:
        self.fires.append(len(jobs))
        return await super().fire(jobs, now, owner=owner, claim_before=claim_before)


async def heartbeat_of(store: PostgresStore, kernel_id: str) -> float | None:
    for k in await store.kernels():
        if k.id == kernel_id:
            return float(k.heartbeat_at)
    return None


async def test_a_kernel_heartbeats_while_its_start_up_is_still_going(fleet: Fleet) -> None:
    store = StallingStore(fleet.cluster.dsn, schema=fleet.schema)
    plugins = load_plugins(PluginContext(), extra=[("rec", Ledger().plugin(0))],
                           use_entry_points=False)
    kernel = build(make_config(""), clock=SystemClock(), plugins=plugins, store=store)
    assert kernel.fleet is not None
    kernel.fleet.settings = FAST  # heartbeat 0.2 s, TTL 1 s
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))
    try:
        await asyncio.wait_for(store.stalled.wait(), 30)  # joined; start-up now stalls
        me = kernel.fleet.id
        first = await heartbeat_of(store, me)
        assert first is not None
        other = await fleet.store()
        # more than a TTL of start-up: the others must still see it alive
        end = time.monotonic() + 10
        while (await heartbeat_of(other, me) or 0.0) <= first + 1.0:
            assert time.monotonic() < end, "no heartbeat while the start-up was stalled"
            await asyncio.sleep(0.05)
        assert (await other.rescue_expired(None, FAST.ttl)).kernels == []
        assert not started.is_set()
        store.stall.set()
        await asyncio.wait_for(started.wait(), 30)
        assert kernel.fleet.id == me  # never fenced
    finally:
        store.stall.set()
        kernel.stop("test")
        await asyncio.wait_for(task, 30)


async def test_start_up_catch_up_of_many_tasks_is_fired_in_chunks(fleet: Fleet) -> None:
    n = 300
    text = "\n".join(f"""
[[tasks]]
id = "t{i:03d}"
schedule = "* * * * * *"
action = "rec"
misfire = "catch_up"
misfire_grace = "1h"
max_catch_up = 100
overlap = "allow_all"
""" for i in range(n))
    seed = await fleet.store()
    behind = time.time() - 3.0  # three seconds of occurrences to catch up per task
    for i in range(n):
        await seed.set_schedule_state(ScheduleState(task_id=f"t{i:03d}",
                                                    last_scheduled_at=math.floor(behind)))
    store = StallingStore(fleet.cluster.dsn, schema=fleet.schema)
    store.stalled.set()  # no stall here
    ledger = Ledger()
    plugins = load_plugins(PluginContext(), extra=[("rec", ledger.plugin(0))],
                           use_entry_points=False)
    kernel = build(make_config(text), clock=SystemClock(), plugins=plugins, store=store)
    assert kernel.fleet is not None
    kernel.fleet.settings = FAST
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))
    try:
        await asyncio.wait_for(started.wait(), 60)
        at_start = list(store.fires)
        caught_up = sum(at_start)
        assert caught_up >= 2 * n  # at least two late seconds per task
        assert len(at_start) <= math.ceil(caught_up / app_mod.FIRE_CHUNK) + 1, at_start
        await until(lambda: len({r[2] for r in ledger.rows}) == n, 30)
    finally:
        kernel.stop("test")
        await asyncio.wait_for(task, 30)
