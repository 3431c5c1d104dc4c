"""Fleet transactions of the PostgreSQL store: kernels, heartbeats, claims, rescue, cron firing.

Each function runs one transaction on the connection it is given (a pool connection, not the
group-commit writer, so claims and heartbeats never wait behind a batch of submissions).

Liveness is one row per kernel process in ``kernels``, renewed by :func:`heartbeat`. A kernel
whose row is gone has been fenced: :func:`heartbeat` answers ``False``, :func:`claim_due` and
claimed submissions take nothing for it, owner-checked starts fail and its finishes are recorded
as superseded. It must stop starting work and register again under a fresh id.

Why the rescue cannot orphan a claim: a claim locks its kernel's row ``FOR KEY SHARE`` (which
does not block heartbeats, a non-key update) before it updates jobs; the rescue deletes the row
(which waits for those claims to commit), then, in a second statement with a fresh snapshot,
returns every job still owned by the deleted kernels to pending. A claim that starts after the
delete finds no row and takes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from kernel.records import Job
from kernel.store import pg_schema as ps
from kernel.store import schema
from kernel.store.pg_tx import Con, insert_jobs


class KernelInfo(msgspec.Struct, kw_only=True, frozen=True):
    """One registered kernel process."""

    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float


class Rescue(msgspec.Struct, kw_only=True, frozen=True):
    """What a rescue did: the kernels it declared dead and the jobs it returned to pending."""

    kernels: list[str]
    jobs: list[str]          # every job returned to pending
    restarted: list[str]     # those of them that had started: attempt raised, marked recovered


_LOCK_ME: Final = "SELECT 1 FROM kernels WHERE id = $1 FOR KEY SHARE"
_CLAIM: Final = (
    "WITH c AS (SELECT id FROM jobs WHERE owner IS NULL AND due_at <= $2 "
    "AND ($4::int4 IS NULL OR gpu_memory_mb <= $4) "
    "ORDER BY due_at, seq LIMIT $3 FOR UPDATE SKIP LOCKED) "
    "UPDATE jobs j SET owner = $1, claimed_at = $5 FROM c WHERE j.id = c.id "
    "AND j.state = 'pending' "
    f"RETURNING j.due_at, j.seq, {', '.join('j.' + f for f in ps.JOB_FIELDS.split(', '))}"
)
_RETURN_JOBS: Final = (
    "WITH old AS (SELECT id, state FROM jobs WHERE owner = ANY($1::text[]) ORDER BY id "
    "FOR UPDATE) "
    "UPDATE jobs j SET owner = NULL, claimed_at = NULL, state = 'pending', "
    "attempt = CASE WHEN old.state = 'running' THEN j.attempt + 1 ELSE j.attempt END, "
    "recovered = j.recovered OR old.state = 'running' "
    "FROM old WHERE j.id = old.id RETURNING j.id, old.state = 'running'"
)


#: "now" of liveness: the caller's instant, or (``NULL``) the database server's clock, one clock
#: for the whole fleet whatever the skew between its boxes.
_NOW: Final = "coalesce({}::float8, extract(epoch FROM clock_timestamp())::float8)"


async def register(con: Con, kernel_id: str, host: str, pid: int, now: float | None) -> None:
    await con.execute(
        "INSERT INTO kernels (id, host, pid, started_at, heartbeat_at) "
        f"SELECT $1, $2, $3, t, t FROM (SELECT {_NOW.format('$4')} AS t) AS n",
        kernel_id, host, pid, now,
    )


async def heartbeat(con: Con, kernel_id: str, now: float | None) -> bool:
    """Renew ``kernel_id``'s heartbeat; ``False`` if it was declared dead (fenced)."""
    row = await con.fetchval(
        f"UPDATE kernels SET heartbeat_at = GREATEST(heartbeat_at, {_NOW.format('$2')}) "
        "WHERE id = $1 RETURNING 1",
        kernel_id, now,
    )
    return row is not None


async def notify(con: Con, channel: str | None) -> None:
    """Wake the fleet's claimers (delivered at commit; a hint, claimers also poll)."""
    if channel is not None:
        await con.execute("SELECT pg_notify($1, '')", channel)


async def _return_jobs(con: Con, dead: list[str], channel: str | None) -> Rescue:
    if not dead:
        return Rescue(kernels=[], jobs=[], restarted=[])
    rows = await con.fetch(_RETURN_JOBS, dead)
    if rows:
        await notify(con, channel)
    return Rescue(kernels=dead, jobs=[r[0] for r in rows], restarted=[r[0] for r in rows if r[1]])


async def expire_kernel(con: Con, kernel_id: str, channel: str | None = None) -> Rescue:
    """Deregister ``kernel_id`` and return its jobs to pending (orderly stop, restart)."""
    async with con.transaction():
        dead = [r[0] for r in await con.fetch(
            "DELETE FROM kernels WHERE id = $1 RETURNING id", kernel_id)]
        if not dead:  # already rescued, or never registered: its jobs may still be owned
            dead = [kernel_id]
        return await _return_jobs(con, dead, channel)


