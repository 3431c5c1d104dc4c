"""Typed events and the bus observers subscribe to.

The kernel publishes; metrics, logs, the TUI, alert plugins and dependency handling subscribe.
Subscribers are synchronous and must be quick (put the event on a queue for slow work): the bus
calls them in order and a failing subscriber is logged, never allowed to break the kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from .records import JobKind, MisfireRecord, RunRecord

log = logging.getLogger("kernel.events")


class Event(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    at: float  # wall instant of the event


class KernelStarted(Event, frozen=True):
    data_dir: str
    store: str
    api_url: str | None
    tasks: int
    recovered_jobs: int    # pending jobs loaded from the store at start
    rerun_jobs: int = 0    # of those, the ones that were running at the last stop (re-run)


class KernelStopping(Event, frozen=True):
    reason: str


class JobSubmitted(Event, frozen=True):
    job_id: str
    task_id: str | None
    action: str
    kind: JobKind
    due_at: float
    trace_id: str


class JobScheduled(Event, frozen=True):
    """A task's next occurrence was armed."""

    task_id: str
    due_at: float


class RunStarted(Event, frozen=True):
    job_id: str
    task_id: str | None
    action: str
    trace_id: str
    span_id: str
    attempt: int
    scheduled_at: float | None
    lateness: float
    recovered: bool


class RunFinished(Event, frozen=True):
    run: RunRecord
    duration: float


class RunSucceeded(RunFinished, frozen=True):
    pass


class RunFailed(RunFinished, frozen=True):
    will_retry: bool = False
    retry_at: float | None = None


class RunTimedOut(RunFinished, frozen=True):
    will_retry: bool = False
    retry_at: float | None = None


class RunCancelled(RunFinished, frozen=True):
    pass


class RunSkipped(RunFinished, frozen=True):
    pass


class MisfireDecided(Event, frozen=True):
    record: MisfireRecord


class ConfigReloaded(Event, frozen=True):
    source: str
    added: list[str]
    removed: list[str]
    changed: list[str]
    error: str | None = None


class StoreFailed(Event, frozen=True):
    error_code: str
    message: str


class LoopStalled(Event, frozen=True):
    """The event loop did not run for ``lag`` seconds beyond a tick (kernel.looplag): something
    blocked it. ``job_ids`` are the runs in flight during the stall (the likely cause)."""

    lag: float
    job_ids: tuple[str, ...] = ()
    task_ids: tuple[str, ...] = ()


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subs: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add ``fn``; returns a function that removes it again."""
        self._subs.append(fn)

        def unsubscribe() -> None:
            if fn in self._subs:
                self._subs.remove(fn)

        return unsubscribe

    def publish(self, event: Event) -> None:
        for fn in tuple(self._subs):
            try:
                fn(event)
            except Exception:  # an observer's bug must not harm the kernel
                log.exception("event subscriber %r failed on %s", fn, type(event).__name__)
