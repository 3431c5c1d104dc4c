"""What the SQLite store checks before it writes, on real files.

* a damaged file is refused before any write: its bytes are the same afterwards;
* a database that was not closed cleanly and whose WAL was deleted is reported at ERROR with
  ERR_STORE_WAL_LOST and what was lost;
* a ``-shm`` or ``-wal`` file that cannot be written is refused at open, naming the file
  (instead of a SIGBUS later).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.errors import ErrorCode, StoreCorrupt, StoreReadOnly
from kernel.records import Job
from kernel.store import SqliteStore

ROOT = Path(__file__).resolve().parents[2]


def job(i: str, size: int = 10) -> Job:
    return Job(id=i, action="log", due_at=1.0, payload={"blob": "x" * size})


def listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


# -- a damaged page ---------------------------------------------------------------------------


async def test_a_damaged_page_is_refused_before_any_write(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    async with SqliteStore(path) as s:
        await s.submit([job(f"j{i}", size=300) for i in range(400)], now=0.0)
    with contextlib.closing(sqlite3.connect(path)) as con:
        size = con.execute("PRAGMA page_size").fetchone()[0]
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'jobs'").fetchone()[0]
    with path.open("r+b") as f:  # the jobs table's root page: garbage, page 1 intact
        f.seek((root - 1) * size)
        f.write(b"\xa5" * size)
    before = listing(tmp_path)

    store = SqliteStore(path)
    with pytest.raises(StoreCorrupt) as e:
        await open_and_load(store)
    await store.close()
    assert e.value.code is ErrorCode.ERR_STORE_CORRUPT
    assert str(path) in str(e.value) and "left untouched" in str(e.value)
    after = listing(tmp_path)
    assert after.keys() == before.keys()  # no -wal, -shm or lock file left behind
    assert after[path.name] == before[path.name]  # not one byte (27, 95: header counters)


async def open_and_load(store: SqliteStore) -> None:
    await store.open()
    # (the store used to open, write its header, and fail only when reading the jobs)
    async for _ in store.load_pending():
        pass


# -- a WAL deleted after a crash --------------------------------------------------------------


_KILLED = textwrap.dedent("""
    import asyncio, os, signal, sys
    from kernel.records import Job
    from kernel.store import SqliteStore

    async def main(path, n):
        store = SqliteStore(path)
        await store.open()
        for i in range(n):  # each one acknowledged (committed to the WAL)
            await store.submit([Job(id=f"k{i}", action="log", due_at=1.0)], now=0.0)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


def killed_after_submitting(path: Path, n: int) -> None:
    """A real process submits ``n`` jobs to ``path`` one by one, then dies by SIGKILL."""
    p = subprocess.run([sys.executable, "-c", _KILLED, str(path), str(n)], cwd=ROOT,
                       capture_output=True, timeout=60, check=False)
    assert p.returncode == -9, p.stderr.decode()


def delete_wal(path: Path, *, also_shm: bool = False) -> Path:
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 0
    wal.unlink()
    if also_shm:
        Path(f"{path}-shm").unlink()
    return wal


def wal_exists(path: Path) -> bool:
    return Path(f"{path}-wal").exists()


def lost_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if getattr(r, "error_code", None) == "ERR_STORE_WAL_LOST"]


@pytest.mark.slow
async def test_a_wal_deleted_after_a_crash_is_reported_loudly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kernel.sqlite3"
    async with SqliteStore(path) as s:  # some history that was checkpointed into the file
        await s.submit([job("old")], now=0.0)
    killed_after_submitting(path, 200)
    wal = delete_wal(path)  # what a user "cleaning up" does

    with caplog.at_level(logging.WARNING):
        async with SqliteStore(path) as s:
            assert await s.count_jobs() == 1  # the 200 acknowledged jobs are gone
            health = await s.health()
    [rec] = lost_records(caplog)
    assert rec.levelno == logging.ERROR
    text = rec.getMessage()
    assert str(wal) in text and "not closed cleanly" in text, text
    assert "acknowledged" in text and "pages" in text, text
    warnings = health.get("warnings")
    assert isinstance(warnings, list) and any("ERR_STORE_WAL_LOST" in w for w in warnings)

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # said once: the next start is a normal one
        async with SqliteStore(path):
            pass
    assert lost_records(caplog) == []


