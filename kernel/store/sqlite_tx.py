"""The SQLite store's write transactions, run on its writer thread (no asyncio in here).

:func:`prepare` checks and migrates the file when the store opens. :class:`Op` and its
subclasses are the queue entries of the group commit: each carries its arguments, prepared on
the event loop (rows encoded when the call is made), and its future, settled on the event loop
after the commit. :func:`apply_batch` runs one batch as one transaction on the writer
connection, applying runs of same-kind operations together.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

from kernel.errors import KernelError, StoreCorrupt, StoreError, StoreReadOnly
from kernel.records import Job, MisfireRecord, RunRecord, ScheduleState, SubmitResult
from kernel.store import schema
from kernel.store.schema import job_row

T = TypeVar("T")
Row = tuple[Any, ...]
Con = sqlite3.Connection

JOB_FIELDS: Final = "state, attempt, started_at, body"
_IN_CHUNK: Final = 500  # ids per "IN (...)" query, below SQLITE_MAX_VARIABLE_NUMBER
_ROWS_PER_INSERT: Final = 256  # rows per multi-row INSERT: one sqlite3_step without the GIL

_INSERT_RUN: Final = (
    "INSERT INTO runs (job_id, task_id, outcome, trace_id, finished_at, body) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_LAST = (
    "max(coalesce(last_scheduled_at, excluded.last_scheduled_at), "
    "coalesce(excluded.last_scheduled_at, last_scheduled_at))"
)
_SET_STATE: Final = (
    "INSERT INTO schedule_state (task_id, last_scheduled_at, paused, next_due_at) "
    f"VALUES (?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET last_scheduled_at = {_LAST}, "
    "paused = excluded.paused, next_due_at = excluded.next_due_at"
)
_UPSERT_DEDUP: Final = (
    "INSERT INTO dedup (key, job_id, expires_at, body) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, "
    "expires_at = excluded.expires_at, body = excluded.body"
)
_ONE_ROW = "(" + ", ".join("?" * len(schema.JOB_COLUMNS)) + ")"
_INSERT_JOBS: Final = [
    f"INSERT INTO jobs ({', '.join(schema.JOB_COLUMNS)}) VALUES "
    f"{', '.join([_ONE_ROW] * k)} ON CONFLICT DO NOTHING"
    for k in range(_ROWS_PER_INSERT + 1)
]


# -- queue entries ----------------------------------------------------------------------------


class Op:
    __slots__ = ("error", "fut", "result")
    weight = 1
    #: May this operation's group commit beside another group in flight (``GroupCommit``
    #: with ``depth`` > 1)? Only kinds whose operations never touch a row another
    #: unacknowledged operation touches may; the others (state writes, cancels, anything
    #: else) keep the order they were issued in: their group waits for every group before it
    #: and no group starts until it committed.
    commutes = False

    def __init__(self, fut: asyncio.Future[Any]) -> None:
        self.fut = fut
        self.result: Any = None
        self.error: KernelError | None = None

    def settle(self) -> None:
        """Resolve the caller's future (event loop thread, after the commit)."""
        if not self.fut.done():
            if self.error is None:
                self.fut.set_result(self.result)
            else:
                self.fut.set_exception(self.error)

    def fail(self, err: KernelError) -> None:
        self.error = err
        self.result = None
        self.settle()


class Submit(Op):
    __slots__ = ("jobs", "now", "rows", "weight")

    def __init__(self, fut: asyncio.Future[Any], jobs: Sequence[Job], now: float) -> None:
        self.fut = fut
        self.result = None
        self.error = None
        self.jobs = jobs
        self.now = now
        self.rows = [job_row(job) for job in jobs]  # encoded now: later mutations don't count
        self.weight = len(jobs)


class MarkRunning(Op):
    __slots__ = ("args",)

    def __init__(self, fut: asyncio.Future[Any], args: tuple[float, int, str]) -> None:
        # two per run (with Finish): the fields set here, without a call to Op.__init__
        self.fut = fut
        self.result = None
        self.error = None
        self.args = args


class Finish(Op):
    __slots__ = ("follow_up", "job_id", "rows", "run")

    def __init__(
        self, fut: asyncio.Future[Any], job_id: str, run: RunRecord, follow_up: Sequence[Job]
    ) -> None:
        self.fut = fut
        self.result = None
        self.error = None
        self.job_id = job_id
        self.run = _run_row(run)
        if follow_up:
            self.follow_up: Sequence[Job] = list(follow_up)
            self.rows: Sequence[Row] = [job_row(job) for job in follow_up]
        else:  # most runs have no follow-up: no lists to build
            self.follow_up = self.rows = ()


