#!/usr/bin/env python3
"""Store benchmarks: acknowledged durable submissions per second, and recovery of 1M jobs.

    .venv/bin/python scripts/bench_store.py [--n 100000] [--recovery-n 1000000]
        [--concurrency 500] [--scenarios concurrent,batch1000,recovery] [--sync NORMAL,FULL]
        [--shapes api,worst] [--loop asyncio|uvloop] [--dir DIR] [--peers] [--peers-dir DIR]

Prints one JSON line per scenario (each run in a fresh subprocess, so peak RSS is its own):

* ``concurrent``: ``--concurrency`` coroutines, each awaiting ``submit([job])`` in a loop until
  ``--n`` jobs are acknowledged (group commit gathers them). ``acked_per_s`` counts only returned
  calls, i.e. committed jobs; latency percentiles are per call.
* ``batch1000``: one caller, ``submit()`` of 1000 jobs per call.
* ``recovery``: a database holding ``--recovery-n`` pending jobs (built through the store's own
  row format, untimed); then a fresh store is opened and ``load_pending`` yields every job as a
  :class:`~kernel.records.Job` (``load_s``); if ``kernel.wheel`` exists, a second pass also puts
  every job into a ``TimingWheel`` (``load_and_wheel_s``).

Jobs carry a 200-character payload string (from a pool of 1024) and a trace id. Two shapes:
``api`` (ids from ``kernel.ids.job_id``, due within the next minute: what POST /jobs makes) and
``worst`` (random uuid4 ids as the peers use, due instants spread over a day: both indexes take
random inserts, about two dirty 4 KiB pages per job per commit); ``time_ids`` is ``api`` with
time-ordered ids. Recovery uses kernel ids and a one-day spread. Everything runs on real files
under ``--dir`` (default: the system temp directory). ``--peers`` also runs the SQLite peer benchmark
(``shared/bench/peers/bench_sqlite.py``) in the same invocation and prints ratios against it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernel.records import Job  # noqa: E402
from kernel.store import SqliteStore, schema  # noqa: E402

try:
    import uvloop  # noqa: F401

    DEFAULT_LOOP = "uvloop"
except ImportError:
    DEFAULT_LOOP = "asyncio"
GOAL_ACKED_PER_S = 40_000
GOAL_RECOVERY_S = 15.0
T0 = 1.8e9  # a fixed wall instant: the store never reads the clock


def make_ids(n: int, kind: str, rng: random.Random) -> list[str]:
    """Job ids: ``kernel`` (``kernel.ids.job_id``, today uuid4 hex), ``uuid4`` (random, as the
    peers use) or ``time`` (time-ordered: 48-bit milliseconds + 80 random bits, as UUIDv7)."""
    if kind == "kernel":
        from kernel.ids import job_id

        return [job_id() for _ in range(n)]
    if kind == "time":
        ms = int(T0 * 1000)
        return [f"{ms + i // 50:012x}{rng.getrandbits(80):020x}" for i in range(n)]
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def make_jobs(n: int, seed: int, *, ids: str = "uuid4", spread: float = 86_400) -> list[Job]:
    """``n`` jobs: a 200-character payload (pool of 1024), a trace id, due within ``spread`` s."""
    rng = random.Random(seed)
    pool = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789 ", k=200))
            for _ in range(1024)]
    return [
        Job(
            id=jid,
            action="log",
            payload={"text": pool[i & 1023]},
            due_at=T0 + i * 2e-5 + rng.random() * spread,
            trace_id=f"{rng.getrandbits(128):032x}",
            created_at=T0,
        )
        for i, jid in enumerate(make_ids(n, ids, rng))
    ]


def cpu_s() -> float:
    """CPU seconds of this process, all threads (user + system): robust to a busy machine."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(sorted_vals: list[float], p: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(p * len(sorted_vals)))]


# -- scenarios (each in its own process) --------------------------------------------------------


async def concurrent(a: argparse.Namespace, path: Path) -> dict[str, Any]:
    jobs = make_jobs(a.n, a.seed, ids=a.ids, spread=a.due_spread)
    store = SqliteStore(path, synchronous=a.sync)
    await store.open()
    it = iter(jobs)
    lat: list[float] = []
    clock = time.perf_counter

    async def submitter() -> int:
        done = 0
        for j in it:  # shared iterator: each job submitted once, by whoever is free
            t = clock()
            await store.submit([j], T0)
            lat.append(clock() - t)
            done += 1
        return done

    gc.collect()
    c0, t0 = cpu_s(), clock()
    counts = await asyncio.gather(*(submitter() for _ in range(a.concurrency)))
    el, cpu = clock() - t0, cpu_s() - c0
    await store.close()
    lat.sort()
    return {
        "acked": sum(counts), "seconds": el, "acked_per_s": sum(counts) / el,
        "cpu_s": cpu, "cpu_us_per_job": cpu / sum(counts) * 1e6,
        "concurrency": a.concurrency, "batches": store.batches,
        "mean_batch": store.batched_ops / max(store.batches, 1),
        "latency_ms": {"p50": pct(lat, 0.5) * 1e3, "p99": pct(lat, 0.99) * 1e3,
                       "max": lat[-1] * 1e3},
        "goal_acked_per_s": GOAL_ACKED_PER_S,
    }


