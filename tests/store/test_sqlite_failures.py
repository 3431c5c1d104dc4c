"""SQLite failures on real files: each becomes a StoreError subclass, and the store survives it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.errors import (
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreReadOnly,
)
from kernel.records import Job
from kernel.store import SqliteStore, schema
from kernel.store.sqlite import translate


def job(i: str, size: int = 10) -> Job:
    return Job(id=i, action="log", due_at=1.0, payload={"blob": "x" * size})


def listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


async def make_db(path: Path, n: int = 3) -> None:
    async with SqliteStore(path) as s:
        await s.submit([job(f"j{i}") for i in range(n)], now=0.0)


# -- not ours ---------------------------------------------------------------------------------


async def test_garbage_file_is_corrupt_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    path.write_bytes(b"this is not a database, just some bytes\n" * 200)
    before = listing(tmp_path)
    with pytest.raises(StoreCorrupt) as e:
        await SqliteStore(path).open()
    assert str(path) in str(e.value) and "left untouched" in str(e.value)
    assert "is not an SQLite database" in str(e.value)
    assert listing(tmp_path) == before  # same bytes, no -wal/-shm created


async def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("CREATE TABLE users (name TEXT)")
        con.commit()
    before = listing(tmp_path)
    with pytest.raises(StoreCorrupt, match="another application"):
        await SqliteStore(path).open()
    assert listing(tmp_path) == before


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    await make_db(path)
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute(f"PRAGMA user_version = {schema.LATEST_VERSION + 1}")
        con.commit()
    before = listing(tmp_path)
    with pytest.raises(StoreCorrupt, match="newer than this kernel") as e:
        await SqliteStore(path).open()
    assert str(path) in str(e.value)
    assert listing(tmp_path) == before


async def test_open_creates_the_schema_once_and_reopens_without_migrating(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "kernel.sqlite3"
    await make_db(path)
    with contextlib.closing(sqlite3.connect(path)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == schema.LATEST_VERSION
        assert con.execute("PRAGMA application_id").fetchone()[0] == schema.APPLICATION_ID
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    async with SqliteStore(path) as s:
        assert await s.count_jobs() == 3
    assert schema.migration_plan("x", 0) == sorted(schema.MIGRATIONS.items())
    assert schema.migration_plan("x", schema.LATEST_VERSION) == []


# -- read-only --------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only_file(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable for this process: chmod, or ``chattr +i`` when root."""
    undo: list[str] = []
    if os.geteuid() != 0:
        path.chmod(0o444)
    elif shutil.which("chattr") and subprocess.run(
        ["chattr", "+i", str(path)], capture_output=True, check=False
    ).returncode == 0:
        undo = ["chattr", "-i", str(path)]
    try:
        try:
            with open(path, "r+b"):
                pytest.skip("cannot make a file read-only here (root without chattr +i)")
        except PermissionError:
            pass
        yield
    finally:
        if undo:
            subprocess.run(undo, check=True)
        path.chmod(0o644)


async def test_read_only_file_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    await make_db(path)
    with read_only_file(path):
        with pytest.raises(StoreReadOnly) as e:
            await SqliteStore(path).open()
    assert str(path) in str(e.value)
    async with SqliteStore(path) as s:  # writable again: nothing was lost
        assert await s.count_jobs() == 3


async def test_read_only_store_reads_but_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    await make_db(path)
    async with SqliteStore(path, read_only=True) as s:
        assert await s.count_jobs() == 3
        for _ in range(2):  # the writer survives the failed batch
            with pytest.raises(StoreReadOnly, match="nothing was stored"):
                await s.submit([job("new")], now=0.0)
        with pytest.raises(StoreReadOnly):
            await s.mark_running("j0", 1.0, 1)
        assert await s.get_job("new") is None
        h = await s.health()
        assert h["ok"] is False and "readonly" in str(h["error"])
    async with SqliteStore(path) as s:
        assert await s.count_jobs() == 3


async def test_read_only_store_needs_an_existing_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such database"):
        await SqliteStore(tmp_path / "missing.db", read_only=True).open()
    assert not (tmp_path / "missing.db").exists()


# -- full -------------------------------------------------------------------------------------


async def test_full_database_refuses_the_batch_and_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    await make_db(path, n=20)
    with contextlib.closing(sqlite3.connect(path)) as con:
        pages = con.execute("PRAGMA page_count").fetchone()[0]
    async with SqliteStore(path, pragmas={"max_page_count": pages + 6}) as s:
        big = [job(f"big{i}", size=2000) for i in range(200)]
        with pytest.raises(StoreFull, match="nothing of this write was stored"):
            await s.submit(big, now=0.0)
        # Many callers in one group commit: each gets the error, none of them is visible.
        res = await asyncio.gather(
            *(s.submit([job(f"c{k}-{i}", size=2000) for i in range(30)], now=0.0)
              for k in range(10)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StoreFull) for r in res)
        assert await s.count_jobs() == 20
        assert (await s.get_job("j7")) == job("j7")
        [r] = await s.submit([job("small")], now=0.0)  # fits: the writer still serves
        assert not r.existed
        assert (await s.health())["ok"] is True
    async with SqliteStore(path) as s:
        assert await s.count_jobs() == 21