class Cancel(Op):
    __slots__ = ("job_id", "run")

    def __init__(self, fut: asyncio.Future[Any], job_id: str, run: RunRecord | None) -> None:
        super().__init__(fut)
        self.job_id = job_id
        self.run = _run_row(run) if run is not None else None


class Call(Op):
    """Anything else: a function of the writer connection, run inside the batch."""

    __slots__ = ("fn",)

    def __init__(self, fut: asyncio.Future[Any], fn: Callable[[Con], Any]) -> None:
        super().__init__(fut)
        self.fn = fn


# -- opening ---------------------------------------------------------------------------------


def is_corruption(e: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the file is not a database, or a damaged one."""
    name = str(getattr(e, "sqlite_errorname", "") or "")
    text = str(e)
    return (name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or "not a database" in text
            or "malformed" in text)


def check_ours(con: Con, where: str) -> int:
    """Read (never write) that the file is ours, or a new, empty database; its schema version.

    :raises StoreCorrupt: not an SQLite database, or another application's.
    """
    try:
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
    except sqlite3.DatabaseError as e:
        if is_corruption(e):
            raise StoreCorrupt(
                f"{where} is not an SQLite database ({e}); the file was left untouched. "
                "Move it aside or point [store] path elsewhere."
            ) from None
        raise
    version = con.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    if app_id not in (0, schema.APPLICATION_ID) or (app_id == 0 and (version != 0 or tables)):
        raise StoreCorrupt(
            f"{where} is an SQLite database of another application "
            f"(application_id={app_id}, user_version={version}); the file was left untouched"
        )
    return int(version)


def prepare(con: Con, where: str, read_only: bool) -> int:
    """Check the file is ours (reading only), then switch to WAL and migrate; the version.

    The store has already checked an existing file on a read-only connection
    (:func:`kernel.store.sqlite_guard.probe`); this repeats the cheap part under the write lock.
    Nothing is written to a file that is up to date: no header write, no empty commit.
    """
    version = check_ours(con, where)
    schema.migration_plan(where, version)  # refuses a newer schema before any write
    if read_only:
        if version != schema.LATEST_VERSION:
            raise StoreReadOnly(
                f"{where}: schema version {version} needs migrating to "
                f"{schema.LATEST_VERSION}, but the store was opened read-only"
            )
        return version
    mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"{where}: cannot switch to WAL journal mode (got {mode!r})")
    # BEGIN IMMEDIATE also proves the file is writable: on a read-only file or directory it
    # fails (SQLITE_READONLY) before anything is acknowledged.
    con.execute("BEGIN IMMEDIATE")
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        for v, statements in schema.migration_plan(where, version):
            for sql in statements:
                con.execute(sql)
            con.execute(f"PRAGMA user_version = {v}")
        if con.execute("PRAGMA application_id").fetchone()[0] != schema.APPLICATION_ID:
            con.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
        con.execute("COMMIT")
    except BaseException:
        rollback(con)
        raise
    return schema.LATEST_VERSION


# -- one batch, one transaction -----------------------------------------------------------------


def apply_batch(con: Con, batch: Sequence[Op]) -> None:
    """Apply ``batch`` in one transaction, in order; raise (rolled back) if anything fails.

    Consecutive operations of one kind are applied together. Between two other operations,
    every ``MarkRunning`` goes before every ``Finish``: they commute there, since a job's
    ``MarkRunning`` is committed before its action starts, hence before its ``Finish`` is
    queued, and a ``Finish`` without follow-ups touches no other job's row. A ``Finish`` with
    follow-ups (retries, dependents) ends such a stretch: the marks queued after it go after
    its inserts, as queued. A loop turn that starts and ends hundreds of runs then costs three
    multi-row statements (one ``sqlite3_step``, one GIL hand-off each; see ``_many``), not
    hundreds of alternating small ones.
    """
    con.execute("BEGIN IMMEDIATE")
    try:
        i = 0
        n = len(batch)
        while i < n:
            kind = type(batch[i])
            j = i + 1
            if kind is MarkRunning or kind is Finish:
                marks: list[Op] = []
                fins: list[Op] = []
                while i < n:
                    op = batch[i]
                    if isinstance(op, MarkRunning):
                        marks.append(op)
                    elif isinstance(op, Finish):
                        fins.append(op)
                        if op.follow_up:
                            i += 1  # its follow-ups are inserted before any later mark
                            break
                    else:
                        break
                    i += 1
                if marks:
                    _mark_running(con, marks)
                if fins:
                    _finishes(con, fins)
                continue
            while j < n and type(batch[j]) is kind:
                j += 1
            _APPLY[kind](con, batch[i:j])
            i = j
        con.execute("COMMIT")
    except BaseException:
        rollback(con)
        raise


def rollback(con: Con) -> None:
    """Roll back if a transaction is open (SQLite ends some on its own, e.g. on SQLITE_FULL)."""
    try:
        con.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def chunks(seq: Sequence[T], size: int = _IN_CHUNK) -> Iterable[Sequence[T]]:
    return (seq[i : i + size] for i in range(0, len(seq), size))


def _run_row(run: RunRecord) -> Row:
    return (
        run.job_id, run.task_id, run.outcome, run.trace_id, run.finished_at, schema.encode(run)
    )


def _jobs_by_id(con: Con, ids: Sequence[str]) -> dict[str, Job]:
    found: dict[str, Job] = {}
    for part in chunks(list(dict.fromkeys(ids))):
        marks = ",".join("?" * len(part))
        sql = f"SELECT id, {JOB_FIELDS} FROM jobs WHERE id IN ({marks})"
        for jid, *rest in con.execute(sql, part):
            found[jid] = schema.decode_job(*rest)
    return found


def _existing(con: Con, job: Job) -> Job | None:
    """The stored job that made ``job``'s insert a no-op: same id, or same cron occurrence."""
    row = con.execute(f"SELECT {JOB_FIELDS} FROM jobs WHERE id = ?", (job.id,)).fetchone()
    if row is None and schema.is_occurrence(job):
        row = con.execute(
            f"SELECT {JOB_FIELDS} FROM jobs "
            "WHERE kind = 'cron' AND task_id = ? AND scheduled_at = ?",
            (job.task_id, job.scheduled_at),
        ).fetchone()
    return schema.decode_job(*row) if row is not None else None


def _insert_rows(con: Con, rows: Sequence[Row]) -> int:
    """Insert job rows (skipping conflicts) with multi-row INSERTs; the number inserted."""
    inserted = 0
    at = 0
    while at < len(rows):
        k = min(_ROWS_PER_INSERT, len(rows) - at)
        if k < _ROWS_PER_INSERT:
            k = 1 << (k.bit_length() - 1)  # a few statement shapes, all cached
        params = [x for row in rows[at : at + k] for x in row]
        inserted += con.execute(_INSERT_JOBS[k], params).rowcount
        at += k
    return inserted


def insert_jobs(
    con: Con, jobs: Sequence[Job], rows: Sequence[Row], now_of: Callable[[int], float]
) -> list[SubmitResult]:
    """Store ``jobs`` (``rows`` = their encoded rows) by ``Store.submit``'s rules.

    ``now_of(i)`` is "now" for ``jobs[i]`` (only dedup keys need it). The common case (no dedup
    key, no conflict) is only the multi-row INSERTs.
    """
    n = len(jobs)
    results: list[SubmitResult | None] = [None] * n
    same_as: list[tuple[int, int]] = []  # (i, w): job i lost its dedup key to job w of the batch
    claimed: dict[str, int] = {}  # dedup key -> index of the job of this batch that takes it
    todo: list[int] | range = range(n)
    if any(job.dedup_key is not None for job in jobs):
        todo = []
        keys = list({job.dedup_key for job in jobs if job.dedup_key is not None})
        held: dict[str, tuple[str, float | None, bytes]] = {}
        for part in chunks(keys):
            marks = ",".join("?" * len(part))
            sql = f"SELECT key, job_id, expires_at, body FROM dedup WHERE key IN ({marks})"
            for key, jid, exp, body in con.execute(sql, part):
                held[key] = (jid, exp, body)
        live: list[tuple[int, str, bytes]] = []
        for i, job in enumerate(jobs):
            key = job.dedup_key
            if key is None:
                todo.append(i)
            elif key in claimed:
                same_as.append((i, claimed[key]))
            elif (h := held.get(key)) is not None and (h[1] is None or h[1] > now_of(i)):
                live.append((i, h[0], h[2]))
            else:
                claimed[key] = i
                todo.append(i)
        if live:
            current = _jobs_by_id(con, [jid for _, jid, _ in live])
            for i, jid, body in live:
                found = current.get(jid) or schema.decode_snapshot(body)
                results[i] = SubmitResult(job=found, existed=True)
        rows = [rows[i] for i in todo]

    inserted = _insert_rows(con, rows)
    if inserted == len(rows):
        for i in todo:
            results[i] = SubmitResult(job=jobs[i])
    else:  # some rows hit an existing id or cron occurrence: the exception, row by row
        mine = dict(
            con.execute("SELECT id, body FROM jobs ORDER BY seq DESC LIMIT ?", (inserted,))
        )
        for i, row in zip(todo, rows, strict=True):
            job = jobs[i]
            if mine.get(job.id) == row[-1]:
                del mine[job.id]
                results[i] = SubmitResult(job=job)
                continue
            other = _existing(con, job)
            if other is None:
                raise StoreError(f"job {job.id!r} was neither stored nor found in the store")
            results[i] = SubmitResult(job=other, existed=True)

    for i, w in same_as:
        won = results[w]
        assert won is not None
        copy = schema.decode_job(won.job.state, won.job.attempt, won.job.started_at,
                                 schema.encode(won.job))
        results[i] = SubmitResult(job=copy, existed=True)
    if claimed:
        con.executemany(
            _UPSERT_DEDUP,
            [
                (key, r.job.id, jobs[i].dedup_expires_at, schema.encode(r.job))
                for key, i in claimed.items()
                if (r := results[i]) is not None
            ],
        )
    latest: dict[str, float] = {}
    for i in todo:
        r = results[i]
        job = jobs[i]
        if (
            r is not None and not r.existed and schema.is_occurrence(job)
            and job.task_id is not None and job.scheduled_at is not None
        ):
            latest[job.task_id] = max(latest.get(job.task_id, job.scheduled_at), job.scheduled_at)
    if latest:  # one row per task of the batch: a herd's 100k tasks in a few statements
        _many(con, _raise_last_sql, list(latest.items()))
    return [r for r in results if r is not None]


# -- batched application of each kind of operation ---------------------------------------------


def _submits(con: Con, ops: Sequence[Op]) -> None:
    subs = [op for op in ops if isinstance(op, Submit)]
    if len(subs) == 1:
        one = subs[0]
        one.result = insert_jobs(con, one.jobs, one.rows, lambda i: one.now)
        return
    nows: list[float] = []

    def now_of(i: int) -> float:
        if not nows:
            nows.extend(op.now for op in subs for _ in op.jobs)
        return nows[i]

    results = insert_jobs(
        con,
        [job for op in subs for job in op.jobs],
        [row for op in subs for row in op.rows],
        now_of,
    )
    at = 0
    for op in subs:
        op.result = results[at : at + len(op.jobs)]
        at += len(op.jobs)


# Statements over many rows at once. Each sqlite3_step releases the GIL, and taking it back
# while the event loop runs Python costs the writer thread up to the switch interval (5 ms):
# so a stretch of marks, deletes or run records is one statement of exactly its size (up to
# _MANY_MAX rows), not executemany's one step per row nor a ladder of power-of-two shapes.
# Parsing a statement of a new size costs far less than one such wait.
_MANY_MAX: Final = 2048  # rows per statement: at most 6 x 2048 variables (SQLite allows 32766)


def _values(k: int, width: int) -> str:
    return ", ".join(["(" + ", ".join("?" * width) + ")"] * k)


@functools.lru_cache(maxsize=256)
def _mark_running_sql(k: int) -> str:
    return ("UPDATE jobs SET state = 'running', started_at = v.column2, attempt = v.column3 "
            f"FROM (VALUES {_values(k, 3)}) AS v WHERE jobs.id = v.column1")


@functools.lru_cache(maxsize=256)
def _delete_jobs_sql(k: int) -> str:
    return f"DELETE FROM jobs WHERE id IN ({', '.join('?' * k)})"


@functools.lru_cache(maxsize=256)
def _insert_runs_sql(k: int) -> str:
    return ("INSERT INTO runs (job_id, task_id, outcome, trace_id, finished_at, body) "
            f"VALUES {_values(k, 6)}")


@functools.lru_cache(maxsize=256)
def _raise_last_sql(k: int) -> str:
    return ("INSERT INTO schedule_state (task_id, last_scheduled_at) "
            f"VALUES {_values(k, 2)} ON CONFLICT (task_id) DO UPDATE SET last_scheduled_at = "
            f"{_LAST}")


def _many(con: Con, sql: Callable[[int], str], rows: Sequence[Row]) -> None:
    """Run ``sql(k)`` over ``rows``, ``_MANY_MAX`` rows per statement at most."""
    for at in range(0, len(rows), _MANY_MAX):
        part = rows[at : at + _MANY_MAX]
        con.execute(sql(len(part)), [x for row in part for x in row])


def _mark_running(con: Con, ops: Sequence[Op]) -> None:
    # (started_at, attempt, job_id) -> (job_id, started_at, attempt) for the VALUES list
    _many(con, _mark_running_sql,
          [(op.args[2], op.args[0], op.args[1]) for op in ops if isinstance(op, MarkRunning)])


def _finishes(con: Con, ops: Sequence[Op]) -> None:
    fins = [op for op in ops if isinstance(op, Finish)]
    _many(con, _delete_jobs_sql, [(op.job_id,) for op in fins])
    _many(con, _insert_runs_sql, [op.run for op in fins])
    if any(op.follow_up for op in fins):
        follow = [job for op in fins for job in op.follow_up]
        nows = [op.run[4] for op in fins for _ in op.follow_up]  # run.finished_at
        insert_jobs(con, follow, [row for op in fins for row in op.rows], nows.__getitem__)


def _cancels(con: Con, ops: Sequence[Op]) -> None:
    cans = [op for op in ops if isinstance(op, Cancel)]
    found = _jobs_by_id(con, [op.job_id for op in cans])
    runs: list[Row] = []
    for op in cans:
        op.result = found.pop(op.job_id, None)
        if op.result is not None and op.run is not None:
            runs.append(op.run)
    con.executemany("DELETE FROM jobs WHERE id = ?", [(op.job_id,) for op in cans])
    if runs:
        con.executemany(_INSERT_RUN, runs)


def _calls(con: Con, ops: Sequence[Op]) -> None:
    for op in ops:
        if isinstance(op, Call):
            op.result = op.fn(con)


_APPLY: Final[dict[type[Op], Callable[[Con, Sequence[Op]], None]]] = {
    Submit: _submits,
    MarkRunning: _mark_running,
    Finish: _finishes,
    Cancel: _cancels,
    Call: _calls,
}


# -- the other writes, as functions for Call ---------------------------------------------------


def set_schedule_state(state: ScheduleState) -> Callable[[Con], None]:
    row = (state.task_id, state.last_scheduled_at, int(state.paused), state.next_due_at)

    def step(con: Con) -> None:
        con.execute(_SET_STATE, row)

    return step


def record_misfire(rec: MisfireRecord) -> Callable[[Con], None]:
    row = (rec.task_id, rec.decided_at, schema.encode(rec))

    def step(con: Con) -> None:
        con.execute("INSERT INTO misfires (task_id, decided_at, body) VALUES (?, ?, ?)", row)

    return step


_OLDEST = "DELETE FROM runs WHERE seq IN (SELECT seq FROM runs {} ORDER BY finished_at, seq LIMIT ?)"


def prune_older(cutoff: float, batch: int) -> Callable[[Con], int]:
    """Delete up to ``batch`` runs finished before ``cutoff``; the number deleted."""
    sql = _OLDEST.format("WHERE finished_at < ?")
    return lambda con: con.execute(sql, (cutoff, batch)).rowcount


def prune_beyond(keep: int, batch: int) -> Callable[[Con], int]:
    """Delete up to ``batch`` of the oldest runs beyond the newest ``keep``."""
    sql = _OLDEST.format("")

    def step(con: Con) -> int:
        excess = con.execute("SELECT count(*) FROM runs").fetchone()[0] - keep
        return con.execute(sql, (min(excess, batch),)).rowcount if excess > 0 else 0

    return step


def purge_dedup(now: float, batch: int) -> Callable[[Con], int]:
    sql = "DELETE FROM dedup WHERE key IN (SELECT key FROM dedup WHERE expires_at <= ? LIMIT ?)"
    return lambda con: con.execute(sql, (now, batch)).rowcount
