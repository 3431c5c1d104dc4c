"""The PostgreSQL store's persisted format: tables, forward migrations and row codecs.

Pure data and pure functions, no I/O: :mod:`kernel.store.postgres` runs the statements.

Namespace. Every table lives in one PostgreSQL schema (``kernel`` by default, ``[store] schema``),
so the kernel can share a database with other applications and tests can give each case its own.

Versioning. ``schema_version`` holds one row per applied migration; :data:`MIGRATIONS` maps each
version to the statements that bring the tables from the previous version to it. Migrations run
in one transaction under a transaction-scoped advisory lock, so kernels starting together do not
race. A version newer than :data:`LATEST_VERSION` was written by a newer kernel and is refused
(:class:`~kernel.errors.StoreCorrupt`), never downgraded; a schema that holds tables but no
``schema_version`` is another application's and is refused as well.

Rows. As in the SQLite store, a job is its msgpack-encoded :class:`~kernel.records.Job`
(``body``, exactly the submitted struct) plus the columns that are indexed or change after
submission: ``state``, ``attempt``, ``started_at`` and ``recovered`` override the body when
decoding. Fleet columns: ``owner`` (the kernel that claimed the job, ``NULL`` = unclaimed),
``claimed_at``; ``priority`` and ``gpu_memory_mb`` let a claim pick what fits a box.
"""

from __future__ import annotations

from typing import Any, Final

from kernel.errors import StoreCorrupt
from kernel.records import Job, JobState
from kernel.store import schema

#: Key of the transaction-scoped advisory lock taken while migrating ("OAK1").
MIGRATION_LOCK: Final = 0x4F414B31
#: Key of the advisory lock that lets one kernel at a time purge history, dedup keys, fired rows.
PURGE_LOCK: Final = 0x4F414B32

