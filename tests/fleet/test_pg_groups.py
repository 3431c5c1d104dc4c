"""A fleet kernel's group commits on the PostgreSQL store: owner-checked starts and finishes
gathered into one group (the one-statement path), with the odd cases in the same group (a job
rescued by another kernel, a job cancelled meanwhile, a finish with follow-ups), and which
commits wake the fleet's claimers. Real database, several stores on one schema."""

from __future__ import annotations

import asyncio

import asyncpg

from kernel.records import JobState, RunQuery
from kernel.store.pg_schema import quote_ident
from kernel.store.postgres import PostgresStore

from .conftest import Fleet
from .test_pg_fleet import ids, ids_of, job, run


async def together(*calls: object) -> list[object]:
    """Issued in one turn of the event loop: the writer takes them as one group."""
    return list(await asyncio.gather(*calls))  # type: ignore[call-overload]


async def test_starts_and_finishes_of_one_group_keep_their_meaning(fleet: Fleet) -> None:
    a, b = await fleet.store(), await fleet.store()
    await a.register_kernel("ka", "h", 1, now=0.0)
    await b.register_kernel("kb", "h", 2, now=0.0)
    names = ["s1", "s2", "f1", "f2", "gone", "rescued", "cancelled"]
    await a.submit_claimed([job(n, 1.0) for n in names], now=0.0, owner="ka", claim_before=5.0)
    await together(*(a.mark_running_owned("ka", n, 1.0, 1)
                     for n in ["f1", "f2", "rescued", "cancelled"]))
    # "rescued" now belongs to kb (released and claimed again), "cancelled" is deleted
    async with a._pool.acquire() as con:  # type: ignore[union-attr]
        await con.execute("UPDATE jobs SET owner = 'kb' WHERE id = 'rescued'")
    assert await a.cancel("cancelled") is not None
    async with a._pool.acquire() as con:  # type: ignore[union-attr]
        await con.execute("DELETE FROM jobs WHERE id = 'gone'")  # a start finds no row

    results = await together(
        a.mark_running_owned("ka", "s1", 2.0, 1),
        a.mark_running_owned("ka", "s2", 2.0, 1),
        a.mark_running_owned("ka", "gone", 2.0, 1),
        a.finish_owned("ka", "f1", run("f1", 3.0)),
        a.finish_owned("ka", "f2", run("f2", 3.0)),
        a.finish_owned("ka", "rescued", run("rescued", 3.0)),
        a.finish_owned("ka", "cancelled", run("cancelled", 3.0)),
    )
    assert results == [True, True, False, True, True, False, True]
    [s1, s2] = await a.get_jobs(["s1", "s2"])
    assert (s1.state, s1.started_at, s2.state) == (JobState.RUNNING, 2.0, JobState.RUNNING)
    assert await a.get_jobs(["f1", "f2", "cancelled"]) == []
    [rescued] = await a.get_jobs(["rescued"])
    assert rescued.state is JobState.RUNNING  # left alone: kb's now
    assert sorted(ids_of(await a.query_runs(RunQuery()))) == ["cancelled", "f1", "f2"]
    assert ids_of(await a.superseded_runs()) == ["rescued"]
    owners = await _run_owners(a)
    assert owners == {"cancelled": "ka", "f1": "ka", "f2": "ka", "rescued": "ka"}


async def test_a_group_with_follow_ups_or_two_owners_is_written_whole(fleet: Fleet) -> None:
    a = await fleet.store()
    await a.register_kernel("ka", "h", 1, now=0.0)
    await a.register_kernel("ka2", "h", 1, now=0.0)  # the same process, registered again
    await a.submit_claimed([job("x", 1.0), job("y", 1.0)], now=0.0, owner="ka", claim_before=5)
    await a.submit_claimed([job("z", 1.0)], now=0.0, owner="ka2", claim_before=5)
    assert await together(a.mark_running_owned("ka", "x", 1.0, 1),
                          a.mark_running_owned("ka2", "z", 1.0, 1)) == [True, True]
    follow = job("x-next", 9.0)
    assert await together(a.finish_owned("ka", "x", run("x", 2.0), [follow]),
                          a.finish_owned("ka2", "z", run("z", 2.0)),
                          a.mark_running_owned("ka", "y", 2.0, 1)) == [True, True, True]
    assert ids(await a.get_jobs(["x", "y", "z", "x-next"])) == ["y", "x-next"]
    assert sorted(ids_of(await a.query_runs(RunQuery()))) == ["x", "z"]


