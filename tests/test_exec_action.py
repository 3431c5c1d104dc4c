"""The built-in ``exec`` action with real child processes: environment, failures, process-group
kill on timeout (also of a child that ignores SIGTERM), rlimits. Timeouts come from the fake
clock; only the SIGTERM->SIGKILL grace is real time (0.2 s)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from kernel.app import SubmitRequest
from kernel.records import Outcome, RunRecord

from .harness import Harness, make_harness


async def wait_for(cond, what: str, limit: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition that depends on real I/O (a child process), with a bound."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not await cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def one_run(h: Harness) -> RunRecord:
    async def done() -> bool:
        return bool(await h.runs())
    await wait_for(done, "the run to be recorded")
    (run,) = await h.runs()
    return run


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): read its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_exec_gets_kernel_env_and_a_clean_environment(tmp_path: Path) -> None:
    os.environ["SOME_SECRET_TOKEN"] = "do-not-leak"
    try:
        h = make_harness("")
        await h.start()
        script = ("import os, json; print(json.dumps({k: os.environ.get(k) for k in "
                  "['KERNEL_JOB_ID','KERNEL_TASK_ID','KERNEL_TRACE_ID','KERNEL_ATTEMPT',"
                  "'KERNEL_SCHEDULED_AT','SOME_SECRET_TOKEN','EXTRA','TRACEPARENT']}))")
        res = await h.kernel.submit(SubmitRequest(action="exec", payload={
            "argv": [sys.executable, "-c", script], "env": {"EXTRA": "x"},
            "cwd": str(tmp_path)}))
        run = await one_run(h)
        assert run.outcome is Outcome.SUCCEEDED, run.detail
        import json
        env = json.loads(run.detail)
        assert env["KERNEL_JOB_ID"] == res.job.id
        assert env["KERNEL_TRACE_ID"] == res.job.trace_id
        assert env["KERNEL_ATTEMPT"] == "1"
        assert env["TRACEPARENT"].startswith(f"00-{res.job.trace_id}-")
        assert env["EXTRA"] == "x"
        assert env["SOME_SECRET_TOKEN"] is None  # not inherited unless inherit_env = true
        await h.stop()
    finally:
        del os.environ["SOME_SECRET_TOKEN"]


async def test_exec_failure_carries_exit_status_and_stderr() -> None:
    h = make_harness("")
    await h.start()
    await h.kernel.submit(SubmitRequest(action="exec", payload={
        "argv": [sys.executable, "-c", "import sys; sys.stderr.write('bad input'); sys.exit(3)"]}))
    run = await one_run(h)
    assert run.outcome is Outcome.FAILED
    assert run.error_code == "ERR_EXEC_FAILED"
    assert "exit status 3" in run.detail and "bad input" in run.detail
    await h.stop()


async def test_exec_missing_program_is_a_clear_failure() -> None:
    h = make_harness("")
    await h.start()
    await h.kernel.submit(SubmitRequest(action="exec", payload={"argv": ["/no/such/program"]}))
    run = await one_run(h)
    assert run.error_code == "ERR_EXEC_FAILED" and "cannot start" in run.detail
    await h.stop()


CHILD = r"""
import os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a child that ignores SIGTERM
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        signal.pause()  # wait for a signal; only SIGKILL can end it
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {pid}")
while True:
    signal.pause()
