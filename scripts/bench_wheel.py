#!/usr/bin/env python3
"""Benchmark kernel.wheel.TimingWheel at several sizes, optionally beside the peer benchmarks.

    .venv/bin/python scripts/bench_wheel.py [--sizes 100000,1000000] [--peers] [--peers-dir DIR]

Prints one JSON object per line. For each N (each in a fresh subprocess, so ``peak_rss_mb`` is
per run), with deadlines uniform over 60 s from ``time.monotonic()`` as the peers use:

* ``schedule_per_s``: ``schedule()`` in a loop keeping every handle in a list (as the asyncio
  peer keeps its ``TimerHandle``s); ``bytes_per_timer_with_handles``: RSS growth / N for
  that wheel plus its handle list (the asyncio peer's figure counts its handle list too).
* ``expire_step_per_s``: that wheel drained by ``advance()`` every 1 ms of the 60 s window
  (60,000 calls, the way the kernel drives it); N / total time; ``advance_max_ms`` is the
  slowest single call, ``advance_mean_us`` the mean. Every wheel here was started 30 s
  before the window, so the window straddles a 65.536 s level-2 boundary (as most windows
  of a long-running kernel do): about 40 % of the timers sit in one level-2 bucket, which is
  sorted whole by the one ``advance()`` that enters it; that call is ``advance_max_ms``.
* ``cancel_per_s``: a second wheel, loaded the same way, every timer cancelled
  (compactions included); ``purge_s``: the ``advance()`` past the window that then drops them.
* ``schedule_many_per_s``: a third wheel bulk-loaded with ``schedule_many()`` (no handles);
  ``bytes_per_timer``: RSS growth / N of that wheel alone (the heapq peer's figure has no
  handle either; the payload object is shared in all three, so it is not counted).
* ``expire_bulk_per_s``: that wheel drained by one ``advance()`` past the window: everything
  due at once, like the asyncio peer's saturated drain and heapq's pop-all.

RSS growth is measured after ``gc.collect()`` with the deadline list alive before and after,
so it is the structure's own memory. ``--peers`` also runs, at the same N,
``bench_asyncio_timers.py --n N --loop asyncio --repeat 1`` and ``bench_heapq.py --n N
--repeat 1`` from ``--peers-dir`` (default ``<repo>/../shared/bench/peers``) and prints the
ratios ours / theirs (above 1 is better for rates, below 1 is better for bytes). The asyncio
peer is skipped where its estimated run time exceeds ``--asyncio-max-s`` (default 180 s);
the output says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEERS = Path(__file__).resolve().parents[2] / "shared/bench/peers"
SPREAD = 60.0
START_LAG = 30.0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(n: int, seed: int, phase: str) -> dict[str, Any]:
    import random

    sys.path.insert(0, str(REPO))
    from kernel.wheel import TimingWheel

    rng = random.Random(seed)
    obj = object()  # one shared payload, as the peers do
    base = time.monotonic()
    whens = [base + rng.random() * SPREAD for _ in range(n)]
    end = base + SPREAD + 0.001
    res: dict[str, Any] = {}
    # the wheel has been running for START_LAG s: the window then straddles the 65.5 s boundary
    # between level-2 buckets, as windows in a long-running kernel mostly do
    w: TimingWheel[object] = TimingWheel(resolution=0.001, start=base - START_LAG)
    sch = w.schedule

    if phase == "A":  # schedule() with handles kept; then drained in 1 ms steps
        gc.collect()
        rss0 = _rss()
        handles: list[int] = []
        app = handles.append
        t0 = time.perf_counter()
        for d in whens:
            app(sch(d, obj))
        t1 = time.perf_counter()
        gc.collect()
        res["schedule_per_s"] = n / (t1 - t0)
        res["bytes_per_timer_with_handles"] = (_rss() - rss0) / n
        del handles
        adv = w.advance
        fired = calls = 0
        worst = 0.0
        t0 = time.perf_counter()
        while True:
            calls += 1
            now = base + calls * 0.001
            a = time.perf_counter()
            fired += len(adv(now))
            b = time.perf_counter()
            if b - a > worst:
                worst = b - a
            if now > end:
                break
        t1 = time.perf_counter()
        assert fired == n and len(w) == 0, (fired, len(w))
        res["expire_step_per_s"] = n / (t1 - t0)
        res["advance_calls"] = calls
        res["advance_mean_us"] = (t1 - t0) / calls * 1e6
        res["advance_max_ms"] = worst * 1e3
    elif phase == "B":  # schedule() again, then cancel everything
        handles = [sch(d, obj) for d in whens]
        cancel = w.cancel
        t0 = time.perf_counter()
        for h in handles:
            cancel(h)
        t1 = time.perf_counter()
        assert len(w) == 0
        res["cancel_per_s"] = n / (t1 - t0)
        t0 = time.perf_counter()
        assert w.advance(end) == []
        res["purge_s"] = time.perf_counter() - t0
    else:  # C: schedule_many(), structure-only memory; then everything due at once
        items = [obj] * n
        gc.collect()
        rss0 = _rss()
        t0 = time.perf_counter()
        w.schedule_many(whens, items)
        t1 = time.perf_counter()
        gc.collect()
        res["schedule_many_per_s"] = n / (t1 - t0)
        res["bytes_per_timer"] = (_rss() - rss0) / n
        del items
        t0 = time.perf_counter()
        out = w.advance(end)
        t1 = time.perf_counter()
        assert len(out) == n
        res["expire_bulk_per_s"] = n / (t1 - t0)
    res[f"peak_rss_mb_{phase}"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def measure(n: int, seed: int) -> tuple[dict[str, Any], float]:
    """The three phases, each in a fresh subprocess (so RSS growth and peak RSS are its own)."""
    res: dict[str, Any] = {"n": n, "spread_s": SPREAD}
    wall = 0.0
    for phase in "ABC":
        argv = [sys.executable, str(Path(__file__).resolve()), "--_child", str(n), "--_phase", phase]
        out, w = _run_json([*argv, "--seed", str(seed)])
        res.update(out)
        wall += w
    res["peak_rss_mb"] = max(res[f"peak_rss_mb_{p}"] for p in "ABC")
    return res, wall


def _run_json(argv: list[str]) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    cp = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.monotonic() - t0
    if cp.returncode:
        sys.stderr.write(cp.stderr)
        raise SystemExit(f"{' '.join(argv)} exited with {cp.returncode}")
    out: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
    return out, wall


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return round(a / b, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated N (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--peers", action="store_true", help="also run the peer benchmarks at each N")
    p.add_argument("--peers-dir", type=Path, default=DEFAULT_PEERS)
    p.add_argument("--asyncio-max-s", type=float, default=180.0)
    p.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_phase", default="A", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child is not None:
        print(json.dumps(child(a._child, a.seed, a._phase)))
        return
    sizes = [int(s.replace("_", "")) for s in a.sizes.split(",") if s.strip()]
    py = sys.executable
    asyncio_s_per_timer: float | None = None  # measured wall seconds per timer, to extrapolate
    for n in sizes:
        ours, wall = measure(n, a.seed)
        ours = {
            "bench": "timing_wheel",
            "python": sys.version.split()[0],
            "wall_s": round(wall, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2),  # other work on the box skews rates
            **ours,
        }
        print(json.dumps(ours), flush=True)
        if not a.peers:
            continue
        peers_dir: Path = a.peers_dir
        heap, hwall = _run_json([py, str(peers_dir / "bench_heapq.py"), "--n", str(n), "--repeat", "1"])
        heap["wall_s"] = round(hwall, 1)
        print(json.dumps(heap), flush=True)
        est = None if asyncio_s_per_timer is None else asyncio_s_per_timer * n * 1.5
        if est is None and n > 2_000_000:
            est = float("inf")  # ~30 s per million on the project machine, growing faster than N
        aio: dict[str, Any] | None
        if est is not None and est > a.asyncio_max_s:
            aio = None
            why = (
                f"skipped: estimated {est:.0f} s > --asyncio-max-s {a.asyncio_max_s:.0f}"
                if est != float("inf")
                else f"skipped: no smaller run to extrapolate from and N > 2M (>{a.asyncio_max_s:.0f} s)"
            )
            print(
                json.dumps({"bench": "asyncio_call_at", "loop": "asyncio", "n": n, "skipped": why}),
                flush=True,
            )
        else:
            argv = [
                py,
                str(peers_dir / "bench_asyncio_timers.py"),
                "--n",
                str(n),
                "--loop",
                "asyncio",
                "--repeat",
                "1",
            ]
            aio, awall = _run_json(argv)
            aio["wall_s"] = round(awall, 1)
            asyncio_s_per_timer = awall / n
            print(json.dumps(aio), flush=True)
        hm = heap["median"]
        ratios: dict[str, Any] = {
            "bench": "ratios_ours_over_theirs",
            "n": n,
            "vs_heapq": {
                "schedule_per_s / push_per_s": _ratio(ours["schedule_per_s"], hm.get("push_per_s")),
                "schedule_many_per_s / heapify_per_s": _ratio(
                    ours["schedule_many_per_s"], hm.get("heapify_per_s")
                ),
                "expire_bulk_per_s / pop_per_s": _ratio(ours["expire_bulk_per_s"], hm.get("pop_per_s")),
                "expire_step_per_s / pop_per_s": _ratio(ours["expire_step_per_s"], hm.get("pop_per_s")),
                "bytes_per_timer / bytes_per_entry": _ratio(
                    ours["bytes_per_timer"], hm.get("bytes_per_entry")
                ),
                "peak_rss_mb": _ratio(ours["peak_rss_mb"], hm.get("peak_rss_mb")),
            },
        }
        if aio is not None:
            am = aio["median"]
            ratios["vs_asyncio"] = {
                "schedule_per_s": _ratio(ours["schedule_per_s"], am.get("schedule_per_s")),
                "cancel_per_s": _ratio(ours["cancel_per_s"], am.get("cancel_per_s")),
                "expire_bulk_per_s / fire_per_s": _ratio(ours["expire_bulk_per_s"], am.get("fire_per_s")),
                "expire_step_per_s / fire_per_s": _ratio(ours["expire_step_per_s"], am.get("fire_per_s")),
                "bytes_per_timer_with_handles / bytes_per_timer": _ratio(
                    ours["bytes_per_timer_with_handles"], am.get("bytes_per_timer")
                ),
                "bytes_per_timer / bytes_per_timer": _ratio(
                    ours["bytes_per_timer"], am.get("bytes_per_timer")
                ),
                "peak_rss_mb": _ratio(ours["peak_rss_mb"], am.get("peak_rss_mb")),
            }
        else:
            ratios["vs_asyncio"] = "asyncio peer skipped at this N"
        print(json.dumps(ratios), flush=True)


if __name__ == "__main__":
    main()
