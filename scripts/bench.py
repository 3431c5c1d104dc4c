#!/usr/bin/env python3
"""Every performance scenario of the kernel in one command, optionally beside the peer anchors.

    .venv/bin/python scripts/bench.py [--peers] [--peers-dir DIR] [--quick] [--only NAME[,NAME]]
        [--out FILE] [--step-timeout S] [--list]

Prints one JSON object per line: one per measurement (``"bench": "ours"``), one per peer run
(``"bench": "peer"``, with ``--peers``), then one ``"bench": "goals"`` line per scenario
(value, goal, met, distance, ratio to the peer measured minutes before) and a final
``"bench": "summary"``. The kernel scenarios run on uvloop, as ``python -m kernel`` does; a
step whose label ends in ``_asyncio`` is the same on asyncio's default loop, reported beside it
in the goal's note. Every measurement runs in a fresh subprocess (its ``peak_rss_mb`` is its
own) with a time limit (``--step-timeout``, default 300 s); ``wall_s`` is the subprocess's wall
time and ``loadavg_1m`` the load when it started (other work on the machine skews rates: read
``cpu_s`` / ``cpu_us_per_run`` where given). ``--quick`` runs reduced sizes (a smoke run,
about 4 minutes); the full ``--peers`` run takes about 17 minutes on a 2-core machine.

Scenarios (``--only`` takes these names; details in ``scripts/bench_kernel.py`` and in
``docs/PERFORMANCE.md``):

  timers    1M and 10M timers held by the bare wheel (bytes per timer, peak RSS), and 100k/1M
            one-shot jobs held by the kernel (a Job record + bookkeeping + the MemoryStore copy)
  rates     wheel insert and expiry rates at 1M and 10M (``scripts/bench_wheel.py``)
  cron      1M cron schedules armed (parse + first next + wheel insert): 1,000 shared
            expressions, and all distinct; plus 100k and 1M tasks through the kernel's start-up
  burst     100k one-shot jobs due within the same second: SqliteStore (the headline) and
            MemoryStore, each on uvloop and on asyncio's loop
  herd      100k cron tasks every 5 s (20k runs/s) for 60 s, SqliteStore and MemoryStore
            (``--quick``: 20k tasks, 30 s)
  steady    1M jobs due uniformly over 60 s (16.7k/s), MemoryStore (``--quick``: 100k, 10 s)
  pending   kernel RSS per pending one-shot job: 1M jobs an hour ahead posted to
            ``POST /jobs/batch`` by a client process, SqliteStore (``--quick``: 100k)
  durable   acknowledged durable submissions: in-process ``kernel.submit`` (500 concurrent
            submitters, SqliteStore) and the HTTP API from a client process on loopback
            (one job per request from 64 connections and from one; 1000 per request), with
            raw ``sqlite3`` ``executemany`` of the same rows in the same process run
  recovery  a SQLite file with 100k and 1M pending jobs: kernel start until all are armed
  e2e       ``exec`` (/bin/true) and ``python`` (operator:truth) actions, history in SQLite:
            runs/s and the kernel's CPU share
  growth    (no runs of its own) cost per timer/job from 100k to 1M (to 10M for the wheel),
            from the lines above

With ``--peers``, each scenario is followed by the peers it is compared with, from
``--peers-dir`` (default ``<repo>/../shared/bench/peers``): asyncio ``call_at`` and ``heapq``
(timers, rates, steady), croniter/cronsim (cron), APScheduler 3.11 (burst, herd) and SQLite
inserts (durable).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_PEERS = Path(__file__).resolve().parents[2] / "shared/bench/peers"
PY = sys.executable
KERNEL = [PY, str(HERE / "bench_kernel.py")]

Step = tuple[str, list[str]]  # (label, argv)


def wheel_measure(n: int) -> list[str]:
    """``scripts/bench_wheel.py``'s three phases at N (its own subprocesses)."""
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import bench_wheel; "
            f"print(json.dumps(bench_wheel.measure({n}, 1)[0]))")
    return [PY, "-c", code]


def bench_cron_arm(kind: str, n: int) -> list[str]:
    return [PY, str(HERE / "bench_cron.py"), "--_arm", kind, "--arm-n", str(n)]


