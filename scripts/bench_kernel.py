#!/usr/bin/env python3
"""Kernel-path benchmark scenarios, one per process: ``bench_kernel.py SCENARIO [options]``.

Run by ``scripts/bench.py`` (which explains every scenario and compares with the peers); each
call prints one JSON line. The kernel runs in-process, built by ``kernel.main.build`` with the
real clock (``SystemClock``) and a plugin registering the no-op action ``noop``, which records
its lateness: the wall clock when the action starts minus the job's due instant
(``ctx.scheduled_at``: the due instant of a one-shot job, the occurrence of a cron job).

Settings common to every scenario (``bench_config``): ``max_concurrency = 1000`` and
``queue_depth = 1_000_000`` (the defaults, 8 and 1024, are for real work, not for no-ops),
the HTTP server off unless the scenario is about it, logging not configured (Python's default
level WARNING, so the per-run INFO lines of ``kernel.logs.EventLogger`` are built but not
written). Stores: ``MemoryStore``, or ``SqliteStore`` on a fresh file in a temporary
directory (``--dir``), ``synchronous=NORMAL`` (the default).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import inspect
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from kernel.app import Kernel, KernelParts, SubmitRequest  # noqa: E402
from kernel.clock import SystemClock  # noqa: E402
from kernel.config import Config, TaskConfig  # noqa: E402
from kernel.hookspecs import Action, PluginContext, RunContext, hookimpl  # noqa: E402
from kernel.main import build  # noqa: E402
from kernel.plugins import load as load_plugins  # noqa: E402
from kernel.records import RunQuery  # noqa: E402
from kernel.store.base import Store  # noqa: E402
from kernel.store.memory import MemoryStore  # noqa: E402
from kernel.store.sqlite import SqliteStore  # noqa: E402

MAX_CONCURRENCY = 1000
QUEUE_DEPTH = 1_000_000


# ============================================================================ helpers


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir())


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pct(vals: list[float], p: float) -> float | None:
    if not vals:
        return None
    return vals[min(len(vals) - 1, int(p / 100 * len(vals)))]


def lateness(vals: array[float] | list[float]) -> dict[str, Any]:
    s = sorted(vals)
    ms = {k: (None if v is None else round(v * 1e3, 3)) for k, v in (
        ("p50_ms", pct(s, 50)), ("p90_ms", pct(s, 90)), ("p99_ms", pct(s, 99)),
        ("max_ms", s[-1] if s else None), ("min_ms", s[0] if s else None))}
    return ms


class Watch:
    """While a window is measured: garbage-collector pauses per generation, involuntary context
    switches (the process was preempted: other work on the machine) and CPU seconds."""

    def __init__(self) -> None:
        self.gc: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t = 0.0

    def _cb(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.gc[info["generation"]].append(time.perf_counter() - self._t)

    def __enter__(self) -> Watch:
        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self._w = time.perf_counter()
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.wall = time.perf_counter() - self._w
        self.cpu = (ru.ru_utime - self._ru.ru_utime) + (ru.ru_stime - self._ru.ru_stime)
        self.preempted = ru.ru_nivcsw - self._ru.ru_nivcsw

    def result(self) -> dict[str, Any]:
        return {"gc_pauses": {f"gen{g}": {"n": len(v), "total_ms": round(sum(v) * 1e3, 1),
                                          "max_ms": round(max(v) * 1e3, 2) if v else 0.0}
                              for g, v in self.gc.items()},
                "involuntary_context_switches": self.preempted,
                "loadavg_1m": round(os.getloadavg()[0], 2)}


class Probe:
    """The ``noop`` action: records when it ran relative to the instant it was due."""

    def __init__(self) -> None:
        self.late = array("d")
        self.sched = array("d")  # scheduled_at of each run (for the cron herd)
        self.target = 0
        self.done = asyncio.Event()
        self.last = 0.0  # wall clock of the latest run

    async def run(self, ctx: RunContext, payload: Any) -> None:
        now = time.time()
        at = ctx.scheduled_at or now
        self.late.append(now - at)
        self.sched.append(at)
        self.last = now
        if self.target and len(self.late) >= self.target:
            self.done.set()

    @hookimpl
    def register_actions(self, context: PluginContext) -> list[Action]:
        return [Action("noop", self.run, "benchmark no-op: records its lateness")]


def bench_config(*, tasks: list[TaskConfig] | None = None, max_concurrency: int = MAX_CONCURRENCY,
                 server: bool = False) -> Config:
    cfg = Config()
    cfg.server.enabled = server
    cfg.server.port = 0
    cfg.scheduler.max_concurrency = max_concurrency
    cfg.scheduler.queue_depth = QUEUE_DEPTH
    cfg.tasks = tasks or []
    return cfg


def make_store(kind: str, workdir: Path) -> Store:
    if kind == "memory":
        return MemoryStore()
    return SqliteStore(workdir / "kernel.sqlite3")


GC_POLICY = True  # --no-gc-policy: leave the collector as Python sets it


class Running:
    """A kernel task started with ``run(started=...)``; ``stop()`` shuts it down in order.

    Once started, the collector is tuned as ``kernel.main.serve`` tunes it for ``python -m
    kernel`` (``kernel.gcpolicy.tune_gc``: a higher first threshold, and the start-up heap frozen
    when it is large), and restored at ``stop()``: the kernel as a library leaves the process's
    collector alone, the process owner tunes it."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.task: asyncio.Task[None] | None = None
        self.start_s = 0.0
        self._gc_saved: Any = None

    async def start(self) -> None:
        started = asyncio.Event()
        t0 = time.perf_counter()
        self.task = asyncio.create_task(self.kernel.run(started=started))
        waiter = asyncio.create_task(started.wait())
        done, _ = await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            waiter.cancel()
            self.task.result()
        self.start_s = time.perf_counter() - t0
        if GC_POLICY:
            try:
                from kernel.gcpolicy import tune_gc
            except ImportError:  # an older tree: the kernel tuned the collector itself
                return
            self._gc_saved = tune_gc(len(self.kernel.timers))

    async def stop(self) -> None:
        self.kernel.stop("benchmark over")
        assert self.task is not None
        await self.task
        if self._gc_saved is not None:
            from kernel.gcpolicy import restore_gc

            restore_gc(*self._gc_saved)
            self._gc_saved = None


