"""Three fleet fixes of the review (commit b3a54ae), each on a real PostgreSQL store:

- a start whose ownership cannot be checked (the database does not answer) is held again and
  runs once the store answers, instead of being recorded as failed;
- a stopping kernel claims nothing more (it would hold jobs it never runs until the TTL rescue);
- GPU jobs this box cannot admit are given back to the fleet before they are dropped here, so a
  failed give-back leaves them held here instead of lost from both places.

Faults come from ``FaultyPgStore``, a real store whose fleet writes fail on demand as an
unreachable database makes them fail. Waits are on conditions, bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from kernel.app import SubmitRequest
from kernel.clock import FakeClock, SystemClock
from kernel.errors import StoreError
from kernel.events import Event, RunFinished
from kernel.fleet import FleetMember, FleetSettings
from kernel.hookspecs import PluginContext
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import Job, Outcome, RunQuery
from kernel.store.postgres import PostgresStore

from ..harness import make_config
from .conftest import Fleet
from .test_kernel_fleet import Ledger, until


class FaultyPgStore(PostgresStore):
    """A real PostgresStore whose fleet writes fail as an unreachable database makes them
    fail (``StoreError``, before anything reaches the database). ``start_failures``: the next
    N ``mark_running_owned`` fail; ``release_fails``: ``release`` fails. ``start_tries`` and
    ``release_tries`` count the calls."""

    start_failures = 0
    start_tries = 0
    release_fails = False
    release_tries = 0

    async def mark_running_owned(self, owner: str, job_id: str, started_at: float,
                                 attempt: int) -> bool:
        self.start_tries += 1
        if self.start_failures > 0:
            self.start_failures -= 1
            raise StoreError(f"{self.where}: marking a job running failed: cannot reach "
                             "PostgreSQL (injected)")
        return await super().mark_running_owned(owner, job_id, started_at, attempt)

    async def release(self, owner: str, job_ids: Sequence[str]) -> int:
        self.release_tries += 1
        if self.release_fails:
            raise StoreError(f"{self.where}: releasing jobs failed: cannot reach PostgreSQL "
                             "(injected)")
        return await super().release(owner, job_ids)


class NapClock(FakeClock):
    """A FakeClock that counts the naps of the loop sleeping on it (one per pass of
    ``FleetMember.claims()`` or ``heartbeats()``) and says whether it is napping now."""

    naps = 0
    napping = False

    async def sleep_until(self, deadline: float | None, wake: asyncio.Event) -> None:
        self.naps += 1
        self.napping = True
        try:
            await super().sleep_until(deadline, wake)
        finally:
            self.napping = False


SLOW_BEATS = FleetSettings(heartbeat=1.0, ttl=3600.0, horizon=10.0, batch=100)


def member(store: PostgresStore, clock: FakeClock, *, claimed: list[Job] | None = None,
           held: Sequence[str] = (), dropped: list[str] | None = None) -> FleetMember:
    """A fleet member on its own (no kernel): ``claimed`` gets what it claims, ``held`` are
    the GPU jobs the box cannot admit, ``dropped`` gets what it drops from the ready queue."""
    got = claimed if claimed is not None else []
    gone = dropped if dropped is not None else []
    return FleetMember(store, clock, SLOW_BEATS, on_claimed=got.extend, on_fenced=lambda: None,
                       on_pauses=lambda _states: None, max_gpu_memory_mb=lambda: None,
                       gpu_held=lambda: list(held), drop_queued=gone.extend)


def job(i: str, due: float) -> Job:
    return Job(id=i, action="rec", due_at=due)


async def faulty_store(fleet: Fleet) -> FaultyPgStore:
    s = FaultyPgStore(fleet.cluster.dsn, schema=fleet.schema)
    await s.open()
    fleet.stores.append(s)
    return s


async def claimed_elsewhere(other: PostgresStore, now: float) -> list[str]:
    """What another kernel of the fleet claims now (the jobs nobody holds)."""
    await other.register_kernel("k-other", "elsewhere", 1, None)
    return [j.id for j in await other.claim_due("k-other", now, 10.0, 10)]


async def cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# ---- 1. a start whose ownership cannot be checked is held again, not failed ------------------
@pytest.mark.slow
async def test_a_start_whose_ownership_cannot_be_checked_runs_later_and_is_not_failed(
        fleet: Fleet) -> None:
    store = FaultyPgStore(fleet.cluster.dsn, schema=fleet.schema)  # the kernel opens it
    store.start_failures = 1  # the first start's ownership check: the database does not answer
    ledger = Ledger()
    plugins = load_plugins(PluginContext(), extra=[("rec", ledger.plugin(0))],
                           use_entry_points=False)
    kernel = build(make_config(""), clock=SystemClock(), plugins=plugins, store=store)
    assert kernel.fleet is not None
    events: list[Event] = []
    kernel.bus.subscribe(events.append)
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))
    try:
        await asyncio.wait_for(started.wait(), 30)
        job_id = (await kernel.submit(SubmitRequest(action="rec"))).job.id

        def finished() -> list[RunFinished]:
            return [e for e in events if isinstance(e, RunFinished) and e.run.job_id == job_id]

        await until(lambda: bool(finished()), 10)  # held again for 1 s, then run
        assert [(e.run.outcome, e.run.error_code, e.run.attempt) for e in finished()] == [
            (Outcome.SUCCEEDED, None, 1)]
        assert store.start_tries == 2  # the refused check, then the start that ran
        assert [(r[1], r[4]) for r in ledger.rows] == [(job_id, 1)]  # its action ran once
        runs = await store.query_runs(RunQuery(job_id=job_id))
        assert [(r.outcome, r.error_code) for r in runs] == [(Outcome.SUCCEEDED, None)]
        assert await store.get_job(job_id) is None  # finished, not left behind
    finally:
        kernel.stop("test")
        await asyncio.wait_for(task, 30)


# ---- 2. no claims while stopping -------------------------------------------------------------
async def test_a_stopping_member_claims_nothing_more(fleet: Fleet) -> None:
    store = await fleet.store()
    other = await fleet.store()  # another kernel's connection: it submits, nobody claims
    clock = NapClock()
    claimed: list[Job] = []
    m = member(store, clock, claimed=claimed)
    await m.join()
    claims = asyncio.create_task(m.claims())
    try:
        await other.submit([job("before", clock.wall())], clock.wall())
        m.wake()
        await until(lambda: [j.id for j in claimed] == ["before"] and clock.napping, 10)
        m.stopping = True  # as Kernel.stop() sets it
        await other.submit([job("after", clock.wall())], clock.wall())
        await until(lambda: clock.napping, 10)
        naps = clock.naps
        m.wake()  # a pass that begins now sees the job in the database and the member stopping
        await until(lambda: clock.naps > naps and clock.napping, 10)
        assert [j.id for j in claimed] == ["before"]
        assert [j.id for j in await store.owned_jobs(m.id)] == ["before"]
        assert await claimed_elsewhere(other, clock.wall()) == ["after"]  # still the fleet's
    finally:
        await cancelled(claims)


async def test_stopping_the_kernel_stops_its_fleet_claims(fleet: Fleet) -> None:
    store = PostgresStore(fleet.cluster.dsn, schema=fleet.schema)  # never opened: no run
    plugins = load_plugins(PluginContext(), use_entry_points=False)
    kernel = build(make_config(""), clock=FakeClock(), plugins=plugins, store=store)
    assert kernel.fleet is not None and not kernel.fleet.stopping
    kernel.stop("test")
    assert kernel.fleet.stopping


# ---- 3. GPU jobs are given back to the fleet before they are dropped here --------------------
async def test_gpu_jobs_given_back_stay_held_here_while_the_give_back_fails(fleet: Fleet) -> None:
    store = await faulty_store(fleet)
    other = await fleet.store()
    clock = NapClock()
    dropped: list[str] = []
    m = member(store, clock, held=["gpu"], dropped=dropped)  # one GPU job this box cannot admit
    await m.join()
    await store.submit([job("gpu", clock.wall())], clock.wall())
    assert [j.id for j in await store.claim_due(m.id, clock.wall(), 10.0, 10)] == ["gpu"]
    store.release_fails = True  # the database does not answer the give-back
    beats = asyncio.create_task(m.heartbeats())

    async def beat() -> None:
        """One heartbeat pass, from its sleep to the next one."""
        await until(lambda: clock.napping, 10)
        naps = clock.naps
        await clock.advance(SLOW_BEATS.heartbeat)
        await until(lambda: clock.naps > naps and clock.napping, 10)

    try:
        await beat()  # held for one heartbeat: kept
        assert (store.release_tries, dropped) == (0, [])
        await beat()  # held for two: given back, which fails
        assert store.release_tries == 1
        assert dropped == []  # not lost: still held here ...
        assert [j.id for j in await store.owned_jobs(m.id)] == ["gpu"]  # ... and ours there
        assert not m.fenced
        store.release_fails = False  # the database answers again
        await beat()
        assert store.release_tries == 2
        assert dropped == ["gpu"]  # dropped here once the fleet has it back
        assert await store.owned_jobs(m.id) == []
        assert await claimed_elsewhere(other, clock.wall()) == ["gpu"]  # another box may run it
    finally:
        await cancelled(beats)
