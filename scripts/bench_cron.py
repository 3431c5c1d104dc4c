#!/usr/bin/env python3
"""Benchmark kernel.cron against the peer anchors (croniter, cronsim, APScheduler).

    .venv/bin/python scripts/bench_cron.py [--n 20000] [--arm-n 1000000] [--tz UTC]
        [--peers] [--peers-dir DIR] [--peers-python PY]

Prints JSON lines:

* ``next``: ``next_after`` calls/s for the peer's four expressions (``*/5 * * * *``,
  ``0 2 * * *``, ``*/5 * * * * *`` seconds first, ``0 9 * * MON-FRI``), N successive calls on
  one schedule from 2025-03-01 12:00:07 in ``--tz``, like ``bench_cron.py``'s ``next_per_s``
  (wall clock, as the peer measures; ``next_per_cpu_s`` divides by this process's CPU time,
  which other processes on a shared machine disturb less).
* ``parse``: schedules built per second for the same four (``parse_schedule``, as the peer's
  constructions/s) and for distinct expressions on a cold :class:`Compiler`; bytes per live
  schedule (tracemalloc, 5000 instances of one expression, as the peer measures).
* ``arm``: one fresh process each, arming ``--arm-n`` schedules the way the kernel does
  (``ScheduleCache.get(expr, tz).next_after(now)``, the reference kept), with the garbage
  collector on: ``shared`` = 1,000 distinct (expr, tz) pairs shared among them, ``distinct`` =
  every one different (parse + first ``next_after``). Reports wall and CPU seconds, µs per
  schedule and bytes per schedule (RSS growth over the whole run, and tracemalloc over the
  first 100k). The expression strings are made before the clock starts and are not counted:
  the configuration holds them anyway.
* with ``--peers``: the peer script's own JSON line (``--n 20000 --repeat 1``, run in the same
  invocation) and a ``ratios`` line (ours / theirs; above 1 means we are faster or, for bytes,
  that we use more).

The peer script needs croniter, cronsim and APScheduler 3.11; ``--peers-python`` names an
interpreter that has them (default: this one).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel.cron import ScheduleCache, parse_schedule
from kernel.triggers import Compiler

EXPRS = ["*/5 * * * *", "0 2 * * *", "*/5 * * * * *", "0 9 * * MON-FRI"]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Sydney"]
_DAYS = ["* * ?", "* * MON-FRI", "1 * ?", "15 * ?", "L * ?", "? * SUN", "*/2 * *", "1,15 * *",
         "* 1-6 *", "* */3 *", "? * 5L", "? * MON#1", "? JAN,JUL 1-5", "L-2 * ?", "15W * ?",
         "? * SAT,SUN"]


def distinct_exprs(n: int) -> list[str]:
    """``n`` different 6-field expressions: every second of the day times 16 day rules."""
    return [f"{i % 60} {i // 60 % 60} {i // 3600 % 24} {_DAYS[i // 86400 % len(_DAYS)]}"
            for i in range(n)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_next(n: int, tz: str) -> dict[str, Any]:
    start = datetime(2025, 3, 1, 12, 0, 7, tzinfo=ZoneInfo(tz)).timestamp()
    out: dict[str, Any] = {"bench": "next", "n": n, "tz": tz}
    for expr in EXPRS:
        sched = parse_schedule(expr, tz)
        t: Any = sched.next_after(start)  # never None for these four
        nxt = sched.next_after
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(n):
            t = nxt(t)
        out[f"{expr}|next_per_s"] = round(n / (time.perf_counter() - t0))
        out[f"{expr}|next_per_cpu_s"] = round(n / (time.process_time() - c0))
    return out


def bench_parse(n: int, tz: str) -> dict[str, Any]:
    start = datetime(2025, 3, 1, 12, 0, 7, tzinfo=ZoneInfo(tz)).timestamp()
    out: dict[str, Any] = {"bench": "parse", "tz": tz}
    m = min(n, 20000)
    for expr in EXPRS:
        parse_schedule(expr, tz)
        t0 = time.perf_counter()
        for _ in range(m):
            parse_schedule(expr, tz)
        out[f"{expr}|new_per_s"] = round(m / (time.perf_counter() - t0))
        gc.collect()
        tracemalloc.start()
        s0 = tracemalloc.get_traced_memory()[0]
        objs = [parse_schedule(expr, tz) for _ in range(5000)]
        for o in objs:
            o.next_after(start)
        s1 = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out[f"{expr}|bytes_per_obj_tracemalloc"] = round((s1 - s0) / 5000, 1)
        del objs
    exprs = distinct_exprs(n)
    comp = Compiler()
    t0 = time.perf_counter()
    for i, e in enumerate(exprs):
        comp.parse(e, ZONES[i & 3])
    out["distinct|parse_per_s"] = round(n / (time.perf_counter() - t0))
    comp = Compiler()
    t0 = time.perf_counter()
    for i, e in enumerate(exprs):
        comp.parse(e, ZONES[i & 3]).next_after(start)
    out["distinct|parse_and_first_next_per_s"] = round(n / (time.perf_counter() - t0))
    return out


def arm(kind: str, n: int) -> dict[str, Any]:
    """Arm ``n`` schedules in this (fresh) process, as the kernel would at start-up."""
    now = datetime(2026, 3, 1, 12, 0, 7, tzinfo=ZoneInfo("UTC")).timestamp()
    if kind == "shared":
        pool = distinct_exprs(n)[:: max(1, n // 1000)][:1000]
        pairs = [(pool[i % len(pool)], ZONES[i % len(pool) % 4]) for i in range(n)]
    else:
        pairs = [(e, ZONES[i & 3]) for i, e in enumerate(distinct_exprs(n))]
    distinct_pairs = len(set(pairs))
    gc.collect()

    def run(items: list[tuple[str, str]]) -> tuple[float, float, list[Any]]:
        cache = ScheduleCache()
        held: list[Any] = []
        add = held.append
        c0 = time.process_time()
        t0 = time.perf_counter()
        for expr, tz in items:
            sched = cache.get(expr, tz)
            sched.next_after(now)
            add(sched)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        held.append(cache)
        return elapsed, cpu, held

    r0 = rss_bytes()
    elapsed, cpu, held = run(pairs)
    gc.collect()
    rss = (rss_bytes() - r0) / n
    del held
    gc.collect()
    m = min(n, 100_000)
    tracemalloc.start()
    s0 = tracemalloc.get_traced_memory()[0]
    _, _, held = run(pairs[:m])
    traced = (tracemalloc.get_traced_memory()[0] - s0) / m
    tracemalloc.stop()
    del held
    return {"bench": f"arm_{kind}", "n": n, "distinct_pairs": distinct_pairs, "zones": ZONES,
            "seconds": round(elapsed, 3), "cpu_seconds": round(cpu, 3),
            "us_per_schedule": round(elapsed / n * 1e6, 3),
            "bytes_per_schedule_rss": round(rss, 1),
            "bytes_per_schedule_tracemalloc": round(traced, 1), "tracemalloc_n": m}


def run_peers(peers_dir: Path, python: str) -> dict[str, Any]:
    script = peers_dir / "bench_cron.py"
    cp = subprocess.run([python, str(script), "--n", "20000", "--repeat", "1"],
                        capture_output=True, text=True, check=False)
    if cp.returncode:
        return {"bench": "peers", "error": cp.stderr.strip().splitlines()[-1:],
                "hint": "pass --peers-python with croniter, cronsim and apscheduler 3.11"}
    line: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
    line["bench"] = "peers"
    line["script"] = str(script)
    return line


def ratios(nxt: dict[str, Any], parse: dict[str, Any], peers: dict[str, Any]) -> dict[str, Any]:
    med = peers["median"]
    out: dict[str, Any] = {"bench": "ratios", "meaning": "ours / peer (higher = we are faster; "
                           "for bytes, higher = we use more)"}
    for expr in EXPRS:
        ours = nxt[f"{expr}|next_per_s"]
        for lib in ("croniter_float", "croniter", "cronsim", "apscheduler_crontrigger"):
            theirs = med.get(f"{lib}|{expr}|next_per_s")
            if theirs:
                out[f"next|{expr}|vs_{lib}"] = round(ours / theirs, 1)
        for lib in ("croniter", "cronsim"):
            theirs = med.get(f"{lib}|{expr}|new_per_s")
            if theirs:
                out[f"parse|{expr}|vs_{lib}"] = round(parse[f"{expr}|new_per_s"] / theirs, 1)
            theirs = med.get(f"{lib}|{expr}|bytes_per_obj_tracemalloc")
            if theirs:
                out[f"bytes|{expr}|vs_{lib}"] = round(
                    parse[f"{expr}|bytes_per_obj_tracemalloc"] / theirs, 3)
    return out


def main() -> None:
    default_peers = Path(__file__).resolve().parents[2] / "shared/bench/peers"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="next_after calls per expression")
    p.add_argument("--arm-n", type=int, default=1_000_000, help="schedules to arm")
    p.add_argument("--tz", default="UTC")
    p.add_argument("--peers", action="store_true", help="also run the peer benchmark")
    p.add_argument("--peers-dir", type=Path, default=default_peers)
    p.add_argument("--peers-python", default=sys.executable)
    p.add_argument("--_arm", choices=["shared", "distinct"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._arm:
        print(json.dumps(arm(a._arm, a.arm_n)))
        return
    env = {"bench": "env", "python": sys.version.split()[0], "cpus": os.cpu_count(),
           "gc": "enabled"}
    print(json.dumps(env), flush=True)
    nxt = bench_next(a.n, a.tz)
    print(json.dumps(nxt), flush=True)
    parse = bench_parse(a.n, a.tz)
    print(json.dumps(parse), flush=True)
    for kind in ("shared", "distinct"):
        cp = subprocess.run([sys.executable, __file__, "--_arm", kind, "--arm-n", str(a.arm_n)],
                            capture_output=True, text=True, check=True)
        print(cp.stdout.strip(), flush=True)
    if a.peers:
        peers = run_peers(a.peers_dir, a.peers_python)
        print(json.dumps(peers), flush=True)
        if "median" in peers:
            print(json.dumps(ratios(nxt, parse, peers)), flush=True)


if __name__ == "__main__":
    main()
