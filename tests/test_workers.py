"""The worker pool of ``python`` actions on its own (kernel.workers): real processes started by
the forkserver, real signals. Waits are bounded polls on conditions, never timed sleeps."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from kernel.errors import ActionError, BadPayload, ErrorCode, Retry
from kernel.workers import PythonSettings, WorkerPool, safe_loads

from .test_exec_action import alive, wait_for

T = "tests.python_action_targets"
ROOT = str(Path(__file__).resolve().parents[1])


async def until(cond: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return cond()
    await wait_for(check, what)


async def test_a_call_runs_in_another_process_and_a_worker_is_reused() -> None:
    pool = WorkerPool(PythonSettings(workers=2))
    try:
        first = await pool.call(f"{T}:pid", [], {})
        second = await pool.call(f"{T}:pid", [], {})
        assert first != os.getpid() and first == second
        assert pool.stats().started == 1 and pool.stats().idle == 1
    finally:
        await pool.close()
    await until(lambda: not alive(first), "the worker to be stopped by close()")


async def test_workers_are_recycled_after_n_tasks() -> None:
    pool = WorkerPool(PythonSettings(workers=1, max_tasks_per_worker=2))
    try:
        pids = [await pool.call(f"{T}:pid", [], {}) for _ in range(5)]
    finally:
        await pool.close()
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert pool.stats().recycled == 2


@pytest.mark.slow
async def test_workers_are_recycled_on_memory_use() -> None:
    pool = WorkerPool(PythonSettings(workers=1, recycle_rss_mb=150))
    try:
        small = await pool.call(f"{T}:pid", [], {})
        assert await pool.call(f"{T}:keep", [200], {}) == small   # leaks 200 MB: then recycled
        after = await pool.call(f"{T}:pid", [], {})
    finally:
        await pool.close()
    assert after != small and pool.stats().recycled == 1


async def test_an_async_target_runs_in_the_workers_own_loop() -> None:
    pool = WorkerPool(PythonSettings(workers=1))
    try:
        wpid, loop_a = await pool.call(f"{T}:loop_info", [], {})
        _, loop_b = await pool.call(f"{T}:loop_info", [], {})
    finally:
        await pool.close()
    assert wpid != os.getpid()
    assert loop_a == loop_b  # one loop per worker, kept across calls


async def test_results_and_exceptions_cross_back_without_importing_user_code() -> None:
    pool = WorkerPool(PythonSettings(workers=1))
    try:
        assert await pool.call(f"{T}:returns_object", [], {}) == "PosixPath('/etc')"
        with pytest.raises(ValueError, match="bad value"):
            await pool.call(f"{T}:raises", ["value"], {})
        with pytest.raises(ConnectionRefusedError):
            await pool.call(f"{T}:raises", ["conn"], {})
        with pytest.raises(ActionError, match="Custom: custom failure") as ei:
            await pool.call(f"{T}:raises", ["custom"], {})
        assert ei.value.code is ErrorCode.ERR_ACTION_FAILED
        with pytest.raises(Retry) as ri:
            await pool.call(f"{T}:raises", ["retry"], {})
        assert ri.value.delay == 7.5 and ri.value.message == "not yet"
        with pytest.raises(ActionError, match=r"sys.exit\(4\)"):
            await pool.call(f"{T}:raises", ["exit"], {})
        with pytest.raises(BadPayload, match="cannot be imported"):
            await pool.call("tests.no_such_module:fn", [], {})
        assert pool.stats().started == 1  # none of these cost the worker
    finally:
        await pool.close()


async def test_a_gpu_is_part_of_a_workers_shape_and_env_is_set_per_call() -> None:
    pool = WorkerPool(PythonSettings(workers=2))
    try:
        assert await pool.call(f"{T}:env", ["CUDA_VISIBLE_DEVICES"], {}, gpu=1) == "1"
        assert await pool.call(f"{T}:env", ["CUDA_VISIBLE_DEVICES"], {}) is None
        assert await pool.call(f"{T}:env", ["KERNEL_JOB_ID"], {},
                               env={"KERNEL_JOB_ID": "j1"}) == "j1"
        assert pool.stats().started == 2  # one worker per GPU shape
    finally:
        await pool.close()


def test_the_kernel_side_unpickles_plain_values_only() -> None:
    import pickle

    assert safe_loads(pickle.dumps({"a": [1, 2.5, None, (b"x",)], "s": {1}})) == {
        "a": [1, 2.5, None, (b"x",)], "s": {1}}
    with pytest.raises(pickle.UnpicklingError):
        safe_loads(pickle.dumps(Path("/etc")))
    with pytest.raises(pickle.UnpicklingError):
        safe_loads(pickle.dumps(os.system))


async def test_a_worker_that_dies_is_reported_and_replaced() -> None:
    pool = WorkerPool(PythonSettings(workers=1))
    try:
        first = await pool.call(f"{T}:pid", [], {})
        with pytest.raises(ActionError, match="died .exit status 3") as ei:
            await pool.call(f"{T}:raises", ["die"], {})
        assert ei.value.code is ErrorCode.ERR_WORKER_DIED
        assert await pool.call(f"{T}:pid", [], {}) != first
    finally:
        await pool.close()


@pytest.mark.slow
async def test_the_memory_cap_gives_a_clear_code() -> None:
    pool = WorkerPool(PythonSettings(workers=1, memory_mb=200))
    try:
        assert await pool.call(f"{T}:allocate", [50], {}) == 50 * 1024 * 1024
        with pytest.raises(ActionError, match="ran out of memory .memory cap 200 MB") as ei:
            await pool.call(f"{T}:allocate", [1024], {})
        assert ei.value.code is ErrorCode.ERR_MEMORY_LIMIT
        # a call with another cap gets a worker of its own; the pool stays within `workers`
        assert await pool.call(f"{T}:allocate", [300], {}, memory_mb=512) == 300 * 1024 * 1024
        assert pool.stats().idle + pool.stats().busy == 1
    finally:
        await pool.close()


async def test_cancelling_a_call_kills_a_worker_that_swallows_signals(tmp_path: Path) -> None:
    pool = WorkerPool(PythonSettings(workers=1))
    marker = tmp_path / "pid"
    try:
        call = asyncio.ensure_future(pool.call(f"{T}:swallow_signals", [str(marker)], {},
                                               grace=0.2))
        await until(marker.exists, "the target to start")
        wpid = int(marker.read_text())
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # the cancellation returns only once the worker is gone (SIGKILL after the grace)
        assert not alive(wpid)
        assert pool.stats().killed == 1 and pool.stats().idle == 0
        assert await pool.call(f"{T}:pid", [], {}) not in (wpid, os.getpid())
    finally:
        await pool.close()


PARENT = textwrap.dedent("""
    import asyncio, os, sys
    sys.path.insert(0, sys.argv[2])
    from kernel.workers import PythonSettings, WorkerPool
    async def main():
        pool = WorkerPool(PythonSettings(workers=1))
        await pool.call("tests.python_action_targets:swallow_signals", [sys.argv[1]], {})
    asyncio.run(main())