@pytest.mark.slow
async def test_a_wal_and_shm_both_deleted_after_a_crash_are_reported_too(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kernel.sqlite3"
    killed_after_submitting(path, 20)
    delete_wal(path, also_shm=True)
    with caplog.at_level(logging.WARNING):
        async with SqliteStore(path) as s:
            assert await s.count_jobs() == 0
    [rec] = lost_records(caplog)
    assert "every write committed since the last checkpoint" in rec.getMessage()


@pytest.mark.slow
async def test_no_warning_after_a_crash_with_its_wal_or_after_a_clean_close(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kernel.sqlite3"
    killed_after_submitting(path, 50)
    with caplog.at_level(logging.WARNING):
        async with SqliteStore(path) as s:
            assert await s.count_jobs() == 50  # recovered from the WAL
        async with SqliteStore(path) as s:  # closed cleanly: the WAL is gone on purpose
            assert await s.count_jobs() == 50
    assert not wal_exists(path)
    assert lost_records(caplog) == []


# -- -shm / -wal not writable -----------------------------------------------------------------


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable even for root: ``chattr +i``; else chmod 0444 (not as root)."""
    undo: list[str] = []
    if shutil.which("chattr") and subprocess.run(
        ["chattr", "+i", str(path)], capture_output=True, check=False
    ).returncode == 0:
        undo = ["chattr", "-i", str(path)]
    elif os.geteuid() != 0:
        path.chmod(0o444)
    try:
        try:
            with open(path, "r+b"):
                pytest.skip("cannot make a file unwritable here: root, and chattr +i is not "
                            "available on this file system (chmod does not stop root)")
        except PermissionError:
            pass
        yield
    finally:
        if undo:
            subprocess.run(undo, check=True)
        path.chmod(0o644)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["-shm", "-wal"])
async def test_an_unwritable_shm_or_wal_is_refused_at_open_naming_it(
        tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "kernel.sqlite3"
    killed_after_submitting(path, 20)  # leaves both -wal and -shm
    target = Path(f"{path}{suffix}")
    with unwritable(target):
        with pytest.raises(StoreReadOnly) as e:
            await SqliteStore(path).open()
    assert e.value.code is ErrorCode.ERR_STORE_READONLY
    assert str(target) in str(e.value) and "writable" in str(e.value)
    async with SqliteStore(path) as s:  # writable again: nothing was lost
        assert await s.count_jobs() == 20


_GROW = textwrap.dedent("""
    import asyncio, subprocess, sys
    from kernel.errors import StoreReadOnly
    from kernel.records import Job
    from kernel.store import SqliteStore

    async def main(path):
        store = SqliteStore(path)
        await store.open()
        await store.submit([Job(id="first", action="log", due_at=1.0)], now=0.0)
        subprocess.run(["chattr", "+i", path + "-shm"], check=True)
        try:
            for k in range(50):  # the WAL outgrows the -shm index's first 32 KiB region
                await store.submit([Job(id=f"b{k}-{i}", action="log", due_at=1.0,
                                        payload={"x": "y" * 500}) for i in range(2000)], now=0.0)
        except StoreReadOnly as e:
            print("refused:", e, flush=True)
        finally:
            subprocess.run(["chattr", "-i", path + "-shm"], check=True)
        await store.close()

    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.slow
def test_a_shm_made_immutable_while_open_refuses_writes_instead_of_sigbus(
        tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    if not shutil.which("chattr") or subprocess.run(
            ["chattr", "+i", str(probe)], capture_output=True, check=False).returncode != 0:
        pytest.skip("needs chattr +i (root on a file system with inode flags): chmod does not "
                    "affect a file SQLite already has open, so nothing else reproduces this")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    path = tmp_path / "kernel.sqlite3"
    p = subprocess.run([sys.executable, "-c", _GROW, str(path)], cwd=ROOT, capture_output=True,
                       timeout=120, check=False)
    out = p.stdout.decode()
    assert p.returncode == 0, (p.returncode, out, p.stderr.decode()[-2000:])  # -7: SIGBUS
    assert out.startswith("refused:") and f"{path}-shm" in out, out
