"""One group commit of the SQLite store applies MarkRunning and Finish operations together
(one ``executemany`` per statement for a stretch of them), without changing what the queue
order means: real SQLite files, the store's own writer connection and ``apply_batch``."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from kernel.records import Job, JobKind, Outcome, RunRecord
from kernel.store import SqliteStore
from kernel.store import sqlite_tx as tx


def job(i: str, **kw: object) -> Job:
    return Job(id=i, action="log", due_at=100.0, **kw)  # type: ignore[arg-type]


def run(j: Job, at: float = 200.0) -> RunRecord:
    return RunRecord(job_id=j.id, task_id=j.task_id, action=j.action, trace_id="t", span_id="s",
                     scheduled_at=j.due_at, started_at=at - 1, finished_at=at, attempt=j.attempt,
                     outcome=Outcome.FAILED)


def states(path: Path) -> dict[str, tuple[str, int]]:
    con = sqlite3.connect(path)
    try:
        return {i: (s, a) for i, s, a in con.execute("SELECT id, state, attempt FROM jobs")}
    finally:
        con.close()


async def apply(path: Path, ops: list[tx.Op]) -> None:
    """Run ``ops`` as one batch on the store's writer connection (the store is open)."""
    store = SqliteStore(path)
    await store.open()
    try:
        assert store._w is not None
        await store._on_writer(tx.apply_batch, store._w, ops)
    finally:
        await store.close()


def fut() -> asyncio.Future[object]:
    return asyncio.get_running_loop().create_future()


async def test_marks_and_finishes_interleaved_in_one_batch_all_apply(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    jobs = [job(f"j{i}") for i in range(6)]
    async with SqliteStore(path) as store:
        await store.submit(jobs, 1.0)
        for j in jobs[:3]:
            await store.mark_running(j.id, 150.0, 1)
    # finishes of j0..j2 (running) interleaved with the marks of j3..j5
    ops: list[tx.Op] = []
    for a, b in zip(jobs[:3], jobs[3:], strict=True):
        ops.append(tx.Finish(fut(), a.id, run(a), ()))
        ops.append(tx.MarkRunning(fut(), (160.0, 2, b.id)))
    await apply(path, ops)
    assert states(path) == {"j3": ("running", 2), "j4": ("running", 2), "j5": ("running", 2)}
    con = sqlite3.connect(path)
    try:
        finished = sorted(r[0] for r in con.execute("SELECT job_id FROM runs"))
    finally:
        con.close()
    assert finished == ["j0", "j1", "j2"]


async def test_a_mark_queued_after_a_finish_with_follow_ups_sees_them_inserted(
        tmp_path: Path) -> None:
    """The retry ``r`` that a Finish inserts, marked running later in the same batch (a finish
    written again after a store failure can share a batch with the retry's start), must end
    RUNNING: after a crash it runs again with its attempt raised, not as a fresh pending job."""
    path = tmp_path / "kernel.sqlite3"
    x = job("x")
    async with SqliteStore(path) as store:
        await store.submit([x], 1.0)
        await store.mark_running("x", 150.0, 1)
    retry = job("r", attempt=2, kind=JobKind.RETRY)
    await apply(path, [tx.MarkRunning(fut(), (150.0, 1, "other")),
                       tx.Finish(fut(), "x", run(x), [retry]),
                       tx.MarkRunning(fut(), (210.0, 2, "r"))])
    assert states(path) == {"r": ("running", 2)}