# -- locked -----------------------------------------------------------------------------------


async def test_lock_held_by_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    await make_db(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreLocked) as e:  # e.g. another kernel on the same file
            await SqliteStore(path, busy_timeout=0.05).open()
        assert str(path) in str(e.value)
        other.execute("ROLLBACK")
        async with SqliteStore(path, busy_timeout=0.05) as s:
            other.execute("BEGIN EXCLUSIVE")
            assert await s.count_jobs() == 3  # WAL: readers are not blocked
            for _ in range(2):
                with pytest.raises(StoreLocked, match="write lock"):
                    await s.submit([job("x")], now=0.0)
            other.execute("ROLLBACK")
            [r] = await s.submit([job("x")], now=0.0)  # the writer survived
            assert not r.existed and await s.count_jobs() == 4
    finally:
        other.close()


async def test_lock_on_a_new_database_fails_open(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    other = sqlite3.connect(path, isolation_level=None)  # rollback journal: locks readers too
    try:
        other.execute("CREATE TABLE IF NOT EXISTS t (x)")
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreLocked):
            await SqliteStore(path, busy_timeout=0.05).open()
    finally:
        other.close()


# -- group commit and durability ---------------------------------------------------------------


async def test_close_flushes_pending_writes(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    s = SqliteStore(path)
    await s.open()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(s.submit([job(f"j{i}")], now=0.0)) for i in range(50)]
        await asyncio.sleep(0)  # every submit is queued, none committed yet
        await s.close()
    assert all(not t.result()[0].existed for t in tasks)
    async with SqliteStore(path) as s2:
        assert await s2.count_jobs() == 50
    assert s.batches >= 1 and s.batched_ops == 50


async def test_group_commit_batches_concurrent_callers(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "kernel.sqlite3") as s:
        await asyncio.gather(*(s.submit([job(f"j{i}")], now=0.0) for i in range(300)))
        assert s.batched_ops == 300 and s.batches <= 3


def test_translate_maps_sqlite_errors() -> None:
    def err(name: str, text: str) -> sqlite3.Error:
        e = sqlite3.OperationalError(text)
        e.sqlite_errorname = name
        return e

    cases = {
        "SQLITE_BUSY": StoreLocked, "SQLITE_LOCKED_SHAREDCACHE": StoreLocked,
        "SQLITE_READONLY_DBMOVED": StoreReadOnly, "SQLITE_FULL": StoreFull,
        "SQLITE_NOTADB": StoreCorrupt, "SQLITE_CORRUPT": StoreCorrupt, "SQLITE_IOERR": StoreError,
    }
    for name, cls in cases.items():
        got = translate(err(name, "boom"), "/x.db", "testing")
        assert type(got) is cls and got.message.startswith("/x.db: testing failed: boom")
    assert type(translate(ValueError("Connection closed"), "/x.db", "t")) is StoreError


_ROOT = Path(__file__).resolve().parents[2]
_CHILD = textwrap.dedent("""
    import asyncio, sys
    from kernel.records import Job
    from kernel.store import SqliteStore

    async def main(path):
        store = SqliteStore(path)
        await store.open()
        async def one(k):
            for i in range(10**6):
                await store.submit([Job(id=f"{k}-{i}", action="log", due_at=1.0)], now=0.0)
                print(f"{k}-{i}", flush=True)  # acknowledged: committed
        await asyncio.gather(*(one(k) for k in range(20)))

    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.slow
async def test_acknowledged_jobs_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(path), stdout=asyncio.subprocess.PIPE,
        cwd=_ROOT,
    )
    assert proc.stdout is not None
    acked: list[str] = []
    while len(acked) < 3000:
        line = await proc.stdout.readline()
        assert line, "the child stopped early"
        acked.append(line.decode().strip())
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    async with SqliteStore(path) as s:
        found = await s.get_jobs(acked)
    assert len(found) == len(acked)


async def test_a_cancelled_caller_does_not_break_the_batch(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "kernel.sqlite3") as s:
        async with asyncio.TaskGroup() as tg:
            doomed = tg.create_task(s.submit([job("doomed")], now=0.0))
            other = tg.create_task(s.submit([job("other")], now=0.0))
            await asyncio.sleep(0)  # both queued
            doomed.cancel()
        assert doomed.cancelled() and not other.result()[0].existed
        # The write was queued before the cancel: it is committed all the same (at most the
        # caller does not learn it), and the writer carries on.
        assert {j.id for j in await s.get_jobs(["doomed", "other"])} == {"doomed", "other"}
        [r] = await s.submit([job("after")], now=0.0)
        assert not r.existed