""")


@pytest.mark.slow
async def test_workers_die_with_a_kernel_that_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", PARENT, str(marker), ROOT,
                                                  cwd=ROOT)
    try:
        await until(marker.exists, "the worker's target to start")
        wpid = int(marker.read_text())
        assert alive(wpid)
        parent.kill()  # SIGKILL: no clean-up code runs in the parent
        await parent.wait()
        await until(lambda: not alive(wpid), "the orphaned worker to kill itself")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()


SCRIPT = textwrap.dedent("""
    # no `if __name__ == "__main__"` guard, on purpose
    import asyncio, sys
    sys.path.insert(0, {root!r})
    with open({runs!r}, "a") as f:
        f.write("ran\\n")
    from kernel.workers import PythonSettings, WorkerPool
    async def main():
        pool = WorkerPool(PythonSettings(workers=2))
        print(await asyncio.gather(pool.call("os:getpid", [], {{}}),
                                   pool.call("os:getpid", [], {{}})))
        await pool.close()
    asyncio.run(main())
""")


@pytest.mark.slow
async def test_workers_never_re_run_the_kernels_main_script(tmp_path: Path) -> None:
    """multiprocessing's spawn and forkserver starts import ``__main__`` again in each worker;
    a script that embeds the kernel without a main guard would run again there."""
    runs = tmp_path / "runs"
    script = tmp_path / "embedding.py"
    script.write_text(SCRIPT.format(root=ROOT, runs=str(runs)))
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), cwd=str(tmp_path),
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert runs.read_text() == "ran\n"


async def test_close_is_bounded_whatever_grace_a_kill_has(tmp_path: Path) -> None:
    pool = WorkerPool(PythonSettings(workers=1))
    marker = tmp_path / "pid"
    call = asyncio.ensure_future(pool.call(f"{T}:swallow_signals", [str(marker)], {},
                                           grace=600.0))
    await until(marker.exists, "the target to start")
    wpid = int(marker.read_text())
    call.cancel()  # SIGTERM (ignored), SIGKILL only after 600 s...
    await until(lambda: pool.stats().killed == 1, "the kill to begin")
    await pool.close(bound=0.2)  # ...unless the pool closes: then at once
    with pytest.raises(asyncio.CancelledError):
        await call
    await until(lambda: not alive(wpid), "the worker to be killed by close()")
