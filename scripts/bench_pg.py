#!/usr/bin/env python3
"""PostgreSQL store benchmarks: submit, claim, start, finish and fleet-wide cron firing.

    .venv/bin/python scripts/bench_pg.py [--n 20000] [--concurrency 500] [--claim 500]
        [--kernels 3] [--dsn DSN] [--no-fsync]

Without ``--dsn`` it starts a throwaway cluster (``tests/pg_cluster.py``) with ``fsync`` and
``synchronous_commit`` on (``--no-fsync``: the test settings), in a temp dir, and removes it.
Prints one JSON line per scenario:

* ``submit_concurrent``: ``--concurrency`` coroutines each awaiting ``submit([job])`` until
  ``--n`` jobs are acknowledged (group commit gathers them).
* ``submit_batch1000``: one caller, ``submit()`` of 1000 jobs per call.
* ``claim``: one kernel claims every job, ``--claim`` per ``claim_due`` call (SKIP LOCKED).
* ``start`` / ``finish``: ``--concurrency`` coroutines call ``mark_running_owned`` then
  ``finish_owned`` (with a run record) for the claimed jobs (group commit).
* ``cycle``: per kernel, submit -> claim -> start -> finish of ``--n`` jobs, ``--claim`` at a
  time: one kernel one step after the other, one kernel with 4 such lanes at once (as a busy
  kernel overlaps its steps), then ``--kernels`` kernels on one database at once.
* ``fire_race``: ``--kernels`` stores fire the same ``--n`` cron occurrences, in their own orders,
  250 per call; every occurrence must be won exactly once.

Everything here shares the machine with the server: the figures are for one box, both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernel.records import Job, JobKind, Outcome, RunRecord  # noqa: E402
from kernel.store.postgres import PostgresStore  # noqa: E402
from tests.pg_cluster import PgCluster, fresh_schema  # noqa: E402

PAYLOAD = {"prompt": "x" * 200}


def jobs(prefix: str, n: int, due: float = 0.0) -> list[Job]:
    return [Job(id=f"{prefix}{i:08d}", action="noop", due_at=due + (i % 1000) * 1e-3,
                payload=PAYLOAD, trace_id="t" * 16) for i in range(n)]


def run_of(job: Job) -> RunRecord:
    return RunRecord(job_id=job.id, task_id=None, action=job.action, trace_id=job.trace_id,
                     span_id="s", scheduled_at=None, started_at=1.0, finished_at=2.0,
                     attempt=job.attempt, outcome=Outcome.SUCCEEDED)


def emit(scenario: str, n: int, seconds: float, **extra: object) -> None:
    print(json.dumps({"scenario": scenario, "n": n, "seconds": round(seconds, 3),
                      "per_s": round(n / seconds) if seconds else None, **extra}), flush=True)


async def fan_out(items: list[Job], concurrency: int, fn: object) -> None:
    it = iter(items)

    async def worker() -> None:
        for j in it:
            await fn(j)  # type: ignore[operator]

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def cycle(store: PostgresStore, owner: str, n: int, chunk: int, prefix: str,
                lanes: int = 1) -> None:
    """submit -> claim -> start -> finish, ``chunk`` jobs at a time, as a kernel would;
    ``lanes`` such loops at once on the same store (their writes share group commits)."""
    await store.register_kernel(owner, "bench", 0, now=0.0)
    per = n // lanes
    await asyncio.gather(*(_lane(store, owner, per, chunk, f"{prefix}{k}-")
                           for k in range(lanes)))


async def _lane(store: PostgresStore, owner: str, n: int, chunk: int, prefix: str) -> None:
    for at in range(0, n, chunk):
        batch = jobs(f"{prefix}{at:08d}-", min(chunk, n - at))
        await store.submit(batch, now=0.0)
        claimed = await store.claim_due(owner, now=10.0, horizon=0.0, limit=chunk)
        await asyncio.gather(*(store.mark_running_owned(owner, j.id, 1.0, j.attempt)
                               for j in claimed))
        await asyncio.gather(*(store.finish_owned(owner, j.id, run_of(j)) for j in claimed))


async def bench(dsn: str, a: argparse.Namespace) -> None:
    n, conc = a.n, a.concurrency
    async with PostgresStore(dsn, schema=fresh_schema("bench")) as s:
        todo = jobs("c", n)
        t = time.perf_counter()
        await fan_out(todo, conc, lambda j: s.submit([j], now=0.0))
        emit("submit_concurrent", n, time.perf_counter() - t, concurrency=conc,
             batches=s.batches)

        more = jobs("b", n)
        t = time.perf_counter()
        for i in range(0, n, 1000):
            await s.submit(more[i : i + 1000], now=0.0)
        emit("submit_batch1000", n, time.perf_counter() - t)

        await s.register_kernel("k", "bench", 0, now=0.0)
        claimed: list[Job] = []
        t = time.perf_counter()
        while got := await s.claim_due("k", now=10.0, horizon=0.0, limit=a.claim):
            claimed += got
        emit("claim", len(claimed), time.perf_counter() - t, per_call=a.claim)

        t = time.perf_counter()
        await fan_out(claimed, conc, lambda j: s.mark_running_owned("k", j.id, 1.0, j.attempt))
        emit("start", len(claimed), time.perf_counter() - t, concurrency=conc)
        t = time.perf_counter()
        await fan_out(claimed, conc, lambda j: s.finish_owned("k", j.id, run_of(j)))
        emit("finish", len(claimed), time.perf_counter() - t, concurrency=conc)

    async with PostgresStore(dsn, schema=fresh_schema("bench")) as s:
        t = time.perf_counter()
        await cycle(s, "solo", n, a.claim, "s")
        emit("cycle_1_kernel", n, time.perf_counter() - t, chunk=a.claim)
    async with PostgresStore(dsn, schema=fresh_schema("bench")) as s:
        t = time.perf_counter()
        await cycle(s, "solo", n, a.claim, "p", lanes=4)
        emit("cycle_1_kernel_4_lanes", n, time.perf_counter() - t, chunk=a.claim,
             batches=s.batches)

    schema = fresh_schema("bench")
    stores = [PostgresStore(dsn, schema=schema) for _ in range(a.kernels)]
    for st in stores:
        await st.open()
    try:
        t = time.perf_counter()
        await asyncio.gather(*(cycle(st, f"k{k}", n, a.claim, f"k{k}-")
                               for k, st in enumerate(stores)))
        emit(f"cycle_{a.kernels}_kernels", n * a.kernels, time.perf_counter() - t,
             chunk=a.claim, note="all kernels in one process: one event loop, one core")
    finally:
        for st in stores:
            await st.close()

    schema = fresh_schema("bench")
    stores = [PostgresStore(dsn, schema=schema) for _ in range(a.kernels)]
    for st in stores:
        await st.open()
    try:
        occ = [(f"task{t:03d}", 60.0 * i) for t in range(100) for i in range(n // 100)]

        async def kernel(k: int) -> int:
            mine = list(occ)
            random.Random(k).shuffle(mine)
            won = 0
            for i in range(0, len(mine), 250):
                part = mine[i : i + 250]
                res = await stores[k].fire(
                    [Job(id=f"f{k}-{tk}-{at}", action="noop", due_at=at, kind=JobKind.CRON,
                         task_id=tk, scheduled_at=at) for tk, at in part], now=0.0)
                won += sum(res)
            return won

        t = time.perf_counter()
        won = await asyncio.gather(*(kernel(k) for k in range(a.kernels)))
        emit("fire_race", len(occ), time.perf_counter() - t, kernels=a.kernels,
             won_per_kernel=won, exactly_once=sum(won) == len(occ),
             deadlocks_retried=sum(st.retried_pool_ops for st in stores))
    finally:
        for st in stores:
            await st.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--claim", type=int, default=500)
    p.add_argument("--kernels", type=int, default=3)
    p.add_argument("--dsn", default=None)
    p.add_argument("--no-fsync", action="store_true")
    a = p.parse_args()
    cluster = None
    if a.dsn is None:
        cluster = PgCluster(durable=not a.no_fsync)
        t = time.perf_counter()
        cluster.start()
        print(json.dumps({"scenario": "cluster_start", "seconds":
                          round(time.perf_counter() - t, 3), "fsync": not a.no_fsync}),
              flush=True)
    try:
        asyncio.run(bench(a.dsn or cluster.dsn, a))  # type: ignore[union-attr]
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