@dataclass
class Scenario:
    name: str
    full: list[Step]
    quick: list[Step]
    peers_full: list[Step] = field(default_factory=list)
    peers_quick: list[Step] = field(default_factory=list)
    goals: Callable[[dict[str, dict[str, Any]]], list[dict[str, Any]]] | None = None


def peer(peers_dir: Path, script: str, *args: str) -> list[str]:
    return [PY, str(peers_dir / script), *args]


# ============================================================================ goals


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _median(d: dict[str, Any] | None, key: str) -> Any:
    return _get(d, "median", key)


def goal(name: str, value: Any, target: float, *, higher_is_better: bool, unit: str,
         peer_value: Any = None, peer_label: str = "", note: str = "") -> dict[str, Any]:
    met: bool | None = None
    distance: str | None = None
    if isinstance(value, int | float):
        met = value >= target if higher_is_better else value <= target
        if not met:
            distance = (f"{target / value:.2f}x short" if higher_is_better and value
                        else f"{value / target:.2f}x over" if target else "")
    out: dict[str, Any] = {"goal": name, "value": value, "target": target, "unit": unit,
                           "met": met}
    if distance:
        out["distance"] = distance
    if isinstance(value, int | float) and isinstance(peer_value, int | float) and peer_value:
        out["peer"] = {"label": peer_label, "value": round(peer_value, 3),
                       "ours_over_peer": round(value / peer_value, 3)}
    if note:
        out["note"] = note
    return out


def _peer_label(r: dict[str, Any] | None, what: str) -> str:
    n = _get(r, "n")
    return f"{what} at {n:,}" if isinstance(n, int) else what


def _largest(r: dict[str, dict[str, Any]], *labels: str) -> dict[str, Any] | None:
    """The result of the last of ``labels`` that ran without error (the largest N)."""
    for label in reversed(labels):
        res = r.get(label)
        if res is not None and "error" not in res:
            return res
    return None


def _n(res: dict[str, Any] | None) -> str:
    n = _get(res, "n") or _get(res, "n_tasks")
    if not isinstance(n, int):
        return "?"
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else (
        f"{n // 1000}k" if n % 1000 == 0 else str(n))


