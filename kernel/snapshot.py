"""What observers read: the counters (an event subscriber) and the immutable snapshot views.

``Counters`` is fed only by the bus, so it counts exactly what metrics, logs and the TUI see:
one ``JobSubmitted`` per job of any kind, one ``RunStarted`` per start, one finished event per
outcome. The views are frozen dataclasses built by the kernel's face in ``Kernel.snapshot()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .events import (
    Event,
    JobSubmitted,
    KernelStarted,
    MisfireDecided,
    RunCancelled,
    RunFailed,
    RunSkipped,
    RunStarted,
    RunSucceeded,
    RunTimedOut,
)
from .fleet import MemberView


@dataclass(slots=True)
class Counters:
    submitted: int = 0
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    skipped: int = 0
    recovered: int = 0
    misfired: int = 0

    def observe(self, event: Event) -> None:
        """The bus subscriber: every counter moves with the event that says so, nowhere else."""
        cls = type(event)
        if cls is RunStarted:
            self.started += 1
        elif cls is JobSubmitted:
            self.submitted += 1
        elif cls is RunSucceeded:
            self.succeeded += 1
        elif cls is RunFailed:
            self.failed += 1
        elif cls is RunTimedOut:
            self.timed_out += 1
        elif cls is RunCancelled:
            self.cancelled += 1
        elif cls is RunSkipped:
            self.skipped += 1
        elif isinstance(event, MisfireDecided):
            self.misfired += event.record.missed
        elif isinstance(event, KernelStarted):
            self.recovered += event.rerun_jobs


@dataclass(frozen=True, slots=True)
class TaskView:
    id: str
    action: str
    schedule: str | None
    tz: str
    enabled: bool
    paused: bool
    next_due: float | None
    last_outcome: str | None
    last_error_code: str | None
    last_finished_at: float | None
    after: tuple[str, ...]
    running: int


@dataclass(frozen=True, slots=True)
class RunningView:
    job_id: str
    task_id: str | None
    action: str
    trace_id: str
    attempt: int
    elapsed: float
    timeout: float | None
    done: float | None = None      # progress the action reported (ctx.progress), if any
    total: float | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class QueuedView:
    job_id: str
    task_id: str | None
    action: str
    priority: int
    held: str | None   # why it is not starting (max_instances, concurrency key, GPU memory)


@dataclass(frozen=True, slots=True)
class GpuView:
    index: int
    name: str
    total_mb: int
    free_mb: int
    reserved_mb: int
    utilization_pct: int | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    tasks: tuple[TaskView, ...]
    running: tuple[RunningView, ...]
    queued: int
    timers: int
    pending_jobs: int
    counters: Counters
    max_concurrency: int
    queue_depth: int
    gpus: tuple[GpuView, ...] = ()
    gpu_note: str | None = None
    queued_jobs: tuple[QueuedView, ...] = ()
    kernel_id: str | None = None                 # fleet mode: this kernel's id
    fleet: tuple[MemberView, ...] = ()           # fleet mode: every kernel of the fleet
    unsaved: int = 0                             # outcomes the store has not taken yet