def kernel_with(cfg: Config, store: Store, probe: Probe,
                services: list[Callable[[Kernel], Awaitable[None]]] | None = None) -> Kernel:
    plugins = load_plugins(PluginContext(), extra=[("bench", probe)], use_entry_points=False)
    return build(cfg, clock=SystemClock(), store=store, plugins=plugins,
                 parts=KernelParts(services=list(services or [])))  # type: ignore[arg-type]


async def submit_all(kernel: Kernel, dues: list[float], batch: int = 10_000) -> float:
    """Submit one ``noop`` job per due instant with ``submit_many``; returns the seconds taken."""
    t0 = time.perf_counter()
    for i in range(0, len(dues), batch):
        await kernel.submit_many([SubmitRequest(action="noop", at=d) for d in dues[i:i + batch]])
    return time.perf_counter() - t0


# ============================================================================ scenarios


async def kernel_hold(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """N one-shot jobs held by the kernel (due in an hour): bytes per job, submit rate."""
    probe = Probe()
    k = kernel_with(bench_config(), make_store(a.store, workdir), probe)
    r = Running(k)
    await r.start()
    rng = random.Random(a.seed)
    base = time.time() + 3600
    dues = [base + rng.random() * 60 for _ in range(a.n)]
    gc.collect()
    r0 = rss()
    c0 = cpu_s()
    el = await submit_all(k, dues)
    cpu = cpu_s() - c0
    del dues
    gc.collect()
    grown = rss() - r0
    snap = k.snapshot()
    out = {"n": a.n, "store": a.store, "submit_s": round(el, 3), "submit_per_s": round(a.n / el),
           "submit_per_cpu_s": round(a.n / cpu), "bytes_per_job": round(grown / a.n, 1),
           "timers": snap.timers, "pending_jobs": snap.pending_jobs}
    await r.stop()
    return out


async def burst(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """N one-shot jobs due within the same second (uniform over 1 s), submitted beforehand."""
    probe = Probe()
    probe.target = a.n
    k = kernel_with(bench_config(), make_store(a.store, workdir), probe)
    r = Running(k)
    await r.start()
    rng = random.Random(a.seed)
    lead = a.lead or (5.0 + a.n / (8_000 if a.store == "sqlite" else 20_000))
    due0 = time.time() + lead
    dues = [due0 + rng.random() * a.spread for _ in range(a.n)]
    last_due = max(dues)
    all_done = asyncio.Event()
    finished_at: list[float] = []

    def on_event(_ev: object) -> None:
        if not all_done.is_set() and k.counters.succeeded >= a.n:
            finished_at.append(time.time())
            all_done.set()

    k.bus.subscribe(on_event)
    sub_s = await submit_all(k, dues)
    overran = time.time() > due0
    await asyncio.sleep(max(0.0, due0 - time.time()))
    c0 = cpu_s()
    w0 = time.time()
    with Watch() as watch:
        try:
            await asyncio.wait_for(probe.done.wait(), timeout=a.max_seconds)
        except TimeoutError:
            pass
        w1 = time.time()
        # "done" = the run's outcome committed (store.finish returned, RunSucceeded published)
        try:
            await asyncio.wait_for(all_done.wait(), timeout=30)
        except TimeoutError:
            pass
        w2 = finished_at[0] if finished_at else time.time()
    cpu = cpu_s() - c0
    ran = len(probe.late)
    out = {"n": a.n, "store": a.store, "spread_s": a.spread, "submit_s": round(sub_s, 2),
           "submit_overran_due": overran, "ran": ran,
           "all_started_after_first_due_s": round(w1 - due0, 3) if ran == a.n else None,
           "last_started_after_last_due_s": (round(probe.last - last_due, 3) if ran == a.n
                                             else None),
           "last_done_after_last_due_s": (round(w2 - last_due, 3)
                                          if k.counters.succeeded >= a.n else None),
           "runs_per_s": round(ran / max(1e-9, w1 - w0)), "cpu_s": round(cpu, 2),
           "cpu_us_per_run": round(cpu / max(ran, 1) * 1e6, 1),
           "lateness": lateness(probe.late), **watch.result()}
    if a.store == "sqlite":
        st: Any = k.store
        out["store_batches"] = st.batches
        out["mean_ops_per_commit"] = round(st.batched_ops / max(st.batches, 1), 1)
    await r.stop()
    return out


async def herd(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """N cron tasks ``*/5 * * * * *`` (all due on the same instants) for ``--seconds``."""
    t0 = time.perf_counter()
    tasks = [TaskConfig(id=f"t{i}", action="noop", schedule=a.schedule) for i in range(a.n)]
    cfg_s = time.perf_counter() - t0
    probe = Probe()
    k = kernel_with(bench_config(tasks=tasks), make_store(a.store, workdir), probe)
    del tasks
    r = Running(k)
    await r.start()
    period = a.period
    first = (int(time.time()) // period + 2) * period  # at least one period to settle
    instants = [first + i * period for i in range(max(1, int(a.seconds // period)))]
    end = instants[-1]
    await asyncio.sleep(max(0.0, first - time.time() - 0.2))
    mark = len(probe.late)
    c0 = cpu_s()
    w0 = time.time()
    # wait for the last instant's runs (or give up period s after it: then they count missed)
    with Watch() as watch:
        while time.time() < end + period:
            await asyncio.sleep(0.1)
            if time.time() > end and sum(1 for s in probe.sched[-a.n:] if s == end) >= a.n:
                break
    w1 = time.time()
    cpu = cpu_s() - c0
    late = probe.late[mark:]
    scheds = probe.sched[mark:]
    want = set(instants)
    per = Counter(s for s in scheds if s in want)
    ran = sum(per.values())
    expected = a.n * len(instants)
    lat = [late[i] for i in range(len(late)) if scheds[i] in want]
    c = k.counters
    out = {"n_tasks": a.n, "schedule": a.schedule, "store": a.store, "instants": len(instants),
           "due_runs_per_s": round(a.n / period), "expected_runs": expected, "ran": ran,
           "missed": expected - ran, "skipped_overlap": c.skipped, "misfired": c.misfired,
           "ran_per_instant_min": min(per.values()) if per else 0,
           "sustained_runs_per_s": round(ran / max(1e-9, w1 - w0)),
           "window_s": round(w1 - w0, 1), "cpu_s": round(cpu, 1),
           "cpu_share_of_one_core": round(cpu / max(1e-9, w1 - w0), 2),
           "cpu_us_per_run": round(cpu / max(ran, 1) * 1e6, 1),
           "configs_s": round(cfg_s, 2), "install_s": round(r.start_s, 2),
           "lateness": lateness(lat), **watch.result()}
    await r.stop()
    return out


async def steady(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """N one-shot jobs due uniformly over ``--spread`` s, all submitted before the window."""
    probe = Probe()
    probe.target = a.n
    k = kernel_with(bench_config(), make_store(a.store, workdir), probe)
    r = Running(k)
    await r.start()
    rng = random.Random(a.seed)
    lead = a.lead or (8.0 + a.n / 40_000)
    base = time.time() + lead
    dues = sorted(base + rng.random() * a.spread for _ in range(a.n))
    sub_s = await submit_all(k, dues)
    overran = time.time() > base
    del dues
    await asyncio.sleep(max(0.0, base - time.time()))
    c0 = cpu_s()
    w0 = time.time()
    with Watch() as watch:
        try:
            await asyncio.wait_for(probe.done.wait(), timeout=a.spread + a.max_seconds)
        except TimeoutError:
            pass
    w1 = time.time()
    cpu = cpu_s() - c0
    ran = len(probe.late)
    out = {"n": a.n, "store": a.store, "spread_s": a.spread,
           "due_rate_per_s": round(a.n / a.spread), "submit_s": round(sub_s, 1),
           "submit_overran_window": overran, "ran": ran,
           "kept_up": ran == a.n and (w1 - base) < a.spread + 1.0,
           "window_s": round(w1 - w0, 1), "cpu_s": round(cpu, 1),
           "cpu_share_of_one_core": round(cpu / max(1e-9, w1 - w0), 2),
           "gc_thresholds_while_running": list(gc.get_threshold()),
           "lateness": lateness(probe.late), **watch.result()}
    await r.stop()
    return out


async def durable(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """In-process ``kernel.submit`` from ``--concurrency`` coroutines on SqliteStore."""
    probe = Probe()
    k = kernel_with(bench_config(), SqliteStore(workdir / "kernel.sqlite3"), probe)
    r = Running(k)
    await r.start()
    left = a.n
    lat: list[float] = []
    clock = time.perf_counter

    async def submitter() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = clock()
            await k.submit(SubmitRequest(action="noop", delay=3600.0))
            lat.append(clock() - t)

    c0 = cpu_s()
    t0 = clock()
    await asyncio.gather(*(submitter() for _ in range(a.concurrency)))
    el = clock() - t0
    cpu = cpu_s() - c0
    st: Any = k.store
    lat.sort()
    out = {"n": len(lat), "concurrency": a.concurrency, "acked_per_s": round(len(lat) / el),
           "seconds": round(el, 2), "cpu_s": round(cpu, 2),
           "latency_ms": {"p50": round((pct(lat, 50) or 0) * 1e3, 2),
                          "p99": round((pct(lat, 99) or 0) * 1e3, 2),
                          "max": round(lat[-1] * 1e3, 2)},
           "store_batches": st.batches,
           "mean_ops_per_commit": round(st.batched_ops / max(st.batches, 1), 1)}
    await r.stop()
    return out


async def start_http_kernel(workdir: Path) -> tuple[Kernel, Running]:
    from kernel.api.server import api_service

    probe = Probe()
    svc = functools.partial(api_service, require_token=False)
    k = kernel_with(bench_config(server=True), SqliteStore(workdir / "kernel.sqlite3"), probe,
                    services=[svc])
    r = Running(k)
    await r.start()
    for _ in range(200):
        if k.api_url:
            break
        await asyncio.sleep(0.05)
    return k, r


async def run_client(url: str, mode: str, n: int, conc: int, batch: int,
                     client: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "http_client", "--url", url, "--mode", mode,
        "--n", str(n), "--concurrency", str(conc), "--batch", str(batch),
        "--client", client, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await proc.communicate()
    res: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return res


async def http(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The HTTP API on loopback (SqliteStore); a separate client process posts jobs.

    ``single``: ``POST /jobs``, one job per request, from ``--concurrency`` connections;
    ``batch``: ``POST /jobs/batch`` with ``--batch`` jobs per request from 4 connections;
    ``lone``: ``POST /jobs`` from one connection (the latency of a request on an idle kernel).
    ``--client lean`` (default) is a minimal keep-alive HTTP/1.1 client on asyncio streams
    (pre-encoded requests), so that the client process takes little of the machine's cores;
    ``aiohttp`` is the aiohttp client. After the kernel stops, ``raw_sqlite`` inserts as many
    job rows as the batch mode acknowledged, in the store's own schema and row format, with
    plain ``sqlite3`` ``executemany`` (1000 rows per transaction, WAL, NORMAL): the anchor of
    the batch figure, measured in the same process run."""
    k, r = await start_http_kernel(workdir)
    out: dict[str, Any] = {"url": k.api_url, "client": a.client}
    plan = {"single": (a.n, a.concurrency), "batch": (a.n * 10, 4), "lone": (min(a.n, 3000), 1)}
    for mode in [m for m in a.modes.split(",") if m]:
        n, conc = plan[mode]
        c0 = cpu_s()
        t0 = time.perf_counter()
        res = await run_client(str(k.api_url), "batch" if mode == "batch" else "single", n,
                               conc, a.batch, a.client)
        el = time.perf_counter() - t0
        res["kernel_cpu_s"] = round(cpu_s() - c0, 2)
        res["kernel_cpu_share_of_one_core"] = round((cpu_s() - c0) / el, 2)
        res["kernel_cpu_us_per_job"] = round((cpu_s() - c0) / max(res["acked"], 1) * 1e6, 1)
        out[mode] = res
    await r.stop()
    if "batch" in out:
        out["raw_sqlite"] = raw_sqlite(workdir / "raw.sqlite3", max(out["batch"]["acked"], 1000),
                                       a.seed)
        out["batch_over_raw_sqlite"] = round(
            out["batch"]["acked_per_s"] / out["raw_sqlite"]["rows_per_s"], 3)
    return out


def raw_sqlite(path: Path, n: int, seed: int) -> dict[str, Any]:
    """``n`` job rows in the store's schema and format, inserted with plain ``sqlite3``
    ``executemany``, 1000 rows per transaction (WAL, synchronous=NORMAL): what the same rows
    cost without the kernel, its HTTP API and its group commit. Rows are built before timing."""
    import sqlite3

    import bench_store
    import msgspec  # scripts/bench_store.py: jobs like the kernel's, in its row format

    from kernel.store import schema

    con = sqlite3.connect(path, isolation_level=None)
    con.close()
    # the jobs the HTTP client posts carry no payload; bench_store's carry 200 characters
    rows = [schema.job_row(msgspec.structs.replace(j, payload={}, action="noop"))
            for j in bench_store.make_jobs(n, seed, ids="kernel")]
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    for _v, statements in schema.migration_plan(str(path), 0):
        for sql in statements:
            con.execute(sql)
    insert = (f"INSERT INTO jobs ({', '.join(schema.JOB_COLUMNS)}) "
              f"VALUES ({', '.join('?' * len(schema.JOB_COLUMNS))})")
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        con.execute("BEGIN")
        con.executemany(insert, rows[i:i + 1000])
        con.execute("COMMIT")
    el = time.perf_counter() - t0
    con.close()
    return {"n": n, "rows_per_s": round(n / el), "seconds": round(el, 2),
            "how": "sqlite3 executemany, 1000 rows/txn, WAL, NORMAL, the store's schema"}


async def pending_http(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Kernel RSS per pending one-shot job: N jobs an hour ahead posted to ``POST /jobs/batch``
    (1000 per request) by a client process, on the SQLite store, as a user would submit them.

    Also what the same jobs would cost held as ``Job`` objects (the timers held a ``Job`` per
    pending job before they held its msgpack ``bytes``): every held body is decoded into a list
    of ``Job`` and the RSS growth measured; that replaces the ``bytes`` object."""
    k, r = await start_http_kernel(workdir)
    gc.collect()
    r0 = rss()
    res = await run_client(str(k.api_url), "batch", a.n, 4, a.batch, a.client)
    gc.collect()
    grown = rss() - r0
    timers: Any = k.timers
    pending: dict[str, Any] = timers._pending
    held = max(len(pending), 1)
    mean_body = sum(sys.getsizeof(v) for v in pending.values()) / held
    out: dict[str, Any] = {"n": a.n, "acked": res["acked"], "acked_per_s": res["acked_per_s"],
                           "pending_jobs": len(pending),
                           "bytes_per_job": round(grown / held, 1),
                           "held_bytes_object": round(mean_body, 1)}
    from kernel import timers as timers_mod

    unpack: Any = getattr(timers_mod, "unpack", None)
    if unpack is None:  # an older tree: (handle, map-encoded body) tuples
        import msgspec

        from kernel.records import Job

        dec = msgspec.msgpack.Decoder(Job).decode
        unpack = lambda v: dec(v[1])  # noqa: E731
    gc.collect()
    r1 = rss()
    as_jobs = [unpack(v) for v in pending.values()]
    gc.collect()
    job_bytes = (rss() - r1) / max(len(as_jobs), 1)
    out["job_object_bytes"] = round(job_bytes, 1)
    out["bytes_per_job_if_held_as_job"] = round(out["bytes_per_job"] - mean_body + job_bytes, 1)
    del as_jobs
    await r.stop()
    return out


async def http_client(a: argparse.Namespace) -> dict[str, Any]:
    if a.client == "lean":
        return await lean_client(a)
    return await http_client_aiohttp(a)


async def lean_client(a: argparse.Namespace) -> dict[str, Any]:
    """Keep-alive HTTP/1.1 over asyncio streams, one request in flight per connection, each
    request pre-encoded: a client that costs little CPU, so the kernel is what is measured."""
    from urllib.parse import urlsplit

    u = urlsplit(a.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    item = {"action": "noop", "delay": 3600}
    if a.mode == "single":
        path, body, per = "/jobs", json.dumps(item).encode(), 1
    else:
        path, body, per = "/jobs/batch", json.dumps({"jobs": [item] * a.batch}).encode(), a.batch
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    lat: list[float] = []
    codes: Counter[int] = Counter()
    acked = 0
    left = a.n

    async def conn() -> None:
        nonlocal left, acked
        reader, writer = await asyncio.open_connection(host, port)
        clock = time.perf_counter
        try:
            while left > 0:
                left -= per
                t = clock()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                i = head.lower().find(b"content-length:")
                size = int(head[i + 15:head.index(b"\r\n", i)])
                await reader.readexactly(size)
                lat.append(clock() - t)
                codes[status] += 1
                if status in (200, 201):
                    acked += per
        finally:
            writer.close()

    t0 = time.perf_counter()
    c0 = cpu_s()
    await asyncio.gather(*(conn() for _ in range(a.concurrency)))
    el = time.perf_counter() - t0
    ccpu = cpu_s() - c0
    lat.sort()
    return {"mode": a.mode, "acked": acked, "acked_per_s": round(acked / el),
            "seconds": round(el, 2), "concurrency": a.concurrency,
            "batch": per, "status": {str(k): v for k, v in codes.items()},
            "request_ms": {"p50": round((pct(lat, 50) or 0) * 1e3, 2),
                           "p99": round((pct(lat, 99) or 0) * 1e3, 2)},
            "client_cpu_s": round(ccpu, 2), "client": "lean"}


async def http_client_aiohttp(a: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    url = a.url.rstrip("/")
    lat: list[float] = []
    codes: Counter[int] = Counter()
    acked = 0
    item = {"action": "noop", "delay": 3600}
    left = a.n

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=a.concurrency)) as s:

        async def single() -> None:
            nonlocal left, acked
            while left > 0:
                left -= 1
                t = time.perf_counter()
                async with s.post(f"{url}/jobs", json=item) as resp:
                    await resp.read()
                    codes[resp.status] += 1
                    if resp.status in (200, 201):
                        acked += 1
                lat.append(time.perf_counter() - t)

        async def batch() -> None:
            nonlocal left, acked
            body = {"jobs": [item] * a.batch}
            while left > 0:
                left -= a.batch
                t = time.perf_counter()
                async with s.post(f"{url}/jobs/batch", json=body) as resp:
                    await resp.read()
                    codes[resp.status] += 1
                    if resp.status in (200, 201):
                        acked += a.batch
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        c0 = cpu_s()
        fn = single if a.mode == "single" else batch
        await asyncio.gather(*(fn() for _ in range(a.concurrency)))
        el = time.perf_counter() - t0
        ccpu = cpu_s() - c0
    lat.sort()
    return {"mode": a.mode, "acked": acked, "acked_per_s": round(acked / el), "seconds": round(el, 2),
            "concurrency": a.concurrency, "batch": a.batch if a.mode == "batch" else 1,
            "status": {str(k): v for k, v in codes.items()},
            "request_ms": {"p50": round((pct(lat, 50) or 0) * 1e3, 2),
                           "p99": round((pct(lat, 99) or 0) * 1e3, 2)},
            "client_cpu_s": round(ccpu, 2)}


async def recovery(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A SQLite file holding N pending jobs; kernel start until every one is armed."""
    path = workdir / "kernel.sqlite3"
    t0 = time.perf_counter()
    async with SqliteStore(path):
        pass
    # filled by a separate process (so the peak RSS below is the kernel's own)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "fill", "--n", str(a.n), "--seed", str(a.seed),
        "--url", str(path))
    if await proc.wait():
        raise SystemExit("filling the database failed")
    build_s = time.perf_counter() - t0
    gc.collect()
    probe = Probe()
    k = kernel_with(bench_config(), SqliteStore(path), probe)
    r = Running(k)
    r0 = rss()
    await r.start()
    snap = k.snapshot()
    out = {"n": a.n, "build_db_s": round(build_s, 1),
           "db_mb": round(dir_bytes(workdir) / 2**20, 1),
           "start_to_armed_s": round(r.start_s, 2), "armed": snap.timers,
           "recovered": k.counters.recovered, "bytes_per_job": round((rss() - r0) / a.n, 1)}
    await r.stop()
    return out


async def e2e(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Real actions (``exec`` /bin/true, ``python`` operator:truth) with history on SQLite."""
    probe = Probe()
    k = kernel_with(bench_config(max_concurrency=a.concurrency),
                    SqliteStore(workdir / "kernel.sqlite3"), probe)
    r = Running(k)
    await r.start()
    if a.action == "exec":
        req = SubmitRequest(action="exec", payload={"argv": ["/bin/true"]})
    else:
        req = SubmitRequest(action="python", payload={"target": "operator:truth", "args": [1]})
    done = asyncio.Event()

    def on_event(_ev: object) -> None:
        c = k.counters
        if c.succeeded + c.failed + c.timed_out >= a.n:
            done.set()

    k.bus.subscribe(on_event)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    for i in range(0, a.n, 1000):
        await k.submit_many([req] * min(1000, a.n - i))
    try:
        await asyncio.wait_for(done.wait(), timeout=a.max_seconds)
    except TimeoutError:
        pass
    el = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c = k.counters
    kcpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    chcpu = (ch1.ru_utime - ch0.ru_utime) + (ch1.ru_stime - ch0.ru_stime)
    runs = await k.store.query_runs(RunQuery(limit=1))
    out = {"action": a.action, "n": a.n, "max_concurrency": a.concurrency,
           "succeeded": c.succeeded, "failed": c.failed, "seconds": round(el, 2),
           "runs_per_s": round((c.succeeded + c.failed) / el),
           "kernel_cpu_s": round(kcpu, 2), "kernel_cpu_share_of_one_core": round(kcpu / el, 2),
           "children_cpu_s": round(chcpu, 2), "history_written": bool(runs)}
    await r.stop()
    return out


async def wheel_hold(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The bare wheel holding N timers (deadlines uniform over 60 s, one shared item), each
    added with ``schedule()`` and its handle kept in a list, as the kernel keeps a job's handle.
    Deadlines are made in chunks, so the process holds little besides the wheel."""
    from kernel.wheel import TimingWheel

    rng = random.Random(a.seed)
    item = object()
    base = time.monotonic()
    wheel: TimingWheel[object] = TimingWheel(resolution=0.001, start=base)
    handles: list[int] = []
    gc.collect()
    r0 = rss()
    el = 0.0
    step = 100_000
    for i in range(0, a.n, step):
        dl = [base + rng.random() * 60 for _ in range(min(step, a.n - i))]
        t0 = time.perf_counter()
        handles.extend(map(wheel.schedule, dl, [item] * len(dl)))
        el += time.perf_counter() - t0
    del dl
    gc.collect()
    with_handles = rss() - r0
    del handles
    gc.collect()
    without = rss() - r0
    return {"n": a.n, "schedule_per_s": round(a.n / el), "bytes_per_timer_with_handles":
            round(with_handles / a.n, 1), "bytes_per_timer": round(without / a.n, 1),
            "held": len(wheel)}


async def cron_arm(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Arming N schedules as the kernel does (ScheduleCache, first next_after, wall->mono,
    a wheel entry per task), without TaskConfig/TaskRuntime: the structures' own cost."""
    import bench_cron  # scripts/bench_cron.py: its expression generator and zones

    from kernel.triggers import ScheduleCache
    from kernel.wheel import TimingWheel

    if a.kind == "shared":
        pool = bench_cron.distinct_exprs(a.n)[:: max(1, a.n // 1000)][:1000]
        pairs = [(pool[i % len(pool)], bench_cron.ZONES[i % len(pool) % 4]) for i in range(a.n)]
    else:
        pairs = [(e, bench_cron.ZONES[i & 3]) for i, e in enumerate(bench_cron.distinct_exprs(a.n))]
    clock = SystemClock()
    gc.collect()
    r0 = rss()
    c0 = cpu_s()
    t0 = time.perf_counter()
    cache = ScheduleCache()
    wheel: TimingWheel[tuple[str, float]] = TimingWheel(resolution=0.001, start=clock.monotonic())
    handles: list[int] = []
    now = clock.wall()
    for i, (expr, tz) in enumerate(pairs):
        sched = cache.get(expr, tz)
        nxt = sched.next_after(now)
        if nxt is not None:
            handles.append(wheel.schedule(clock.wall_to_mono(nxt), (expr, nxt)))
        else:
            handles.append(i)
    el = time.perf_counter() - t0
    cpu = cpu_s() - c0
    gc.collect()
    grown = rss() - r0
    return {"kind": a.kind, "n": a.n, "distinct": len(set(pairs)), "seconds": round(el, 2),
            "cpu_s": round(cpu, 2), "us_per_schedule": round(el / a.n * 1e6, 2),
            "bytes_per_schedule": round(grown / a.n, 1), "armed": len(wheel),
            "note": "RSS growth counts the wheel entry, handle, (expr, next) item and the "
                    "cache; the expression strings exist before (as in a config)"}


async def tasks_arm(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """N cron tasks through the kernel's start-up (TaskConfig -> TaskRuntime -> wheel)."""
    import bench_cron

    exprs = bench_cron.distinct_exprs(a.n) if a.kind == "distinct" else None
    pool = bench_cron.distinct_exprs(1000)
    gc.collect()
    r0 = rss()
    t0 = time.perf_counter()
    tasks = [TaskConfig(id=f"t{i}", action="noop",
                        schedule=exprs[i] if exprs else pool[i % 1000]) for i in range(a.n)]
    cfg_s = time.perf_counter() - t0
    r1 = rss()
    probe = Probe()
    k = kernel_with(bench_config(tasks=tasks), MemoryStore(), probe)
    del tasks
    r = Running(k)
    await r.start()
    gc.collect()
    out = {"kind": a.kind, "n": a.n, "configs_s": round(cfg_s, 2),
           "config_bytes_per_task": round((r1 - r0) / a.n, 1),
           "start_to_armed_s": round(r.start_s, 2), "armed": k.snapshot().timers,
           "bytes_per_task_total": round((rss() - r0) / a.n, 1),
           "bytes_per_task_kernel": round((rss() - r1) / a.n, 1)}
    await r.stop()
    return out


SCENARIOS = {
    "kernel_hold": kernel_hold, "burst": burst, "herd": herd, "steady": steady,
    "durable": durable, "http": http, "pending_http": pending_http, "recovery": recovery,
    "e2e": e2e, "cron_arm": cron_arm, "tasks_arm": tasks_arm, "wheel_hold": wheel_hold,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=[*SCENARIOS, "http_client", "fill"])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--lead", type=float, default=0.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--period", type=int, default=5)
    p.add_argument("--schedule", default="*/5 * * * * *")
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--action", choices=["exec", "python"], default="exec")
    p.add_argument("--kind", choices=["shared", "distinct"], default="shared")
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--url", default="")
    p.add_argument("--mode", default="single")
    p.add_argument("--modes", default="single,batch",
                   help="http: which of single, batch, lone to run, in order")
    p.add_argument("--client", choices=["lean", "aiohttp"], default="lean")
    p.add_argument("--no-gc-policy", action="store_true",
                   help="leave the collector as Python sets it (python -m kernel tunes it)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", default=None)
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop",
                   help="the event loop (python -m kernel runs on uvloop when it is installed)")
    a = p.parse_args()
    global GC_POLICY
    GC_POLICY = not a.no_gc_policy
    if a.scenario == "http_client":
        print(json.dumps(asyncio.run(http_client(a))))
        return
    if a.scenario == "fill":
        import bench_store  # scripts/bench_store.py: pending rows in the store's own format

        fill: Any = bench_store.fill_pending  # a colleague's helper: adapt to its signature
        kw = {"ids": "kernel"} if "ids" in inspect.signature(fill).parameters else {}
        fill(Path(a.url), a.n, a.seed, **kw)
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench_kernel_", dir=a.dir))
    try:
        t0 = time.perf_counter()
        runner: Any = asyncio.run
        if a.loop == "uvloop":
            import uvloop

            runner = uvloop.run
        res = runner(SCENARIOS[a.scenario](a, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res = {"scenario": a.scenario, **res, "loop": a.loop, "peak_rss_mb": peak_mb(),
           "process_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
