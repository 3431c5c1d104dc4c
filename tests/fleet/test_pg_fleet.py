"""The fleet API of the PostgreSQL store, with several stores (kernels) on one real database."""

from __future__ import annotations

import asyncio
import random

import pytest

from kernel.records import Job, JobKind, JobState, Outcome, RunQuery, RunRecord

from .conftest import Fleet


def job(i: str, due: float = 100.0, **kw: object) -> Job:
    return Job(id=i, action="log", due_at=due, payload={"n": i}, **kw)  # type: ignore[arg-type]


def cron(i: str, task: str, at: float) -> Job:
    return job(i, at, kind=JobKind.CRON, task_id=task, scheduled_at=at)


def run(job_id: str, finished: float, attempt: int = 1) -> RunRecord:
    return RunRecord(
        job_id=job_id, task_id=None, action="log", trace_id="t", span_id="s", scheduled_at=None,
        started_at=finished - 1, finished_at=finished, attempt=attempt,
        outcome=Outcome.SUCCEEDED,
    )


def ids(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs]


async def test_register_heartbeat_and_fencing(fleet: Fleet) -> None:
    s = await fleet.store()
    await s.register_kernel("k1", "box-a", 101, now=10.0)
    await s.register_kernel("k2", "box-b", 202, now=11.0)
    assert await s.heartbeat("k1", now=20.0)
    assert [(k.id, k.host, k.pid, k.heartbeat_at) for k in await s.kernels()] == [
        ("k1", "box-a", 101, 20.0), ("k2", "box-b", 202, 11.0)]
    # k2 last beat at 11: with a TTL of 10 it is dead at 25, k1 (20) is not.
    rescue = await s.rescue_expired(now=25.0, ttl=10.0)
    assert rescue.kernels == ["k2"]
    assert not await s.heartbeat("k2", now=26.0)  # fenced: must register again
    assert await s.heartbeat("k1", now=26.0)
    assert (await s.health())["kernels"] == 1


async def test_claim_due_takes_due_jobs_in_order_within_the_horizon(fleet: Fleet) -> None:
    s = await fleet.store()
    await s.register_kernel("k1", "a", 1, now=0.0)
    await s.submit([job("late", 500.0), job("b", 105.0), job("a", 101.0), job("c", 109.0),
                    job("gpu", 102.0, gpu_memory_mb=40_000)], now=0.0)
    got = await s.claim_due("k1", now=100.0, horizon=10.0, limit=2, max_gpu_memory_mb=24_000)
    assert ids(got) == ["a", "b"]
    assert ids(await s.claim_due("k1", now=100.0, horizon=10.0, limit=10)) == ["gpu", "c"]
    assert await s.claim_due("k1", now=100.0, horizon=10.0, limit=10) == []  # all taken
    assert ids(await s.owned_jobs("k1")) == ["a", "gpu", "b", "c"]
    assert await s.claim_due("nobody", now=1000.0, horizon=0.0, limit=10) == []  # not registered


async def test_three_claimers_never_take_the_same_job(fleet: Fleet) -> None:
    stores = [await fleet.store() for _ in range(3)]
    for k, s in enumerate(stores):
        await s.register_kernel(f"k{k}", "h", k, now=0.0)
    await stores[0].submit([job(f"j{i:04d}", float(i % 50)) for i in range(1500)], now=0.0)

    async def claimer(k: int) -> list[str]:
        mine: list[str] = []
        while got := await stores[k].claim_due(f"k{k}", now=100.0, horizon=0.0, limit=64):
            mine += ids(got)
        return mine

    taken = await asyncio.gather(*(claimer(k) for k in range(3)))
    flat = [i for t in taken for i in t]
    assert len(flat) == 1500 and len(set(flat)) == 1500


