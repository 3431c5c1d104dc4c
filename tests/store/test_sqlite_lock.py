"""One owner per store: an exclusive lock (flock on ``<db>-lock``) held while the store is open.

Store level: a second store on the same file, in this process or another, is refused with
ERR_STORE_LOCKED naming the holder's pid; the lock goes with its holder, even one killed with
SIGKILL. Kernel level: two real ``python -m kernel run`` processes on one ``[store] path``: the
second exits non-zero with one error line and runs nothing; after SIGKILL of the first a new
kernel starts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernel.errors import ErrorCode, StoreLocked
from kernel.records import Job
from kernel.store import SqliteStore
from tests.kernelproc import free_port, start_kernel, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


def job(i: str) -> Job:
    return Job(id=i, action="log", due_at=1.0)


async def test_a_second_store_on_the_same_file_is_refused_naming_the_holder(
        tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    async with SqliteStore(path) as first:
        await first.submit([job("a")], now=0.0)
        with pytest.raises(StoreLocked) as e:
            await SqliteStore(path).open()
        assert e.value.code is ErrorCode.ERR_STORE_LOCKED
        text = str(e.value)
        assert f"pid {os.getpid()}" in text and str(path) in text and "\n" not in text
        assert await first.count_jobs() == 1  # the holder is not disturbed
        [r] = await first.submit([job("b")], now=0.0)
        assert not r.existed
    async with SqliteStore(path) as again:  # a clean close hands the lock back
        assert await again.count_jobs() == 2


async def test_a_read_only_store_needs_no_lock(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    async with SqliteStore(path) as owner:
        await owner.submit([job("a")], now=0.0)
        async with SqliteStore(path, read_only=True) as reader:  # an inspection tool
            assert await reader.count_jobs() == 1


_HOLDER = textwrap.dedent("""
    import asyncio, sys
    from kernel.store import SqliteStore

    async def main(path):
        store = SqliteStore(path)
        await store.open()
        print("open", flush=True)
        await asyncio.Event().wait()  # hold the store until killed

    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.slow
async def test_the_lock_of_a_killed_holder_never_blocks_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, str(path), stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"open\n"
        with pytest.raises(StoreLocked, match=f"pid {proc.pid}\\b"):
            await SqliteStore(path).open()
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert (tmp_path / "kernel.sqlite3-lock").exists()  # a stale file, but no stale lock
    async with SqliteStore(path) as s:
        await s.submit([job("after")], now=0.0)
        assert await s.count_jobs() == 1


def write_config(tmp: Path, store: Path, out: Path) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(f"""
[kernel]
data_dir = "{tmp / 'data'}"
shutdown_grace = "2s"
[store]
path = "{store}"
[[tasks]]
id = "every_second"
schedule = "* * * * * *"
action = "python"
payload = {{ target = "crashprobe:record", kwargs = {{ out = "{out}" }}, pass_context = true }}
""")
    return cfg


@pytest.mark.slow
async def test_a_second_kernel_on_the_same_store_exits_with_one_line_and_runs_nothing(
        tmp_path: Path) -> None:
    store = tmp_path / "shared" / "kernel.sqlite3"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out_a, out_b = tmp_path / "a" / "runs.log", tmp_path / "b" / "runs.log"
    cfg_a = write_config(tmp_path / "a", store, out_a)
    cfg_b = write_config(tmp_path / "b", store, out_b)
    port_a = free_port()
    first = start_kernel(cfg_a, port_a, tmp_path / "a" / "kernel.log")
    procs = [first]
    try:
        await wait_healthy(f"http://127.0.0.1:{port_a}", first)
        log_b = tmp_path / "b" / "kernel.log"
        second = start_kernel(cfg_b, free_port(), log_b)
        procs.append(second)
        rc = await asyncio.to_thread(second.wait, 30)
        text = log_b.read_text()
        assert rc != 0, text
        errors = [line for line in text.splitlines() if "ERR_STORE_LOCKED" in line]
        assert len(errors) == 1, text
        assert f"pid {first.pid}" in errors[0] and str(store) in errors[0], text
        assert "Traceback" not in text, text
        assert not out_b.exists(), "the refused kernel ran something"
        assert first.poll() is None, "the first kernel was disturbed"

        first.send_signal(signal.SIGKILL)  # its lock dies with it
        first.wait()
        port_c = free_port()
        third = start_kernel(cfg_b, port_c, tmp_path / "b" / "kernel-c.log")
        procs.append(third)
        await wait_healthy(f"http://127.0.0.1:{port_c}", third)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