async def batch1000(a: argparse.Namespace, path: Path) -> dict[str, Any]:
    jobs = make_jobs(a.n, a.seed, ids=a.ids, spread=a.due_spread)
    store = SqliteStore(path, synchronous=a.sync)
    await store.open()
    gc.collect()
    c0, t0 = cpu_s(), time.perf_counter()
    for i in range(0, len(jobs), 1000):
        await store.submit(jobs[i : i + 1000], T0)
    el, cpu = time.perf_counter() - t0, cpu_s() - c0
    await store.close()
    return {"acked": len(jobs), "seconds": el, "acked_per_s": len(jobs) / el, "cpu_s": cpu,
            "cpu_us_per_job": cpu / len(jobs) * 1e6}


def fill_pending(path: Path, n: int, seed: int, ids: str) -> None:
    """Add ``n`` pending jobs to a store file, in the store's own row format (not timed)."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous = OFF")
    con.execute("PRAGMA cache_size = -262144")
    insert = (f"INSERT INTO jobs ({', '.join(schema.JOB_COLUMNS)}) "
              f"VALUES ({', '.join('?' * len(schema.JOB_COLUMNS))})")
    step = 100_000
    for i in range(0, n, step):
        rows = [schema.job_row(j) for j in make_jobs(min(step, n - i), seed + i, ids=ids)]
        con.execute("BEGIN")
        con.executemany(insert, rows)
        con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


async def recovery(a: argparse.Namespace, path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    async with SqliteStore(path):  # creates the schema
        pass
    await asyncio.to_thread(fill_pending, path, a.recovery_n, a.seed, a.ids)
    build_s = time.perf_counter() - t0
    db_mb = sum(p.stat().st_size for p in path.parent.iterdir()) / 2**20
    out: dict[str, Any] = {"jobs": a.recovery_n, "build_s": build_s, "db_mb": db_mb}
    gc.collect()
    clock = time.perf_counter

    t0 = clock()
    async with SqliteStore(path) as store:
        t_open = clock() - t0
        count = 0
        async for batch in store.load_pending():
            count += len(batch)
    out.update(open_s=t_open, load_s=clock() - t0, loaded=count)
    out["jobs_per_s"] = count / out["load_s"]

    try:
        from kernel.wheel import TimingWheel
    except ImportError:
        out["wheel"] = "kernel.wheel not found: skipped"
    else:
        gc.collect()
        t0 = clock()
        wheel: Any = TimingWheel(resolution=0.001, start=T0)
        many = getattr(wheel, "schedule_many", None)
        async with SqliteStore(path) as store:
            async for batch in store.load_pending():
                if many is not None:
                    many([j.due_at for j in batch], batch)
                else:
                    for j in batch:
                        wheel.schedule(j.due_at, j)
        out.update(load_and_wheel_s=clock() - t0, in_wheel=len(wheel),
                   wheel_api="schedule_many" if many is not None else "schedule")
        del wheel
    out["goal_s"] = GOAL_RECOVERY_S
    out["meets_goal"] = out.get("load_and_wheel_s", out["load_s"]) < GOAL_RECOVERY_S
    return out


SCENARIOS: dict[str, Callable[[argparse.Namespace, Path], Coroutine[Any, Any, dict[str, Any]]]]
SCENARIOS = {"concurrent": concurrent, "batch1000": batch1000, "recovery": recovery}
#: Shapes: (id kind, due spread in seconds) for submit scenarios; recovery always spreads a day.
SHAPES = {"api": ("kernel", 60.0), "worst": ("uuid4", 86_400.0), "time_ids": ("time", 60.0)}


def child(a: argparse.Namespace) -> None:
    d = Path(tempfile.mkdtemp(prefix="bench_store", dir=a.dir))
    try:
        runner: Any = asyncio.run
        if a.loop == "uvloop":
            import uvloop

            runner = uvloop.run
        res = runner(SCENARIOS[a.scenario](a, d / "kernel.sqlite3"))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    res.update(bench="store", scenario=a.scenario, shape=a.shape, ids=a.ids,
               due_spread_s=a.due_spread, synchronous=a.sync, loop=a.loop,
               n=a.n if a.scenario != "recovery" else a.recovery_n,
               sqlite=sqlite3.sqlite_version, python=sys.version.split()[0],
               peak_rss_mb=rss_mb(), load_avg_1m=os.getloadavg()[0], cpus=os.cpu_count())
    if a.scenario == "concurrent":
        res["meets_goal"] = res["acked_per_s"] >= GOAL_ACKED_PER_S
    print(json.dumps(res))


def run_child(a: argparse.Namespace, scenario: str, sync: str, shape: str) -> dict[str, Any]:
    ids, spread = SHAPES[shape]
    if scenario == "recovery":
        ids, spread = "kernel", 86_400.0
    argv = [sys.executable, os.path.abspath(__file__), "--_child", "--scenario", scenario,
            "--shape", shape, "--ids", ids, "--due-spread", str(spread),
            "--sync", sync, "--n", str(a.n), "--recovery-n", str(a.recovery_n),
            "--concurrency", str(a.concurrency), "--loop", a.loop, "--seed", str(a.seed)]
    if a.dir:
        argv += ["--dir", a.dir]
    cp = subprocess.run(argv, capture_output=True, text=True, check=False)
    if cp.returncode:
        sys.stderr.write(cp.stderr)
        return {"bench": "store", "scenario": scenario, "shape": shape, "synchronous": sync,
                "error": cp.stderr.strip().splitlines()[-1:]}
    line: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
    return line


def run_peers(a: argparse.Namespace, ours: list[dict[str, Any]]) -> None:
    script = Path(a.peers_dir) / "bench_sqlite.py"
    d = tempfile.mkdtemp(prefix="bench_peers", dir=a.dir)
    try:
        cp = subprocess.run(
            [sys.executable, str(script), "--n", "100000", "--max-seconds", "60",
             "--repeat", "1", "--dir", d],
            capture_output=True, text=True, check=False,
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if cp.returncode:
        print(json.dumps({"bench": "peers", "error": cp.stderr.strip()[-500:]}))
        return
    peer: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
    peer["load_avg_1m_after"] = os.getloadavg()[0]
    print(json.dumps(peer))
    med = peer["median"]
    ratios: dict[str, float] = {}
    for r in ours:
        if "acked_per_s" not in r:
            continue
        sync = r["synchronous"]
        for variant in ("aio_batch1000", "sync_batch1000", "aio_row_commit"):
            base = med.get(f"{variant}|{sync}|rows_per_s")
            if base:
                key = f"{r['scenario']}[{r.get('shape')}]|{sync} / {variant}|{sync}"
                ratios[key] = r["acked_per_s"] / base
    print(json.dumps({"bench": "store_vs_peers", "ratios": ratios,
                      "note": "ours: full Job rows (4 indexes, msgpack body), acknowledged per "
                              "call; peers: 3-column rows with one index"}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="jobs per submit scenario")
    p.add_argument("--recovery-n", type=int, default=1_000_000)
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--scenarios", default="concurrent,batch1000,recovery")
    p.add_argument("--sync", default="NORMAL,FULL", help="synchronous values to measure")
    p.add_argument("--shapes", default="api,worst",
                   help="job shapes for submit scenarios: " + ", ".join(
                       f"{k} (ids {v[0]}, due within {v[1]:g} s)" for k, v in SHAPES.items()))
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default=DEFAULT_LOOP,
                   help="event loop (default: uvloop when installed, as the kernel's CLI runs)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", default=None, help="where the database files go (fsync cost!)")
    p.add_argument("--peers", action="store_true", help="also run the SQLite peer benchmark")
    p.add_argument("--peers-dir", default=str(Path(__file__).resolve().parents[2]
                                              / "shared/bench/peers"))
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="api", help=argparse.SUPPRESS)
    p.add_argument("--ids", default="kernel", help=argparse.SUPPRESS)
    p.add_argument("--due-spread", type=float, default=60.0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        child(a)
        return
    results = []
    for scenario in a.scenarios.split(","):
        if scenario == "recovery":
            runs = [("NORMAL", "api")]
        else:
            runs = [(sync, shape) for shape in a.shapes.split(",") for sync in a.sync.split(",")]
        for sync, shape in runs:
            res = run_child(a, scenario, sync, shape)
            print(json.dumps(res), flush=True)
            results.append(res)
    if a.peers:
        with contextlib.suppress(KeyboardInterrupt):
            run_peers(a, results)


if __name__ == "__main__":
    main()