async def test_rescue_returns_a_dead_kernels_jobs_and_fences_its_writes(fleet: Fleet) -> None:
    a, b = await fleet.store(), await fleet.store()
    await a.register_kernel("ka", "box-a", 1, now=0.0)
    await b.register_kernel("kb", "box-b", 2, now=0.0)
    await a.submit([job("x", 10.0), job("y", 11.0), job("z", 12.0)], now=0.0)
    assert ids(await a.claim_due("ka", now=10.0, horizon=5.0, limit=10)) == ["x", "y", "z"]
    assert await a.mark_running_owned("ka", "x", started_at=10.0, attempt=1)
    assert not await b.mark_running_owned("kb", "y", started_at=10.0, attempt=1)  # not kb's

    assert await b.heartbeat("kb", now=40.0)
    rescue = await b.rescue_expired(now=40.0, ttl=30.0)  # ka last beat at 0
    assert rescue.kernels == ["ka"] and sorted(rescue.jobs) == ["x", "y", "z"]
    assert rescue.restarted == ["x"]
    [x, y, _] = await b.get_jobs(["x", "y", "z"])
    assert (x.state, x.attempt, x.recovered) == (JobState.PENDING, 2, True)
    assert (y.state, y.attempt, y.recovered) == (JobState.PENDING, 1, False)
    assert await b.owned_jobs("ka") == []
    assert (await b.rescue_expired(now=41.0, ttl=30.0)).kernels == []  # nothing twice

    # The dead kernel wakes up: it is fenced everywhere.
    assert not await a.heartbeat("ka", now=42.0)
    assert not await a.mark_running_owned("ka", "y", started_at=42.0, attempt=1)
    assert await a.claim_due("ka", now=42.0, horizon=100.0, limit=10) == []
    follow = job("x-dep", 50.0, kind=JobKind.DEPENDENT)
    assert not await a.finish_owned("ka", "x", run("x", 43.0), [follow])
    assert await a.get_job("x") is not None and await a.get_job("x-dep") is None
    assert await a.query_runs(RunQuery()) == []
    assert ids_of(await a.superseded_runs()) == ["x"]

    # Another kernel runs the rescued jobs.
    assert ids(await b.claim_due("kb", now=42.0, horizon=0.0, limit=10)) == ["x", "y", "z"]
    assert await b.mark_running_owned("kb", "x", started_at=43.0, attempt=2)
    assert await b.finish_owned("kb", "x", run("x", 44.0, attempt=2), [follow])
    assert await b.get_job("x") is None and await b.get_job("x-dep") is not None
    assert [r.attempt for r in await b.query_runs(RunQuery())] == [2]


def ids_of(runs: list[RunRecord]) -> list[str]:
    return [r.job_id for r in runs]


async def test_a_late_finish_after_the_rescued_attempt_finished_is_superseded(
    fleet: Fleet,
) -> None:
    a, b = await fleet.store(), await fleet.store()
    await a.register_kernel("ka", "h", 1, now=0.0)
    await b.register_kernel("kb", "h", 2, now=100.0)
    await a.submit([job("j", 1.0)], now=0.0)
    await a.claim_due("ka", now=1.0, horizon=0.0, limit=1)
    assert await a.mark_running_owned("ka", "j", 1.0, 1)
    await b.rescue_expired(now=100.0, ttl=30.0)
    await b.claim_due("kb", now=100.0, horizon=0.0, limit=1)
    assert await b.finish_owned("kb", "j", run("j", 101.0, attempt=2))
    # The job row is gone now; the stale attempt 1 must not count as a finish.
    assert not await a.finish_owned("ka", "j", run("j", 102.0, attempt=1), [job("retry", 9.0)])
    assert await a.get_job("retry") is None
    assert ids_of(await a.superseded_runs("j")) == ["j"]
    # A job cancelled meanwhile (no later attempt) finishes as the contract says.
    await a.register_kernel("ka2", "h", 1, now=100.0)
    await a.submit([job("c", 1.0)], now=100.0)
    await a.claim_due("ka2", now=100.0, horizon=0.0, limit=1)
    await a.cancel("c")
    assert await a.finish_owned("ka2", "c", run("c", 103.0), [job("c-dep", 9.0)])
    assert await a.get_job("c-dep") is not None


