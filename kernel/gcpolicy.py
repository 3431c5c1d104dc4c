"""Garbage-collector tuning, owned by the process that runs the kernel (``kernel.main.serve``).

A library must not change the collector of the process it is embedded in, so the kernel does not
tune it; the composition root does, once the kernel has armed its start-up timers, and undoes it
when the kernel stops. A benchmark that builds kernels directly calls the same two functions.

Why: every run allocates a dozen GC-tracked objects (task, coroutine, context, records), so
CPython's default first threshold (700) collects every ~60 runs and, worse, the oldest generation
is re-scanned whenever it has grown by a quarter, which with a million armed jobs is ~0.3 s a
time. Raising the first threshold makes young collections rare; collecting once and freezing the
start-up heap (recovered jobs, thousands of tasks) moves it out of every later full collection
(frozen objects are still freed by reference counting when they go).
"""

from __future__ import annotations

import gc

GC_GEN0_THRESHOLD = 20_000
GC_FREEZE_MIN = 10_000  # at start-up, with this many timers armed: collect once, then freeze

Saved = tuple[tuple[int, int, int], bool]


def tune_gc(armed: int) -> Saved:
    """Raise the first GC threshold; after arming a large start-up heap (recovered jobs,
    thousands of tasks), collect once and freeze it, so that later full collections skip it.
    Returns what to undo (pass it to :func:`restore_gc`)."""
    old = gc.get_threshold()
    frozen = armed >= GC_FREEZE_MIN
    if frozen:
        gc.collect()
        gc.freeze()
    gc.set_threshold(max(old[0], GC_GEN0_THRESHOLD), old[1], old[2])
    return old, frozen


def restore_gc(old: tuple[int, int, int], frozen: bool) -> None:
    """Undo :func:`tune_gc`: the thresholds as they were, and the frozen heap thawed."""
    gc.set_threshold(*old)
    if frozen:
        gc.unfreeze()
