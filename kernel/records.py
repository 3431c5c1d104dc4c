"""Typed records shared by the store, the dispatcher, the API and observers.

Instants are wall seconds since the Unix epoch (UTC, float) wherever they are persisted; the
monotonic clock never leaves the process. Rows carry ``SCHEMA_VERSION`` through the store.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

SCHEMA_VERSION = 1


class JobState(enum.StrEnum):
    PENDING = "pending"    # waiting for its due instant (in the wheel) or in the ready queue
    RUNNING = "running"    # an attempt has started; on restart it is run again (recovered)
    DONE = "done"          # finished (any outcome); kept only as history rows
    CANCELLED = "cancelled"


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class JobKind(enum.StrEnum):
    SUBMIT = "submit"        # POST /jobs, CLI, Python API
    CRON = "cron"            # an occurrence of a task's schedule; (task_id, scheduled_at) unique
    RETRY = "retry"          # the next attempt of a failed job
    DEPENDENT = "dependent"  # started by the success of an upstream task (`after`)
    TRIGGER = "trigger"      # a manual run of a task (POST /tasks/{id}/trigger)
    BACKFILL = "backfill"    # a past occurrence run on request (POST /tasks/{id}/backfill)


class Job(msgspec.Struct, kw_only=True, gc=False):
    """One unit of work: an ad-hoc submission, a cron occurrence, a retry or a dependent run.

    A cron occurrence has ``task_id`` and ``scheduled_at`` set; the pair is unique in the store,
    which is how no occurrence is run twice after a restart.

    ``gc=False``: a million pending jobs are not walked by every garbage collection. A job holds
    only JSON-like values (its payload), which cannot form reference cycles back to it.
    """

    id: str
    action: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    task_id: str | None = None
    kind: JobKind = JobKind.SUBMIT
    due_at: float                      # wall instant it may start
    scheduled_at: float | None = None  # the cron instant (or due_at for one-shots)
    priority: int = 0
    timeout: float | None = None
    attempt: int = 1
    dedup_key: str | None = None
    dedup_expires_at: float | None = None
    trace_id: str = ""
    parent_span_id: str | None = None
    created_at: float = 0.0
    state: JobState = JobState.PENDING
    recovered: bool = False
    started_at: float | None = None
    gpu_memory_mb: int = 0            # declared GPU memory; 0 = needs no GPU
    gpu: int | None = None            # a GPU index, or None for any


class RunRecord(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """One finished attempt of a job, as kept in run history."""

    job_id: str
    task_id: str | None
    action: str
    trace_id: str
    span_id: str
    scheduled_at: float | None
    started_at: float | None
    finished_at: float
    attempt: int
    outcome: Outcome
    error_code: str | None = None
    detail: str = ""          # short result or error text (truncated to 2 KiB)
    recovered: bool = False


class ScheduleState(msgspec.Struct, kw_only=True):
    """Per task: the last occurrence turned into a job, and whether it is paused."""

    task_id: str
    last_scheduled_at: float | None = None
    paused: bool = False
    next_due_at: float | None = None


class SubmitResult(msgspec.Struct, kw_only=True, frozen=True):
    """What a durable submission returns: the job, and whether it already existed (dedup)."""

    job: Job
    existed: bool = False


class RunQuery(msgspec.Struct, kw_only=True, frozen=True):
    task_id: str | None = None
    outcome: Outcome | None = None
    since: float | None = None
    until: float | None = None
    trace_id: str | None = None
    job_id: str | None = None
    limit: int = 100
    offset: int = 0


class MisfireRecord(msgspec.Struct, kw_only=True, frozen=True):
    """A decision taken about occurrences missed while the kernel was down."""

    task_id: str
    decided_at: float
    policy: str
    missed: int
    first_missed: float
    last_missed: float
    ran: int
