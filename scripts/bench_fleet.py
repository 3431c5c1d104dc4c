#!/usr/bin/env python3
"""Fleet benchmarks: real kernels (each its own process, uvloop) on one PostgreSQL database.

    .venv/bin/python scripts/bench_fleet.py [--jobs 20000] [--kernels 1,3] [--dsn DSN]

Without ``--dsn`` a throwaway cluster is started (``tests/pg_cluster.py``) with ``fsync``,
``synchronous_commit`` and autovacuum **on**, on this same machine. Per kernel count K, K kernel
processes start on a fresh schema, then each one, in its own process:

* ``cycle``: submits ``--jobs`` no-op jobs due now through ``Kernel.submit_many`` (1000 per
  call): submit (claimed at insert as far as the kernel has room, the rest claimed by whichever
  kernel has room) -> start (owner-checked mark) -> finish (owner-checked, run history); the
  figure is the fleet's jobs run per second from the first submission to the last finish (the
  parent sums the runs ended on every kernel), with ``--concurrency`` runs at once per kernel
  (``[scheduler] max_concurrency``, default 1024: no-op jobs; the kernel's own default, 8, is
  for GPU work). Also the CPU per job of the kernels (their processes) and of the server (every
  ``postgres`` process), and the rate the machine's cores would allow at that cost;
* ``claimed_ahead``: 2000 jobs due from 1 s after submission on, 1000 a second, submitted to
  the fleet's first kernel: claimed ahead into a wheel; due-to-start lateness p50/p99;
* ``submit_500``: 500 coroutines awaiting ``Kernel.submit`` of one job each (due in an hour,
  so only the acknowledgement is measured), acknowledged jobs per second.

Prints one JSON line per kernel and scenario, then one ``fleet`` line per K with the sum.
The anchors' published figures (not re-measured here): River ~46k jobs/s (8-core laptop),
Oban ~16.7k/s, graphile-worker 184k/s batched (i9), Hatchet 2k runs/s (8-vCPU RDS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def server_cpu() -> float:
    """CPU seconds (user + system) used so far by every running PostgreSQL process on this
    machine: the server's share of a step is the difference between two readings (its pooled
    backends live as long as the kernels)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm_end = stat.rfind(")")
        if stat[stat.find("(") + 1:comm_end] != "postgres":
            continue
        fields = stat[comm_end + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def worker(dsn: str, schema: str, k: int, jobs: int, ahead: bool,
                 concurrency: int) -> None:
    from kernel import config as config_mod
    from kernel.app import SubmitRequest
    from kernel.clock import SystemClock
    from kernel.events import Event, RunStarted, RunSucceeded
    from kernel.hookspecs import Action, PluginContext, RunContext, hookimpl
    from kernel.main import build
    from kernel.plugins import load as load_plugins
    from kernel.store.postgres import PostgresStore

    class Noop:
        @hookimpl
        def register_actions(self, context: PluginContext) -> list[Action]:
            return [Action("noop", self.run, "does nothing")]

        async def run(self, ctx: RunContext, payload: Any) -> Any:
            return None

    cfg, issues = config_mod.parse_text(f"""
[kernel]
log_level = "warning"
[store]
backend = "postgres"
dsn = "{dsn}"
schema = "{schema}"
[scheduler]
max_concurrency = {concurrency}
queue_depth = 1000000
""", "bench.toml")
    assert not [i for i in issues if i.severity == "error"], issues
    cfg.server.enabled = False
    plugins = load_plugins(PluginContext(), extra=[("noop", Noop())], use_entry_points=False)
    kernel = build(cfg, clock=SystemClock(), plugins=plugins,
                   store=PostgresStore(dsn, schema=schema))
    done = 0
    late: list[float] = []
    last = 0.0

    def on(ev: Event) -> None:
        nonlocal done, last
        if isinstance(ev, RunSucceeded):
            done += 1
            last = time.perf_counter()
        elif isinstance(ev, RunStarted) and ev.lateness is not None:
            late.append(ev.lateness)

    kernel.bus.subscribe(on)
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))
    await started.wait()
    # As `python -m kernel run` does (kernel.main.serve): the benchmark measures that process.
    from kernel.gcpolicy import tune_gc
    tune_gc(0)
    print(json.dumps({"ready": k}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # all kernels of the fleet start together
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    server0 = server_cpu()
    for i in range(0, jobs, 1000):
        await kernel.submit_many([SubmitRequest(action="noop") for _ in range(min(1000, jobs - i))])
    # A kernel runs what it has room for, not necessarily what it was given: the parent sums
    # the runs ended on every kernel and says when the fleet has run them all.
    stop = asyncio.Event()

    async def progress() -> None:
        while not stop.is_set():
            print(json.dumps({"progress": k, "done": done}), flush=True)
            await asyncio.sleep(0.02)

    reporter = asyncio.create_task(progress())
    await asyncio.to_thread(sys.stdin.readline)  # "all run" from the parent
    stop.set()
    await reporter
    cpu = time.process_time() - cpu0  # this kernel process's CPU (all threads) for the cycle
    print(json.dumps({"scenario": "cycle", "kernel": k, "submitted": jobs, "n": done,
                      "start": t0, "end": last, "server_cpu_start": server0,
                      "server_cpu_end": server_cpu(), "cpu_s": cpu}), flush=True)
    late.clear()  # from here on: the claimed-ahead jobs only (submit_500's are due in an hour)
    if ahead:
        # 1000 per second from 1 s on: timer precision, not a burst queueing behind itself
        ahead_ids = [r.job.id for r in await kernel.submit_many(
            [SubmitRequest(action="noop", delay=1.0 + i / 1000) for i in range(2000)])]
    t1 = time.perf_counter()
    n = 0

    async def one() -> None:
        nonlocal n
        while n < 20_000:
            n += 1
            await kernel.submit(SubmitRequest(action="noop", delay=3600))

    await asyncio.gather(*(one() for _ in range(500)))
    dt = time.perf_counter() - t1
    if ahead:  # the 2000 ran on whichever kernels claimed them: wait until none is left
        store = kernel.store
        end = time.monotonic() + 60
        while await store.get_jobs(ahead_ids):
            assert time.monotonic() < end, "the claimed-ahead jobs did not all run"
            await asyncio.sleep(0.1)
    else:
        await asyncio.sleep(4)
    print(json.dumps({"scenario": "submit_500", "kernel": k, "n": n, "per_s": round(n / dt)}),
          flush=True)
    print(json.dumps({"scenario": "lateness", "kernel": k, "runs": len(late),
                      "p50_ms": round(pct(late, 0.5) * 1000, 2),
                      "p99_ms": round(pct(late, 0.99) * 1000, 2)}), flush=True)
    kernel.stop("bench")
    await task


def run_fleet(dsn: str, kernels: int, jobs: int, concurrency: int) -> None:
    from tests.pg_cluster import fresh_schema

    schema = fresh_schema("bench")
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--worker", dsn, schema, str(k), str(jobs),
         "1" if k == 0 else "0", str(concurrency)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for k in range(kernels)]
    for p in procs:  # wait until every kernel is up
        assert p.stdout is not None
        json.loads(p.stdout.readline())
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    lines: queue.Queue[tuple[int, str | None]] = queue.Queue()

    def read(i: int, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.put((i, line))
        lines.put((i, None))

    for i, p in enumerate(procs):
        threading.Thread(target=read, args=(i, p), daemon=True).start()
    rows: list[dict[str, Any]] = []
    done = [0] * kernels
    open_ = kernels
    stopped = False
    while open_:
        i, line = lines.get()
        if line is None:
            open_ -= 1
            continue
        row = json.loads(line)
        if "progress" in row:
            done[i] = row["done"]
            if not stopped and sum(done) >= kernels * jobs:  # the fleet ran them all
                stopped = True
                for p in procs:
                    assert p.stdin is not None
                    p.stdin.write("stop\n")
                    p.stdin.flush()
            continue
        row["kernels"] = kernels
        row["max_concurrency"] = concurrency
        print(json.dumps(row), flush=True)
        rows.append(row)
    for p in procs:
        p.wait()
    cyc = [r for r in rows if r["scenario"] == "cycle"]
    span = max(r["end"] for r in cyc) - min(r["start"] for r in cyc)
    total = sum(r["n"] for r in cyc)
    lat = [r for r in rows if r["scenario"] == "lateness" and r["runs"]]
    # the kernels' cycles overlap: the server's CPU from the first start to the last end
    server_s = max(r["server_cpu_end"] for r in cyc) - min(r["server_cpu_start"] for r in cyc)
    kernel_us = sum(r["cpu_s"] for r in cyc) / total * 1e6
    server_us = server_s / total * 1e6
    print(json.dumps({"scenario": "fleet", "kernels": kernels, "max_concurrency": concurrency,
                      "jobs": total,
                      "per_s": round(total / span),
                      "kernel_cpu_us_per_job": round(kernel_us, 1),
                      "server_cpu_us_per_job": round(server_us, 1),
                      # what os.cpu_count() cores allow at that CPU per job, kernels + server
                      "cpu_bound_per_s": round((os.cpu_count() or 1) * 1e6
                                               / (kernel_us + server_us)),
                      "submit_500_per_s": sum(r["per_s"] for r in rows
                                              if r["scenario"] == "submit_500"),
                      "claimed_ahead_p50_ms": statistics.median(r["p50_ms"] for r in lat)
                      if lat else None,
                      "load_avg": os.getloadavg()[0]}), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        dsn, schema, k, jobs, ahead, conc = sys.argv[2:8]
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        asyncio.run(worker(dsn, schema, int(k), int(jobs), ahead == "1", int(conc)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=20_000, help="jobs per kernel in the cycle")
    ap.add_argument("--kernels", default="1,3", help="kernel counts to run, e.g. 1,3")
    ap.add_argument("--dsn", help="an existing database (default: a throwaway durable cluster)")
    ap.add_argument("--concurrency", type=int, default=1024,
                    help="[scheduler] max_concurrency of each kernel (no-op jobs: runs at once)")
    a = ap.parse_args()
    from tests.pg_cluster import durable_dsn

    with durable_dsn(a.dsn) as dsn:
        for k in (int(x) for x in a.kernels.split(",")):
            run_fleet(dsn, k, a.jobs, a.concurrency)


if __name__ == "__main__":
    main()