async def test_only_commits_that_leave_jobs_unclaimed_wake_the_claimers(fleet: Fleet) -> None:
    a = await fleet.store()
    await a.register_kernel("ka", "h", 1, now=0.0)
    heard: list[str] = []
    marker = asyncio.Event()

    def on(_con: object, _pid: int, _channel: str, payload: str) -> None:
        heard.append(payload)
        if payload == "marker":
            marker.set()

    listener = await asyncpg.connect(fleet.cluster.dsn)
    try:
        await listener.add_listener(a.channel, on)

        async def mark() -> list[str]:
            """What was heard since the last marker, up to a marker sent now (notifications
            arrive in commit order)."""
            marker.clear()
            await listener.execute(f"NOTIFY {quote_ident(a.channel)}, 'marker'")
            await asyncio.wait_for(marker.wait(), timeout=10)
            got = heard[:-1]
            heard.clear()
            return got

        # claimed at insert, started, finished: nothing for another kernel to claim
        await a.submit_claimed([job("mine", 1.0)], now=0.0, owner="ka", claim_before=5.0)
        await a.mark_running_owned("ka", "mine", 1.0, 1)
        await a.finish_owned("ka", "mine", run("mine", 2.0))
        assert await mark() == []
        # due beyond the horizon: stored unclaimed, whoever claims it later must hear of it
        await a.submit_claimed([job("later", 100.0)], now=0.0, owner="ka", claim_before=5.0)
        assert await mark() == [""]
        # a follow-up is stored unclaimed too
        await a.submit_claimed([job("up", 1.0)], now=0.0, owner="ka", claim_before=5.0)
        await a.mark_running_owned("ka", "up", 1.0, 1)
        await a.finish_owned("ka", "up", run("up", 2.0), [job("up-next", 3.0)])
        assert await mark() == [""]
    finally:
        await listener.close()


async def _run_owners(store: PostgresStore) -> dict[str, str]:
    async with store._pool.acquire() as con:  # type: ignore[union-attr]
        return {r[0]: r[1] for r in await con.fetch("SELECT job_id, owner FROM runs")}


async def test_a_group_of_unlike_runs_records_each_as_it_was(fleet: Fleet) -> None:
    from kernel.records import Outcome, RunRecord

    a = await fleet.store()
    await a.register_kernel("ka", "h", 1, now=0.0)
    await a.submit_claimed([job(n, 1.0) for n in ("u1", "u2", "u3")], now=0.0, owner="ka",
                           claim_before=5.0)
    await together(*(a.mark_running_owned("ka", n, 1.0, att)
                     for n, att in (("u1", 1), ("u2", 3), ("u3", 2))))

    def rec(jid: str, task: str | None, outcome: Outcome, attempt: int) -> RunRecord:
        return RunRecord(job_id=jid, task_id=task, action="log", trace_id=f"tr-{jid}",
                         span_id="s", scheduled_at=None, started_at=1.0, finished_at=2.0,
                         attempt=attempt, outcome=outcome)

    assert await together(
        a.finish_owned("ka", "u1", rec("u1", "nightly", Outcome.SUCCEEDED, 1)),
        a.finish_owned("ka", "u2", rec("u2", None, Outcome.FAILED, 3)),
        a.finish_owned("ka", "u3", rec("u3", "other", Outcome.TIMED_OUT, 2)),
    ) == [True, True, True]
    async with a._pool.acquire() as con:  # type: ignore[union-attr]
        rows = await con.fetch("SELECT job_id, task_id, outcome, trace_id, attempt, owner "
                               "FROM runs ORDER BY job_id")
    assert [tuple(r) for r in rows] == [
        ("u1", "nightly", "succeeded", "tr-u1", 1, "ka"),
        ("u2", None, "failed", "tr-u2", 3, "ka"),
        ("u3", "other", "timed_out", "tr-u3", 2, "ka"),
    ]
    by_id = {r.job_id: r for r in await a.query_runs(RunQuery())}
    assert (by_id["u2"].outcome, by_id["u3"].attempt) == (Outcome.FAILED, 2)
