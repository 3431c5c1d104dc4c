#!/usr/bin/env python3
"""Fleet cron chaos: every-second cron tasks on real kernels sharing one PostgreSQL database,
kernels SIGKILLed and restarted, then every occurrence checked in the database (issue 12's goal:
0 duplicate and 0 missed occurrences in a 10-minute run at 2k occurrences/s).

    .venv/bin/python scripts/cron_chaos.py [--minutes 10] [--tasks 2000] [--kernels 3]
        [--kill-every 45] [--seed 1] [--out docs/bench/cron_chaos.jsonl] [--dsn DSN] [--keep]

Without ``--dsn`` a throwaway durable cluster is started (``tests/pg_cluster.py``,
``PgCluster(durable=True)``: fsync, synchronous_commit and autovacuum on) on this machine; with
``--dsn`` a fresh schema is used in that database. One ``config.toml`` holds ``--tasks`` tasks,
each ``* * * * * *`` (six fields, seconds first: once a second), so the occurrence rate is
``--tasks`` per second. Each runs the ``log`` action at level ``debug`` with the kernel's log at
``warning`` (the kernel has no no-op builtin; ``log`` is the cheapest one: one filtered
``logging`` call in the kernel's loop, no process, no thread). Per task: ``overlap =
"allow_all"`` (an occurrence is never skipped because the previous one still runs: that would be
the overlap policy's choice, not a miss), ``misfire = "catch_up"`` with ``misfire_grace = "1h"``
and ``max_catch_up = 3600`` (a restarted kernel catches up every occurrence since the task's
stored ``last_scheduled_at``; they are all fired already unless the whole fleet was down).
``[fleet]``: ``heartbeat = "1s"``, ``ttl = "3s"``; ``[store] history_max_rows`` is raised above
every run the benchmark makes (the default 100k would prune the first runs of a long run and
the check would count them missed); ``[scheduler] max_concurrency = max(256, --tasks)`` (kernels
race to fire each instant and one of them usually wins the whole herd of that second, so it
may have to run all of it at once). Each kernel has its own data dir
(``KERNEL_DATA_DIR``) and API port (``/healthz`` tells when it is up).

The run:

1. ``--kernels`` ``python -m kernel run`` processes start; T0 = when all are healthy.
2. Every ``--kill-every`` seconds (x a uniform factor in [0.5, 1.5] from the seeded RNG) one
   live kernel, picked at random, is SIGKILLed at a useful moment: as soon as it has a run in
   flight (a ``jobs`` row in state ``running`` owned by its kernel id), polling every 10 ms for
   at most 5 s; failing that when it holds claimed jobs; failing that anyway. It is restarted
   after a random 1-10 s pause (so two kernels run meanwhile) and waited for until healthy.
   Every ``--progress`` seconds a line says occurrences fired per second, fire lag
   (``fired_at - instant``), overdue jobs and the load average: a growing lag means the fleet
   cannot keep up with the rate on this machine.
3. At T1 = T0 + ``--minutes``: the kernels keep running until no cron job scheduled in the
   checked window is left in ``jobs`` (at most ``--drain`` seconds), then get SIGTERM (orderly
   stop).
4. Checks, from the database, for every task and every whole-second instant in
   [T0 + 2 s, T1 - 5 s] (margins: a kernel's first instant depends on when it armed its tasks,
   and the last ones may still be firing when the kernels stop):

   * ``fired``: exactly one row per (task, instant) (the primary key forbids two; a missing one is
     *missed_unfired*);
   * per fired row, the runs of its job id: exactly one non-superseded ``succeeded`` run. None
     is *missed_unrun* (broken down by the outcomes seen); more than one is a duplicate. A
     succeeded run with attempt > 1 is the same job run again after a kill
     (*rerun_after_kill*, not a duplicate);
   * runs of the tasks whose job id is in no ``fired`` row, with a scheduled instant in the
     window: a second job for one occurrence, a duplicate.

   Also reported: occurrences fired per second over the window, fire lag (``fired_at -
   instant``, every occurrence), start lateness (``started_at - scheduled_at`` decoded from a
   sample of ~50k run bodies; first attempts, reruns apart), misfire records (a restarted
   kernel's catch-up: ``missed`` must stay 0), the kernels' log lines by level and the most
   frequent ones, the load average and the machine.

Output: one JSON line per event (setup, start, kill, restart, progress, drain, stopped, check,
kernel_log) on stdout and a final ``{"scenario": "cron_chaos", ...}`` summary line, also appended
to ``--out``. Exit status 1 when anything was missed or duplicated. The work dir (config, kernel
logs) is removed unless ``--keep`` or the run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kernelproc import free_port, wait_healthy  # noqa: E402

TASK_PREFIX = "chaos-"
START_MARGIN = 2.0   # seconds after T0 before the checked window opens
END_MARGIN = 5.0     # seconds before T1 where it closes
KILL_POLL = 0.01     # seconds between looks at the victim's jobs
KILL_WAIT = 5.0      # the most we wait for a useful moment to kill


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


async def one_row(con: Any, sql: str, *args: Any) -> asyncpg.Record:
    """``fetchrow`` of a query that always returns a row (an aggregate)."""
    row: asyncpg.Record | None = await con.fetchrow(sql, *args)
    assert row is not None, sql
    return row


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model}


def write_config(path: Path, dsn: str, schema: str, tasks: int, minutes: float) -> None:
    # run history is pruned beyond history_max_rows (100k by default): keep every run of the
    # whole run (and the drain) with room to spare, or the check would find runs "missing"
    keep_runs = max(100_000, int(tasks * (minutes * 60 + 600) * 2))
    head = f"""# written by scripts/cron_chaos.py