def goals_timers(r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    aio = r.get("peer:asyncio_burst")
    wheel = _largest(r, "wheel_hold_1M", "wheel_hold_10M")
    held = _largest(r, "kernel_hold_100k", "kernel_hold_1M")
    return [
        goal(f"wheel bytes/timer at {_n(wheel)} (handles kept, as the kernel keeps them)",
             _get(wheel, "bytes_per_timer_with_handles"), 100,
             higher_is_better=False, unit="B", peer_value=_median(aio, "bytes_per_timer"),
             peer_label=_peer_label(aio, "asyncio call_at")),
        goal(f"wheel peak RSS holding {_n(wheel)} timers", _get(wheel, "peak_rss_mb"),
             1200, higher_is_better=False, unit="MB", note="the goal is for 10M"),
        goal(f"kernel one-shot job held at {_n(held)} (Job + bookkeeping + MemoryStore copy)",
             _get(held, "bytes_per_job"), 100, higher_is_better=False,
             unit="B", peer_value=_median(aio, "bytes_per_timer"),
             peer_label=_peer_label(aio, "asyncio call_at"),
             note="the 100 B goal is the wheel's; a kernel job is a record, not a timer"),
    ]


def goals_rates(r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    heap = r.get("peer:heapq")
    aio = r.get("peer:asyncio_burst")
    for n in ("100k", "1M", "10M"):
        w = r.get(f"wheel_{n}")
        if w is None:
            continue
        out.append(goal(f"wheel schedule() at {n}", _get(w, "schedule_per_s"), 1e6,
                        higher_is_better=True, unit="/s", peer_value=_median(aio, "schedule_per_s"),
                        peer_label=_peer_label(aio, "asyncio call_at")))
        out.append(goal(f"wheel expiry in 1 ms steps at {n}", _get(w, "expire_step_per_s"), 1e6,
                        higher_is_better=True, unit="/s", peer_value=_median(heap, "pop_per_s"),
                        peer_label=_peer_label(heap, "heapq pop")))
        out.append(goal(f"wheel expiry, all due at once, at {n}", _get(w, "expire_bulk_per_s"),
                        1e6, higher_is_better=True, unit="/s",
                        peer_value=_median(aio, "fire_per_s"),
                        peer_label=_peer_label(aio, "asyncio saturated fire")))
    return out


def goals_cron(r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    cr = r.get("peer:cron_next")
    croniter = _median(cr, "croniter|*/5 * * * *|next_per_s")
    for kind in ("shared", "distinct"):
        a = r.get(f"cron_arm_{kind}")
        n = _get(a, "n") or 0
        secs = _get(a, "seconds")
        out.append(goal(f"arm {n:,} schedules, {kind} expressions", secs, 10,
                        higher_is_better=False, unit="s",
                        peer_value=(n / croniter) if croniter else None,
                        peer_label="croniter: N get_next() calls alone"))
        out.append(goal(f"bytes per armed schedule, {kind}", _get(a, "bytes_per_schedule"), 200,
                        higher_is_better=False, unit="B"))
    return out


def _loops(r: dict[str, dict[str, Any]], label: str, *path: str) -> str:
    """``value (asyncio: value)``: the headline on uvloop, the same step on asyncio beside it."""
    other = _get(r.get(f"{label}_asyncio"), *path)
    return f"asyncio loop: {other}" if other is not None else ""


def goals_burst(r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    aps = r.get("peer:apscheduler_date_burst")
    out = []
    for store, us_goal in (("sqlite", 30), ("memory", 15)):
        label = f"burst_{store}"
        b = r.get(label)
        aps_p50 = (_median(aps, "lateness_p50_ms") or 0) / 1e3 or None
        out.append(goal(f"burst {_n(b)} due in 1 s ({store}, uvloop): last done after the last "
                        "due instant", _get(b, "last_done_after_last_due_s"), 2,
                        higher_is_better=False, unit="s",
                        note=_loops(r, label, "last_done_after_last_due_s")))
        out.append(goal(f"burst {_n(b)} due in 1 s ({store}, uvloop): CPU per run",
                        _get(b, "cpu_us_per_run"), us_goal, higher_is_better=False, unit="us",
                        note=_loops(r, label, "cpu_us_per_run")))
        out.append(goal(f"burst {_n(b)} due in 1 s ({store}, uvloop): p50 lateness",
                        (_get(b, "lateness", "p50_ms") or 0) / 1e3 if b else None, 2,
                        higher_is_better=False, unit="s", peer_value=aps_p50,
                        peer_label=_peer_label(aps, "APScheduler 3 p50 (memory, no persistence)"),
                        note=_loops(r, label, "lateness", "p50_ms")))
    return out


def goals_herd(r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    aps = r.get("peer:apscheduler_cron")
    exp = _median(aps, "due_runs_in_window")
    ex = _median(aps, "executed")
    out = []
    for label in ("herd_sqlite", "herd_memory"):
        h = r.get(label)
        if h is None:
            continue
        store = _get(h, "store")
        out += [
            goal(f"cron herd {_n(h)} tasks every 5 s ({store}, uvloop): missed occurrences",
                 _get(h, "missed"), 0, higher_is_better=False, unit="runs",
                 note=(f"of {_get(h, 'expected_runs')} due; skipped by overlap "
                       f"{_get(h, 'skipped_overlap')}; "
                       + (f"APScheduler executed {ex} of {exp} (grace 1 s); " if aps else "")
                       + _loops(r, label, "missed"))),
            goal(f"cron herd ({store}, uvloop): p99 lateness",
                 (_get(h, "lateness", "p99_ms") or 0) / 1e3 if h else None, 1,
                 higher_is_better=False, unit="s", note=_loops(r, label, "lateness", "p99_ms")),
            goal(f"cron herd ({store}, uvloop): CPU per run", _get(h, "cpu_us_per_run"), 50,
                 higher_is_better=False, unit="us",
                 note="50 us = 1 core at 20k runs/s; " + _loops(r, label, "cpu_us_per_run")),
        ]
    return out


def goals_steady(r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    s = r.get("steady")
    aio = r.get("peer:asyncio_realtime")
    return [goal(f"steady {_n(s)} jobs over 60 s (memory, uvloop): p99 fire lateness",
                 _get(s, "lateness", "p99_ms"), 5, higher_is_better=False, unit="ms",
                 peer_value=_median(aio, "lateness_p99_ms"), peer_label="asyncio call_at p99",
                 note=_loops(r, "steady", "lateness", "p99_ms"))]


def goals_pending(r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    p = _largest(r, "pending_http_100k", "pending_http_200k", "pending_http_1M")
    aio = r.get("peer:asyncio_burst")
    return [goal(f"kernel RSS per pending one-shot job, {_n(p)} via POST /jobs/batch (sqlite)",
                 _get(p, "bytes_per_job"), 300, higher_is_better=False, unit="B",
                 peer_value=_median(aio, "bytes_per_timer"),
                 peer_label=_peer_label(aio, "asyncio call_at per timer"),
                 note=f"held as Job objects it would be {_get(p, 'bytes_per_job_if_held_as_job')} B")]


def goals_durable(r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    d = r.get("durable_inprocess")
    h = r.get("durable_http")
    raw = _get(h, "raw_sqlite", "rows_per_s")
    sq = r.get("peer:sqlite")
    return [
        goal("durable submits via POST /jobs/batch (1000 per request, sqlite, uvloop)",
             _get(h, "batch", "acked_per_s"), 100_000, higher_is_better=True, unit="/s",
             peer_value=raw, peer_label="raw sqlite3 executemany of the same rows, same run",
             note=_loops(r, "durable_http", "batch", "acked_per_s")),
        goal("POST /jobs/batch over raw sqlite3 executemany (same run)",
             _get(h, "batch_over_raw_sqlite"), 0.3, higher_is_better=True, unit="x"),
        goal("POST /jobs, one job per request, 64 connections (sqlite, uvloop)",
             _get(h, "single", "acked_per_s"), 15_000, higher_is_better=True, unit="/s",
             note=(f"p50 {_get(h, 'single', 'request_ms', 'p50')} ms; one connection: p50 "
                   f"{_get(h, 'lone', 'request_ms', 'p50')} ms; "
                   + _loops(r, "durable_http", "single", "acked_per_s"))),
        goal("durable kernel.submit, 500 submitters (sqlite, uvloop)", _get(d, "acked_per_s"),
             40_000, higher_is_better=True, unit="/s",
             peer_value=_median(sq, "aio_batch1000|NORMAL|rows_per_s"),
             peer_label="aiosqlite 1000 rows/txn (peer, 3-column rows)"),
    ]


def goals_recovery(r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    big = _largest(r, "recovery_100k", "recovery_1M")
    return [goal(f"restart: {_get(big, 'n')} pending jobs armed (uvloop)",
                 _get(big, "start_to_armed_s"), 10, higher_is_better=False, unit="s")]


def goals_growth(r: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Cost per timer at the larger N over the smaller: 1.0 is flat."""
    pairs = [
        ("wheel bytes/timer (handles kept)", "wheel_hold_1M", "wheel_hold_10M",
         ("bytes_per_timer_with_handles",)),
        ("wheel schedule() s/timer", "wheel_1M", "wheel_10M", ("schedule_per_s",)),
        ("wheel expiry s/timer (1 ms steps)", "wheel_1M", "wheel_10M", ("expire_step_per_s",)),
        ("kernel job bytes", "kernel_hold_100k", "kernel_hold_1M", ("bytes_per_job",)),
        ("kernel submit s/job", "kernel_hold_100k", "kernel_hold_1M", ("submit_per_s",)),
        ("recovery s/job", "recovery_100k", "recovery_1M", ("start_to_armed_s",)),
        ("kernel bytes/task (tasks_arm)", "tasks_arm_100k", "tasks_arm_1M",
         ("bytes_per_task_kernel",)),
    ]
    out = []
    for label, small, large, path in pairs:
        a, b = _get(r.get(small), *path), _get(r.get(large), *path)
        if not isinstance(a, int | float) or not isinstance(b, int | float) or not a or not b:
            continue
        if path[0].endswith("_per_s"):  # a rate: cost per item is its inverse
            ratio = a / b
        elif path[0] == "start_to_armed_s":
            ratio = (b / _get(r.get(large), "n")) / (a / _get(r.get(small), "n"))
        else:
            ratio = b / a
        out.append(goal(f"growth {small} -> {large}: {label}", round(ratio, 2), 1.25,
                        higher_is_better=False, unit="x per item",
                        note="1.0 = flat cost per item; goal: within 25 %"))
    return out


# ============================================================================ scenarios


def scenarios(peers_dir: Path, tmp: str) -> list[Scenario]:
    K = KERNEL
    sqlite_dir = ["--dir", tmp]
    sq = ["--store", "sqlite", *sqlite_dir]
    aio = ["--loop", "asyncio"]
    return [
        Scenario(
            "timers",
            full=[("wheel_hold_1M", [*K, "wheel_hold", "--n", "1000000"]),
                  ("wheel_hold_10M", [*K, "wheel_hold", "--n", "10000000"]),
                  ("kernel_hold_100k", [*K, "kernel_hold", "--n", "100000"]),
                  ("kernel_hold_1M", [*K, "kernel_hold", "--n", "1000000"])],
            quick=[("wheel_hold_1M", [*K, "wheel_hold", "--n", "1000000"]),
                   ("kernel_hold_100k", [*K, "kernel_hold", "--n", "100000"])],
            peers_full=[("asyncio_burst", peer(peers_dir, "bench_asyncio_timers.py", "--n",
                                               "1000000", "--loop", "asyncio", "--repeat", "1")),
                        ("heapq", peer(peers_dir, "bench_heapq.py", "--n", "1000000",
                                       "--repeat", "1"))],
            peers_quick=[("asyncio_burst", peer(peers_dir, "bench_asyncio_timers.py", "--n",
                                                "100000", "--loop", "asyncio", "--repeat", "1")),
                         ("heapq", peer(peers_dir, "bench_heapq.py", "--n", "100000",
                                        "--repeat", "1"))],
            goals=goals_timers),
        Scenario(
            "rates",
            full=[("wheel_1M", wheel_measure(1_000_000)), ("wheel_10M", wheel_measure(10_000_000))],
            quick=[("wheel_100k", wheel_measure(100_000))],
            goals=goals_rates),
        Scenario(
            "cron",
            full=[("cron_arm_shared", [*K, "cron_arm", "--kind", "shared", "--n", "1000000"]),
                  ("cron_arm_distinct", [*K, "cron_arm", "--kind", "distinct", "--n", "1000000"]),
                  ("bench_cron_arm_distinct", bench_cron_arm("distinct", 1_000_000)),
                  ("tasks_arm_100k", [*K, "tasks_arm", "--n", "100000"]),
                  ("tasks_arm_1M", [*K, "tasks_arm", "--n", "1000000"])],
            quick=[("cron_arm_shared", [*K, "cron_arm", "--kind", "shared", "--n", "100000"]),
                   ("cron_arm_distinct", [*K, "cron_arm", "--kind", "distinct", "--n", "100000"]),
                   ("tasks_arm_20k", [*K, "tasks_arm", "--n", "20000"])],
            peers_full=[("cron_next", peer(peers_dir, "bench_cron.py", "--n", "20000",
                                           "--repeat", "1"))],
            peers_quick=[("cron_next", peer(peers_dir, "bench_cron.py", "--n", "5000",
                                            "--repeat", "1"))],
            goals=goals_cron),
        Scenario(
            "burst",
            full=[("burst_sqlite", [*K, "burst", "--n", "100000", *sq]),
                  ("burst_memory", [*K, "burst", "--n", "100000"]),
                  ("burst_sqlite_asyncio", [*K, "burst", "--n", "100000", *sq, *aio]),
                  ("burst_memory_asyncio", [*K, "burst", "--n", "100000", *aio])],
            quick=[("burst_sqlite", [*K, "burst", "--n", "20000", *sq]),
                   ("burst_memory", [*K, "burst", "--n", "20000"])],
            peers_full=[("apscheduler_date_burst", peer(
                peers_dir, "bench_apscheduler.py", "--n", "100000", "--kind", "date", "--spread",
                "1", "--grace", "0", "--fire-seconds", "120", "--repeat", "1"))],
            peers_quick=[("apscheduler_date_burst", peer(
                peers_dir, "bench_apscheduler.py", "--n", "20000", "--kind", "date", "--spread",
                "1", "--grace", "0", "--fire-seconds", "60", "--repeat", "1"))],
            goals=goals_burst),
        Scenario(
            "herd",
            full=[("herd_sqlite", [*K, "herd", "--n", "100000", "--seconds", "60", *sq]),
                  ("herd_memory", [*K, "herd", "--n", "100000", "--seconds", "60"]),
                  ("herd_sqlite_asyncio", [*K, "herd", "--n", "100000", "--seconds", "60", *sq,
                                           *aio])],
            quick=[("herd_sqlite", [*K, "herd", "--n", "20000", "--seconds", "30", *sq]),
                   ("herd_memory", [*K, "herd", "--n", "20000", "--seconds", "30"])],
            peers_full=[("apscheduler_cron", peer(
                peers_dir, "bench_apscheduler.py", "--n", "100000", "--kind", "cron",
                "--fire-seconds", "30", "--repeat", "1"))],
            peers_quick=[("apscheduler_cron", peer(
                peers_dir, "bench_apscheduler.py", "--n", "10000", "--kind", "cron",
                "--fire-seconds", "15", "--repeat", "1"))],
            goals=goals_herd),
        Scenario(
            "steady",
            full=[("steady", [*K, "steady", "--n", "1000000", "--spread", "60"]),
                  ("steady_asyncio", [*K, "steady", "--n", "1000000", "--spread", "60", *aio])],
            quick=[("steady", [*K, "steady", "--n", "100000", "--spread", "10"])],
            peers_full=[("asyncio_realtime", peer(
                peers_dir, "bench_asyncio_timers.py", "--n", "1000000", "--mode", "realtime",
                "--spread", "60", "--loop", "asyncio", "--repeat", "1"))],
            peers_quick=[("asyncio_realtime", peer(
                peers_dir, "bench_asyncio_timers.py", "--n", "100000", "--mode", "realtime",
                "--spread", "10", "--loop", "asyncio", "--repeat", "1"))],
            goals=goals_steady),
        Scenario(
            "pending",
            full=[("pending_http_1M", [*K, "pending_http", "--n", "1000000", *sqlite_dir])],
            quick=[("pending_http_100k", [*K, "pending_http", "--n", "100000", *sqlite_dir])],
            peers_full=[("asyncio_burst", peer(peers_dir, "bench_asyncio_timers.py", "--n",
                                               "1000000", "--loop", "asyncio", "--repeat", "1"))],
            peers_quick=[("asyncio_burst", peer(peers_dir, "bench_asyncio_timers.py", "--n",
                                                "100000", "--loop", "asyncio", "--repeat", "1"))],
            goals=goals_pending),
        Scenario(
            "durable",
            full=[("durable_inprocess", [*K, "durable", "--n", "100000", *sqlite_dir]),
                  ("durable_http", [*K, "http", "--n", "20000", "--concurrency", "64",
                                    "--modes", "lone,single,batch", *sqlite_dir]),
                  ("durable_http_asyncio", [*K, "http", "--n", "20000", "--concurrency", "64",
                                            "--modes", "single,batch", *sqlite_dir, *aio])],
            quick=[("durable_inprocess", [*K, "durable", "--n", "20000", *sqlite_dir]),
                   ("durable_http", [*K, "http", "--n", "5000", "--concurrency", "64",
                                     "--modes", "lone,single,batch", *sqlite_dir])],
            peers_full=[("sqlite", peer(
                peers_dir, "bench_sqlite.py", "--n", "100000", "--variants",
                "aio_batch1000,sync_batch1000", "--sync", "NORMAL", "--max-seconds", "30",
                "--repeat", "1", "--dir", tmp))],
            peers_quick=[("sqlite", peer(
                peers_dir, "bench_sqlite.py", "--n", "20000", "--variants",
                "aio_batch1000,sync_batch1000", "--sync", "NORMAL", "--max-seconds", "10",
                "--repeat", "1", "--dir", tmp))],
            goals=goals_durable),
        Scenario(
            "recovery",
            full=[("recovery_100k", [*K, "recovery", "--n", "100000", *sqlite_dir]),
                  ("recovery_1M", [*K, "recovery", "--n", "1000000", *sqlite_dir])],
            quick=[("recovery_100k", [*K, "recovery", "--n", "100000", *sqlite_dir])],
            goals=goals_recovery),
        Scenario(
            "e2e",
            full=[("e2e_exec", [*K, "e2e", "--action", "exec", "--n", "3000", "--concurrency",
                                "32", *sqlite_dir]),
                  ("e2e_python", [*K, "e2e", "--action", "python", "--n", "30000",
                                  "--concurrency", "64", *sqlite_dir])],
            quick=[("e2e_exec", [*K, "e2e", "--action", "exec", "--n", "300", "--concurrency",
                                 "32", *sqlite_dir]),
                   ("e2e_python", [*K, "e2e", "--action", "python", "--n", "3000",
                                   "--concurrency", "64", *sqlite_dir])]),
        Scenario("growth", full=[], quick=[], goals=goals_growth),
    ]


# ============================================================================ running


def run_step(label: str, argv: list[str], timeout: float) -> dict[str, Any]:
    load = round(os.getloadavg()[0], 2)
    t0 = time.monotonic()
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": round(timeout, 1),
                "loadavg_1m": load}
    wall = round(time.monotonic() - t0, 1)
    lines = [ln for ln in cp.stdout.strip().splitlines() if ln.startswith("{")]
    if cp.returncode or not lines:
        tail = cp.stderr.strip().splitlines()[-3:]
        return {"error": f"exit status {cp.returncode}", "stderr": tail, "wall_s": wall,
                "loadavg_1m": load}
    out: dict[str, Any] = json.loads(lines[-1])
    out.update(wall_s=wall, loadavg_1m=load)
    return out


def environment() -> dict[str, Any]:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                   check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        import importlib.metadata

        uv = (f"{importlib.metadata.version('uvloop')}: the kernel scenarios run on it (as "
              "python -m kernel does); steps labelled _asyncio on asyncio's default loop")
    except importlib.metadata.PackageNotFoundError:
        uv = "not installed (the kernel scenarios cannot run their uvloop steps)"
    return {"bench": "environment", "nproc": os.cpu_count(), "cpu": model, "memory": mem,
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "uvloop": uv, "platform": platform.platform(), "loadavg": os.getloadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--peers", action="store_true", help="also run the peer benchmarks")
    p.add_argument("--peers-dir", type=Path, default=DEFAULT_PEERS)
    p.add_argument("--quick", action="store_true", help="reduced sizes (a smoke run)")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--out", type=Path, help="also append every line to this JSONL file")
    p.add_argument("--step-timeout", type=float, default=300.0)
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_")
    all_sc = scenarios(a.peers_dir, tmp)
    if a.list:
        for sc in all_sc:
            print(sc.name)
        return
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    unknown = only - {sc.name for sc in all_sc}
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sc.name for sc in all_sc)}")
    out_file = a.out.open("a") if a.out else None

    def emit(obj: dict[str, Any]) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if out_file is not None:
            out_file.write(line + "\n")
            out_file.flush()

    t_start = time.monotonic()
    emit({**environment(), "quick": a.quick, "peers": a.peers, "only": sorted(only) or "all",
          "command": " ".join(["scripts/bench.py", *sys.argv[1:]])})
    results: dict[str, dict[str, Any]] = {}
    summary: list[dict[str, Any]] = []
    for sc in all_sc:
        if only and sc.name not in only and not (sc.name == "growth" and not only):
            continue
        for label, argv in (sc.quick if a.quick else sc.full):
            res = run_step(label, argv, a.step_timeout)
            results[label] = res
            emit({"bench": "ours", **res, "scenario": sc.name, "step": label})
        if a.peers:
            for label, argv in (sc.peers_quick if a.quick else sc.peers_full):
                res = run_step(label, argv, a.step_timeout)
                results[f"peer:{label}"] = res
                emit({"bench": "peer", "peer_bench": res.pop("bench", None), **res,
                      "scenario": sc.name, "step": label})
        if sc.goals is not None:
            for g in sc.goals(results):
                if g["value"] is None:
                    continue
                g = {"bench": "goals", "scenario": sc.name, **g}
                summary.append(g)
                emit(g)
    emit({"bench": "summary", "quick": a.quick, "total_s": round(time.monotonic() - t_start, 1),
          "goals_met": sum(1 for g in summary if g["met"]),
          "goals_missed": [g["goal"] for g in summary if g["met"] is False]})
    if out_file is not None:
        out_file.close()


if __name__ == "__main__":
    main()
