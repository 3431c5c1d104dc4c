#!/usr/bin/env python3
"""The database's own floor for the fleet cycle: what PostgreSQL does on this machine when the
clients cost next to nothing.

    .venv/bin/python scripts/bench_sql_floor.py [--clients 3] [--jobs 40000] [--batch 256,38]

``--clients`` processes (asyncpg on uvloop, two connections each) run, on the kernel's own
tables and indexes (created by ``PostgresStore``), the statements of a fleet kernel's job cycle
with no kernel around them: insert a batch of jobs claimed by their owner (a 305-byte body, as
a kernel's no-op job has), mark them running (owner-checked), then delete them and insert
their run records (owner-checked), ``--batch`` jobs per statement. No events, timers, tasks or
futures: a fixed body, ids from ``os.urandom``.

Prints one JSON line per batch size: jobs per second for all clients together, the server's
CPU per job (every ``postgres`` process, read from ``/proc``) and the clients' CPU per job. Set
beside ``scripts/bench_fleet.py`` (the same cycle through real kernels, which prints the same
two CPU figures), it says which side bounds the fleet on this machine. A throwaway durable
cluster (``fsync``, ``synchronous_commit`` and autovacuum on) is started unless ``--dsn``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

JOB_BODY = b"x" * 305  # a kernel's no-op job is 305 bytes of msgpack
RUN_BODY = b"y" * 200

INSERT = (
    "INSERT INTO jobs (id, due_at, state, kind, attempt, owner, claimed_at, body) "
    "SELECT u.id, 0, 'pending', 'submit', 1, $2, 0, u.b FROM unnest($1::text[], $3::bytea[]) "
    "AS u(id, b)"
)
START = (
    "UPDATE jobs j SET state = 'running', started_at = 1 FROM unnest($1::text[], "
    "array_fill($2::text, ARRAY[cardinality($1::text[])])) AS u(id, own) "
    "WHERE j.id = u.id AND j.owner = u.own AND j.id = ANY($1::text[])"
)
FINISH = (
    "WITH g AS (DELETE FROM jobs j USING unnest($1::text[], array_fill($2::text, "
    "ARRAY[cardinality($1::text[])])) AS u(id, own) WHERE j.id = u.id AND j.owner = u.own "
    "AND j.id = ANY($1::text[]) RETURNING j.id) "
    "INSERT INTO runs (job_id, outcome, trace_id, finished_at, attempt, owner, body) "
    "SELECT id, 'succeeded', 'tttttttttttttttttttttttttttttttt', 2, 1, $2, $3 FROM g"
)


async def client(dsn: str, schema: str, k: int, jobs: int, batch: int) -> None:
    import asyncpg
    from bench_fleet import server_cpu

    lanes = 2
    cons = [await asyncpg.connect(dsn, server_settings={"search_path": schema})
            for _ in range(lanes)]
    owner = f"k{k}"
    await cons[0].execute("INSERT INTO kernels VALUES ($1, 'bench', 0, 0, 0)", owner)
    print(json.dumps({"ready": k}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # every client starts together
    s0, c0, t0 = server_cpu(), time.process_time(), time.perf_counter()

    async def lane(con: asyncpg.Connection) -> None:
        for _ in range(0, jobs // lanes, batch):
            ids = [os.urandom(16).hex() for _ in range(batch)]
            await con.execute(INSERT, ids, owner, [JOB_BODY] * batch)
            await con.execute(START, ids, owner)
            await con.execute(FINISH, ids, owner, RUN_BODY)

    await asyncio.gather(*(lane(c) for c in cons))
    done = jobs // lanes // batch * batch * lanes
    print(json.dumps({"n": done, "start": t0, "end": time.perf_counter(), "server_start": s0,
                      "server_end": server_cpu(), "cpu": time.process_time() - c0}),
          flush=True)
    for c in cons:
        await c.close()


def run(dsn: str, clients: int, jobs: int, batch: int) -> None:
    from kernel.store.postgres import PostgresStore
    from tests.pg_cluster import fresh_schema

    schema = fresh_schema("floor")

    async def create() -> None:  # the kernel's own tables and indexes
        store = PostgresStore(dsn, schema=schema)
        await store.open()
        await store.close()

    asyncio.run(create())
    procs = [subprocess.Popen([sys.executable, __file__, "--client", dsn, schema, str(k),
                               str(jobs), str(batch)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for k in range(clients)]
    for p in procs:
        assert p.stdout is not None
        json.loads(p.stdout.readline())
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    rows = []
    for p in procs:
        assert p.stdout is not None
        rows.append(json.loads(p.stdout.readline()))
        p.wait()
    total = sum(r["n"] for r in rows)
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    server = max(r["server_end"] for r in rows) - min(r["server_start"] for r in rows)
    print(json.dumps({
        "scenario": "sql_floor", "clients": clients, "batch": batch, "jobs": total,
        "per_s": round(total / span),
        "server_cpu_us_per_job": round(server / total * 1e6, 1),
        "client_cpu_us_per_job": round(sum(r["cpu"] for r in rows) / total * 1e6, 1),
        "load_avg": os.getloadavg()[0],
    }), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        dsn, schema, k, jobs, batch = sys.argv[2:7]
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        asyncio.run(client(dsn, schema, int(k), int(jobs), int(batch)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=3, help="client processes (as kernels)")
    ap.add_argument("--jobs", type=int, default=40_000, help="jobs per client")
    ap.add_argument("--batch", default="256,38",
                    help="jobs per statement, e.g. 256,38 (38: the average start/finish group "
                         "a kernel of the three-kernel benchmark commits)")
    ap.add_argument("--dsn", help="an existing database (default: a throwaway durable cluster)")
    a = ap.parse_args()
    from tests.pg_cluster import durable_dsn

    with durable_dsn(a.dsn) as dsn:
        for b in (int(x) for x in a.batch.split(",")):
            run(dsn, a.clients, a.jobs, b)


if __name__ == "__main__":
    main()