[kernel]
log_level = "warning"
log_format = "json"
shutdown_grace = "5s"
[store]
backend = "postgres"
dsn = "{dsn}"
schema = "{schema}"
history_max_rows = {keep_runs}
[fleet]
heartbeat = "1s"
ttl = "3s"
[scheduler]
max_concurrency = {max(256, tasks)}
queue_depth = 1000000
"""
    task = """
[[tasks]]
id = "{id}"
schedule = "* * * * * *"
action = "log"
payload = {{ message = "tick", level = "debug" }}
overlap = "allow_all"
misfire = "catch_up"
misfire_grace = "1h"
max_catch_up = 3600
"""
    path.write_text(head + "".join(task.format(id=task_id(i)) for i in range(tasks)))


def task_id(i: int) -> str:
    return f"{TASK_PREFIX}{i:05d}"


@dataclass
class Box:
    """One kernel slot of the fleet: successive processes, one data dir, one log."""

    k: int
    cfg: Path
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0

    def start(self) -> None:
        self.dir.mkdir(exist_ok=True)
        self.port = free_port()
        env = {**os.environ, "KERNEL_DATA_DIR": str(self.dir / "data"),
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        with (self.dir / "kernel.log").open("ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kernel", "run", "--config", str(self.cfg),
                 "--port", str(self.port)],
                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.starts += 1

    async def healthy(self, limit: float = 120.0) -> None:
        assert self.proc is not None
        await wait_healthy(f"http://127.0.0.1:{self.port}", self.proc, limit)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    async def stop(self, limit: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return await asyncio.to_thread(self.proc.wait, limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return await asyncio.to_thread(self.proc.wait)


@dataclass
class Chaos:
    boxes: list[Box]
    pool: asyncpg.Pool
    rng: random.Random
    kill_every: float
    t0: float
    end: float
    kills: list[dict[str, Any]] = field(default_factory=list)
    restart_s: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)

    def rel(self) -> float:
        return round(time.time() - self.t0, 3)

    async def victim_jobs(self, pid: int) -> tuple[list[str], int, int]:
        """The kernel ids of ``pid`` and the jobs they own: (ids, running, claimed)."""
        row = await one_row(self.pool,
            "SELECT array_agg(DISTINCT k.id), count(j.id) FILTER (WHERE j.state = 'running'), "
            "count(j.id) FROM kernels k LEFT JOIN jobs j ON j.owner = k.id WHERE k.pid = $1",
            pid)
        return list(row[0] or []), row[1], row[2]

    async def kill_one(self) -> None:
        live = [b for b in self.boxes if b.alive]
        if len(live) < 2:
            return
        box = self.rng.choice(live)
        assert box.proc is not None
        pid = box.proc.pid
        limit = time.monotonic() + KILL_WAIT
        condition = "none"
        ids: list[str] = []
        running = claimed = 0
        while True:
            ids, running, claimed = await self.victim_jobs(pid)
            now = time.monotonic()
            if running:
                condition = "running"
                break
            if now >= limit:
                condition = "claimed" if claimed else "none"
                break
            await asyncio.sleep(KILL_POLL)
        box.kill()
        ev = {"event": "kill", "t": self.rel(), "at": round(time.time(), 3), "kernel": box.k, "pid": pid,
              "kernel_id": ids[0] if len(ids) == 1 else ids, "condition": condition,
              "running": running, "claimed": claimed}
        self.kills.append(ev)
        emit(ev)
        pause = self.rng.uniform(1.0, 10.0)
        await asyncio.sleep(pause)
        t = time.monotonic()
        box.start()
        await box.healthy()
        took = time.monotonic() - t
        self.restart_s.append(took)
        emit({"event": "restart", "t": self.rel(), "kernel": box.k, "pause_s": round(pause, 2),
              "healthy_after_s": round(took, 2), "pid": box.proc.pid if box.proc else None})

    async def run(self) -> None:
        while True:
            at = time.time() + self.kill_every * self.rng.uniform(0.5, 1.5)
            if at >= self.end:
                return
            await asyncio.sleep(at - time.time())
            await self.kill_one()

    async def progress(self, every: float) -> None:
        last = time.time()
        while True:
            await asyncio.sleep(every)
            now = time.time()
            row = await one_row(self.pool,
                "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY fired_at - "
                "instant), max(fired_at - instant) FROM fired WHERE fired_at > $1 "
                "AND fired_at <= $2", last, now)
            won = await self.pool.fetch(
                "SELECT k.pid, count(*) FROM fired f LEFT JOIN kernels k ON k.id = f.owner "
                "WHERE f.fired_at > $1 AND f.fired_at <= $2 GROUP BY 1", last, now)
            slot = {b.proc.pid: f"k{b.k}" for b in self.boxes if b.proc is not None}
            share = {slot.get(r[0], "gone") if r[0] is not None else "gone": r[1] for r in won}
            overdue = await self.pool.fetchval(
                "SELECT count(*) FROM jobs WHERE due_at < $1", now - 2.0)
            load = os.getloadavg()[0]
            self.loads.append(load)
            emit({"event": "progress", "t": self.rel(),
                  "fired_per_s": round(row[0] / (now - last)),
                  "fire_lag_p50_ms": None if row[1] is None else round(row[1] * 1000, 1),
                  "fire_lag_max_ms": None if row[2] is None else round(row[2] * 1000, 1),
                  "won": dict(sorted(share.items())), "overdue_jobs": overdue,
                  "kernels_alive": sum(b.alive for b in self.boxes),
                  "load1": round(load, 2)})
            last = now


async def drain(pool: asyncpg.Pool, hi: float, limit: float) -> tuple[int, float]:
    """Wait until no cron job scheduled at or before ``hi`` is stored; (left, seconds)."""
    t = time.monotonic()
    while True:
        left = await pool.fetchval(
            "SELECT count(*) FROM jobs WHERE kind = 'cron' AND scheduled_at <= $1", hi)
        if not left or time.monotonic() - t >= limit:
            return left, time.monotonic() - t
        await asyncio.sleep(0.2)


async def check(con: Any, tasks: int, lo: int, hi: int) -> dict[str, Any]:
    """Every (task, whole-second instant in [lo, hi]): one fired row, one succeeded run."""
    from kernel.store import schema

    await con.execute("SET work_mem = '256MB'")
    ids = [task_id(i) for i in range(tasks)]
    like = TASK_PREFIX + "%"
    n_sec = hi - lo + 1
    expected = tasks * n_sec
    fired, odd = await one_row(con,
        "SELECT count(*) FILTER (WHERE instant = floor(instant)), "
        "count(*) FILTER (WHERE instant <> floor(instant)) FROM fired "
        "WHERE task_id LIKE $1 AND instant >= $2 AND instant <= $3", like, lo, hi)
    unfired = await con.fetch(
        "SELECT t.task_id, s.instant FROM unnest($1::text[]) AS t(task_id) "
        "CROSS JOIN generate_series($2::int8, $3::int8) AS s(instant) "
        "WHERE NOT EXISTS (SELECT 1 FROM fired f WHERE f.task_id = t.task_id "
        "AND f.instant = s.instant::float8) ORDER BY 2, 1", ids, lo, hi)
    per = await one_row(con,
        "WITH f AS (SELECT job_id FROM fired WHERE task_id LIKE $1 AND instant >= $2 "
        "AND instant <= $3), "
        "r AS (SELECT f.job_id, "
        "count(r.seq) FILTER (WHERE r.outcome = 'succeeded' AND NOT r.superseded) AS ok, "
        "count(r.seq) FILTER (WHERE r.superseded) AS sup, "
        "max(r.attempt) FILTER (WHERE r.outcome = 'succeeded' AND NOT r.superseded) AS att "
        "FROM f LEFT JOIN runs r ON r.job_id = f.job_id GROUP BY f.job_id) "
        "SELECT count(*) FILTER (WHERE ok = 0), count(*) FILTER (WHERE ok > 1), "
        "count(*) FILTER (WHERE att > 1), coalesce(sum(sup), 0)::int8, count(*) FROM r",
        like, lo, hi)
    unrun, dup_runs, rerun, superseded, fired_jobs = per
    rerun_at = {int(r[0]): r[1] for r in await con.fetch(
        "SELECT f.instant, count(DISTINCT f.job_id) FROM fired f JOIN runs r "
        "ON r.job_id = f.job_id AND r.outcome = 'succeeded' AND NOT r.superseded "
        "AND r.attempt > 1 WHERE f.task_id LIKE $1 AND f.instant >= $2 AND f.instant <= $3 "
        "GROUP BY 1 ORDER BY 1", like, lo, hi)}
    unrun_outcomes = {r[0] or "no run": r[1] for r in await con.fetch(
        "WITH f AS (SELECT job_id FROM fired WHERE task_id LIKE $1 AND instant >= $2 "
        "AND instant <= $3), bad AS (SELECT f.job_id FROM f LEFT JOIN runs r "
        "ON r.job_id = f.job_id AND r.outcome = 'succeeded' AND NOT r.superseded "
        "WHERE r.seq IS NULL) "
        "SELECT r.outcome, count(*) FROM bad LEFT JOIN runs r ON r.job_id = bad.job_id "
        "GROUP BY 1", like, lo, hi)}
    still_stored = await con.fetchval(
        "SELECT count(*) FROM jobs WHERE kind = 'cron' AND task_id LIKE $1 "
        "AND scheduled_at >= $2 AND scheduled_at <= $3", like, lo, hi)
    # runs whose job id no fired row names: a second job for an occurrence, if in the window
    orphans = [schema.decode_run(r[0]) for r in await con.fetch(
        "SELECT r.body FROM runs r WHERE r.task_id LIKE $1 AND NOT EXISTS "
        "(SELECT 1 FROM fired f WHERE f.job_id = r.job_id)", like)]
    orphan_dups = [o for o in orphans if o.scheduled_at is not None and lo <= o.scheduled_at <= hi
                   and o.outcome.value == "succeeded"]
    # lateness: fire (fired_at - instant) over all, run start from a sample of the run bodies
    fire_lag = await one_row(con,
        "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY fired_at - instant), "
        "max(fired_at - instant) FROM fired WHERE task_id LIKE $1 AND instant >= $2 "
        "AND instant <= $3", like, lo, hi)
    step = max(1, expected // 50_000)
    sample = [schema.decode_run(r[0]) for r in await con.fetch(
        "SELECT r.body FROM fired f JOIN runs r ON r.job_id = f.job_id WHERE f.task_id LIKE $1 "
        "AND f.instant >= $2 AND f.instant <= $3 AND r.outcome = 'succeeded' "
        "AND NOT r.superseded AND r.seq % $4 = 0", like, lo, hi, step)]
    late = [r.started_at - r.scheduled_at for r in sample
            if r.started_at is not None and r.scheduled_at is not None and r.attempt == 1]
    late_rerun = [r.started_at - r.scheduled_at for r in sample
                  if r.started_at is not None and r.scheduled_at is not None and r.attempt > 1]
    misfire_rows = [schema.decode_misfire(r[0]) for r in await con.fetch(
        "SELECT body FROM misfires WHERE task_id LIKE $1", like)]
    missed_unfired = len(unfired)
    duplicates = dup_runs + len(orphan_dups)

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 1)

    return {
        "window": [lo, hi], "seconds": n_sec, "occurrences_expected": expected,
        "fired": fired, "fired_off_second": odd, "missed_unfired": missed_unfired,
        "missed_unfired_first": [[r[0], r[1]] for r in unfired[:10]],
        "missed_unrun": unrun, "missed_unrun_outcomes": unrun_outcomes,
        "still_stored": still_stored, "missed": missed_unfired + unrun,
        "duplicate_runs": dup_runs, "duplicate_jobs": len(orphan_dups),
        "duplicates": duplicates, "rerun_after_kill": rerun,
        "rerun_by_instant": rerun_at, "superseded_runs": superseded,
        "orphan_runs_outside_window": len(orphans) - len(orphan_dups),
        "fired_jobs": fired_jobs,
        "misfire_records": len(misfire_rows),
        "misfire_missed": sum(m.missed for m in misfire_rows),
        "misfire_caught_up": sum(m.ran for m in misfire_rows),
        "fire_lag_ms": {"p50": ms(fire_lag[0][0]) if fire_lag[0] else None,
                        "p99": ms(fire_lag[0][1]) if fire_lag[0] else None,
                        "max": ms(fire_lag[1])},
        "start_lateness_ms": {"sample": len(late), "p50": ms(pct(late, 0.5)),
                              "p99": ms(pct(late, 0.99)), "max": ms(max(late, default=None))},
        "rerun_start_lateness_ms": {"sample": len(late_rerun), "p50": ms(pct(late_rerun, 0.5)),
                                    "max": ms(max(late_rerun, default=None))},
    }


def kernel_logs(boxes: list[Box]) -> dict[str, Any]:
    """What the kernels logged (JSON lines, warning and above): lines per level, the most
    frequent messages (digits folded, so one line stands for many), errors with their time."""
    levels: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    errors: list[str] = []
    for b in boxes:
        path = b.dir / "kernel.log"
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                level = str(rec.get("level", "?")).lower()
                msg = str(rec.get("message", rec.get("msg", line)))
                ts = str(rec.get("ts", ""))
            except (ValueError, AttributeError):
                level, msg, ts = "text", line, ""
            levels[level] += 1
            kinds[f"{level}: {re.sub(r'[0-9]+', '#', msg)[:160]}"] += 1
            if level in {"error", "critical", "text"} and len(errors) < 20:
                errors.append(f"{ts} k{b.k}: {msg[:300]}")
    return {"levels": dict(levels), "top": dict(kinds.most_common(8)), "errors": errors}


async def main_async(a: argparse.Namespace, dsn: str) -> dict[str, Any]:
    from tests.pg_cluster import fresh_schema

    schema = fresh_schema("cronchaos")
    work = Path(tempfile.mkdtemp(prefix="cron-chaos-"))
    cfg = work / "config.toml"
    write_config(cfg, dsn, schema, a.tasks, a.minutes)
    emit({"event": "setup", "work_dir": str(work), "schema": schema, "tasks": a.tasks,
          "kernels": a.kernels, "minutes": a.minutes, "kill_every": a.kill_every,
          "seed": a.seed, **machine()})
    boxes = [Box(k, cfg, work / f"k{k}") for k in range(a.kernels)]
    pool: asyncpg.Pool | None = None
    ok = False
    try:
        t = time.monotonic()
        for b in boxes:
            b.start()
        for b in boxes:
            await b.healthy()
        t0 = time.time()
        emit({"event": "start", "kernels_up_s": round(time.monotonic() - t, 2)})
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4,
                                         server_settings={"search_path": schema})
        assert pool is not None
        t1 = t0 + a.minutes * 60
        chaos = Chaos(boxes, pool, random.Random(a.seed), a.kill_every, t0, t1)
        async with asyncio.TaskGroup() as tg:
            prog = tg.create_task(chaos.progress(a.progress))
            await chaos.run()
            await asyncio.sleep(max(0.0, t1 - time.time()))
            lo, hi = math.ceil(t0 + START_MARGIN), math.floor(t1 - END_MARGIN)
            left, took = await drain(pool, hi, a.drain)
            emit({"event": "drain", "t": chaos.rel(), "left": left, "seconds": round(took, 2)})
            prog.cancel()
        codes = await asyncio.gather(*(b.stop() for b in boxes))
        emit({"event": "stopped", "t": chaos.rel(), "exit_codes": codes})
        async with pool.acquire() as con:
            result = await check(con, a.tasks, lo, hi)
        emit({"event": "check", **result})
        conditions = Counter(k["condition"] for k in chaos.kills)
        summary = {
            "scenario": "cron_chaos", "minutes": a.minutes, "tasks": a.tasks,
            "kernels": a.kernels, "kill_every": a.kill_every, "seed": a.seed,
            "occurrences_expected": result["occurrences_expected"], "fired": result["fired"],
            "missed": result["missed"], "duplicates": result["duplicates"],
            "rerun_after_kill": result["rerun_after_kill"], "kills": len(chaos.kills),
            "kill_conditions": dict(conditions),
            "restart_healthy_s_max": round(max(chaos.restart_s, default=0.0), 2),
            "occurrences_per_s": round(result["fired"] / result["seconds"], 1),
            "fire_lag_ms": result["fire_lag_ms"],
            "start_lateness_ms": result["start_lateness_ms"],
            "rerun_start_lateness_ms": result["rerun_start_lateness_ms"],
            "superseded_runs": result["superseded_runs"],
            "misfire_missed": result["misfire_missed"],
            "load_avg": [round(x, 2) for x in os.getloadavg()],
            "load1_max": round(max(chaos.loads, default=os.getloadavg()[0]), 2),
            **machine(), "ok": result["missed"] == 0 and result["duplicates"] == 0,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        logs = kernel_logs(boxes)
        summary["kernel_log_lines"] = logs["levels"]
        emit({"event": "kernel_log", **logs})
        emit(summary)
        ok = bool(summary["ok"])
        return summary
    finally:
        for b in boxes:
            if b.alive:
                b.kill()
        if pool is not None:
            await pool.close()
        if ok and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            emit({"event": "kept", "work_dir": str(work)})


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the run (T1 - T0)")
    ap.add_argument("--tasks", type=int, default=2000,
                    help="every-second cron tasks (= occurrences per second)")
    ap.add_argument("--kernels", type=int, default=3, help="kernel processes")
    ap.add_argument("--kill-every", type=float, default=45.0,
                    help="mean seconds between kills (x uniform 0.5-1.5)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the kill schedule")
    ap.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines")
    ap.add_argument("--drain", type=float, default=120.0,
                    help="the most seconds to wait at the end for the window's jobs to run")
    ap.add_argument("--out", default="docs/bench/cron_chaos.jsonl",
                    help="file the summary line is appended to")
    ap.add_argument("--dsn", help="an existing database (default: a throwaway durable cluster)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (config, logs)")
    a = ap.parse_args()
    if a.kernels < 2:
        ap.error("--kernels: at least 2 (one is killed at a time, the others go on)")
    if a.tasks < 1 or a.minutes <= 0:
        ap.error("--tasks and --minutes must be positive")
    from tests.pg_cluster import durable_dsn

    with durable_dsn(a.dsn) as dsn:
        summary = asyncio.run(main_async(a, dsn))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(summary) + "\n")
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
