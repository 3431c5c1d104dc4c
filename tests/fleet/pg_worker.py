"""A stand-in kernel for the fleet chaos test: only the PostgreSQL store's fleet API, no wheel.

    python -m tests.fleet.pg_worker DSN SCHEMA NAME OUT

It registers, heartbeats and rescues every 0.1 s (TTL 1 s), fires the occurrences of one cron
task (every 0.05 s) fleet-wide, claims what is due within 0.3 s, and "runs" each job it could
start by appending ``run <job> <attempt> <kernel>`` to OUT (one ``os.write``, so a SIGKILL never
leaves half a line), then finishes it owner-checked and appends ``fin <job> <ok>``. On SIGTERM it
stops, gives its claims back (``expire_kernel``) and exits 0. This is the kernel's intended use
of the API (docs/FLEET.md), minus the wheel.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

from kernel.clock import SystemClock
from kernel.records import Job, JobKind, Outcome, RunRecord
from kernel.store.postgres import PostgresStore

TTL = 1.0
BEAT = 0.1
CRON_STEP = 0.05
CRON_TASK = "chaos-cron"


def log(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


async def main(dsn: str, schema: str, name: str, out: str) -> None:
    clock = SystemClock()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    generation = 0
    kid = f"{name}.{generation}"
    async with PostgresStore(dsn, schema=schema, pool_size=2) as store:
        await store.register_kernel(kid, socket.gethostname(), os.getpid(), clock.wall())
        fired_until = int(clock.wall() / CRON_STEP)  # the grid is shared by the fleet
        next_beat = 0.0
        while not stop.is_set():
            now = clock.wall()
            if now >= next_beat:
                next_beat = now + BEAT
                if not await store.heartbeat(kid, now):  # fenced: start again, fresh id
                    generation += 1
                    kid = f"{name}.{generation}"
                    await store.register_kernel(kid, socket.gethostname(), os.getpid(), now)
                await store.rescue_expired(now, TTL)
            # Cron: every instant k * CRON_STEP up to now + horizon, fired by whoever gets
            # there first (each worker fires all of them; each wins some).
            occ = []
            while (fired_until + 1) * CRON_STEP <= now + 0.3:
                fired_until += 1
                at = round(fired_until * CRON_STEP, 6)
                occ.append(Job(id=f"{kid}-c{fired_until}", action="noop", due_at=at,
                               kind=JobKind.CRON, task_id=CRON_TASK, scheduled_at=at))
            if occ:
                await store.fire(occ, now, owner=kid, claim_before=now + 0.3)
            claimed = await store.claim_due(kid, now, 0.3, 50)
            for job in await store.owned_jobs(kid):  # claimed now or at fire time
                if job.state.value == "running":
                    continue
                attempt = job.attempt
                if not await store.mark_running_owned(kid, job.id, clock.wall(), attempt):
                    continue
                log(fd, f"run {job.id} {attempt} {kid}")
                run = RunRecord(
                    job_id=job.id, task_id=job.task_id, action=job.action, trace_id="t",
                    span_id="s", scheduled_at=job.scheduled_at, started_at=now,
                    finished_at=clock.wall(), attempt=attempt, outcome=Outcome.SUCCEEDED,
                    recovered=job.recovered,
                )
                ok = await store.finish_owned(kid, job.id, run)
                log(fd, f"fin {job.id} {int(ok)}")
            if not claimed:
                await asyncio.sleep(0.02)  # the poll interval of this stand-in kernel
        await store.expire_kernel(kid)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