async def test_expire_kernel_frees_its_jobs_at_once(fleet: Fleet) -> None:
    s = await fleet.store()
    await s.register_kernel("old", "box", 7, now=0.0)
    await s.submit([job("p", 1.0), job("r", 2.0)], now=0.0)
    await s.claim_due("old", now=1.0, horizon=5.0, limit=10)
    await s.mark_running_owned("old", "r", 2.0, 1)
    rescue = await s.expire_kernel("old")  # a restart on the same box, no TTL to wait
    assert rescue.kernels == ["old"] and rescue.restarted == ["r"]
    assert [(j.id, j.state, j.attempt, j.recovered) for j in await s.list_jobs()] == [
        ("p", JobState.PENDING, 1, False), ("r", JobState.PENDING, 2, True)]
    assert await s.kernels() == []


async def test_release_gives_back_pending_claims_only(fleet: Fleet) -> None:
    a, b = await fleet.store(), await fleet.store()
    await a.register_kernel("ka", "h", 1, now=0.0)
    await b.register_kernel("kb", "h", 2, now=0.0)
    await a.submit([job("g", 1.0, gpu_memory_mb=80_000), job("r", 2.0)], now=0.0)
    await a.claim_due("ka", now=2.0, horizon=0.0, limit=10)
    await a.mark_running_owned("ka", "r", 2.0, 1)
    assert await a.release("ka", ["g", "r"]) == 1  # the running one stays
    assert ids(await b.claim_due("kb", now=2.0, horizon=0.0, limit=10)) == ["g"]
    assert await b.release("ka", ["g"]) == 0  # not ka's any more


async def test_submit_claimed_owns_what_is_due_soon(fleet: Fleet) -> None:
    s = await fleet.store()
    await s.register_kernel("k", "h", 1, now=0.0)
    res, owned = await s.submit_claimed([job("soon", 1.0), job("later", 60.0)], now=0.0,
                                        owner="k", claim_before=5.0)
    assert [r.existed for r in res] == [False, False] and owned == [True, False]
    res, owned = await s.submit_claimed([job("soon", 1.0)], now=0.0, owner="k", claim_before=5.0)
    assert res[0].existed and owned == [False]
    assert ids(await s.owned_jobs("k")) == ["soon"]
    assert ids(await s.claim_due("k", now=0.0, horizon=100.0, limit=10)) == ["later"]
    await s.expire_kernel("k")
    _, owned = await s.submit_claimed([job("n", 1.0)], now=0.0, owner="k", claim_before=5.0)
    assert owned == [False]  # a fenced kernel claims nothing at insert either


# -- cron occurrences once fleet-wide ---------------------------------------------------------


async def test_fire_wins_each_occurrence_once_even_after_its_job_finished(fleet: Fleet) -> None:
    s = await fleet.store()
    won = await s.fire([cron("a1", "t", 60.0), cron("a2", "t", 120.0), cron("a3", "t", 60.0)],
                       now=50.0)
    assert won == [True, True, False]
    assert ids(await s.list_jobs()) == ["a1", "a2"]
    assert (await s.schedule_states())["t"].last_scheduled_at == 120.0
    await s.finish("a1", run("a1", 61.0))
    assert await s.fire([cron("b1", "t", 60.0), cron("b2", "t", 180.0)], now=70.0) == [
        False, True]
    assert ids(await s.list_jobs()) == ["a2", "b2"]
    assert await s.purge_fired(before=100.0, batch=1) == 1
    assert await s.fire([cron("c1", "t", 60.0)], now=71.0) == [True]  # forgotten: fires again
    with pytest.raises(ValueError, match="not a cron occurrence"):
        await s.fire([job("plain")], now=0.0)


async def test_fire_claims_the_occurrences_it_won(fleet: Fleet) -> None:
    s = await fleet.store()
    await s.register_kernel("k", "h", 1, now=0.0)
    await s.fire([cron("a", "t", 10.0), cron("b", "t", 100.0)], now=5.0, owner="k",
                 claim_before=20.0)
    assert ids(await s.owned_jobs("k")) == ["a"]


