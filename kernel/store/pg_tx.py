"""The PostgreSQL store's write transactions: queue entries and how a batch of them is applied.

:class:`Op` and its subclasses are the entries of the group-commit queue (as in
:mod:`kernel.store.sqlite_tx`): each carries its arguments, encoded on the event loop when the
call is made, and its future, settled after the commit. :func:`apply_batch` runs one batch as one
transaction on the writer connection, applying runs of same-kind operations together, each run
as a few array statements (``unnest``): one round trip per statement, whatever the batch size.

Concurrency with other kernels. Every statement here is safe against writers on other
connections at ``READ COMMITTED``: inserts use ``ON CONFLICT`` (a conflicting row being written
elsewhere is waited for, then decided on its committed state), dedup keys are taken by one upsert
whose ``WHERE`` re-checks expiry on the latest row, and owner-checked writes re-check ``owner``
on the row they lock. A deadlock between two kernels' batches is possible in principle (two
batches touching the same rows in different orders); the store retries the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import asyncpg
import asyncpg.pool

from kernel.errors import StoreError
from kernel.records import Job, MisfireRecord, RunRecord, ScheduleState, SubmitResult
from kernel.store import pg_schema as ps
from kernel.store import schema
from kernel.store.sqlite_tx import Op  # the group-commit queue entry: the same for both stores

#: A connection: the writer's own, or one borrowed from the pool.
Con = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
Row = tuple[Any, ...]

_RUN_TYPES: Final = ("text", "text", "text", "text", "float8", "int4", "text", "bool", "bytea")
_INSERT_RUNS: Final = (
    "INSERT INTO runs (job_id, task_id, outcome, trace_id, finished_at, attempt, owner, "
    "superseded, body) SELECT * FROM unnest("
    + ", ".join(f"${i}::{t}[]" for i, t in enumerate(_RUN_TYPES, start=1)) + ")"
)
_TAKE_KEYS: Final = (
    "INSERT INTO dedup (key, job_id, expires_at, taken_at, body) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[], $5::bytea[]) "
    "ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, expires_at = excluded.expires_at, "
    "taken_at = excluded.taken_at, body = excluded.body "
    "WHERE dedup.expires_at IS NOT NULL AND dedup.expires_at <= excluded.taken_at "
    "RETURNING key"
)
_RAISE_LAST: Final = (
    "INSERT INTO schedule_state (task_id, last_scheduled_at) "
    "SELECT * FROM unnest($1::text[], $2::float8[]) ON CONFLICT (task_id) DO UPDATE "
    "SET last_scheduled_at = GREATEST(schedule_state.last_scheduled_at, "
    "excluded.last_scheduled_at)"
)
_SET_STATE: Final = (
    "INSERT INTO schedule_state (task_id, last_scheduled_at, paused, next_due_at) "
    "VALUES ($1, $2, $3, $4) ON CONFLICT (task_id) DO UPDATE SET "
    "last_scheduled_at = GREATEST(schedule_state.last_scheduled_at, excluded.last_scheduled_at), "
    "paused = excluded.paused, next_due_at = excluded.next_due_at"
)


def run_row(run: RunRecord, owner: str | None = None, superseded: bool = False) -> Row:
    return (
        run.job_id, run.task_id, run.outcome.value, run.trace_id, run.finished_at, run.attempt,
        owner, superseded, schema.encode(run),
    )


# -- queue entries ----------------------------------------------------------------------------


class Submit(Op):
    """``submit`` (``owner`` is None) or a submission claimed at insert by ``owner``."""

    commutes = True  # (see Op.commutes) each for its own job(s)
    __slots__ = ("bodies", "claim", "jobs", "now", "owner", "weight")

    def __init__(self, fut: asyncio.Future[Any], jobs: Sequence[Job], now: float,
                 owner: str | None = None, claim_before: float | None = None,
                 claim_limit: int | None = None) -> None:
        super().__init__(fut)
        self.jobs = list(jobs)
        self.now = now
        self.bodies = [schema.encode_job(job) for job in jobs]  # later mutations don't count
        self.owner = owner
        self.weight = len(jobs)
        # per job: claimed by ``owner`` at insert (due by ``claim_before``; the first
        # ``claim_limit`` of those, in the order given)
        self.claim = [False] * len(self.jobs)
        if owner is not None and claim_before is not None:
            left = len(self.jobs) if claim_limit is None else claim_limit
            for i, job in enumerate(self.jobs):
                if left <= 0:
                    break
                if job.due_at <= claim_before:
                    self.claim[i] = True
                    left -= 1


class MarkRunning(Op):
    commutes = True  # (see Op.commutes) each for its own job(s)
    __slots__ = ("args", "owner")

    def __init__(self, fut: asyncio.Future[Any], args: tuple[str, float, int],
                 owner: str | None = None) -> None:
        super().__init__(fut)
        self.args = args
        self.owner = owner


class Finish(Op):
    commutes = True  # (see Op.commutes) each for its own job(s)
    __slots__ = ("attempt", "bodies", "follow_up", "job_id", "owner", "run", "run_rec")

    def __init__(self, fut: asyncio.Future[Any], job_id: str, run: RunRecord,
                 follow_up: Sequence[Job], owner: str | None = None) -> None:
        super().__init__(fut)
        self.job_id = job_id
        self.run_rec = run
        self.run = run_row(run, owner)
        self.follow_up = list(follow_up)
        self.bodies = [schema.encode_job(job) for job in follow_up]
        self.owner = owner


class Cancel(Op):
    __slots__ = ("job_id", "run")

    def __init__(self, fut: asyncio.Future[Any], job_id: str, run: RunRecord | None) -> None:
        super().__init__(fut)
        self.job_id = job_id
        self.run = run_row(run) if run is not None else None


class Call(Op):
    """Anything else: a coroutine function of the writer connection, run inside the batch."""

    __slots__ = ("fn",)

    def __init__(self, fut: asyncio.Future[Any], fn: Callable[[Con], Awaitable[Any]]) -> None:
        super().__init__(fut)
        self.fn = fn


# -- inserting jobs by submit's rules ----------------------------------------------------------


async def _jobs_by_id(con: Con, ids: Sequence[str]) -> dict[str, Job]:
    if not ids:
        return {}
    rows = await con.fetch(f"SELECT id, {ps.JOB_FIELDS} FROM jobs WHERE id = ANY($1::text[])",
                           list(ids))
    return {r[0]: ps.decode_job(*r[1:]) for r in rows}


async def _jobs_by_occurrence(con: Con, occ: Sequence[tuple[str, float]]
                              ) -> dict[tuple[str, float], Job]:
    if not occ:
        return {}
    rows = await con.fetch(
        f"SELECT j.task_id, j.scheduled_at, {', '.join('j.' + f for f in ps.JOB_FIELDS.split(', '))}"
        " FROM jobs j JOIN unnest($1::text[], $2::float8[]) AS u(t, s)"
        " ON j.task_id = u.t AND j.scheduled_at = u.s WHERE j.kind = 'cron'",
        [t for t, _ in occ], [s for _, s in occ],
    )
    return {(r[0], r[1]): ps.decode_job(*r[2:]) for r in rows}


def _occurrence(job: Job) -> tuple[str, float] | None:
    if schema.is_occurrence(job) and job.task_id is not None and job.scheduled_at is not None:
        return (job.task_id, job.scheduled_at)
    return None


async def insert_jobs(
    con: Con,
    jobs: Sequence[Job],
    bodies: Sequence[bytes],
    now_of: Callable[[int], float],
    owner_of: Callable[[int], str | None] = lambda i: None,
) -> list[SubmitResult]:
    """Store ``jobs`` by ``Store.submit``'s rules, inside the caller's transaction.

    ``now_of(i)`` is "now" for ``jobs[i]`` (dedup expiry), ``owner_of(i)`` the kernel that
    claims it at insert (``None``: unclaimed).
    """
    n = len(jobs)
    results: list[SubmitResult | None] = [None] * n
    same_as: list[tuple[int, int]] = []  # (i, w): job i lost its dedup key to job w of the batch
    claimed: dict[str, int] = {}  # dedup key -> index of the job of this batch that takes it
    todo: list[int] = []
    for i, job in enumerate(jobs):
        key = job.dedup_key
        if key is None:
            todo.append(i)
        elif key in claimed:
            same_as.append((i, claimed[key]))
        else:
            claimed[key] = i
            todo.append(i)
    if claimed:
        # Take the keys first (sorted: two kernels lock them in the same order). A key held by
        # a live job stays as it is and is not returned.
        order = sorted(claimed)
        won = {r[0] for r in await con.fetch(
            _TAKE_KEYS, order, [jobs[claimed[k]].id for k in order],
            [jobs[claimed[k]].dedup_expires_at for k in order],
            [now_of(claimed[k]) for k in order], [bodies[claimed[k]] for k in order],
        )}
        lost = [k for k in order if k not in won]
        if lost:
            held = {r[0]: (r[1], r[2]) for r in await con.fetch(
                "SELECT key, job_id, body FROM dedup WHERE key = ANY($1::text[])", lost)}
            current = await _jobs_by_id(con, [jid for jid, _ in held.values()])
            for k in lost:
                jid, body = held[k]
                found = current.get(jid) or ps.decode_snapshot(body)
                results[claimed[k]] = SubmitResult(job=found, existed=True)
                del claimed[k]
            todo = [i for i in todo if results[i] is None]

    # Candidates: the first job of the batch with each id and each cron occurrence.
    seen_ids: set[str] = set()
    seen_occ: set[tuple[str, float]] = set()
    cand: list[int] = []
    later: list[int] = []
    for i in todo:
        job = jobs[i]
        occ = _occurrence(job)
        if job.id in seen_ids or (occ is not None and occ in seen_occ):
            later.append(i)
            continue
        seen_ids.add(job.id)
        if occ is not None:
            seen_occ.add(occ)
        cand.append(i)
    inserted: set[str] = set()
    if cand:
        rows = [ps.job_row(jobs[i], bodies[i], owner_of(i)) for i in cand]
        sql, params = ps.insert_jobs_sql(ps.columns(rows, len(ps.JOB_COLUMNS)))
        inserted = {r[0] for r in await con.fetch(sql, *params)}
    missing = [i for i in cand if jobs[i].id not in inserted] + later
    for i in cand:
        if jobs[i].id in inserted:
            results[i] = SubmitResult(job=jobs[i])
    if missing:  # an id or occurrence already stored: the stored job answers
        by_id = await _jobs_by_id(con, [jobs[i].id for i in missing])
        occs = [o for i in missing if jobs[i].id not in by_id and (o := _occurrence(jobs[i]))]
        by_occ = await _jobs_by_occurrence(con, occs)
        for i in missing:
            job = jobs[i]
            other = by_id.get(job.id)
            if other is None and (o := _occurrence(job)) is not None:
                other = by_occ.get(o)
            if other is None:
                raise StoreError(f"job {job.id!r} was neither stored nor found in the store")
            results[i] = SubmitResult(job=other, existed=True)

    for i, w in same_as:
        r = results[w]
        assert r is not None
        copy = schema.decode_job(r.job.state, r.job.attempt, r.job.started_at,
                                 schema.encode(r.job))
        results[i] = SubmitResult(job=copy, existed=True)
    # A key taken by a job that turned out to exist already points at the stored job.
    repoint = [(k, r.job) for k, i in claimed.items() if (r := results[i]) is not None
               and r.existed]
    if repoint:
        await con.execute(
            "UPDATE dedup d SET job_id = u.j, body = u.b FROM unnest($1::text[], $2::text[], "
            "$3::bytea[]) AS u(k, j, b) WHERE d.key = u.k AND d.key = ANY($1::text[])",
            [k for k, _ in repoint], [j.id for _, j in repoint],
            [schema.encode(j) for _, j in repoint],
        )
    latest: dict[str, float] = {}
    for i in cand:
        job = jobs[i]
        if job.id in inserted and (o := _occurrence(job)) is not None:
            latest[o[0]] = max(latest.get(o[0], o[1]), o[1])
    if latest:
        tasks = sorted(latest)
        await con.execute(_RAISE_LAST, tasks, [latest[t] for t in tasks])
    return [r for r in results if r is not None]


async def insert_runs(con: Con, rows: Sequence[Row]) -> None:
    if rows:
        await con.execute(_INSERT_RUNS, *ps.columns(list(rows), len(_RUN_TYPES)))


# -- batched application of each kind of operation ---------------------------------------------
#
# A join with unnest($ids) carries per-row values; the redundant "j.id = ANY($ids)" gives the
# planner the batch's size on the table side too, so it looks rows up by primary key whatever
# the table's statistics say (without it, stale statistics can turn 500 lookups into a scan).


async def _submits(con: Con, ops: Sequence[Op]) -> bool:
    subs = [op for op in ops if isinstance(op, Submit)]
    jobs = [job for op in subs for job in op.jobs]
    nows = [op.now for op in subs for _ in op.jobs]
    claimers = sorted({op.owner for op in subs if op.owner is not None})
    alive: set[str] = set()
    if claimers:  # a kernel fenced out (rescued) claims nothing; the lock holds off a rescue
        alive = {r[0] for r in await con.fetch(
            "SELECT id FROM kernels WHERE id = ANY($1::text[]) ORDER BY id FOR KEY SHARE",
            claimers)}
    owners = [op.owner if mine and op.owner in alive else None
              for op in subs for mine in op.claim]
    results = await insert_jobs(
        con, jobs, [b for op in subs for b in op.bodies], nows.__getitem__, owners.__getitem__
    )
    at = 0
    unclaimed = False
    for op in subs:
        mine = results[at : at + len(op.jobs)]
        if op.owner is None:
            op.result = mine
            unclaimed = unclaimed or any(not r.existed for r in mine)
        else:
            owned = [not r.existed and owners[at + k] is not None for k, r in enumerate(mine)]
            op.result = (mine, owned)
            unclaimed = unclaimed or any(not r.existed and not o
                                         for r, o in zip(mine, owned, strict=True))
        at += len(op.jobs)
    return unclaimed


async def _mark_running(con: Con, ops: Sequence[Op]) -> bool:
    marks = [op for op in ops if isinstance(op, MarkRunning)]
    plain = {op.args[0]: op.args for op in marks if op.owner is None}  # the last one counts
    if plain:
        args = list(plain.values())
        await con.execute(
            "UPDATE jobs j SET state = 'running', started_at = u.s, attempt = u.a "
            "FROM unnest($1::text[], $2::float8[], $3::int4[]) AS u(id, s, a) WHERE j.id = u.id "
            "AND j.id = ANY($1::text[])",
            [a[0] for a in args], [a[1] for a in args], [a[2] for a in args],
        )
    owned = [op for op in marks if op.owner is not None]
    if owned:
        last = {op.args[0]: op for op in owned}
        rows = await con.fetch(
            "UPDATE jobs j SET state = 'running', started_at = u.s, attempt = u.a "
            "FROM unnest($1::text[], $2::text[], $3::float8[], $4::int4[]) AS u(id, o, s, a) "
            "WHERE j.id = u.id AND j.owner = u.o AND j.id = ANY($1::text[]) RETURNING j.id",
            list(last), [op.owner for op in last.values()],
            [op.args[1] for op in last.values()], [op.args[2] for op in last.values()],
        )
        ok = {r[0] for r in rows}
        for op in owned:
            op.result = op.args[0] in ok
    return False


async def _finishes(con: Con, ops: Sequence[Op]) -> bool:
    fins = [op for op in ops if isinstance(op, Finish)]
    plain = [op for op in fins if op.owner is None]
    owned = [op for op in fins if op.owner is not None]
    keep: list[Finish] = list(plain)
    lost: set[str] = set()
    if plain:
        await con.execute("DELETE FROM jobs WHERE id = ANY($1::text[])",
                          [op.job_id for op in plain])
    if owned:
        gone = {r[0] for r in await con.fetch(
            "DELETE FROM jobs j USING unnest($1::text[], $2::text[]) AS u(id, o) "
            "WHERE j.id = u.id AND j.owner = u.o AND j.id = ANY($1::text[]) RETURNING j.id",
            [op.job_id for op in owned], [op.owner for op in owned],
        )}
        rest = [op for op in owned if op.job_id not in gone]
        if rest:
            # Still stored under another owner (rescued, maybe claimed again), gone after a
            # later attempt finished elsewhere, or gone with this attempt's end recorded by
            # someone else (a cancel on another kernel): this attempt was superseded.
            lost = {r[0] for r in await con.fetch(
                "SELECT u.id FROM unnest($1::text[], $2::int4[], $3::text[]) AS u(id, a, o) "
                "WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.id = u.id) "
                "OR EXISTS (SELECT 1 FROM runs r WHERE r.job_id = u.id AND NOT r.superseded "
                "AND (r.attempt > u.a OR (r.attempt = u.a AND r.owner IS DISTINCT FROM u.o)))",
                [op.job_id for op in rest], [op.run_rec.attempt for op in rest],
                [op.owner for op in rest],
            )}
        for op in owned:
            op.result = op.job_id not in lost
            if op.result:
                keep.append(op)
    await insert_runs(con, [
        run_row(op.run_rec, op.owner, superseded=True) if op.job_id in lost else op.run
        for op in fins
    ])
    follow = [(op, job, body) for op in keep for job, body in zip(op.follow_up, op.bodies,
                                                                  strict=True)]
    if not follow:
        return False
    nows = [op.run_rec.finished_at for op, _, _ in follow]
    stored = await insert_jobs(con, [j for _, j, _ in follow], [b for _, _, b in follow],
                               nows.__getitem__)
    return any(not r.existed for r in stored)


async def _cancels(con: Con, ops: Sequence[Op]) -> bool:
    cans = [op for op in ops if isinstance(op, Cancel)]
    rows = await con.fetch(
        f"DELETE FROM jobs WHERE id = ANY($1::text[]) RETURNING id, {ps.JOB_FIELDS}",
        [op.job_id for op in cans],
    )
    found = {r[0]: ps.decode_job(*r[1:]) for r in rows}
    runs: list[Row] = []
    for op in cans:
        op.result = found.pop(op.job_id, None)
        if op.result is not None and op.run is not None:
            runs.append(op.run)
    await insert_runs(con, runs)
    return False


async def _calls(con: Con, ops: Sequence[Op]) -> bool:
    for op in ops:
        if isinstance(op, Call):
            op.result = await op.fn(con)
    return False


#: Applies a run of same-kind operations; True if it stored jobs nobody has claimed.
_APPLY: Final[dict[type[Op], Callable[[Con, Sequence[Op]], Awaitable[bool]]]] = {
    Submit: _submits,
    MarkRunning: _mark_running,
    Finish: _finishes,
    Cancel: _cancels,
    Call: _calls,
}


async def apply_batch(con: Con, batch: Sequence[Op], channel: str | None = None) -> None:
    """Apply ``batch`` in one transaction, in order; raise (rolled back) if anything fails.

    If ``channel`` is given and the batch stored jobs nobody claimed (plain submissions,
    submissions due beyond the claim horizon, follow-ups), ``NOTIFY channel`` is sent with the
    commit, in the same round trip: a hint that wakes claimers, delivered only if the batch
    commits. A batch whose new jobs were all claimed at insert wakes nobody.

    The transaction is driven by hand (``BEGIN`` ... ``NOTIFY; COMMIT`` as one simple query)
    rather than by ``con.transaction()``, which would spend a round trip on the notification.
    """
    await con.execute("BEGIN")
    try:
        i = 0
        unclaimed = False
        while i < len(batch):
            kind = type(batch[i])
            j = i + 1
            while j < len(batch) and type(batch[j]) is kind:
                j += 1
            unclaimed = await _APPLY[kind](con, batch[i:j]) or unclaimed
            i = j
        if channel is not None and unclaimed:
            await con.execute(f"NOTIFY {ps.quote_ident(channel)}; COMMIT")
        else:
            await con.execute("COMMIT")
    except BaseException:
        if not con.is_closed() and con.is_in_transaction():
            with contextlib.suppress(Exception):  # the original error is what counts
                await con.execute("ROLLBACK")
        raise


# -- the hot path of a fleet kernel: starts and finishes as one statement ---------------------

# The owner is compared as a join column (``u.own``, the owner repeated server-side by
# ``array_fill``), not as a constant filter: a constant ``j.owner = $4`` makes the planner
# expect one matching row and pick a nested loop over the batch (quadratic: 65k comparisons
# for 256 starts, measured as twice the server's CPU per job). The redundant
# ``j.id = ANY(...)`` keeps primary-key lookups whatever the table's statistics say.
@functools.lru_cache(maxsize=32)
def _starts_and_finishes_sql(scalar: frozenset[int]) -> str:
    """The one statement of :func:`apply_starts_and_finishes`. Parameters: marks ``$1`` ids,
    ``$2`` started_at, ``$3`` attempt; ``$4`` the owner; finishes ``$5`` job ids, ``$6``
    task_id, ``$7`` outcome, ``$8`` trace_id, ``$9`` finished_at, ``$10`` attempt, ``$11``
    body. Those in ``scalar`` (3, 6, 7, 10: equal across the group, as they usually are) are
    one value instead of an array."""
    def col(n: int, name: str, typ: str, arrays: list[str], names: list[str]) -> str:
        if n in scalar:
            return f"${n}::{typ}"
        arrays.append(f"${n}::{typ}[]")
        names.append(name)
        return f"u.{name}"

    m_arrays, m_names = ["$1::text[]", "$2::float8[]"], ["id", "s"]
    m_attempt = col(3, "a", "int4", m_arrays, m_names)
    f_arrays, f_names = ["$5::text[]"], ["j"]
    t = col(6, "t", "text", f_arrays, f_names)
    o = col(7, "o", "text", f_arrays, f_names)
    tr = col(8, "tr", "text", f_arrays, f_names)
    f = col(9, "f", "float8", f_arrays, f_names)
    a = col(10, "a", "int4", f_arrays, f_names)
    b = col(11, "b", "bytea", f_arrays, f_names)
    return (
        "WITH m AS ("
        f" UPDATE jobs j SET state = 'running', started_at = u.s, attempt = {m_attempt}"
        f" FROM unnest({', '.join(m_arrays)}, array_fill($4::text, ARRAY[cardinality($1::text[])]))"
        f" AS u({', '.join(m_names)}, own)"
        " WHERE j.id = u.id AND j.owner = u.own AND j.id = ANY($1::text[]) RETURNING j.id),"
        " g AS (DELETE FROM jobs j"
        " USING unnest($5::text[], array_fill($4::text, ARRAY[cardinality($5::text[])]))"
        " AS u(id, own)"
        " WHERE j.id = u.id AND j.owner = u.own AND j.id = ANY($5::text[]) RETURNING j.id),"
        " r AS ("
        " INSERT INTO runs (job_id, task_id, outcome, trace_id, finished_at, attempt, owner,"
        f" superseded, body) SELECT u.j, {t}, {o}, {tr}, {f}, {a}, $4, false, {b}"
        f" FROM unnest({', '.join(f_arrays)}) AS u({', '.join(f_names)})"
        " WHERE u.j IN (SELECT id FROM g) RETURNING job_id)"
        " SELECT true, id FROM m UNION ALL SELECT false, job_id FROM r"
    )


def _same(values: list[Any]) -> bool:
    return bool(values) and all(v == values[0] for v in values)


async def apply_starts_and_finishes(con: Con, batch: Sequence[Op]) -> list[Op]:
    """A fleet kernel's usual group, in one statement and one round trip: owner-checked
    RUNNING marks and finishes without follow-ups, all of one owner. Returns the operations
    left for :func:`apply_batch`: the whole batch when it holds anything else, or else the
    finishes whose job was no longer this owner's (superseded or cancelled: the slow path
    decides which). The operations done here have their results set.

    The statement runs on its own (autocommit: a statement is atomic), without ``BEGIN`` and
    ``COMMIT``: one round trip instead of five. Marks and finishes of one group are for
    different jobs (a finish is issued only after its job's mark committed), so the order of
    the data-modifying parts inside the statement does not matter.
    """
    owner: str | None = None
    marks: dict[str, MarkRunning] = {}
    fins: dict[str, Finish] = {}
    for op in batch:
        if isinstance(op, MarkRunning) and op.owner is not None and op.args[0] not in marks:
            marks[op.args[0]] = op
        elif (isinstance(op, Finish) and op.owner is not None and not op.follow_up
              and op.job_id not in fins):
            fins[op.job_id] = op
        else:
            return list(batch)
        if owner is None:
            owner = op.owner
        elif op.owner != owner:
            return list(batch)
    if owner is None:
        return list(batch)
    runs = [op.run for op in fins.values()]
    params: dict[int, Any] = {
        1: list(marks), 2: [op.args[1] for op in marks.values()],
        3: [op.args[2] for op in marks.values()], 4: owner, 5: list(fins),
        6: [r[1] for r in runs], 7: [r[2] for r in runs], 8: [r[3] for r in runs],
        9: [r[4] for r in runs], 10: [r[5] for r in runs], 11: [r[8] for r in runs],
    }
    scalar = frozenset(n for n in (3, 6, 7, 10) if _same(params[n]))
    for n in scalar:
        params[n] = params[n][0]
    rows = await con.fetch(_starts_and_finishes_sql(scalar), *(params[n] for n in range(1, 12)))
    started = {r[1] for r in rows if r[0]}
    finished = {r[1] for r in rows if not r[0]}
    for jid, mark in marks.items():
        mark.result = jid in started
    left: list[Op] = []
    for jid, fin in fins.items():
        if jid in finished:
            fin.result = True
        else:
            left.append(fin)
    return left


# -- the other writes, as functions for Call ---------------------------------------------------


def _state_step(sql: str, state: ScheduleState) -> Callable[[Con], Awaitable[None]]:
    async def step(con: Con) -> None:
        await con.execute(sql, state.task_id, state.last_scheduled_at, state.paused,
                          state.next_due_at)

    return step


def set_schedule_state(state: ScheduleState) -> Callable[[Con], Awaitable[None]]:
    """A task's whole state, paused flag included (pause, resume, a single box)."""
    return _state_step(_SET_STATE, state)


_ADVANCE_STATE: Final = (
    "INSERT INTO schedule_state (task_id, last_scheduled_at, paused, next_due_at) "
    "VALUES ($1, $2, $3, $4) ON CONFLICT (task_id) DO UPDATE SET "
    "last_scheduled_at = GREATEST(schedule_state.last_scheduled_at, excluded.last_scheduled_at), "
    "next_due_at = CASE WHEN schedule_state.paused THEN schedule_state.next_due_at "
    "ELSE excluded.next_due_at END"
)


def advance_schedule_state(state: ScheduleState) -> Callable[[Con], Awaitable[None]]:
    """A task's progress, leaving its stored ``paused`` flag as it is (only pause and resume
    set it: another kernel of the fleet may have paused the task a moment ago)."""
    return _state_step(_ADVANCE_STATE, state)


def record_misfire(rec: MisfireRecord) -> Callable[[Con], Awaitable[None]]:
    body = schema.encode(rec)

    async def step(con: Con) -> None:
        await con.execute("INSERT INTO misfires (task_id, decided_at, body) VALUES ($1, $2, $3)",
                          rec.task_id, rec.decided_at, body)

    return step


def _count(status: str) -> int:
    """The row count of a command tag such as ``DELETE 12``."""
    return int(status.rsplit(" ", 1)[-1])


_OLDEST = ("DELETE FROM runs WHERE seq IN (SELECT seq FROM runs {} ORDER BY finished_at, seq "
           "LIMIT $1)")
_PURGE_GATE = f"SELECT pg_try_advisory_xact_lock({ps.PURGE_LOCK})"


def prune_older(cutoff: float, batch: int) -> Callable[[Con], Awaitable[int]]:
    """Delete up to ``batch`` runs finished before ``cutoff``; the number deleted.

    Each purge transaction first takes the purge advisory lock; if another kernel holds it,
    nothing is deleted (0: that kernel is purging).
    """
    sql = _OLDEST.format("WHERE finished_at < $2")

    async def step(con: Con) -> int:
        if not await con.fetchval(_PURGE_GATE):
            return 0
        return _count(await con.execute(sql, batch, cutoff))

    return step


def prune_beyond(keep: int, batch: int) -> Callable[[Con], Awaitable[int]]:
    sql = _OLDEST.format("")

    async def step(con: Con) -> int:
        if not await con.fetchval(_PURGE_GATE):
            return 0
        excess = int(await con.fetchval("SELECT count(*) FROM runs")) - keep
        return _count(await con.execute(sql, min(excess, batch))) if excess > 0 else 0

    return step


def purge_dedup(now: float, batch: int) -> Callable[[Con], Awaitable[int]]:
    sql = ("DELETE FROM dedup WHERE key IN (SELECT key FROM dedup WHERE expires_at <= $1 "
           "LIMIT $2)")

    async def step(con: Con) -> int:
        if not await con.fetchval(_PURGE_GATE):
            return 0
        return _count(await con.execute(sql, now, batch))

    return step


__all__ = [
    "Call",
    "Cancel",
    "Finish",
    "MarkRunning",
    "Op",
    "Submit",
    "apply_batch",
    "apply_starts_and_finishes",
    "insert_jobs",
    "insert_runs",
]