"""


@pytest.mark.slow
async def test_timeout_kills_the_whole_process_group_even_if_it_ignores_sigterm(
        tmp_path: Path) -> None:
    h = make_harness("")
    await h.start()
    pids_file = tmp_path / "pids"
    await h.kernel.submit(SubmitRequest(action="exec", timeout=5, payload={
        "argv": [sys.executable, "-c", CHILD, str(pids_file)], "grace": 0.2}))

    async def started() -> bool:
        return pids_file.exists() and len(pids_file.read_text().split()) == 2
    await wait_for(started, "the child to start")
    parent, grandchild = map(int, pids_file.read_text().split())
    await h.advance(4.9)
    assert alive(parent) and alive(grandchild)
    await h.clock.advance(0.1)
    run = await one_run(h)
    assert run.outcome is Outcome.TIMED_OUT and run.error_code == "ERR_TIMEOUT"

    async def gone() -> bool:
        return not alive(parent) and not alive(grandchild)
    await wait_for(gone, "the process group to be killed")
    await h.stop()


LIMITS = ("import json, os, resource; print(json.dumps([resource.getrlimit(resource.RLIMIT_DATA)[0],"
          " resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_CPU),"
          " os.nice(0), os.getpid() == os.getpgid(0)]))")


async def test_rlimit_memory_limit_is_applied() -> None:
    """The memory cap is RLIMIT_DATA (heap and private writable mappings), and the address
    space stays unlimited: CUDA reserves huge PROT_NONE ranges that RLIMIT_AS would count."""
    import json

    h = make_harness("")
    await h.start()
    nice0 = os.nice(0)
    await h.kernel.submit(SubmitRequest(action="exec", payload={
        "argv": [sys.executable, "-c", LIMITS],
        "limits": {"memory_mb": 2048, "nice": 5, "cpu_sec": 30}}))
    run = await one_run(h)
    assert run.outcome is Outcome.SUCCEEDED, run.detail
    data, as_, cpu, nice, leader = json.loads(run.detail)
    assert data == 2048 * 1024 * 1024
    assert as_ == -1  # RLIM_INFINITY: a CUDA process can still start
    assert cpu == [30, 31]
    assert nice == min(nice0 + 5, 19)
    assert leader  # still its own process group (the wrapper exec'd the program in place)
    await h.stop()


async def test_limits_are_set_without_preexec_fn(monkeypatch: pytest.MonkeyPatch) -> None:
    """preexec_fn runs Python between fork and exec, unsafe with threads (the kernel has the
    store writer, aiosqlite and to_thread threads): the limits come from a wrapper that sets
    them on itself and then execs the program."""
    seen: list[dict[str, object]] = []
    real = asyncio.create_subprocess_exec

    async def spy(*args: object, **kwargs: object) -> asyncio.subprocess.Process:
        seen.append(kwargs)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    h = make_harness("")
    await h.start()
    await h.kernel.submit(SubmitRequest(action="exec", payload={
        "argv": ["/bin/echo", "limited"], "limits": {"memory_mb": 512}}))
    run = await one_run(h)
    assert run.outcome is Outcome.SUCCEEDED and run.detail == "limited\n", run.detail
    assert seen and all(kw.get("preexec_fn") is None for kw in seen)
    await h.stop()


async def test_a_missing_program_with_limits_is_a_clear_failure() -> None:
    h = make_harness("")
    await h.start()
    await h.kernel.submit(SubmitRequest(action="exec", payload={
        "argv": ["/no/such/program"], "limits": {"cpu_sec": 5}}))
    run = await one_run(h)
    assert run.error_code == "ERR_EXEC_FAILED"
    assert run.detail.startswith("cannot start '/no/such/program'"), run.detail
    await h.stop()


async def test_exec_keeps_only_a_tail_of_huge_output() -> None:
    h = make_harness("")
    await h.start()
    code = "import sys\nfor _ in range(2000): sys.stdout.write('x' * 65536)\nprint('THE END')"
    await h.kernel.submit(SubmitRequest(action="exec", payload={
        "argv": [sys.executable, "-c", code]}))
    run = await one_run(h)
    assert run.outcome is Outcome.SUCCEEDED
    assert run.detail.endswith("THE END\n") and len(run.detail) <= 2048
    await h.stop()


async def test_exec_with_a_missing_cwd_names_the_cwd(tmp_path: Path) -> None:
    h = make_harness("")
    await h.start()
    await h.kernel.submit(SubmitRequest(action="exec", payload={
        "argv": ["/bin/echo", "hi"], "cwd": str(tmp_path / "nope")}))
    run = await one_run(h)
    assert run.error_code == "ERR_EXEC_FAILED" and "cwd" in run.detail and "nope" in run.detail
    await h.stop()


def exits(code: int | None) -> None:
    raise SystemExit(code)


async def test_python_target_calling_sys_exit_does_not_stop_the_kernel() -> None:
    h = make_harness("")
    await h.start()
    await h.kernel.submit(SubmitRequest(action="python", payload={
        "target": "tests.test_exec_action:exits", "args": [3]}))
    run = await one_run(h)
    assert run.outcome is Outcome.FAILED and "sys.exit(3)" in run.detail
    await h.kernel.submit(SubmitRequest(action="python", payload={
        "target": "tests.test_exec_action:exits", "args": [0]}))

    async def two() -> bool:
        return len(await h.runs()) == 2
    await wait_for(two, "the second run")
    assert (await h.runs())[1].outcome is Outcome.SUCCEEDED
    assert h.task is not None and not h.task.done()  # the kernel is still running
    await h.stop()


TERM_THEN = r"""
import os, signal, sys
out = sys.argv[1]
def on_term(signum, frame):
    with open(out, "a") as f:
        f.write("TERM\n")   # noted, then ignored: only SIGKILL ends this process
signal.signal(signal.SIGTERM, on_term)
with open(out, "a") as f:
    f.write(f"START {os.getpid()}\n")
while True:
    signal.pause()
"""


@pytest.mark.slow
async def test_a_timed_out_child_gets_sigterm_first_then_sigkill(tmp_path: Path) -> None:
    h = make_harness("")
    await h.start()
    out = tmp_path / "signals"
    await h.kernel.submit(SubmitRequest(action="exec", timeout=5, payload={
        "argv": [sys.executable, "-c", TERM_THEN, str(out)], "grace": 0.2}))

    async def started() -> bool:
        return out.exists() and out.read_text().startswith("START")
    await wait_for(started, "the child to start")
    pid = int(out.read_text().split()[1])
    await h.advance(5)
    run = await one_run(h)
    assert run.outcome is Outcome.TIMED_OUT

    async def gone() -> bool:
        return not alive(pid)
    await wait_for(gone, "the child to be killed")
    # it saw SIGTERM (and survived it), so the kill that ended it came after: SIGKILL
    assert out.read_text().splitlines()[1:] == ["TERM"]
    await h.stop()
