"""The SQLite store: one file in WAL mode, writes group-committed by one writer thread.

Connections. The *writer* connection lives on its own thread and is used only by the writer
task: each group commit is one hop to that thread, running the whole transaction (``BEGIN
IMMEDIATE`` ... ``COMMIT``) without coming back to the event loop in between. Reads go through
aiosqlite on a separate *reader* connection (``query_only``), so a read never sees a batch still
being written and never waits behind a commit. :meth:`load_pending` opens its own aiosqlite
connection to read one consistent snapshot however long the iteration takes.

Group commit. Every write (``submit``, ``mark_running``, ``finish``, ``cancel``, the retention
deletes, ...) appends an operation and a future to one queue and awaits the future; the rows
are encoded then, on the event loop. The writer task takes everything queued (up to
``max_batch`` jobs) and runs it as one transaction on the writer thread; only after ``COMMIT``
are the futures resolved. While a commit is in flight new requests queue up, so the batch size
follows the load without a timer: an idle store commits a lone request at once (no added
latency), a busy one hundreds per transaction (500 concurrent submitters: batches of 500). Rows
go in by multi-row ``INSERT`` statements, up to 256 rows per ``sqlite3_step``: the writer
thread needs the GIL only briefly per batch instead of once per row, so a busy event loop does
not stall it (the convoy effect of ``executemany``). If a transaction fails, it is rolled back
and every operation in it gets the translated error; the writer goes on with the next batch.

Durability. ``journal_mode=WAL``. ``synchronous`` defaults to ``NORMAL``: a committed transaction
has been written to the WAL file (in the OS page cache) before ``submit`` returns, so it
survives the kernel being killed (SIGKILL, OOM, crash) at any instant; only an OS crash or power
loss can drop the last commits since a checkpoint (the database stays consistent). ``FULL`` adds
an fsync of the WAL per commit, i.e. per group, to survive power loss too, at the price of one
fsync of latency per batch. The kernel promises durability against process crashes, hence
``NORMAL``; pick ``FULL`` where the box loses power.

Opening. Before SQLite may write anything the store takes ownership and checks the files
(:mod:`kernel.store.sqlite_guard`): an exclusive lock on ``<db>-lock`` for as long as it is open
(a second store on the file gets :class:`~kernel.errors.StoreLocked` naming the holder's pid),
a warning at ERROR when the last owner was killed and the WAL was deleted since, writable
``-wal``/``-shm`` files, and on a read-only connection: the file is ours and ``PRAGMA
quick_check`` finds no damage. A refused file is left byte for byte as it was. A
``read_only`` store takes no lock (inspection tools work beside a running kernel).

Errors. Every sqlite3/aiosqlite exception is translated here (:func:`translate`) into
:class:`~kernel.errors.StoreError` subclasses whose message names the file.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

import aiosqlite

from kernel.errors import (
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
from kernel.store import schema
from kernel.store import sqlite_guard as guard
from kernel.store import sqlite_tx as tx
from kernel.store.base import Store
from kernel.store.group import GroupCommit

T = TypeVar("T")
Row = tuple[Any, ...]

_SYNCHRONOUS: Final = ("NORMAL", "FULL", "EXTRA", "OFF")
_LOAD_MMAP_MB: Final = 1024


def translate(exc: BaseException, path: str, doing: str) -> KernelError:
    """The kernel error for an exception raised by sqlite3/aiosqlite while ``doing``."""
    if isinstance(exc, KernelError):
        return exc
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    text = str(exc)
    msg = f"{path}: {doing} failed: {text}"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return StoreLocked(f"{msg} (another connection holds the database's write lock)")
    if name.startswith("SQLITE_READONLY") or "readonly database" in text:
        unwritable = _unwritable_sidecar(path)
        if unwritable is not None:
            return StoreReadOnly(f"{msg}; {unwritable} is not writable, nothing was stored")
        return StoreReadOnly(f"{msg}; writes are refused, nothing was stored")
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return StoreFull(f"{msg}; nothing of this write was stored")
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or "not a database" in text:
        # Found while running, after the store has written to it: no claim that it is intact.
        return StoreCorrupt(
            f"{msg}: SQLite reports the file damaged; stop the kernel, check it with "
            f"`sqlite3 {path} 'PRAGMA integrity_check'`, and restore it from a backup or move "
            "it aside"
        )
    if name.startswith("SQLITE_IOERR"):
        unwritable = _unwritable_sidecar(path)
        if unwritable is not None:
            return StoreReadOnly(f"{msg}; {unwritable} is not writable, nothing was stored")
    return StoreError(msg)


def _unwritable_sidecar(path: str) -> str | None:
    """The ``-wal`` or ``-shm`` file that became unwritable (e.g. ``chattr +i``) while open."""
    for suffix in ("-shm", "-wal"):
        p = f"{path}{suffix}"
        if os.path.exists(p) and not os.access(p, os.W_OK):
            return p
    return None


def _copy(err: KernelError) -> KernelError:
    """A fresh instance per waiter, so tracebacks of different callers do not pile up."""
    new = type(err).__new__(type(err))
    KernelError.__init__(new, err.message, code=err.code)
    return new


class SqliteStore(Store):
    """A :class:`~kernel.store.base.Store` in one SQLite file (WAL), with group commit.

    :param path: the database file; its directory is created if missing.
    :param synchronous: ``"NORMAL"`` (default: durable across process crashes) or ``"FULL"``
        (also across power loss); see the module docstring. ``"EXTRA"`` is accepted, and
        ``"OFF"`` too, though with it a commit is durable only once the OS writes it back.
    :param busy_timeout: seconds to wait for another connection's lock before
        :class:`~kernel.errors.StoreLocked`.
    :param read_only: open with ``mode=ro``: reads work, every write raises
        :class:`~kernel.errors.StoreReadOnly` (inspection tools; tests of that failure).
    :param max_batch: the most jobs one group commit takes (one call is never split).
    :param cache_mb: page cache per connection.
    :param wal_autocheckpoint: WAL pages between checkpoints, which run inside a commit
        (SQLite's default is 1000; a bigger WAL means fewer, larger checkpoints, which cost
        measurably less CPU per job, 10-25 % here, when every job dirties index pages).
    :param pragmas: extra ``PRAGMA name = value`` for every connection (e.g. ``max_page_count``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        busy_timeout: float = 5.0,
        read_only: bool = False,
        max_batch: int = 10_000,
        cache_mb: int = 64,
        wal_autocheckpoint: int = 10_000,
        pragmas: dict[str, int | str] | None = None,
    ) -> None:
        sync = synchronous.upper()
        if sync not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, not {synchronous!r}"
            )
        self.path = Path(path)
        self._shm = f"{self.path}-shm"
        self.synchronous = sync
        self.busy_timeout = busy_timeout
        self.read_only = read_only
        self.max_batch = max(1, max_batch)
        self._pragmas: dict[str, int | str] = {
            "cache_size": -1024 * cache_mb,
            "temp_store": "MEMORY",
        }
        self._pragmas.update(pragmas or {})
        self._wal_pages = wal_autocheckpoint
        self._w: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._r: aiosqlite.Connection | None = None
        self._group = GroupCommit(self._commit, str(self.path), max_batch)
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_error: str | None = None
        self._version = 0
        self._lock: guard.OwnerLock | None = None
        self._warnings: list[str] = []  # said once at open (a lost WAL); shown in health
        self.batches = 0  # committed group commits (for health and the benchmark)
        self.batched_ops = 0

    def __repr__(self) -> str:
        state = "open" if self._w is not None else "closed"
        return f"SqliteStore({str(self.path)!r}, {state}, synchronous={self.synchronous})"

    # -- connections ------------------------------------------------------------------------

    def _uri(self) -> str:
        mode = "ro" if self.read_only else "rwc"
        return f"file:{quote(str(self.path.absolute()))}?mode={mode}"

    def _connect_sync(self) -> sqlite3.Connection:
        """A connection with our pragmas; runs on the thread that will use it."""
        con = sqlite3.connect(
            self._uri(), uri=True, isolation_level=None, timeout=self.busy_timeout,
            cached_statements=256,
        )
        try:
            for name, value in self._pragmas.items():
                con.execute(f"PRAGMA {name} = {value}")
        except BaseException:
            con.close()
            raise
        return con

    async def _reader(self, *, mmap_mb: int = 0) -> aiosqlite.Connection:
        try:
            db = await aiosqlite.connect(
                self._uri(), uri=True, isolation_level=None, timeout=self.busy_timeout
            )
        except sqlite3.Error as e:
            raise translate(e, str(self.path), "opening the database") from None
        try:
            for name, value in self._pragmas.items():
                await db.execute(f"PRAGMA {name} = {value}")
            await db.execute("PRAGMA query_only = 1")
            if mmap_mb:
                await db.execute(f"PRAGMA mmap_size = {mmap_mb * 2**20}")
        except BaseException as e:
            await db.close()
            if isinstance(e, sqlite3.Error | ValueError):
                raise translate(e, str(self.path), "opening the database") from None
            raise
        return db

    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the writer thread: one hop."""
        assert self._thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        if self._w is not None:
            return
        where = str(self.path)
        if not self.read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except PermissionError as e:
                raise StoreReadOnly(f"{where}: cannot create its directory: {e}") from None
            except OSError as e:
                raise StoreError(f"{where}: cannot create its directory: {e}") from None
        elif not self.path.exists():
            raise StoreError(f"{where}: no such database (opened read-only, nothing created)")
        self._group = GroupCommit(self._commit, str(self.path), self.max_batch)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        try:
            self._w = await self._on_writer(self._open_sync)
            self._r = await self._reader()
        except BaseException as e:
            if self._w is not None:
                await self._on_writer(self._w.close)
                self._w = None
            if self._lock is not None:
                await self._on_writer(self._let_go, False)
            self._thread.shutdown(wait=False)
            self._thread = None
            if isinstance(e, sqlite3.Error | ValueError):
                raise translate(e, where, "opening the database") from None
            if isinstance(e, OSError):
                raise StoreError(f"{where}: opening the database failed: {e}") from None
            raise
        self._loop = asyncio.get_running_loop()
        self._writer = self._loop.create_task(self._group.run(), name=f"store-writer:{where}")

    def _open_sync(self) -> sqlite3.Connection:
        """Take ownership, check, then open the writer connection (see the module docstring)."""
        self._warnings = []
        if not self.read_only:
            self._lock = lock = guard.OwnerLock(self.path)
            # An existing lock file is tried first: a busy store is reported at once, and the
            # WAL check reads -shm before any connection of ours can reset it.
            if lock.acquire(create=False) and (lost := guard.wal_loss(lock)) is not None:
                self._warnings.append(lost)
            guard.check_writable(self.path)
            if self.path.exists() and self.path.stat().st_size > 0:
                guard.probe(self.path, self.busy_timeout)  # read-only: a refusal writes nothing
            lock.acquire(create=True)
        con = self._connect_sync()
        try:
            self._version = tx.prepare(con, str(self.path), self.read_only)
            if not self.read_only:
                con.execute(f"PRAGMA synchronous = {self.synchronous}")
                con.execute(f"PRAGMA wal_autocheckpoint = {self._wal_pages}")
                con.execute(f"PRAGMA journal_size_limit = {64 * 2**20}")
            if self._lock is not None:
                self._lock.mark("open")  # the WAL exists now: a kill from here on is unclean
        except BaseException:
            con.close()
            raise
        return con

    def _let_go(self, clean: bool) -> None:
        """Hand the lock back (writer thread): marked closed after a clean close, else as it
        was before this store opened."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            if clean:
                lock.mark("closed")
            else:
                lock.restore()
        except OSError as e:
            self._last_error = f"{lock.path}: cannot record the close: {e}"
        finally:
            lock.release()

    async def close(self) -> None:
        if self._w is None:
            return
        self._group.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            if not writer.done():
                await writer  # drains the queue: every pending write is committed or failed
            elif not writer.cancelled() and writer.exception() is not None:
                self._last_error = f"the writer task failed: {writer.exception()!r}"
        clean = False
        try:
            if self._r is not None:
                await self._r.close()
            await self._on_writer(self._w.close)
            clean = True  # SQLite checkpointed the WAL into the file and removed it
        except (sqlite3.Error, ValueError) as e:
            self._last_error = translate(e, str(self.path), "closing").message
        finally:
            self._r = self._w = None
            if self._lock is not None and self._thread is not None:
                await self._on_writer(self._let_go, clean)
            if self._thread is not None:
                self._thread.shutdown(wait=False)
                self._thread = None

    # -- the writer -------------------------------------------------------------------------

    async def _commit(self, batch: list[tx.Op]) -> None:
        assert self._w is not None and self._thread is not None
        done = asyncio.get_running_loop().run_in_executor(self._thread, self._apply, batch)
        cancelled = False
        while True:
            try:
                await asyncio.shield(done)
                error: BaseException | None = None
            except asyncio.CancelledError:
                # The transaction goes on in the writer thread: wait for its verdict so that
                # no caller is told "not stored" about a batch that was committed.
                cancelled = True
                if not done.done():
                    continue
                error = done.exception()
            except Exception as e:
                error = e
            break
        if error is None:
            self._last_error = None
            self.batches += 1
            self.batched_ops += len(batch)
            for op in batch:
                op.settle()
        else:
            err = translate(error, str(self.path), f"writing a batch of {len(batch)} operations")
            self._last_error = err.message
            for op in batch:
                op.fail(_copy(err))
        if cancelled:
            raise asyncio.CancelledError

    def _apply(self, batch: list[tx.Op]) -> None:
        """One group commit (writer thread), unless ``-shm`` stopped being writable.

        SQLite maps ``-shm`` into memory and grows it as the WAL grows; once the file is
        immutable (``chattr +i``) that growth ends in SIGBUS, which kills the process without
        a word. One ``access()`` per batch (about a microsecond) turns it into an error.
        """
        assert self._w is not None
        shm = self._shm
        if not os.access(shm, os.W_OK) and os.path.exists(shm):
            raise StoreReadOnly(
                f"{shm} is no longer writable (chattr +i or a permission change while the store "
                "is open); SQLite maps it into memory and this write would crash the process "
                "(SIGBUS), so nothing of it was stored. Make the file writable again"
            )
        tx.apply_batch(self._w, batch)

    def _enqueue(self, op: tx.Op) -> asyncio.Future[Any]:
        if self._w is None:
            raise StoreError(f"{self.path}: the store is not open")
        if self._writer is None or self._writer.done():
            raise StoreError(f"{self.path}: the store's writer task has stopped")
        return self._group.put(op)  # (raises StoreError once the store is closing)

    def _future(self) -> asyncio.Future[Any]:
        if self._loop is None:
            raise StoreError(f"{self.path}: the store is not open")
        return self._loop.create_future()

    # -- writes -----------------------------------------------------------------------------

    async def submit(self, jobs: Sequence[Job], now: float) -> list[SubmitResult]:
        if not jobs:
            return []
        result: list[SubmitResult] = await self._enqueue(tx.Submit(self._future(), jobs, now))
        return result

    async def mark_running(self, job_id: str, started_at: float, attempt: int) -> None:
        await self._enqueue(tx.MarkRunning(self._future(), (started_at, attempt, job_id)))

    async def finish(self, job_id: str, run: RunRecord, follow_up: Sequence[Job] = ()) -> None:
        await self._enqueue(tx.Finish(self._future(), job_id, run, follow_up))

    async def cancel(self, job_id: str, run: RunRecord | None = None) -> Job | None:
        job: Job | None = await self._enqueue(tx.Cancel(self._future(), job_id, run))
        return job

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        result: T = await self._enqueue(tx.Call(self._future(), fn))
        return result

    async def set_schedule_state(self, state: ScheduleState) -> None:
        await self._call(tx.set_schedule_state(state))

    async def record_misfire(self, rec: MisfireRecord) -> None:
        await self._call(tx.record_misfire(rec))

    async def _batches(self, step: Callable[[sqlite3.Connection], int], batch: int) -> int:
        """Run ``step`` (deleting at most ``batch`` rows) as separate writes until it is done."""
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

    # -- reads ------------------------------------------------------------------------------

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        db = self._r
        if db is None:
            raise StoreError(f"{self.path}: the store is not open")
        try:
            return list(await db.execute_fetchall(sql, params))  # type: ignore[arg-type]
        except (sqlite3.Error, ValueError) as e:
            raise translate(e, str(self.path), "reading") from None

    async def get_job(self, job_id: str) -> Job | None:
        rows = await self._read(f"SELECT {tx.JOB_FIELDS} FROM jobs WHERE id = ?", (job_id,))
        return schema.decode_job(*rows[0]) if rows else None

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        found: dict[str, Job] = {}
        for part in tx.chunks(list(dict.fromkeys(job_ids))):
            marks = ",".join("?" * len(part))
            for jid, *rest in await self._read(
                f"SELECT id, {tx.JOB_FIELDS} FROM jobs WHERE id IN ({marks})", part
            ):
                found[jid] = schema.decode_job(*rest)
        return [found[i] for i in job_ids if i in found]

    async def list_jobs(
        self,
        *,
        state: JobState | None = None,
        task_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        if state is not None:
            where.append(f"state = '{JobState(state).value}'")  # a literal: partial index
        if task_id is not None:
            where.append("task_id = ?")
            params.append(task_id)
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._read(
            f"SELECT {tx.JOB_FIELDS} FROM jobs {cond} ORDER BY due_at, seq LIMIT ? OFFSET ?",
            (*params, max(limit, 0), max(offset, 0)),
        )
        return [schema.decode_job(*r) for r in rows]

    async def count_jobs(self) -> int:
        return int((await self._read("SELECT count(*) FROM jobs"))[0][0])

    async def load_pending(self, batch: int = 10_000) -> AsyncIterator[list[Job]]:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        if self._w is None:
            raise StoreError(f"{self.path}: the store is not open")
        # Reading in due order jumps around the table: memory-mapped reads halve the cost.
        db = await self._reader(mmap_mb=_LOAD_MMAP_MB)
        decode = schema.decode_job
        try:
            try:
                # One statement from first row to last: one read snapshot throughout.
                cur = await db.execute(
                    f"SELECT {tx.JOB_FIELDS} FROM jobs ORDER BY due_at, seq"
                )
                while rows := await cur.fetchmany(batch):
                    yield [decode(*r) for r in rows]
                await cur.close()
            except (sqlite3.Error, ValueError) as e:
                raise translate(e, str(self.path), "loading stored jobs") from None
        finally:
            await db.close()

    async def schedule_states(self) -> dict[str, ScheduleState]:
        rows = await self._read(
            "SELECT task_id, last_scheduled_at, paused, next_due_at FROM schedule_state"
        )
        return {
            t: ScheduleState(task_id=t, last_scheduled_at=last, paused=bool(p), next_due_at=nxt)
            for t, last, p, nxt in rows
        }

    async def misfires(self, task_id: str | None = None, limit: int = 100) -> list[MisfireRecord]:
        cond, params = ("WHERE task_id = ?", [task_id]) if task_id is not None else ("", [])
        rows = await self._read(
            f"SELECT body FROM misfires {cond} ORDER BY decided_at DESC, seq DESC LIMIT ?",
            (*params, max(limit, 0)),
        )
        return [schema.decode_misfire(r[0]) for r in rows]

    async def query_runs(self, q: RunQuery) -> list[RunRecord]:
        where: list[str] = []
        params: list[Any] = []
        for cond, value in (
            ("task_id = ?", q.task_id),
            ("outcome = ?", q.outcome),
            ("trace_id = ?", q.trace_id),
            ("job_id = ?", q.job_id),
            ("finished_at >= ?", q.since),
            ("finished_at < ?", q.until),
        ):
            if value is not None:
                where.append(cond)
                params.append(value)
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._read(
            f"SELECT body FROM runs {cond} ORDER BY finished_at DESC, seq DESC LIMIT ? OFFSET ?",
            (*params, max(q.limit, 0), max(q.offset, 0)),
        )
        return [schema.decode_run(r[0]) for r in rows]

    async def health(self) -> dict[str, object]:
        info: dict[str, object] = {
            "ok": False,
            "path": str(self.path),
            "error": self._last_error,
            "pending": -1,
            "running": -1,
            "backend": "sqlite",
            "schema_version": self._version,
            "synchronous": self.synchronous,
            "read_only": self.read_only,
            "queued_writes": len(self._group.queue),
            "batches": self.batches,
            "batched_ops": self.batched_ops,
            "warnings": list(self._warnings),
        }
        if self._r is None:
            info["error"] = "not open"
            return info
        if self._writer is None or self._writer.done():
            info["error"] = "the writer task has stopped"
            return info
        try:
            total = (await self._read("SELECT count(*) FROM jobs"))[0][0]
            running = (await self._read("SELECT count(*) FROM jobs WHERE state = 'running'"))[0][0]
        except StoreError as e:
            info["error"] = e.message
            return info
        info.update(pending=total - running, running=running, ok=self._last_error is None)
        return info


__all__ = ["SqliteStore", "translate"]
