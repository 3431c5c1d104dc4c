"""The PostgreSQL store: several kernels share one database (the fleet), writes group-committed.

Connections. One *writer* connection belongs to the writer task: each group commit is one
transaction of a few array statements on it. Reads and fleet operations (claims, heartbeats,
rescue, cron firing) go through a small asyncpg pool, so a claim never waits behind a batch of
submissions and a read never sees a batch half written. :meth:`load_pending` reads one
``REPEATABLE READ`` snapshot through a server-side cursor. asyncpg prepares every statement once
per connection and caches it, so the hot statements are planned once.

Group commit. As in :mod:`kernel.store.sqlite`: every contract write appends an operation and a
future to one queue; the writer takes everything queued (up to ``max_batch`` jobs) and applies
it as one transaction (:func:`kernel.store.pg_tx.apply_batch`), resolving the futures only after
``COMMIT``. Rows go in by ``INSERT ... SELECT FROM unnest($arrays) ON CONFLICT DO NOTHING``: one
statement per kind of operation per batch, whatever its size. A batch that deadlocks with
another kernel's (or fails to serialize) is retried whole; a lost connection is reopened for the
next batch. If the commit fails, every operation in it gets the translated error.

Durability is PostgreSQL's: a write returns after ``COMMIT`` (``synchronous_commit`` as the
server is configured, ``on`` by default: flushed to its WAL).

Errors. asyncpg and socket errors are translated here (:func:`translate`) into
:class:`~kernel.errors.StoreError` subclasses whose message names the server (the DSN without
its password) and the schema.

The fleet API beyond the contract (``register_kernel``, ``heartbeat``, ``claim_due``,
``submit_claimed``, ``mark_running_owned``, ``finish_owned``, ``release``, ``rescue_expired``,
``expire_kernel``, ``fire``, ...) is documented on each method; ``docs/FLEET.md`` explains how a
kernel uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg

from kernel.errors import (
    ConfigError,
    ConfigIssue,
    KernelError,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreReadOnly,
)
from kernel.records import (
    Job,
    JobState,
    MisfireRecord,
    RunQuery,
    RunRecord,
    ScheduleState,
    SubmitResult,
)
from kernel.store import pg_fleet as fleet
from kernel.store import pg_schema as ps
from kernel.store import pg_tx as tx
from kernel.store import schema
from kernel.store.base import Store
from kernel.store.group import GroupCommit
from kernel.store.pg_fleet import KernelInfo, Rescue

T = TypeVar("T")

_RETRIES: Final = 5  # attempts of a batch that deadlocked or failed to serialize
#: Group commits in flight at once, each on its own writer connection: the server executes one
#: while the kernel builds the next (measured: one at a time, the two mostly took turns).
WRITE_DEPTH: Final = 2
#: The most jobs one group commit takes (one call, e.g. a 1,000-job submission, is never split).
#: Small enough that a wave of starts or finishes larger than it (hundreds of runs ending in one
#: loop turn) is split in groups that are in flight together: the server writes one while the
#: kernel settles the other. Measured with 1,024 runs at once: 17.6k jobs/s per kernel at 256,
#: 12.2k/s with one group per wave.
WRITE_GROUP: Final = 256
_RETRYABLE: Final = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_IDENT_MAX: Final = 63  # bytes of a PostgreSQL identifier (NAMEDATALEN - 1), a NOTIFY channel too
_LOST: Final = (
    asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError,
    ConnectionError, OSError, TimeoutError,
)


def _connection_broken(exc: BaseException) -> bool:
    """Whether the connection that raised ``exc`` must be replaced (not a plain SQL error)."""
    if isinstance(exc, asyncpg.PostgresError):  # the server answered; 57: shut down, 08: gone
        return str(getattr(exc, "sqlstate", "") or "").startswith(("57", "08"))
    return not isinstance(exc, KernelError)  # ours: raised by our own checks, not the wire


def notify_channel(schema: str) -> str:
    """The NOTIFY channel of ``schema``: ``kernel_jobs:<schema>``, or, where that would pass
    PostgreSQL's 63-byte identifiers (``pg_notify`` refuses a longer name, and the server
    truncates a longer LISTEN, which then never matches), ``kernel_jobs:#`` and a digest of the
    schema name: still one channel per schema, the same on every kernel."""
    channel = f"kernel_jobs:{schema}"
    if len(channel.encode()) <= _IDENT_MAX:
        return channel
    return "kernel_jobs:#" + hashlib.sha256(schema.encode()).hexdigest()[:40]


_KV_PASSWORD: Final = re.compile(r"""(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)""", re.I)


def redact(dsn: str) -> str:
    """``dsn`` without its password (in the user part or the query of a URI, or a
    ``password=`` of a key/value string), for messages."""
    if "://" not in dsn:
        return _KV_PASSWORD.sub(r"\1***", dsn)
    try:
        parts = urlsplit(dsn)
        password = parts.password
    except ValueError:
        return "<unparsable dsn>"
    query = parse_qsl(parts.query, keep_blank_values=True)
    hidden = any(k.lower() == "password" for k, _ in query)
    if password is None and not hidden:
        return dsn
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[-1]}"
    text = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query:
        text += "?" + (urlencode([(k, "***" if k.lower() == "password" else v)
                                  for k, v in query], safe="*/") if hidden else parts.query)
    return text + (f"#{parts.fragment}" if parts.fragment else "")


def translate(exc: BaseException, where: str, doing: str) -> KernelError:
    """The kernel error for an exception raised by asyncpg (or the socket) while ``doing``."""
    if isinstance(exc, KernelError):
        return exc
    msg = f"{where}: {doing} failed: {exc}"
    if isinstance(exc, asyncpg.DeadlockDetectedError | asyncpg.SerializationError
                  | asyncpg.LockNotAvailableError):
        return StoreLocked(f"{msg} (another kernel holds the rows; nothing was stored)")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError | asyncpg.ReadOnlySQLTransactionError):
        return StoreReadOnly(f"{msg}; the role may not write here, nothing was stored")
    if isinstance(exc, asyncpg.DiskFullError | asyncpg.InsufficientResourcesError):
        return StoreFull(f"{msg}; nothing of this write was stored")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return StoreError(f"{msg} (create the database first, or fix [store] dsn)")
    if isinstance(exc, asyncpg.InvalidPasswordError
                  | asyncpg.InvalidAuthorizationSpecificationError):
        return StoreError(f"{msg} (check the user and password of [store] dsn)")
    if isinstance(exc, _LOST) or (
        isinstance(exc, asyncpg.PostgresError) and _connection_broken(exc)
    ):
        return StoreError(f"{where}: {doing} failed: cannot reach PostgreSQL: {exc!r} "
                          "(check [store] dsn, and that the server runs and accepts connections)")
    return StoreError(msg)


def _copy(err: KernelError) -> KernelError:
    new = type(err).__new__(type(err))
    KernelError.__init__(new, err.message, code=err.code)
    return new


class PostgresStore(Store):
    """A :class:`~kernel.store.base.Store` in a PostgreSQL database, shared by a fleet.

    :param dsn: a libpq connection URI (``postgresql://user@host:5432/db``; a unix socket is
        ``postgresql:///db?host=/run/postgresql``).
    :param schema: the PostgreSQL schema (namespace) that holds the kernel's tables.
    :param max_batch: the most jobs one group commit takes (one call is never split;
        :data:`WRITE_GROUP`).
    :param pool_size: connections for reads and fleet operations (plus the writers, one per
        group commit in flight: :data:`WRITE_DEPTH`).
    :param connect_timeout: seconds to wait for a connection.
    :param command_timeout: seconds any one statement may take (``None``: no limit).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "kernel",
        max_batch: int = WRITE_GROUP,
        pool_size: int = 4,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 60.0,
    ) -> None:
        if not schema:
            raise ValueError("schema must be a non-empty PostgreSQL schema name")
        self.dsn = dsn
        self.schema = schema
        self.max_batch = max(1, max_batch)
        self.pool_size = max(1, pool_size)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.where = f"{redact(dsn)} (schema {schema})"
        #: NOTIFY channel of this schema: every commit that may store or free jobs sends one.
        self.channel = notify_channel(schema)
        self._listener: asyncpg.Connection | None = None
        # synchronous_commit: a job is acknowledged after its COMMIT, so the COMMIT must be
        # durable whatever the server's default (with it off, a server crash loses the last
        # acknowledged commits: seen, 29 jobs lost to an immediate stop)
        self._settings = {"search_path": ps.quote_ident(schema),
                          "application_name": "open-autoglm-kernel",
                          "synchronous_commit": "on"}
        self._idle_writers: list[asyncpg.Connection] = []  # writer connections not in a commit
        self._writers: set[asyncpg.Connection] = set()
        self._pool: asyncpg.Pool | None = None
        self._group = GroupCommit(self._commit, self.where, self.max_batch, WRITE_DEPTH)
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._last_error: str | None = None
        self._version = 0
        self.batches = 0
        self.batched_ops = 0
        self.retried_batches = 0  # group commits retried after a deadlock / serialization failure
        self.retried_pool_ops = 0  # the same for fleet operations and reads

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"PostgresStore({self.where!r}, {state})"

    # -- connections ------------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        try:
            con: asyncpg.Connection = await asyncpg.connect(
                self.dsn, timeout=self.connect_timeout, command_timeout=self.command_timeout,
                server_settings=self._settings,
            )
        except ValueError as e:  # the DSN itself (asyncpg's ClientConfigurationError, a port)
            raise ConfigError([ConfigIssue(
                "<config>", "[store].dsn",
                f"{redact(self.dsn)!r} is not a usable PostgreSQL DSN ({e}); valid: a libpq URI "
                "such as postgresql://kernel@db-host:5432/kernel")]) from None
        except (asyncpg.PostgresError, *_LOST) as e:
            raise translate(e, self.where, "connecting") from None
        return con

    async def _take_writer(self) -> asyncpg.Connection:
        """A writer connection for one commit (one per group in flight)."""
        while self._idle_writers:
            con = self._idle_writers.pop()
            if not con.is_closed():
                return con
            self._writers.discard(con)
        con = await self._connect()
        self._writers.add(con)
        return con

    def _drop_writer(self, con: asyncpg.Connection) -> None:
        with contextlib.suppress(Exception):
            con.terminate()
        self._writers.discard(con)

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return
        if len(self.schema.encode()) > _IDENT_MAX:
            raise ConfigError([ConfigIssue(
                "<config>", "[store].schema",
                f"{self.schema[:20]!r}... is {len(self.schema.encode())} bytes long; a "
                f"PostgreSQL schema name has at most {_IDENT_MAX}")])
        con = await self._connect()
        try:
            self._version = await self._migrate(con)
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self.pool_size, timeout=self.connect_timeout,
                command_timeout=self.command_timeout, server_settings=self._settings,
            )
        except BaseException as e:
            with contextlib.suppress(Exception):
                await con.close()
            if isinstance(e, asyncpg.PostgresError | asyncpg.InterfaceError | OSError
                          | TimeoutError):
                raise translate(e, self.where, "opening the store") from None
            raise
        self._idle_writers = [con]
        self._writers = {con}
        self._open = True
        self._loop = asyncio.get_running_loop()
        self._group = GroupCommit(self._commit, self.where, self.max_batch, WRITE_DEPTH)
        self._writer = self._loop.create_task(self._group.run(),
                                              name=f"store-writer:{self.where}")

    async def _migrate(self, con: asyncpg.Connection) -> int:
        async with con.transaction():
            await con.execute(f"SELECT pg_advisory_xact_lock({ps.MIGRATION_LOCK})")
            tables = {r[0] for r in await con.fetch(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v')", self.schema)}
            if tables and "schema_version" not in tables:
                raise StoreCorrupt(
                    f"{self.where}: the schema holds tables of another application "
                    f"({', '.join(sorted(tables)[:5])}); nothing was changed. Point [store] "
                    "schema at a schema of its own."
                )
            if not tables:
                await con.execute(f"CREATE SCHEMA IF NOT EXISTS {ps.quote_ident(self.schema)}")
            await con.execute(ps.VERSION_TABLE)
            version = int(await con.fetchval(
                "SELECT coalesce(max(version), 0) FROM schema_version"))
            for v, statements in ps.migration_plan(self.where, version):
                for sql in statements:
                    await con.execute(sql)
                await con.execute("INSERT INTO schema_version (version) VALUES ($1)", v)
        return ps.LATEST_VERSION

    async def close(self) -> None:
        if not self._open:
            return
        self._group.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            if not writer.done():
                await writer  # drains the queue: every pending write is committed or failed
            elif not writer.cancelled() and writer.exception() is not None:
                self._last_error = f"the writer task failed: {writer.exception()!r}"
        self._open = False
        try:
            if self._listener is not None:
                listener, self._listener = self._listener, None
                await listener.close()
            if self._pool is not None:
                try:  # a connection still held (an abandoned load_pending) cannot hang close
                    await asyncio.wait_for(self._pool.close(), timeout=10)
                except TimeoutError:
                    self._pool.terminate()
            for con in list(self._writers):
                await con.close()
        except (asyncpg.PostgresError, *_LOST) as e:
            self._last_error = translate(e, self.where, "closing").message
        finally:
            self._pool = None
            self._writers.clear()
            self._idle_writers.clear()

    # -- the writer -------------------------------------------------------------------------

    async def _commit(self, batch: list[tx.Op]) -> None:
        error: BaseException | None = None
        con: asyncpg.Connection | None = None
        left: list[tx.Op] = batch  # not written yet (the fast path may write some first)
        try:
            for attempt in range(_RETRIES):
                try:
                    if con is None:
                        con = await self._take_writer()
                    left = await tx.apply_starts_and_finishes(con, left)
                    if left:
                        await tx.apply_batch(con, left, self.channel)
                    error = None
                    break
                except _RETRYABLE as e:
                    error = e
                    self.retried_batches += 1
                    await asyncio.sleep(0.001 * (attempt + 1))
                except Exception as e:
                    error = e
                    if con is not None and _connection_broken(e):
                        self._drop_writer(con)
                        con = None
                    break
        except asyncio.CancelledError:
            if con is not None:  # mid-transaction: the connection cannot be reused
                self._drop_writer(con)
                con = None
            for op in batch:  # the COMMIT may or may not have happened
                op.fail(StoreError(f"{self.where}: the store's writer was cancelled during a "
                                   "commit; the write may or may not be stored"))
            raise
        finally:
            if con is not None:
                self._idle_writers.append(con)
        if error is None:
            self._last_error = None
            self.batches += 1
            self.batched_ops += len(batch)
            for op in batch:
                op.settle()
        else:  # what the fast path wrote is stored: only the rest failed
            err = translate(error, self.where, f"writing a batch of {len(left)} operations")
            self._last_error = err.message
            failed = {id(op) for op in left}
            for op in batch:
                if id(op) in failed:
                    op.fail(_copy(err))
                else:
                    op.settle()

    def _enqueue(self, op: tx.Op) -> asyncio.Future[Any]:
        if not self._open:
            raise StoreError(f"{self.where}: the store is not open")
        if self._writer is None or self._writer.done():
            raise StoreError(f"{self.where}: the store's writer task has stopped")
        return self._group.put(op)

    def _future(self) -> asyncio.Future[Any]:
        if self._loop is None or not self._open:
            raise StoreError(f"{self.where}: the store is not open")
        return self._loop.create_future()

    # -- contract writes --------------------------------------------------------------------

    async def submit(self, jobs: Sequence[Job], now: float) -> list[SubmitResult]:
        if not jobs:
            return []
        result: list[SubmitResult] = await self._enqueue(tx.Submit(self._future(), jobs, now))
        return result

    async def mark_running(self, job_id: str, started_at: float, attempt: int) -> None:
        await self._enqueue(tx.MarkRunning(self._future(), (job_id, started_at, attempt)))

    async def finish(self, job_id: str, run: RunRecord, follow_up: Sequence[Job] = ()) -> None:
        await self._enqueue(tx.Finish(self._future(), job_id, run, follow_up))

    async def cancel(self, job_id: str, run: RunRecord | None = None) -> Job | None:
        job: Job | None = await self._enqueue(tx.Cancel(self._future(), job_id, run))
        return job

    async def _call(self, fn: Callable[[tx.Con], Awaitable[T]]) -> T:
        result: T = await self._enqueue(tx.Call(self._future(), fn))
        return result

    async def set_schedule_state(self, state: ScheduleState) -> None:
        await self._call(tx.set_schedule_state(state))

    async def advance_schedule_state(self, state: ScheduleState) -> None:
        """:meth:`set_schedule_state` for a task's progress (``last_scheduled_at``,
        ``next_due_at``): the stored ``paused`` flag is left as it is, so a kernel that has not
        yet followed a pause made on another never undoes it."""
        await self._call(tx.advance_schedule_state(state))

    async def record_misfire(self, rec: MisfireRecord) -> None:
        await self._call(tx.record_misfire(rec))

    async def _batches(self, step: Callable[[tx.Con], Awaitable[int]],
                       batch: int) -> int:
        total = 0
        while True:
            n = await self._call(step)
            total += n
            if n < batch:
                return total

    async def prune_history(
        self,
        now: float,
        *,
        max_rows: int | None,
        max_age: float | None,
        batch: int = 5000,
    ) -> int:
        """As the contract says; while another kernel of the fleet purges, this one deletes
        nothing (one purger at a time, by an advisory lock)."""
        batch = max(1, batch)
        total = 0
        if max_age is not None:
            total += await self._batches(tx.prune_older(now - max_age, batch), batch)
        if max_rows is not None:
            total += await self._batches(tx.prune_beyond(max(0, max_rows), batch), batch)
        return total

    async def purge_dedup(self, now: float, batch: int = 5000) -> int:
        batch = max(1, batch)
        return await self._batches(tx.purge_dedup(now, batch), batch)

    # -- reads and fleet operations on the pool ---------------------------------------------

    async def _on_pool(self, fn: Callable[[tx.Con], Awaitable[T]],
                       doing: str) -> T:
        pool = self._pool
        if pool is None or not self._open:
            raise StoreError(f"{self.where}: the store is not open")
        for attempt in range(_RETRIES):
            try:
                async with pool.acquire() as con:
                    return await fn(con)
            except _RETRYABLE as e:
                self.retried_pool_ops += 1
                if attempt == _RETRIES - 1:
                    raise translate(e, self.where, doing) from None
                await asyncio.sleep(0.001 * (attempt + 1))
            except (asyncpg.PostgresError, *_LOST) as e:
                raise translate(e, self.where, doing) from None
        raise AssertionError("unreachable")

    async def _read(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def q(con: tx.Con) -> list[asyncpg.Record]:
            return list(await con.fetch(sql, *args))

        return await self._on_pool(q, "reading")

    async def get_job(self, job_id: str) -> Job | None:
        rows = await self._read(f"SELECT {ps.JOB_FIELDS} FROM jobs WHERE id = $1", job_id)
        return ps.decode_job(*rows[0]) if rows else None

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        rows = await self._read(f"SELECT id, {ps.JOB_FIELDS} FROM jobs WHERE id = ANY($1::text[])",
                                list(dict.fromkeys(job_ids)))
        found = {r[0]: r for r in rows}
        return [ps.decode_job(*found[i][1:]) for i in job_ids if i in found]

    async def list_jobs(
        self,
        *,
        state: JobState | None = None,
        task_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        where: list[str] = []
        args: list[Any] = [max(limit, 0), max(offset, 0)]
        if state is not None:
            where.append(f"state = '{JobState(state).value}'")  # a literal: partial index
        if task_id is not None:
            args.append(task_id)
            where.append(f"task_id = ${len(args)}")
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._read(
            f"SELECT {ps.JOB_FIELDS} FROM jobs {cond} ORDER BY due_at, seq LIMIT $1 OFFSET $2",
            *args,
        )
        return [ps.decode_job(*r) for r in rows]

    async def count_jobs(self) -> int:
        return int((await self._read("SELECT count(*) FROM jobs"))[0][0])

    async def load_pending(self, batch: int = 10_000) -> AsyncIterator[list[Job]]:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        pool = self._pool
        if pool is None or not self._open:
            raise StoreError(f"{self.where}: the store is not open")
        decode = ps.decode_job
        try:
            async with pool.acquire() as con, con.transaction(
                isolation="repeatable_read", readonly=True
            ):
                cur = await con.cursor(
                    f"SELECT {ps.JOB_FIELDS} FROM jobs ORDER BY due_at, seq")
                while rows := await cur.fetch(batch):
                    yield [decode(*r) for r in rows]
        except (asyncpg.PostgresError, *_LOST) as e:
            raise translate(e, self.where, "loading stored jobs") from None

    async def schedule_states(self) -> dict[str, ScheduleState]:
        rows = await self._read(
            "SELECT task_id, last_scheduled_at, paused, next_due_at FROM schedule_state")
        return {
            t: ScheduleState(task_id=t, last_scheduled_at=last, paused=p, next_due_at=nxt)
            for t, last, p, nxt in rows
        }

    async def misfires(self, task_id: str | None = None, limit: int = 100) -> list[MisfireRecord]:
        if task_id is None:
            rows = await self._read(
                "SELECT body FROM misfires ORDER BY decided_at DESC, seq DESC LIMIT $1",
                max(limit, 0))
        else:
            rows = await self._read(
                "SELECT body FROM misfires WHERE task_id = $2 "
                "ORDER BY decided_at DESC, seq DESC LIMIT $1", max(limit, 0), task_id)
        return [schema.decode_misfire(r[0]) for r in rows]

    async def query_runs(self, q: RunQuery) -> list[RunRecord]:
        """As the contract says; superseded attempts are not part of it (see
        :meth:`superseded_runs`)."""
        where = ["NOT superseded"]
        args: list[Any] = [max(q.limit, 0), max(q.offset, 0)]
        for cond, value in (
            ("task_id = ${}", q.task_id),
            ("outcome = ${}", q.outcome.value if q.outcome is not None else None),
            ("trace_id = ${}", q.trace_id),
            ("job_id = ${}", q.job_id),
            ("finished_at >= ${}", q.since),
            ("finished_at < ${}", q.until),
        ):
            if value is not None:
                args.append(value)
                where.append(cond.format(len(args)))
        rows = await self._read(
            f"SELECT body FROM runs WHERE {' AND '.join(where)} "
            "ORDER BY finished_at DESC, seq DESC LIMIT $1 OFFSET $2", *args)
        return [schema.decode_run(r[0]) for r in rows]

    async def health(self) -> dict[str, object]:
        info: dict[str, object] = {
            "ok": False,
            "path": self.where,
            "error": self._last_error,
            "pending": -1,
            "running": -1,
            "backend": "postgres",
            "schema": self.schema,
            "schema_version": self._version,
            "queued_writes": len(self._group.queue),
            "batches": self.batches,
            "batched_ops": self.batched_ops,
            "retried_batches": self.retried_batches,
            "retried_pool_ops": self.retried_pool_ops,
        }
        if not self._open:
            info["error"] = "not open"
            return info
        if self._writer is None or self._writer.done():
            info["error"] = "the writer task has stopped"
            return info
        try:
            [row] = await self._read(
                "SELECT count(*), count(*) FILTER (WHERE state = 'running'), "
                "(SELECT count(*) FROM kernels) FROM jobs")
        except StoreError as e:
            info["error"] = e.message
            return info
        total, running, kernels = row
        info.update(pending=total - running, running=running, kernels=kernels,
                    ok=self._last_error is None)
        return info

    # -- the fleet ----------------------------------------------------------------------------

    async def register_kernel(self, kernel_id: str, host: str, pid: int,
                              now: float | None) -> None:
        """Add a live kernel row (a fresh id per process start), heartbeat ``now``.

        Liveness instants (here, :meth:`heartbeat`, :meth:`rescue_expired`) may be ``None``:
        the database server's clock then stands for "now", one clock for the whole fleet
        whatever the skew between boxes. Use either the server's clock or the kernels' own
        throughout a fleet, not both."""
        await self._on_pool(lambda c: fleet.register(c, kernel_id, host, pid, now),
                            "registering the kernel")

    async def heartbeat(self, kernel_id: str, now: float | None) -> bool:
        """Renew the heartbeat. ``False``: this kernel was declared dead and its jobs rescued;
        it must stop starting work (self-fencing) and register again under a fresh id."""
        return await self._on_pool(lambda c: fleet.heartbeat(c, kernel_id, now), "heartbeat")

    async def kernels(self) -> list[KernelInfo]:
        """Every registered kernel, oldest first (for the TUI and ``/snapshot``)."""
        return await self._on_pool(fleet.kernels, "listing kernels")

    async def expire_kernel(self, kernel_id: str) -> Rescue:
        """Deregister ``kernel_id`` and return its jobs to pending now (an orderly stop, or a
        restart on the same box taking back its predecessor's jobs without waiting the TTL)."""
        return await self._on_pool(lambda c: fleet.expire_kernel(c, kernel_id, self.channel),
                                   "expiring a kernel")

    async def rescue_expired(self, now: float | None, ttl: float) -> Rescue:
        """Any kernel may call this: kernels whose heartbeat is older than ``now - ttl`` are
        deleted and their jobs returned to pending (attempt raised and ``recovered`` set for
        the ones that had started)."""
        return await self._on_pool(lambda c: fleet.rescue_expired(c, now, ttl, self.channel),
                                   "rescuing expired kernels")

    async def claim_due(self, owner: str, now: float, horizon: float, limit: int, *,
                        max_gpu_memory_mb: int | None = None) -> list[Job]:
        """Claim up to ``limit`` unclaimed pending jobs due by ``now + horizon`` for ``owner``
        (``FOR UPDATE SKIP LOCKED``: concurrent claimers never wait for or take the same job),
        in due order. ``max_gpu_memory_mb`` skips jobs declaring more GPU memory than the box
        has. Empty if ``owner`` is not registered (fenced)."""
        if limit < 1:
            return []
        return await self._on_pool(
            lambda c: fleet.claim_due(c, owner, now, horizon, limit, max_gpu_memory_mb),
            "claiming jobs")

    async def release(self, owner: str, job_ids: Sequence[str]) -> int:
        """Give back claimed jobs that have not started (e.g. a GPU job this box cannot
        admit soon) so that another kernel claims them; the number released."""
        return await self._on_pool(lambda c: fleet.release(c, owner, job_ids, self.channel),
                                   "releasing jobs")

    async def submit_claimed(self, jobs: Sequence[Job], now: float, owner: str,
                             claim_before: float, limit: int | None = None
                             ) -> tuple[list[SubmitResult], list[bool]]:
        """:meth:`submit`, claiming for ``owner`` at insert the new jobs due by
        ``claim_before`` (no claim round trip for work this kernel runs soon), at most
        ``limit`` of them (the first, in the order given); the others are left for whichever
        kernel claims them (NOTIFY). The second list says, per job, whether it is now owned by
        ``owner``."""
        if not jobs:
            return [], []
        result: tuple[list[SubmitResult], list[bool]] = await self._enqueue(
            tx.Submit(self._future(), jobs, now, owner, claim_before, limit))
        return result

    async def mark_running_owned(self, owner: str, job_id: str, started_at: float,
                                 attempt: int) -> bool:
        """:meth:`mark_running` only if ``owner`` still owns the job; ``False`` otherwise (it
        was rescued meanwhile: do not start it)."""
        ok: bool = await self._enqueue(
            tx.MarkRunning(self._future(), (job_id, started_at, attempt), owner))
        return ok

    async def finish_owned(self, owner: str, job_id: str, run: RunRecord,
                           follow_up: Sequence[Job] = ()) -> bool:
        """:meth:`finish` for a job ``owner`` claimed. If the job was rescued meanwhile (it
        is stored under another owner or none, or a later attempt already finished, or it was
        cancelled elsewhere with a run record for this attempt), the run is recorded as
        superseded, the job is left alone and ``follow_up`` is dropped: ``False``. A job no
        longer stored otherwise (cancelled without a record) finishes as usual."""
        ok: bool = await self._enqueue(tx.Finish(self._future(), job_id, run, follow_up, owner))
        return ok

    async def fire(self, jobs: Sequence[Job], now: float, *, owner: str | None = None,
                   claim_before: float | None = None) -> list[bool]:
        """Fire cron occurrences once fleet-wide: per job, whether this call won its
        (task, instant) (then its job is stored, claimed by ``owner`` if due by
        ``claim_before``). Occurrences stay recorded after their job finished, until
        :meth:`purge_fired`. Raises ``ValueError`` for a job that is not an occurrence."""
        if not jobs:
            return []
        return await self._on_pool(lambda c: fleet.fire(c, jobs, now, owner, claim_before, self.channel),
                                   "firing cron occurrences")

    async def purge_fired(self, before: float, batch: int = 5000) -> int:
        """Forget fired occurrences with an instant before ``before`` (older than any
        misfire grace), ``batch`` per transaction; the number removed."""
        batch = max(1, batch)
        total = 0
        while True:
            n = await self._on_pool(lambda c: fleet.purge_fired(c, before, batch),
                                    "purging fired occurrences")
            total += n
            if n < batch:
                return total

    async def superseded_runs(self, job_id: str | None = None,
                              limit: int = 100) -> list[RunRecord]:
        """Runs recorded by :meth:`finish_owned` for attempts that had been superseded."""
        if job_id is None:
            rows = await self._read("SELECT body FROM runs WHERE superseded "
                                    "ORDER BY finished_at DESC, seq DESC LIMIT $1", limit)
        else:
            rows = await self._read("SELECT body FROM runs WHERE superseded AND job_id = $2 "
                                    "ORDER BY finished_at DESC, seq DESC LIMIT $1", limit, job_id)
        return [schema.decode_run(r[0]) for r in rows]

    async def listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (on the event loop) whenever a commit of any kernel of the fleet may
        have stored or freed jobs: submissions, follow-ups, fired occurrences, releases,
        rescues. A hint only: notifications can be lost with the connection, so a claimer also
        polls. One listener per store; it lives until :meth:`close`."""
        if not self._open:
            raise StoreError(f"{self.where}: the store is not open")
        if self._listener is not None:
            raise ValueError("this store already has a listener")
        con = await self._connect()

        def on_notify(*_: object) -> None:
            wake()

        try:
            await con.add_listener(self.channel, on_notify)
        except (asyncpg.PostgresError, *_LOST) as e:
            await con.close()
            raise translate(e, self.where, "listening for notifications") from None
        self._listener = con

    async def owned_jobs(self, owner: str) -> list[Job]:
        """The jobs ``owner`` holds, in due order (``/snapshot``; a kernel's own check)."""
        rows = await self._read(
            f"SELECT {ps.JOB_FIELDS} FROM jobs WHERE owner = $1 ORDER BY due_at, seq", owner)
        return [ps.decode_job(*r) for r in rows]


__all__ = ["KernelInfo", "PostgresStore", "Rescue", "redact", "translate"]
