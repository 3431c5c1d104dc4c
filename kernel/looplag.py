"""The event loop watches its own lag: a stall over a threshold is logged naming the runs in
flight, counted, and published as a :class:`~kernel.events.LoopStalled` event.

A service coroutine (``KernelParts(services=[watch_loop_lag])``) sleeps ``interval`` seconds of
the kernel's clock in a loop; the time it overslept is the scheduling lag of the loop, since
its wake-up is a timer callback that cannot run while anything else holds the loop. A stall
can only be measured once it is over, so the culprit may already have finished: the runs named
are those in flight at any moment since the previous tick, followed through the bus
(RunStarted / RunFinished) plus the kernel's snapshot, which is read only when a stall is seen.

For observers: :class:`LoopLagWatcher` keeps ``stalls`` (count), ``stalled_seconds`` (sum of
lags over the threshold), ``max_lag`` and ``last_lag``; metrics can read them, or count the
``LoopStalled`` events.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from .events import Event, LoopStalled, RunFinished, RunStarted

if TYPE_CHECKING:
    from .app import Kernel

log = logging.getLogger("kernel.looplag")


class LoopLagSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """How often the loop is probed and what counts as a stall (seconds)."""

    interval: float = 0.1
    threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("interval", "threshold"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: must be a positive number of seconds")


@dataclass(frozen=True, slots=True)
class LoopStall:
    at: float                      # wall instant the stall was seen (its end)
    lag: float                     # seconds the loop was late
    runs: tuple[str, ...]          # "job <id> (task <id>, action <name>)"


@dataclass(eq=False)
class LoopLagWatcher:
    settings: LoopLagSettings = field(default_factory=LoopLagSettings)
    stalls: int = 0
    stalled_seconds: float = 0.0
    max_lag: float = 0.0
    last_lag: float = 0.0
    last_stall: LoopStall | None = None

    async def run(self, kernel: Kernel) -> None:
        """The service: runs until cancelled (at the kernel's shutdown)."""
        clock = kernel.clock
        interval, threshold = self.settings.interval, self.settings.threshold
        in_flight: dict[str, tuple[str | None, str]] = {}   # job id -> (task id, action)
        ended: dict[str, tuple[str | None, str]] = {}       # finished since the last tick

        def follow(ev: Event) -> None:
            if isinstance(ev, RunStarted):
                in_flight[ev.job_id] = (ev.task_id, ev.action)
            elif isinstance(ev, RunFinished):
                r = ev.run
                ended[r.job_id] = in_flight.pop(r.job_id, (r.task_id, r.action))

        unsubscribe = kernel.bus.subscribe(follow)
        try:
            while True:
                t0 = clock.monotonic()
                await clock.sleep(interval)
                lag = max(0.0, clock.monotonic() - t0 - interval)
                self.last_lag = lag
                self.max_lag = max(self.max_lag, lag)
                if lag > threshold:
                    suspects = {**ended, **in_flight}
                    for rv in kernel.snapshot().running:  # runs started before we subscribed
                        suspects.setdefault(rv.job_id, (rv.task_id, rv.action))
                    self._stalled(kernel, lag, suspects)
                ended.clear()
        finally:
            unsubscribe()

    def _stalled(self, kernel: Kernel, lag: float,
                 suspects: dict[str, tuple[str | None, str]]) -> None:
        self.stalls += 1
        self.stalled_seconds += lag
        runs = tuple(f"job {jid} (task {task or '-'}, action {action})"
                     for jid, (task, action) in suspects.items())
        self.last_stall = LoopStall(kernel.clock.wall(), lag, runs)
        log.warning(
            "the event loop stalled for %.2f s (threshold %.2f s); runs in flight: %s. An action "
            "blocked the loop: run blocking code in a `python` action (a worker process) or in "
            "a thread, never directly in a coroutine", lag, self.settings.threshold,
            "; ".join(runs) or "none", extra={
                "lag": round(lag, 3), "job_ids": list(suspects),
                "task_ids": sorted({t for t, _ in suspects.values() if t})})
        kernel.bus.publish(LoopStalled(
            at=kernel.clock.wall(), lag=lag, job_ids=tuple(suspects),
            task_ids=tuple(sorted({t for t, _ in suspects.values() if t}))))


async def watch_loop_lag(kernel: Kernel) -> None:
    """A service with the default settings (see :class:`LoopLagWatcher` to read its counters)."""
    await LoopLagWatcher().run(kernel)
