"""The journal on its own, on a real MemoryStore with an injected write fault."""

from __future__ import annotations

import asyncio

import pytest

from kernel.clock import FakeClock
from kernel.errors import StoreError, StoreFull
from kernel.journal import Journal
from kernel.records import Job, JobKind, Outcome, RunQuery, RunRecord

from ..faults import FaultyStore

T0 = 1_767_225_600.0


def job(i: str, **kw: object) -> Job:
    return Job(id=i, action="a", due_at=T0, **kw)  # type: ignore[arg-type]


def run_of(j: Job) -> RunRecord:
    return RunRecord(job_id=j.id, task_id=None, action="a", trace_id="t", span_id="s",
                     scheduled_at=None, started_at=T0, finished_at=T0 + 1, attempt=1,
                     outcome=Outcome.SUCCEEDED)


@pytest.fixture
async def store() -> FaultyStore:
    s = FaultyStore()
    await s.open()
    return s


def journal(store: FaultyStore, failures: list[StoreError]) -> Journal:
    return Journal(store, FakeClock(), fleet=None, on_failed=failures.append)


async def test_new_jobs_are_acknowledged_after_the_store_took_them(store: FaultyStore) -> None:
    j = journal(store, [])
    results, mine = await j.new_jobs([job("a"), job("b")], T0)
    assert [r.job.id for r in results] == ["a", "b"] and [m.id for m in mine] == ["a", "b"]
    again, mine = await j.new_jobs([job("a")], T0)
    assert again[0].existed and mine == []
    store.full = True
    with pytest.raises(StoreFull):  # nothing is acknowledged that was not committed
        await j.new_jobs([job("c")], T0)


async def test_occurrences_run_from_memory_when_one_store_fails(store: FaultyStore) -> None:
    failures: list[StoreError] = []
    j = journal(store, failures)
    occ = [job("o1", task_id="t", kind=JobKind.CRON, scheduled_at=T0)]
    assert [x.id for x in await j.occurrences(occ, T0)] == ["o1"]
    again = [job("o2", task_id="t", kind=JobKind.CRON, scheduled_at=T0)]
    assert await j.occurrences(again, T0) == []  # the same (task, instant): not run twice
    store.full = True
    late = [job("o3", task_id="t", kind=JobKind.CRON, scheduled_at=T0 + 1)]
    assert [x.id for x in await j.occurrences(late, T0)] == ["o3"] and failures


async def test_a_refused_finish_is_kept_and_flushed_oldest_first(store: FaultyStore) -> None:
    failures: list[StoreError] = []
    j = journal(store, failures)
    a, b = job("a"), job("b")
    await j.new_jobs([a, b], T0)
    store.full = True
    assert await j.finished("a", run_of(a), []) and await j.finished("b", run_of(b), [])
    assert j.unsaved == 2 and len(failures) == 2
    assert not await j.flush() and j.unsaved == 2
    store.full = False
    assert await j.flush() and j.unsaved == 0
    runs = await store.query_runs(RunQuery())
    assert sorted(r.job_id for r in runs) == ["a", "b"]
    assert await store.get_job("a") is None  # recorded: never run again


async def test_two_flushes_at_once_write_every_kept_outcome(store: FaultyStore) -> None:
    j = journal(store, [])
    a, b = job("a"), job("b")
    await j.new_jobs([a, b], T0)
    store.full = True
    await j.finished("a", run_of(a), [])
    await j.finished("b", run_of(b), [])
    store.full = False
    assert all(await asyncio.gather(j.flush(), j.flush()))  # the service and the stop's
    assert j.unsaved == 0
    assert sorted(r.job_id for r in await store.query_runs(RunQuery())) == ["a", "b"]


async def test_follow_ups_are_armed_only_once_a_kept_outcome_is_durable(store: FaultyStore) -> None:
    j = journal(store, [])
    a = job("a")
    await j.new_jobs([a], T0)
    armed: list[str] = []
    store.full = True
    assert await j.finished("a", run_of(a), [job("f")], on_saved=lambda: armed.append("f")) \
        == "kept"
    assert armed == []
    store.full = False
    await j.flush()
    assert armed == ["f"]
