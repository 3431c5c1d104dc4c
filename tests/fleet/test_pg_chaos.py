"""Chaos at the store level: three worker processes share one database under load, one is
SIGKILLed at a random moment; then every acknowledged job has exactly one counted run, only
jobs in flight at the kill ran twice (the second time recovered, attempt raised), and no cron
occurrence counted twice. The workers (``pg_worker.py``) use the store's fleet API as a kernel
would; the kernel itself is not wired to it yet."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from kernel.clock import SystemClock
from kernel.records import Job, RunQuery
from kernel.store.postgres import PostgresStore

from ..pg_cluster import PgCluster, fresh_schema

ROOT = Path(__file__).resolve().parents[2]


async def wait_for(cond: object, timeout: float, what: str) -> None:
    """Poll ``cond()`` (an async callable) until true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_sigkill_one_of_three_workers_loses_and_duplicates_nothing(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    schema = fresh_schema("chaos")
    clock = SystemClock()
    rng = random.Random()
    async with PostgresStore(pg_cluster.dsn, schema=schema) as store:
        start = clock.wall()
        acked: list[str] = []
        procs: list[asyncio.subprocess.Process] = []
        try:
            for k in range(3):
                procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tests.fleet.pg_worker", pg_cluster.dsn, schema,
                    f"w{k}", str(tmp_path / f"w{k}.log"), cwd=ROOT,
                ))
            # Load: 3000 jobs due over the next 3 s, submitted while the workers run.
            kill_at = time.monotonic() + rng.uniform(0.8, 2.5)
            killed_at = 0.0
            for i in range(60):
                jobs = [Job(id=f"j{i:03d}-{n:02d}", action="noop",
                            due_at=start + 0.05 * i + 0.001 * n) for n in range(50)]
                res = await store.submit(jobs, now=clock.wall())
                acked += [r.job.id for r in res if not r.existed]
                if not killed_at and time.monotonic() >= kill_at:
                    procs[1].send_signal(signal.SIGKILL)
                    killed_at = time.monotonic()
                await asyncio.sleep(0.05)  # the load's own pace: 1000 jobs/s
            if not killed_at:
                procs[1].send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
            cron_until = clock.wall()

            async def all_done() -> bool:
                for p in (procs[0], procs[2]):
                    assert p.returncode is None, "a surviving worker exited"
                if await store.get_jobs(acked):
                    return False
                first = await store.list_jobs(task_id="chaos-cron", limit=1)
                return not first or (first[0].scheduled_at or 0.0) > cron_until

            await wait_for(all_done, 30, "every job to finish on the surviving workers")
            recovered_in = time.monotonic() - killed_at
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
            for p in procs:
                try:
                    await asyncio.wait_for(p.wait(), timeout=20)
                except TimeoutError:
                    p.kill()
                    await p.wait()
        assert [p.returncode for p in procs] == [0, -signal.SIGKILL, 0]

        runs = await store.query_runs(RunQuery(limit=1_000_000))
        counted: dict[str, int] = defaultdict(int)
        for r in runs:
            counted[r.job_id] += 1
        plain = {r.job_id: r for r in runs if r.task_id is None}
        assert sorted(plain) == sorted(acked)  # nothing acknowledged lost
        assert [j for j, n in counted.items() if n != 1] == []  # nothing counted twice

        starts: dict[str, list[int]] = defaultdict(list)
        for k in range(3):
            for line in (tmp_path / f"w{k}.log").read_text().splitlines():
                kind, job_id, *rest = line.split()
                if kind == "run":
                    starts[job_id].append(int(rest[0]))
        twice = {j: a for j, a in starts.items() if len(a) > 1}
        for job_id, attempts in twice.items():  # only jobs in flight at the kill ran again
            assert sorted(attempts) == [1, 2], (job_id, attempts)
            final = next(r for r in runs if r.job_id == job_id)
            assert final.attempt == 2 and final.recovered
        assert len(twice) <= 1  # a worker runs one job at a time: one was in flight

        steps = [round((r.scheduled_at or 0.0) / 0.05) for r in runs
                 if r.task_id == "chaos-cron"]
        assert len(steps) == len(set(steps))  # each occurrence counted once fleet-wide
        upto = int(cron_until / 0.05)
        done = sorted(k for k in steps if k <= upto)
        assert len(done) > 20 and done == list(range(done[0], upto + 1))  # none missed
        assert recovered_in < 20
