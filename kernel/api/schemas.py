"""The HTTP API's request and response bodies, as msgspec Structs.

Requests are decoded once, at the boundary, into Structs with ``forbid_unknown_fields``; the
bounds written here with ``Meta`` are checked by the decoder and appear in ``/openapi.json``.
Responses are views of the kernel's records: instants are ISO-8601 strings (UTC) in every view,
except ``GET /snapshot``, which is the kernel's own snapshot (epoch seconds) for the TUI.

Also here: the conversions between instants and their ISO-8601 text, and from records to views.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from kernel.app import Snapshot
from kernel.app import TaskView as KernelTaskView
from kernel.config import GPU_MEMORY_MB_MAX, PRIORITY_MAX, TaskConfig
from kernel.errors import ErrorCode
from kernel.records import Job, JobKind, JobState, Outcome, RunRecord

API_VERSION = 1
#: The largest delay, timeout or TTL accepted (ten years): larger ones are a client's mistake.
MAX_SECONDS = 10 * 366 * 86400.0
BATCH_MAX = 10_000
PAGE_MAX = 1000
OFFSET_MAX = 1_000_000_000

Seconds = Annotated[float, Meta(ge=0, le=MAX_SECONDS, description="seconds")]
PositiveSeconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS, description="seconds")]
Priority = Annotated[int, Meta(ge=-PRIORITY_MAX, le=PRIORITY_MAX,
                               description="higher runs first (default 0)")]
Instant = Annotated[str | float, Meta(
    description="an ISO-8601 instant (no offset: UTC), or epoch seconds")]
Limit = Annotated[int, Meta(ge=1, le=PAGE_MAX)]
Offset = Annotated[int, Meta(ge=0, le=OFFSET_MAX)]


class _In(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# ---------------------------------------------------------------------------------- requests


class JobIn(_In):
    """A one-shot job: ``POST /jobs`` (and each item of ``POST /jobs/batch``)."""

    action: Annotated[str, Meta(min_length=1, max_length=128,
                                description="an installed action, e.g. exec, python, log")]
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    delay: Seconds | None = None
    at: Instant | None = None
    dedup_key: Annotated[str, Meta(min_length=1, max_length=512)] | None = None
    dedup_ttl: Seconds | None = None
    priority: Priority = 0
    timeout: PositiveSeconds | None = None
    gpu_memory_mb: Annotated[int, Meta(ge=0, le=GPU_MEMORY_MB_MAX,
                                       description="GPU memory the job needs (MiB)")] = 0
    gpu: Annotated[int, Meta(ge=0, le=1024, description="pin to this card index")] | None = None


class BatchIn(_In):
    jobs: Annotated[list[JobIn], Meta(min_length=1, max_length=BATCH_MAX)]


class TriggerIn(_In):
    payload: dict[str, Any] | None = None


class BackfillIn(_In):
    start: Instant
    end: Instant


class JobsQuery(_In):
    state: JobState | None = None
    task: str | None = None
    limit: Limit = 100
    offset: Offset = 0


class RunsQuery(_In):
    task: str | None = None
    outcome: Outcome | None = None
    since: Instant | None = None
    until: Instant | None = None
    limit: Limit = 100
    offset: Offset = 0


# ---------------------------------------------------------------------------------- responses


class JobAccepted(Struct, kw_only=True):
    """A durable submission: ``existed`` is true when the dedup key named an earlier job."""

    id: str
    due_at: str
    trace_id: str
    existed: bool = False


class JobOut(Struct, kw_only=True):
    id: str
    action: str
    payload: dict[str, Any]
    task_id: str | None
    kind: JobKind
    state: JobState
    due_at: str
    scheduled_at: str | None
    priority: int
    timeout: float | None
    attempt: int
    dedup_key: str | None
    trace_id: str
    created_at: str
    started_at: str | None
    recovered: bool


class FinishedJobOut(Struct, kw_only=True):
    """``GET /jobs/{id}`` of a job that has finished: its last run, as the history keeps it.

    ``state`` is ``done`` (any outcome but cancelled) or ``cancelled``. A failed attempt that
    is retried ends this job; the retry is a new job in the same trace (GET /runs/{trace_id}).
    """

    id: str
    action: str
    task_id: str | None
    state: JobState
    outcome: Outcome
    error_code: str | None
    detail: str
    trace_id: str
    scheduled_at: str | None
    started_at: str | None
    finished_at: str
    attempt: int
    recovered: bool


class JobList(Struct, kw_only=True):
    jobs: list[JobOut]
    limit: int
    offset: int


class CancelOut(Struct, kw_only=True, omit_defaults=True):
    """``cancelled``: the job will not run (again); for a running one, whether its run ended
    as cancelled. ``outcome``/``error_code``: how a running job's run really ended (it may
    have finished first, or been abandoned: ERR_ABANDONED); ``running``: it still goes."""

    id: str
    cancelled: bool
    was: JobState
    outcome: str | None = None
    error_code: str | None = None
    running: bool = False


class RunOut(Struct, kw_only=True):
    job_id: str
    task_id: str | None
    action: str
    trace_id: str
    span_id: str
    scheduled_at: str | None
    started_at: str | None
    finished_at: str
    attempt: int
    outcome: Outcome
    error_code: str | None
    detail: str
    recovered: bool


class RunList(Struct, kw_only=True):
    runs: list[RunOut]
    limit: int
    offset: int


class TaskOut(Struct, kw_only=True):
    id: str
    action: str
    description: str
    schedule: str | None
    tz: str
    enabled: bool
    paused: bool
    next_due: str | None
    last_outcome: str | None
    last_error_code: str | None
    last_finished_at: str | None
    after: list[str]
    running: int


class TaskList(Struct, kw_only=True):
    tasks: list[TaskOut]


class TaskChanged(Struct, kw_only=True):
    """The effect of a runtime task change (kept in memory only, not written to config.toml)."""

    task: TaskOut | None
    added: list[str]
    removed: list[str]
    changed: list[str]


class BackfillOut(Struct, kw_only=True):
    task_id: str
    count: int
    jobs: list[JobAccepted]


class HealthOut(Struct, kw_only=True):
    status: str  # "ok" | "unavailable"
    accepting: bool
    loop: str
    store_ok: bool
    store: dict[str, Any] | UnsetType = UNSET  # details only for an authorised caller
    unsaved: int = 0  # run outcomes the store refused, kept in memory and written again


class ReloadOut(Struct, kw_only=True):
    """A configuration change (file reload or runtime task edit), for the TUI."""

    at: float
    source: str
    added: list[str]
    removed: list[str]
    changed: list[str]
    error: str | None = None


class StallOut(Struct, kw_only=True):
    """The last time the event loop stalled (kernel.looplag), and the runs in flight then."""

    at: float
    lag: float
    job_ids: list[str]
    task_ids: list[str]


class SnapshotOut(Struct, kw_only=True):
    """``GET /snapshot``: the shape the TUI polls (``kernel.tui.TuiView``); keep it stable."""

    snapshot: Snapshot
    recent_runs: list[RunRecord]
    api_version: int = API_VERSION
    reloads: list[ReloadOut] = msgspec.field(default_factory=list)  # newest first
    last_stall: StallOut | None = None


class Issue(Struct, kw_only=True):
    where: str
    message: str


class ErrorDetail(Struct, kw_only=True):
    code: ErrorCode
    message: str
    field: str | None = None
    issues: list[Issue] | UnsetType = UNSET


class ErrorOut(Struct, kw_only=True):
    error: ErrorDetail


#: Every Struct named in /openapi.json (msgspec builds their JSON schemas).
SCHEMA_TYPES: tuple[Any, ...] = (
    JobIn, BatchIn, TriggerIn, BackfillIn, JobsQuery, RunsQuery, TaskConfig,
    JobAccepted, JobOut, FinishedJobOut, JobList, CancelOut, RunOut, RunList, TaskOut, TaskList, TaskChanged,
    BackfillOut, HealthOut, SnapshotOut, ErrorOut,
)


# ---------------------------------------------------------------------------------- instants


def iso(t: float | None) -> str | None:
    """An epoch instant as ISO-8601 UTC text (``None`` stays ``None``)."""
    if t is None:
        return None
    try:
        return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()
    except (OverflowError, OSError, ValueError):  # beyond year 1..9999: say it as a number
        return repr(t)


def parse_instant(value: str | float) -> float:
    """ISO-8601 text (UTC when it has no offset) or epoch seconds; raises ValueError."""
    if isinstance(value, int | float):
        t = float(value)
    else:
        text = value.strip()
        try:
            t = float(text)
        except ValueError:
            try:
                d = dt.datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(f"{value!r} is not an ISO-8601 instant "
                                 "(e.g. 2026-10-25T00:00:00+02:00) or epoch seconds") from None
            if d.tzinfo is None:
                d = d.replace(tzinfo=dt.UTC)
            try:
                t = d.timestamp()
            except (OverflowError, OSError, ValueError):
                raise ValueError(f"{value!r} is out of range") from None
    if not math.isfinite(t) or not 0 <= t <= 253_402_300_799.0:  # to 9999-12-31T23:59:59Z
        raise ValueError(f"{value!r} is out of range (years 1970-9999)")
    return t


# ---------------------------------------------------------------------------------- errors


_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"(?:unknown|missing required) field `(?P<name>[^`]*)`")


def field_path(message: str, prefix: str = "") -> tuple[str | None, str]:
    """(field path, text) from a msgspec error message such as
    "Expected `int`, got `str` - at `$.jobs[0].priority`"."""
    text = message
    path = ""
    m = _AT_PATH.search(message)
    if m:
        path = m.group("path").lstrip(".")
        text = message[:m.start()]
    u = _UNKNOWN.search(text)
    if u:
        path = f"{path}.{u.group('name')}" if path else u.group("name")
    if prefix:
        path = f"{prefix}.{path}" if path and not path.startswith("[") else prefix + path
    return (path or None), text


# ---------------------------------------------------------------------------------- views


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id, action=job.action, payload=job.payload, task_id=job.task_id, kind=job.kind,
        state=job.state, due_at=iso(job.due_at) or "", scheduled_at=iso(job.scheduled_at),
        priority=job.priority, timeout=job.timeout, attempt=job.attempt,
        dedup_key=job.dedup_key, trace_id=job.trace_id, created_at=iso(job.created_at) or "",
        started_at=iso(job.started_at), recovered=job.recovered)


def finished_job_out(run: RunRecord, state: JobState) -> FinishedJobOut:
    return FinishedJobOut(
        id=run.job_id, action=run.action, task_id=run.task_id, state=state, outcome=run.outcome,
        error_code=run.error_code, detail=run.detail, trace_id=run.trace_id,
        scheduled_at=iso(run.scheduled_at), started_at=iso(run.started_at),
        finished_at=iso(run.finished_at) or "", attempt=run.attempt, recovered=run.recovered)


def accepted(job: Job, existed: bool = False) -> JobAccepted:
    return JobAccepted(id=job.id, due_at=iso(job.due_at) or "", trace_id=job.trace_id,
                       existed=existed)


def run_out(run: RunRecord) -> RunOut:
    return RunOut(
        job_id=run.job_id, task_id=run.task_id, action=run.action, trace_id=run.trace_id,
        span_id=run.span_id, scheduled_at=iso(run.scheduled_at), started_at=iso(run.started_at),
        finished_at=iso(run.finished_at) or "", attempt=run.attempt, outcome=run.outcome,
        error_code=run.error_code, detail=run.detail, recovered=run.recovered)


def task_out(view: KernelTaskView, description: str = "") -> TaskOut:
    return TaskOut(
        id=view.id, action=view.action, description=description, schedule=view.schedule,
        tz=view.tz, enabled=view.enabled, paused=view.paused, next_due=iso(view.next_due),
        last_outcome=view.last_outcome, last_error_code=view.last_error_code,
        last_finished_at=iso(view.last_finished_at), after=list(view.after),
        running=view.running)
