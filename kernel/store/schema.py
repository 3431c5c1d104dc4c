"""The persisted format: SQLite schema, forward migrations and row codecs.

Pure data and pure functions, no I/O: :mod:`kernel.store.sqlite` runs the statements.

Versioning. ``PRAGMA user_version`` holds the schema version and ``PRAGMA application_id`` marks
the file as ours. :data:`MIGRATIONS` maps each version to the statements that bring a database
from the previous version to it; a new database runs them all, in one transaction. A file whose
version is newer than :data:`LATEST_VERSION` was written by a newer kernel and is refused
(:class:`~kernel.errors.StoreCorrupt`), never downgraded.

Rows. A job is stored as its msgpack-encoded :class:`~kernel.records.Job` (``body``, exactly the
submitted struct) plus the columns that are indexed or change after submission: ``state``,
``attempt`` and ``started_at`` (set by ``mark_running``) override the body when decoding. Run
history and misfire decisions are msgpack bodies plus the columns their queries filter on.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from kernel.errors import BadPayload, StoreCorrupt
from kernel.records import Job, JobKind, JobState, MisfireRecord, RunRecord

#: "OAK1": marks a database file as an Open-AutoGLM kernel store.
APPLICATION_ID: Final = 0x4F414B31

_V1: Final = (
    # seq gives insertion order (ties in due_at); id is the job's own key.
    """CREATE TABLE jobs (
        seq          INTEGER PRIMARY KEY,
        id           TEXT    NOT NULL UNIQUE,
        due_at       REAL    NOT NULL,
        state        TEXT    NOT NULL,
        kind         TEXT    NOT NULL,
        task_id      TEXT,
        scheduled_at REAL,
        attempt      INTEGER NOT NULL,
        started_at   REAL,
        body         BLOB    NOT NULL
    )""",
    "CREATE INDEX jobs_due ON jobs (due_at)",
    # One stored job per cron occurrence: (task, scheduled instant).
    "CREATE UNIQUE INDEX jobs_cron ON jobs (task_id, scheduled_at) WHERE kind = 'cron'",
    "CREATE INDEX jobs_task ON jobs (task_id, due_at) WHERE task_id IS NOT NULL",
    "CREATE INDEX jobs_running ON jobs (due_at) WHERE state = 'running'",
    # Dedup keys outlive their job (a finished job still answers its key until expiry), so the
    # key keeps a snapshot of the job it points at.
    """CREATE TABLE dedup (
        key        TEXT PRIMARY KEY,
        job_id     TEXT NOT NULL,
        expires_at REAL,
        body       BLOB NOT NULL
    )""",
    "CREATE INDEX dedup_expires ON dedup (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE runs (
        seq         INTEGER PRIMARY KEY,
        job_id      TEXT NOT NULL,
        task_id     TEXT,
        outcome     TEXT NOT NULL,
        trace_id    TEXT NOT NULL,
        finished_at REAL NOT NULL,
        body        BLOB NOT NULL
    )""",
    "CREATE INDEX runs_finished ON runs (finished_at)",
    "CREATE INDEX runs_task ON runs (task_id, finished_at)",
    "CREATE INDEX runs_trace ON runs (trace_id)",
    """CREATE TABLE schedule_state (
        task_id           TEXT PRIMARY KEY,
        last_scheduled_at REAL,
        paused            INTEGER NOT NULL DEFAULT 0,
        next_due_at       REAL
    ) WITHOUT ROWID""",
    """CREATE TABLE misfires (
        seq        INTEGER PRIMARY KEY,
        task_id    TEXT NOT NULL,
        decided_at REAL NOT NULL,
        body       BLOB NOT NULL
    )""",
    "CREATE INDEX misfires_task ON misfires (task_id, decided_at)",
)

_V2: Final = (
    # GET /jobs/{id} of a finished job (and `runs --job`) read its runs by job id: without this
    # index that is a scan of the whole run history.
    "CREATE INDEX runs_job ON runs (job_id)",
)

#: version -> statements that migrate a database from ``version - 1`` to ``version``.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {1: _V1, 2: _V2}
LATEST_VERSION: Final = max(MIGRATIONS)


def migration_plan(path: str, version: int) -> list[tuple[int, tuple[str, ...]]]:
    """The steps from ``version`` to :data:`LATEST_VERSION`, oldest first.

    :raises StoreCorrupt: ``version`` is newer than this kernel knows (or negative).
    """
    if version > LATEST_VERSION or version < 0:
        raise StoreCorrupt(
            f"{path}: store schema version {version} is newer than this kernel supports "
            f"(latest known: {LATEST_VERSION}); it was written by a newer kernel. "
            "Upgrade the kernel or point [store] path elsewhere; the file was left untouched."
        )
    return [(v, MIGRATIONS[v]) for v in range(version + 1, LATEST_VERSION + 1)]


# -- codecs ---------------------------------------------------------------------------------

_ENCODER: Final = msgspec.msgpack.Encoder()
_JOB: Final = msgspec.msgpack.Decoder(Job)
_RUN: Final = msgspec.msgpack.Decoder(RunRecord)
_MISFIRE: Final = msgspec.msgpack.Decoder(MisfireRecord)

encode = _ENCODER.encode
decode_run = _RUN.decode
decode_misfire = _MISFIRE.decode

#: Column order of :func:`job_row` (and of the INSERT built from it).
JOB_COLUMNS: Final = (
    "id", "due_at", "state", "kind", "task_id", "scheduled_at", "attempt", "started_at", "body"
)


def encode_job(job: Job) -> bytes:
    """The stored body of ``job``.

    :raises BadPayload: the payload holds something msgpack cannot carry.
    """
    try:
        return _ENCODER.encode(job)
    except (TypeError, OverflowError, ValueError) as e:
        raise BadPayload(f"job {job.id!r}: its payload cannot be stored: {e}") from None


def job_row(job: Job) -> tuple[Any, ...]:
    """The ``jobs`` row of ``job`` in :data:`JOB_COLUMNS` order.

    :raises BadPayload: the payload holds something msgpack cannot carry.
    """
    try:
        body = _ENCODER.encode(job)
    except (TypeError, OverflowError, ValueError):
        body = encode_job(job)  # raises with the message
    return (
        job.id, job.due_at, job.state, job.kind, job.task_id, job.scheduled_at, job.attempt,
        job.started_at, body,
    )


def decode_job(state: str, attempt: int, started_at: float | None, body: bytes) -> Job:
    """Rebuild a stored job: the submitted body, with the columns ``mark_running`` changes."""
    job = _JOB.decode(body)
    if state != job.state or attempt != job.attempt or started_at != job.started_at:
        job.state = JobState(state)
        job.attempt = attempt
        job.started_at = started_at
    return job


def decode_snapshot(body: bytes) -> Job:
    """A job that a dedup key points at but that is no longer stored: finished or cancelled."""
    job = _JOB.decode(body)
    job.state = JobState.DONE
    return job


def is_occurrence(job: Job) -> bool:
    """Whether ``job`` is a cron occurrence, unique per (task_id, scheduled_at)."""
    return job.kind is JobKind.CRON


__all__ = [
    "APPLICATION_ID",
    "JOB_COLUMNS",
    "LATEST_VERSION",
    "MIGRATIONS",
    "decode_job",
    "decode_misfire",
    "decode_run",
    "decode_snapshot",
    "encode",
    "encode_job",
    "is_occurrence",
    "job_row",
    "migration_plan",
]
