"""The loop watches its own lag (kernel.looplag): a stall over the threshold is logged naming
the runs in flight, counted, and published as LoopStalled.

On the fake clock a stall is ``FakeClock.jump`` (time moves while no callback runs, as a
blocked loop sees it); one test blocks a real loop with a real blocking call."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from kernel.app import KernelParts, SubmitRequest
from kernel.clock import SystemClock
from kernel.events import LoopStalled
from kernel.hookspecs import PluginContext
from kernel.looplag import LoopLagSettings, LoopLagWatcher
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import Outcome, RunQuery
from kernel.store.memory import MemoryStore

from .harness import make_config, make_harness
from .test_exec_action import wait_for


async def test_a_stall_is_logged_with_the_run_in_flight_counted_and_published(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kernel.looplag")
    w = LoopLagWatcher(LoopLagSettings(interval=0.1, threshold=0.5))
    h = make_harness("", parts=KernelParts(services=[w.run]))
    await h.start()
    res = await h.kernel.submit(SubmitRequest(action="rec", payload={"mode": "block"}))
    await h.idle()
    assert h.rec.calls, "the run started"
    await h.advance(3.0)          # time passes with the loop free: no stall
    assert w.stalls == 0 and w.max_lag < 0.5
    await h.clock.jump(2.0)       # the loop is held for 2 s
    await h.idle()
    assert w.stalls == 1
    assert w.last_stall is not None and 1.8 <= w.last_stall.lag <= 2.0
    assert any(res.job.id in r for r in w.last_stall.runs)
    (warning,) = [r for r in caplog.records if r.name == "kernel.looplag"]
    assert warning.levelno == logging.WARNING
    assert res.job.id in warning.getMessage() and "loop stalled for " in warning.getMessage()
    (ev,) = [e for e in h.events if isinstance(e, LoopStalled)]
    assert ev.job_ids == (res.job.id,)
    h.rec.release.set()
    await h.stop()


async def test_a_run_that_ended_during_the_stall_is_still_named() -> None:
    w = LoopLagWatcher(LoopLagSettings(interval=0.1, threshold=0.5))
    h = make_harness("", parts=KernelParts(services=[w.run]))
    await h.start()
    res = await h.kernel.submit(SubmitRequest(action="rec", payload={
        "mode": "sleep", "seconds": 1.0}))
    await h.idle()
    await h.clock.jump(2.0)  # the run's sleep ends inside the stall
    await h.idle()
    assert res.job.id in h.rec.finished
    assert w.stalls == 1 and w.last_stall is not None
    assert any(res.job.id in r for r in w.last_stall.runs)
    await h.stop()


@pytest.mark.slow
async def test_a_real_blocking_call_in_the_loop_is_caught(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A real loop and clock: an in-process async target that calls time.sleep(0.6)."""
    caplog.set_level(logging.WARNING, logger="kernel.looplag")
    w = LoopLagWatcher(LoopLagSettings(interval=0.05, threshold=0.3))
    store = MemoryStore()
    kernel = build(make_config(""), clock=SystemClock(), store=store,
                   plugins=load_plugins(PluginContext(), use_entry_points=False),
                   parts=KernelParts(services=[w.run]))
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))
    async with asyncio.timeout(20):
        await started.wait()
    res = await kernel.submit(SubmitRequest(action="python", payload={
        "target": "tests.python_action_targets:blocking_async",
        "args": [str(tmp_path / "m"), 0.6], "in_process": True}))

    async def stalled() -> bool:
        return w.stalls >= 1
    await wait_for(stalled, "the stall to be seen")
    assert w.last_stall is not None and w.last_stall.lag >= 0.3
    assert any(res.job.id in r for r in w.last_stall.runs)
    assert any(res.job.id in r.getMessage() for r in caplog.records)

    async def recorded() -> bool:
        return bool(await store.query_runs(RunQuery(limit=10)))
    await wait_for(recorded, "the run to be recorded")
    (run,) = await store.query_runs(RunQuery(limit=10))
    assert run.outcome is Outcome.SUCCEEDED  # in process, a blocking target cannot be stopped
    kernel.stop("test")
    async with asyncio.timeout(20):
        await task