async def test_three_kernels_racing_the_same_occurrences_win_each_once(fleet: Fleet) -> None:
    stores = [await fleet.store() for _ in range(3)]
    tasks = [f"task{t:02d}" for t in range(20)]
    instants = [60.0 * i for i in range(1, 101)]
    occurrences = [(t, at) for t in tasks for at in instants]  # 2000

    async def kernel(k: int) -> list[tuple[str, float]]:
        mine = list(occurrences)
        random.Random(k).shuffle(mine)  # each kernel meets them in its own order
        won: list[tuple[str, float]] = []
        for i in range(0, len(mine), 250):
            part = mine[i : i + 250]
            res = await stores[k].fire([cron(f"k{k}-{t}-{at}", t, at) for t, at in part],
                                       now=0.0, owner=None)
            won += [o for o, w in zip(part, res, strict=True) if w]
        return won

    won = await asyncio.wait_for(asyncio.gather(*(kernel(k) for k in range(3))), timeout=60)
    flat = [o for w in won for o in w]
    assert len(flat) == len(occurrences) and set(flat) == set(occurrences)
    assert all(w for w in won)  # more than one kernel won some
    assert await stores[0].count_jobs() == len(occurrences)
    assert [s.retried_pool_ops for s in stores] == [0, 0, 0]  # no deadlock was retried


async def test_a_dead_kernel_cannot_orphan_claims_made_during_its_rescue(fleet: Fleet) -> None:
    a, b = await fleet.store(), await fleet.store()
    await a.submit([job(f"j{i:03d}", 1.0) for i in range(200)], now=0.0)
    for round_ in range(5):
        kid = f"ka{round_}"
        await a.register_kernel(kid, "h", 1, now=0.0)

        async def claim(kid: str = kid) -> None:
            while await a.claim_due(kid, now=1.0, horizon=0.0, limit=7):
                pass

        await asyncio.gather(claim(), b.rescue_expired(now=100.0, ttl=10.0))
        await b.rescue_expired(now=100.0, ttl=10.0)
        # Whatever the interleaving, no job is left owned by a kernel that no longer exists.
        assert await a.owned_jobs(kid) == []
        assert await a.kernels() == []


async def test_commits_that_store_jobs_wake_the_fleets_listeners(fleet: Fleet) -> None:
    a, b = await fleet.store(), await fleet.store()
    woken = asyncio.Event()
    await b.listen(woken.set)
    with pytest.raises(ValueError, match="already has a listener"):
        await b.listen(woken.set)
    await a.submit([job("x", 1.0)], now=0.0)
    await asyncio.wait_for(woken.wait(), timeout=10)
    woken.clear()
    await a.register_kernel("k", "h", 1, now=0.0)
    await a.claim_due("k", now=1.0, horizon=0.0, limit=1)
    assert await a.release("k", ["x"]) == 1
    await asyncio.wait_for(woken.wait(), timeout=10)


async def test_liveness_on_the_database_servers_clock(fleet: Fleet) -> None:
    s = await fleet.store()
    await s.register_kernel("k", "h", 1, now=None)
    [k] = await s.kernels()
    assert k.heartbeat_at == k.started_at > 1e9  # the server's epoch seconds
    assert await s.heartbeat("k", now=None)
    assert (await s.rescue_expired(now=None, ttl=3600.0)).kernels == []
    assert (await s.rescue_expired(now=k.heartbeat_at + 7200.0, ttl=3600.0)).kernels == ["k"]


async def test_a_job_started_without_an_owner_is_never_claimed(fleet: Fleet) -> None:
    s = await fleet.store()
    await s.register_kernel("k", "h", 1, now=0.0)
    await s.submit([job("started", 1.0), job("waiting", 2.0)], now=0.0)
    await s.mark_running("started", started_at=1.0, attempt=1)  # a kernel not in the fleet
    assert ids(await s.claim_due("k", now=5.0, horizon=0.0, limit=10)) == ["waiting"]
    assert await s.claim_due("k", now=5.0, horizon=0.0, limit=10) == []