_V1: Final = (
    """CREATE TABLE jobs (
        seq           bigint GENERATED ALWAYS AS IDENTITY,
        id            text    NOT NULL PRIMARY KEY,
        due_at        float8  NOT NULL,
        state         text    NOT NULL,
        kind          text    NOT NULL,
        task_id       text,
        scheduled_at  float8,
        attempt       integer NOT NULL,
        started_at    float8,
        recovered     boolean NOT NULL DEFAULT false,
        priority      integer NOT NULL DEFAULT 0,
        gpu_memory_mb integer NOT NULL DEFAULT 0,
        owner         text,
        claimed_at    float8,
        body          bytea   NOT NULL
    ) WITH (fillfactor = 80)""",
    "CREATE INDEX jobs_due ON jobs (due_at, seq)",
    # What claim_due scans: unclaimed jobs in due order. No index mentions state, started_at or
    # attempt, so that marking a job running is a HOT update (no index entry written; the 20 %
    # free space per page keeps the new version on the same page).
    "CREATE INDEX jobs_unclaimed ON jobs (due_at, seq) WHERE owner IS NULL",
    "CREATE INDEX jobs_owner ON jobs (owner) WHERE owner IS NOT NULL",
    # One stored job per cron occurrence: (task, scheduled instant), as in the SQLite store.
    "CREATE UNIQUE INDEX jobs_cron ON jobs (task_id, scheduled_at) WHERE kind = 'cron'",
    "CREATE INDEX jobs_task ON jobs (task_id, due_at) WHERE task_id IS NOT NULL",
    # Dedup keys outlive their job; taken_at is the "now" of the submission that took the key,
    # which lets one upsert decide, row by row, whether the key it meets has expired.
    """CREATE TABLE dedup (
        key        text   NOT NULL PRIMARY KEY,
        job_id     text   NOT NULL,
        expires_at float8,
        taken_at   float8 NOT NULL,
        body       bytea  NOT NULL
    )""",
    "CREATE INDEX dedup_expires ON dedup (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE runs (
        seq         bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id      text    NOT NULL,
        task_id     text,
        outcome     text    NOT NULL,
        trace_id    text    NOT NULL,
        finished_at float8  NOT NULL,
        attempt     integer NOT NULL,
        owner       text,
        superseded  boolean NOT NULL DEFAULT false,
        body        bytea   NOT NULL
    )""",
    "CREATE INDEX runs_finished ON runs (finished_at, seq)",
    "CREATE INDEX runs_task ON runs (task_id, finished_at)",
    "CREATE INDEX runs_trace ON runs (trace_id)",
    "CREATE INDEX runs_job ON runs (job_id)",
    """CREATE TABLE schedule_state (
        task_id           text    NOT NULL PRIMARY KEY,
        last_scheduled_at float8,
        paused            boolean NOT NULL DEFAULT false,
        next_due_at       float8
    )""",
    """CREATE TABLE misfires (
        seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        task_id    text   NOT NULL,
        decided_at float8 NOT NULL,
        body       bytea  NOT NULL
    )""",
    "CREATE INDEX misfires_task ON misfires (task_id, decided_at)",
    # -- the fleet ------------------------------------------------------------------------------
    # One row per live kernel process; a row whose heartbeat is older than the TTL is deleted
    # by whoever rescues its jobs, which also fences the dead kernel out of claiming.
    """CREATE TABLE kernels (
        id           text   NOT NULL PRIMARY KEY,
        host         text   NOT NULL,
        pid          integer NOT NULL,
        started_at   float8 NOT NULL,
        heartbeat_at float8 NOT NULL
    )""",
    "CREATE INDEX kernels_heartbeat ON kernels (heartbeat_at)",
    # Every cron occurrence ever fired, keyed by (task, instant); it outlives the job row, so
    # an occurrence runs once fleet-wide even after its job finished.
    """CREATE TABLE fired (
        task_id  text   NOT NULL,
        instant  float8 NOT NULL,
        job_id   text   NOT NULL,
        fired_at float8 NOT NULL,
        owner    text,
        PRIMARY KEY (task_id, instant)
    )""",
    "CREATE INDEX fired_at ON fired (fired_at)",
)

#: version -> statements that migrate the tables from ``version - 1`` to ``version``.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {1: _V1}
LATEST_VERSION: Final = max(MIGRATIONS)

VERSION_TABLE: Final = """CREATE TABLE IF NOT EXISTS schema_version (
    version    integer NOT NULL PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


def migration_plan(where: str, version: int) -> list[tuple[int, tuple[str, ...]]]:
    """The steps from ``version`` to :data:`LATEST_VERSION`, oldest first.

    :raises StoreCorrupt: ``version`` is newer than this kernel knows (or negative).
    """
    if version > LATEST_VERSION or version < 0:
        raise StoreCorrupt(
            f"{where}: store schema version {version} is newer than this kernel supports "
            f"(latest known: {LATEST_VERSION}); it was written by a newer kernel. "
            "Upgrade the kernel or point [store] schema elsewhere; nothing was changed."
        )
    return [(v, MIGRATIONS[v]) for v in range(version + 1, LATEST_VERSION + 1)]


def quote_ident(name: str) -> str:
    """``name`` as a PostgreSQL identifier (a schema name from the config)."""
    return '"' + name.replace('"', '""') + '"'


# -- rows ---------------------------------------------------------------------------------------

#: The job columns of an insert, in the order of :func:`job_columns` arrays.
JOB_COLUMNS: Final = (
    "id", "due_at", "state", "kind", "task_id", "scheduled_at", "attempt", "started_at",
    "recovered", "priority", "gpu_memory_mb", "owner", "body",
)
_JOB_TYPES: Final = (
    "text", "float8", "text", "text", "text", "float8", "int4", "float8", "bool", "int4", "int4",
    "text", "bytea",
)
#: ``SELECT`` list that :func:`decode_job` reads.
JOB_FIELDS: Final = "state, attempt, started_at, recovered, body"
def job_row(job: Job, body: bytes, owner: str | None) -> tuple[Any, ...]:
    """The ``jobs`` row of ``job`` in :data:`JOB_COLUMNS` order."""
    return (
        job.id, job.due_at, job.state.value, job.kind.value, job.task_id, job.scheduled_at,
        job.attempt, job.started_at, job.recovered, job.priority, job.gpu_memory_mb, owner, body,
    )


def insert_jobs_sql(cols: list[list[Any]]) -> tuple[str, list[Any]]:
    """The ``INSERT ... SELECT FROM unnest(...)`` of job rows given as columns (:func:`columns`
    of :func:`job_row` rows), and its parameters. A column whose values are all equal (state,
    kind, attempt, owner... usually are within a batch) is passed once, as a scalar, instead of
    as an array: asyncpg spends ~0.3 µs encoding each array element, and these columns were
    half of a submitted job's elements. One statement text per set of such columns (a few in
    practice; asyncpg caches each prepared)."""
    select: list[str] = []
    arrays: list[str] = []
    params: list[Any] = []
    for k, (typ, col) in enumerate(zip(_JOB_TYPES, cols, strict=True)):
        if k not in _ALWAYS_ARRAY and col and all(v == col[0] for v in col):
            params.append(col[0])
            select.append(f"${len(params)}::{typ}")
        else:
            params.append(col)
            arrays.append(f"${len(params)}::{typ}[]")
            select.append(f"u.c{len(arrays)}")
    names = ", ".join(f"c{i}" for i in range(1, len(arrays) + 1))
    sql = (f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) SELECT {', '.join(select)} "
           f"FROM unnest({', '.join(arrays)}) AS u({names}) ON CONFLICT DO NOTHING RETURNING id")
    return sql, params


_ALWAYS_ARRAY: Final = frozenset({0, 1, 12})  # id, due_at, body: different per job anyway


def columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows turned into one list per column (the arrays an ``unnest`` insert takes)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(c) for c in zip(*rows, strict=True)]


def decode_job(state: str, attempt: int, started_at: float | None, recovered: bool,
               body: bytes) -> Job:
    """Rebuild a stored job: the submitted body, with the columns that change after it."""
    job = schema.decode_job(state, attempt, started_at, body)
    if recovered and not job.recovered:
        job.recovered = True
    return job


def decode_snapshot(body: bytes) -> Job:
    return schema.decode_snapshot(body)


def done(job: Job) -> Job:
    """A copy of ``job`` marked finished (what a dedup key answers once its job is gone)."""
    copy = schema.decode_snapshot(schema.encode(job))
    copy.state = JobState.DONE
    return copy


__all__ = [
    "JOB_COLUMNS",
    "JOB_FIELDS",
    "LATEST_VERSION",
    "MIGRATIONS",
    "MIGRATION_LOCK",
    "PURGE_LOCK",
    "VERSION_TABLE",
    "columns",
    "decode_job",
    "decode_snapshot",
    "insert_jobs_sql",
    "job_row",
    "migration_plan",
    "quote_ident",
]