async def rescue_expired(con: Con, now: float | None, ttl: float,
                         channel: str | None = None) -> Rescue:
    """Declare dead every kernel whose heartbeat is older than ``now - ttl``; free its jobs."""
    async with con.transaction():
        dead = [r[0] for r in await con.fetch(
            f"DELETE FROM kernels WHERE heartbeat_at < {_NOW.format('$1')} - $2 RETURNING id",
            now, ttl)]
        dead.sort()
        return await _return_jobs(con, dead, channel)


async def kernels(con: Con) -> list[KernelInfo]:
    rows = await con.fetch(
        "SELECT id, host, pid, started_at, heartbeat_at FROM kernels ORDER BY started_at, id")
    return [KernelInfo(id=r[0], host=r[1], pid=r[2], started_at=r[3], heartbeat_at=r[4])
            for r in rows]


async def claim_due(con: Con, owner: str, now: float, horizon: float, limit: int,
                    max_gpu_memory_mb: int | None) -> list[Job]:
    """Claim up to ``limit`` unclaimed pending jobs due by ``now + horizon`` for ``owner``."""
    async with con.transaction():
        if await con.fetchval(_LOCK_ME, owner) is None:
            return []  # fenced: declared dead, must register again
        rows = await con.fetch(_CLAIM, owner, now + horizon, limit, max_gpu_memory_mb, now)
    rows = sorted(rows, key=lambda r: (r[0], r[1]))
    return [ps.decode_job(*r[2:]) for r in rows]


async def release(con: Con, owner: str, job_ids: Sequence[str],
                  channel: str | None = None) -> int:
    """Return ``owner``'s pending jobs among ``job_ids`` to the fleet; the number released."""
    async with con.transaction():
        status = await con.execute(
            "UPDATE jobs SET owner = NULL, claimed_at = NULL WHERE id = ANY($1::text[]) "
            "AND owner = $2 AND state = 'pending'",
            list(job_ids), owner,
        )
        n = int(status.rsplit(" ", 1)[-1])
        if n:
            await notify(con, channel)
    return n


async def fire(con: Con, jobs: Sequence[Job], now: float, owner: str | None,
               claim_before: float | None, channel: str | None = None) -> list[bool]:
    """Record cron occurrences fleet-wide; store the job of each occurrence won.

    One transaction: the occurrences are inserted into ``fired`` sorted by (task, instant) with
    ``ON CONFLICT DO NOTHING`` (sorted, so that kernels firing the same instants concurrently
    lock them in the same order and never deadlock), and only the jobs of the rows inserted
    here are stored. ``True`` per job whose occurrence this call won.
    """
    first: dict[tuple[str, float], int] = {}
    for i, job in enumerate(jobs):
        if not schema.is_occurrence(job) or job.task_id is None or job.scheduled_at is None:
            raise ValueError(f"job {job.id!r} is not a cron occurrence (kind=cron, task_id, "
                             "scheduled_at)")
        first.setdefault((job.task_id, job.scheduled_at), i)
    bodies = [schema.encode_job(job) for job in jobs]
    order = sorted(first)
    async with con.transaction():
        alive = owner is not None and await con.fetchval(_LOCK_ME, owner) is not None
        won_rows = await con.fetch(
            "INSERT INTO fired (task_id, instant, job_id, fired_at, owner) "
            "SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::float8[], $5::text[]) "
            "ORDER BY 1, 2 ON CONFLICT DO NOTHING RETURNING task_id, instant",
            [t for t, _ in order], [s for _, s in order],
            [jobs[first[o]].id for o in order], [now] * len(order), [owner] * len(order),
        )
        won = sorted(first[(r[0], r[1])] for r in won_rows)
        if won:
            claim = owner if alive else None
            owners = [claim if claim_before is not None and jobs[i].due_at <= claim_before
                      else None for i in won]
            await insert_jobs(con, [jobs[i] for i in won], [bodies[i] for i in won],
                              lambda k: now, owners.__getitem__)
            if None in owners:
                await notify(con, channel)
    mine = set(won)
    return [i in mine for i in range(len(jobs))]


async def purge_fired(con: Con, before: float, batch: int) -> int:
    """Forget up to ``batch`` fired occurrences with an instant before ``before``."""
    status = await con.execute(
        "DELETE FROM fired WHERE (task_id, instant) IN (SELECT task_id, instant FROM fired "
        "WHERE instant < $1 LIMIT $2)", before, batch,
    )
    return int(status.rsplit(" ", 1)[-1])


__all__ = [
    "KernelInfo",
    "Rescue",
    "claim_due",
    "expire_kernel",
    "fire",
    "heartbeat",
    "kernels",
    "notify",
    "purge_fired",
    "register",
    "release",
    "rescue_expired",
]
