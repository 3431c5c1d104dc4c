"""The store contract, run against every implementation (see ``conftest.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from kernel.errors import BadPayload, StoreError
from kernel.records import (
    Job,
    JobKind,
    JobState,
    MisfireRecord,
    Outcome,
    RunQuery,
    RunRecord,
    ScheduleState,
)
from kernel.store import Store

from .conftest import Harness


def job(i: str, due: float = 100.0, **kw: object) -> Job:
    return Job(id=i, action="log", due_at=due, payload={"n": i}, **kw)  # type: ignore[arg-type]


def cron(i: str, task: str, at: float) -> Job:
    return job(i, at, kind=JobKind.CRON, task_id=task, scheduled_at=at)


def run(
    job_id: str,
    finished: float,
    *,
    task: str | None = None,
    outcome: Outcome = Outcome.SUCCEEDED,
    trace: str = "t0",
) -> RunRecord:
    return RunRecord(
        job_id=job_id, task_id=task, action="log", trace_id=trace, span_id="s",
        scheduled_at=None, started_at=finished - 1, finished_at=finished, attempt=1,
        outcome=outcome,
    )


def ids(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs]


async def load_all(store: Store, batch: int = 10_000) -> list[list[Job]]:
    return [b async for b in store.load_pending(batch)]


# -- submit, get, list, cancel, finish --------------------------------------------------------


async def test_submit_then_get_returns_an_equal_copy(store: Store) -> None:
    j = job("a", 5.0, task_id="t", priority=3, timeout=2.5, trace_id="tr", created_at=1.0)
    [res] = await store.submit([j], now=0.0)
    assert not res.existed and res.job == j
    got = await store.get_job("a")
    assert got == j and got is not j
    got.payload["n"] = "changed"
    assert (await store.get_job("a")) == j
    assert await store.get_job("nope") is None
    assert await store.count_jobs() == 1


async def test_submit_nothing(store: Store) -> None:
    assert await store.submit([], now=0.0) == []


async def test_get_jobs_in_order_asked_skipping_missing(store: Store) -> None:
    await store.submit([job(f"j{i}", float(i)) for i in range(5)], now=0.0)
    assert ids(await store.get_jobs(["j3", "x", "j0", "j4"])) == ["j3", "j0", "j4"]
    many = [f"j{i}" for i in range(5)] * 300  # more ids than one IN (...) query takes
    assert len(await store.get_jobs(many)) == 1500


async def test_same_id_twice_returns_the_stored_job(store: Store) -> None:
    await store.submit([job("a", 1.0)], now=0.0)
    [r1, r2] = await store.submit([job("a", 2.0), job("b", 3.0)], now=0.0)
    assert r1.existed and r1.job.due_at == 1.0
    assert not r2.existed
    [r3, r4] = await store.submit([job("c", 1.0), job("c", 9.0)], now=0.0)
    assert not r3.existed and r4.existed and r4.job.due_at == 1.0
    assert await store.count_jobs() == 3


async def test_list_jobs_order_filters_and_paging(store: Store) -> None:
    await store.submit(
        [job("late", 30.0), job("t1", 10.0, task_id="t"), job("early", 5.0),
         job("t2", 10.0, task_id="t"), job("u", 20.0, task_id="u")],
        now=0.0,
    )
    await store.mark_running("u", started_at=21.0, attempt=1)
    assert ids(await store.list_jobs()) == ["early", "t1", "t2", "u", "late"]
    assert ids(await store.list_jobs(limit=2, offset=1)) == ["t1", "t2"]
    assert ids(await store.list_jobs(task_id="t")) == ["t1", "t2"]
    assert ids(await store.list_jobs(state=JobState.RUNNING)) == ["u"]
    assert ids(await store.list_jobs(state=JobState.PENDING, task_id="u")) == []
    assert ids(await store.list_jobs(state=JobState.PENDING))[:1] == ["early"]


async def test_cancel_removes_and_records_history_if_found(store: Store) -> None:
    await store.submit([job("a"), job("b")], now=0.0)
    removed = await store.cancel("a", run(job_id="a", finished=10.0, outcome=Outcome.CANCELLED))
    assert removed is not None and removed.id == "a" and removed.state is JobState.PENDING
    assert await store.get_job("a") is None
    assert await store.cancel("a", run("a", 11.0)) is None  # nothing written
    runs = await store.query_runs(RunQuery())
    assert [(r.job_id, r.finished_at) for r in runs] == [("a", 10.0)]
    assert await store.cancel("b") is not None
    assert len(await store.query_runs(RunQuery())) == 1
    assert await store.count_jobs() == 0


async def test_cancel_of_a_running_job_says_so(store: Store) -> None:
    await store.submit([job("a")], now=0.0)
    await store.mark_running("a", started_at=3.0, attempt=2)
    removed = await store.cancel("a")
    assert removed is not None and removed.state is JobState.RUNNING and removed.attempt == 2


async def test_finish_deletes_records_and_stores_follow_ups(store: Store) -> None:
    await store.submit([job("a", task_id="t")], now=0.0)
    await store.mark_running("a", started_at=100.0, attempt=1)
    retry = job("a-2", 160.0, task_id="t", kind=JobKind.RETRY, attempt=2)
    dep = job("dep", 101.0, task_id="d", kind=JobKind.DEPENDENT)
    await store.finish("a", run("a", 101.0, task="t", outcome=Outcome.FAILED), [retry, dep])
    assert await store.get_job("a") is None
    assert await store.get_jobs(["a-2", "dep"]) == [retry, dep]
    [r] = await store.query_runs(RunQuery(task_id="t"))
    assert r.outcome is Outcome.FAILED
    await store.finish("gone", run("gone", 102.0))  # cancelled meanwhile: not an error
    assert len(await store.query_runs(RunQuery())) == 2


async def test_mark_running_of_an_unknown_job_is_ignored(store: Store) -> None:
    await store.mark_running("nope", started_at=1.0, attempt=1)
    assert await store.count_jobs() == 0


# -- dedup ------------------------------------------------------------------------------------


def keyed(i: str, key: str, expires: float | None) -> Job:
    return job(i, dedup_key=key, dedup_expires_at=expires)


async def test_dedup_within_ttl_returns_the_existing_job(store: Store) -> None:
    [first] = await store.submit([keyed("a", "k", 50.0)], now=0.0)
    assert not first.existed
    await store.mark_running("a", started_at=10.0, attempt=1)
    [again] = await store.submit([keyed("b", "k", 80.0)], now=49.0)
    assert again.existed and again.job.id == "a" and again.job.state is JobState.RUNNING
    assert await store.get_job("b") is None


async def test_dedup_after_expiry_stores_a_new_job(store: Store) -> None:
    await store.submit([keyed("a", "k", 50.0)], now=0.0)
    [r] = await store.submit([keyed("b", "k", 90.0)], now=50.0)  # expires_at <= now: expired
    assert not r.existed and r.job.id == "b"
    [r2] = await store.submit([keyed("c", "k", 99.0)], now=60.0)  # b now holds the key
    assert r2.existed and r2.job.id == "b"
    assert ids(await store.list_jobs()) == ["a", "b"]


async def test_dedup_first_in_one_batch_wins(store: Store) -> None:
    res = await store.submit([keyed("a", "k", 50.0), keyed("b", "k", 50.0), job("c")], now=0.0)
    assert [(r.job.id, r.existed) for r in res] == [("a", False), ("a", True), ("c", False)]
    assert res[1].job == res[0].job and res[1].job is not res[0].job


async def test_dedup_of_a_finished_job_returns_its_snapshot(store: Store) -> None:
    await store.submit([keyed("a", "k", None)], now=0.0)  # None: never expires
    await store.finish("a", run("a", 5.0))
    [r] = await store.submit([keyed("b", "k", 10.0)], now=1e9)
    assert r.existed and r.job.id == "a" and r.job.state is JobState.DONE


async def test_purge_dedup_removes_expired_keys_only(store: Store) -> None:
    await store.submit(
        [keyed(f"x{i}", f"old{i}", 10.0) for i in range(7)]
        + [keyed("live", "live", 100.0), keyed("forever", "forever", None)],
        now=0.0,
    )
    assert await store.purge_dedup(now=10.0, batch=3) == 7
    assert await store.purge_dedup(now=10.0) == 0
    assert await store.count_jobs() == 9  # jobs are untouched
    [live, forever, old] = await store.submit(
        [keyed("l2", "live", 200.0), keyed("f2", "forever", None), keyed("o2", "old1", 50.0)],
        now=11.0,
    )
    assert live.existed and forever.existed and not old.existed


# -- cron occurrences and schedule state ------------------------------------------------------


async def test_cron_occurrence_is_unique_while_stored(store: Store) -> None:
    [r1] = await store.submit([cron("c1", "t", 60.0)], now=0.0)
    [r2, r3] = await store.submit([cron("c2", "t", 60.0), cron("c3", "u", 60.0)], now=0.0)
    assert not r1.existed and r2.existed and r2.job.id == "c1" and not r3.existed
    [r4, r5] = await store.submit([cron("c4", "t", 120.0), cron("c5", "t", 120.0)], now=0.0)
    assert not r4.existed and r5.existed and r5.job.id == "c4"
    await store.finish("c1", run("c1", 61.0, task="t"))
    [r6] = await store.submit([cron("c6", "t", 60.0)], now=0.0)  # no longer stored
    assert not r6.existed
    # Other kinds are not occurrences: a manual trigger at the same instant is its own job.
    [r7] = await store.submit([job("m", 60.0, kind=JobKind.TRIGGER, task_id="t",
                                   scheduled_at=60.0)], now=0.0)
    assert not r7.existed


async def test_cron_raises_last_scheduled_at_never_lowers_it(store: Store) -> None:
    await store.submit([cron("a", "t", 120.0), cron("b", "t", 60.0)], now=0.0)
    await store.submit([cron("c", "t", 90.0)], now=0.0)
    states = await store.schedule_states()
    assert states["t"].last_scheduled_at == 120.0
    await store.set_schedule_state(ScheduleState(task_id="t", last_scheduled_at=30.0,
                                                 paused=True, next_due_at=180.0))
    assert (await store.schedule_states())["t"] == ScheduleState(
        task_id="t", last_scheduled_at=120.0, paused=True, next_due_at=180.0)
    await store.set_schedule_state(ScheduleState(task_id="new", last_scheduled_at=None))
    await store.set_schedule_state(ScheduleState(task_id="t", last_scheduled_at=None))
    states = await store.schedule_states()
    assert states["t"].last_scheduled_at == 120.0 and not states["t"].paused
    assert states["new"] == ScheduleState(task_id="new")
    await store.finish("a", run("a", 121.0), [cron("d", "t", 180.0)])
    assert (await store.schedule_states())["t"].last_scheduled_at == 180.0


# -- recovery ---------------------------------------------------------------------------------


async def test_load_pending_yields_pending_and_running_in_due_order(store: Store) -> None:
    dues = list(range(23))
    random.Random(7).shuffle(dues)
    await store.submit([job(f"j{d}", float(d)) for d in dues], now=0.0)
    await store.submit([job("tie", 5.0)], now=0.0)  # same due as j5: submission order
    await store.mark_running("j3", started_at=3.5, attempt=2)
    batches = await load_all(store, batch=5)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 4]
    flat = [j for b in batches for j in b]
    assert ids(flat) == [f"j{d}" for d in range(6)] + ["tie"] + [f"j{d}" for d in range(6, 23)]
    j3 = flat[3]
    assert (j3.state, j3.attempt, j3.started_at) == (JobState.RUNNING, 2, 3.5)
    assert await load_all(store, batch=1) != []
    with pytest.raises(ValueError, match="batch"):
        await load_all(store, batch=0)


async def test_load_pending_reads_one_snapshot(store: Store) -> None:
    await store.submit([job(f"j{i}", float(i)) for i in range(4)], now=0.0)
    seen: list[str] = []
    async for batch in store.load_pending(2):
        seen += ids(batch)
        if len(seen) == 2:
            await store.submit([job("new", 99.0)], now=0.0)
    assert seen == ["j0", "j1", "j2", "j3"]


async def test_load_pending_of_an_empty_store(store: Store) -> None:
    assert await load_all(store) == []


async def test_mark_running_survives_a_restart(harness: Harness) -> None:
    await harness.store.submit([job("a", 1.0), job("b", 2.0)], now=0.0)
    await harness.store.mark_running("a", started_at=5.0, attempt=3)
    store = await harness.reopen()
    [[a, b]] = await load_all(store)
    assert (a.id, a.state, a.attempt, a.started_at) == ("a", JobState.RUNNING, 3, 5.0)
    assert (b.id, b.state) == ("b", JobState.PENDING)


async def test_concurrent_submits_are_all_durable(harness: Harness) -> None:
    store = harness.store

    async def submitter(k: int) -> list[bool]:
        out = []
        for i in range(10):
            [r] = await store.submit([job(f"{k}-{i}", float(i))], now=0.0)
            out.append(r.existed)
        return out

    acks = await asyncio.gather(*(submitter(k) for k in range(200)))
    assert sum(len(a) for a in acks) == 2000 and not any(x for a in acks for x in a)
    assert await store.count_jobs() == 2000
    if harness.durable:
        store = await harness.reopen()
        assert await store.count_jobs() == 2000
        got = await store.get_jobs([f"{k}-{i}" for k in range(200) for i in range(10)])
        assert len(got) == 2000


# -- history, retention, misfires --------------------------------------------------------------


async def finished_runs(store: Store, n: int) -> None:
    await store.submit([job(f"r{i}") for i in range(n)], now=0.0)
    for i in range(n):
        await store.finish(
            f"r{i}",
            run(f"r{i}", float(i), task="even" if i % 2 == 0 else "odd",
                outcome=Outcome.FAILED if i % 3 == 0 else Outcome.SUCCEEDED, trace=f"tr{i % 4}"),
        )


async def test_query_runs_filters_newest_first_and_pages(store: Store) -> None:
    await finished_runs(store, 12)
    q = store.query_runs
    assert [r.finished_at for r in await q(RunQuery())] == [float(i) for i in range(11, -1, -1)]
    assert [r.job_id for r in await q(RunQuery(task_id="odd", limit=2))] == ["r11", "r9"]
    assert [r.job_id for r in await q(RunQuery(task_id="odd", limit=2, offset=2))] == ["r7", "r5"]
    assert [r.job_id for r in await q(RunQuery(outcome=Outcome.FAILED))] == [
        "r9", "r6", "r3", "r0"]
    assert [r.job_id for r in await q(RunQuery(since=3.0, until=6.0))] == ["r5", "r4", "r3"]
    assert [r.job_id for r in await q(RunQuery(trace_id="tr1", task_id="odd"))] == [
        "r9", "r5", "r1"]
    assert await q(RunQuery(trace_id="none")) == []
    assert await q(RunQuery(limit=0)) == []


async def test_prune_history_by_count_keeps_the_newest(store: Store) -> None:
    await finished_runs(store, 12)
    assert await store.prune_history(100.0, max_rows=5, max_age=None, batch=2) == 7
    assert [r.job_id for r in await store.query_runs(RunQuery())] == [
        "r11", "r10", "r9", "r8", "r7"]
    assert await store.prune_history(100.0, max_rows=5, max_age=None) == 0


async def test_prune_history_by_age(store: Store) -> None:
    await finished_runs(store, 12)
    # older than now - max_age = 4.0 goes (0..3); then more than 6 rows: 4 and 5 go too
    assert await store.prune_history(10.0, max_rows=None, max_age=6.0, batch=3) == 4
    assert await store.prune_history(10.0, max_rows=6, max_age=6.0, batch=3) == 2
    assert [r.job_id for r in await store.query_runs(RunQuery())][-1] == "r6"
    assert await store.prune_history(10.0, max_rows=None, max_age=None) == 0


async def test_misfires_newest_first_per_task(store: Store) -> None:
    for i, task in enumerate(["a", "b", "a", "a"]):
        await store.record_misfire(MisfireRecord(
            task_id=task, decided_at=float(i), policy="skip", missed=i + 1, first_missed=0.0,
            last_missed=float(i), ran=0))
    assert [m.decided_at for m in await store.misfires()] == [3.0, 2.0, 1.0, 0.0]
    assert [m.missed for m in await store.misfires("a", limit=2)] == [4, 3]
    assert await store.misfires("zzz") == []


# -- lifecycle and health ----------------------------------------------------------------------


async def test_health_reports_counts(store: Store) -> None:
    await store.submit([job("a"), job("b")], now=0.0)
    await store.mark_running("a", 1.0, 1)
    h = await store.health()
    assert (h["ok"], h["error"], h["pending"], h["running"]) == (True, None, 1, 1)
    assert "path" in h


async def test_a_closed_store_refuses_and_close_is_idempotent(store: Store) -> None:
    await store.open()  # already open: no-op
    await store.close()
    await store.close()
    with pytest.raises(StoreError):
        await store.submit([job("a")], now=0.0)
    with pytest.raises(StoreError):
        await store.get_job("a")
    assert (await store.health())["ok"] is False
    await store.open()
    assert await store.count_jobs() == 0


async def test_async_context_manager(harness: Harness) -> None:
    await harness.store.close()
    async with harness.store as s:
        assert await s.count_jobs() == 0
    with pytest.raises(StoreError):
        await harness.store.count_jobs()


# -- more edges ----------------------------------------------------------------------------------


async def test_unencodable_payload_is_refused_and_nothing_stored(store: Store) -> None:
    bad = Job(id="bad", action="log", due_at=1.0, payload={"x": object()})
    with pytest.raises(BadPayload, match="'bad'"):
        await store.submit([job("ok"), bad], now=0.0)
    assert await store.count_jobs() == 0
    [r] = await store.submit([job("ok")], now=0.0)  # and the store still works
    assert not r.existed


async def test_same_dedup_key_from_concurrent_callers_stores_one(store: Store) -> None:
    res = await asyncio.gather(
        *(store.submit([keyed(f"k{i}", "same", 100.0)], now=0.0) for i in range(20))
    )
    flat = [r for rs in res for r in rs]
    assert sum(not r.existed for r in flat) == 1
    assert len({r.job.id for r in flat}) == 1
    assert await store.count_jobs() == 1


async def test_concurrent_cron_occurrences_store_one(store: Store) -> None:
    res = await asyncio.gather(
        *(store.submit([cron(f"c{i}", "t", 60.0)], now=0.0) for i in range(20))
    )
    assert sum(not rs[0].existed for rs in res) == 1
    assert await store.count_jobs() == 1
    assert (await store.schedule_states())["t"].last_scheduled_at == 60.0


async def test_mixed_writes_in_one_group_commit(store: Store) -> None:
    await store.submit([job(f"j{i}") for i in range(10)], now=0.0)
    await asyncio.gather(
        store.mark_running("j0", 1.0, 1),
        store.finish("j1", run("j1", 2.0), [job("f1")]),
        store.cancel("j2"),
        store.submit([job("n1")], now=0.0),
        store.mark_running("j3", 1.0, 2),
        store.record_misfire(MisfireRecord(task_id="t", decided_at=1.0, policy="skip",
                                           missed=1, first_missed=0.0, last_missed=0.0, ran=0)),
        store.set_schedule_state(ScheduleState(task_id="t", paused=True)),
        store.finish("j4", run("j4", 3.0)),
    )
    assert ids(await store.list_jobs(state=JobState.RUNNING)) == ["j0", "j3"]
    assert await store.count_jobs() == 10 - 3 + 2
    assert len(await store.query_runs(RunQuery())) == 2
    assert (await store.schedule_states())["t"].paused


async def test_breaking_out_of_load_pending_releases_it(store: Store) -> None:
    await store.submit([job(f"j{i}", float(i)) for i in range(10)], now=0.0)
    async with contextlib.aclosing(store.load_pending(3)) as it:
        async for batch in it:
            assert ids(batch) == ["j0", "j1", "j2"]
            break
    assert await store.count_jobs() == 10
