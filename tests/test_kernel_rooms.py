"""Behaviour the rooms brought (issue "The job path as rooms" and "Trust under faults"), end to
end on a fake clock: every run ends, counters agree with events, one GPU reading per plan,
retries wait their backoff, failed finish writes are kept and written again, wall-clock steps
back, and stop/restart of pending and running jobs on both stores."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kernel.app import KernelParts, SubmitRequest
from kernel.clock import FakeClock
from kernel.errors import ErrorCode, StoreFull
from kernel.events import JobSubmitted, RunFinished, RunStarted
from kernel.gpu import FakeGpuProbe, GpuInfo
from kernel.hookspecs import Action, PluginContext, RunContext, hookimpl
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import JobState, Outcome
from kernel.store.base import Store
from kernel.store.memory import MemoryStore
from kernel.store.sqlite import SqliteStore

from .faults import FaultyStore
from .harness import Harness, RecordingPlugin, make_config, make_harness

T0 = 1_767_225_600.0


class StubbornPlugin:
    """An action that swallows every cancellation until the test lets it go (``release``)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.release = False
        self.swallowed = 0

    async def run(self, ctx: RunContext, payload: Any) -> Any:
        while not self.release:
            try:
                await self.clock.sleep(1000)
            except asyncio.CancelledError:
                self.swallowed += 1
        return "let go"

    @hookimpl
    def register_actions(self, context: PluginContext) -> list[Action]:
        return [Action("stubborn", self.run, "test action that ignores cancellation")]


@pytest.fixture
async def stub() -> AsyncIterator[StubbornPlugin]:
    """A stubborn action, let go at the end of the test whatever happened (else the event
    loop's own teardown would wait for it forever). Async, so that it ends before the loop."""
    plugin = StubbornPlugin(FakeClock())
    yield plugin
    plugin.release = True


def harness_with(text: str, extra: list[tuple[str, object]], *, store: Store | None = None,
                 clock: FakeClock | None = None, parts: KernelParts | None = None) -> Harness:
    clock = clock or FakeClock()
    rec = RecordingPlugin(clock)
    plugins = load_plugins(PluginContext(), extra=[("rec", rec), *extra], use_entry_points=False)
    store = store or MemoryStore()
    kernel = build(make_config(text), clock=clock, plugins=plugins, store=store, parts=parts)
    h = Harness(kernel, clock, rec, store)
    kernel.bus.subscribe(h.events.append)
    return h


# ------------------------------------------------------------------------- every run ends
async def test_a_run_that_swallows_its_timeout_is_abandoned_and_frees_its_slot(
        stub: StubbornPlugin) -> None:
    clock = stub.clock
    h = harness_with("""
        [scheduler]
        max_concurrency = 1
        """, [("stubborn", stub)], clock=clock, parts=KernelParts(cancel_grace=5.0))
    await h.start()
    stuck = await h.kernel.submit(SubmitRequest(action="stubborn", timeout=2))
    waiting = await h.kernel.submit(SubmitRequest(action="rec"))
    await h.advance(2)  # timed out: cancelled, but it swallows the cancellation
    assert stub.swallowed == 1 and h.rec.calls == []
    await h.advance(5)  # the cancel grace is over: abandoned, the slot goes to the next job
    (run,) = await h.runs(outcome=Outcome.TIMED_OUT)
    assert (run.job_id, run.error_code) == (stuck.job.id, ErrorCode.ERR_ABANDONED.value)
    assert [c.job_id for c in h.rec.calls] == [waiting.job.id]
    assert h.kernel.snapshot().running == ()
    await h.stop()


async def test_delete_of_a_run_that_ignores_it_ends_it_too(stub: StubbornPlugin) -> None:
    clock = stub.clock
    h = harness_with("", [("stubborn", stub)], clock=clock, parts=KernelParts(cancel_grace=3.0))
    await h.start()
    res = await h.kernel.submit(SubmitRequest(action="stubborn"))
    await h.idle()
    await h.kernel.cancel(res.job.id)
    await h.advance(3)
    (run,) = await h.runs()
    assert (run.outcome, run.error_code) == (Outcome.CANCELLED, ErrorCode.ERR_ABANDONED.value)
    await h.stop()


async def test_shutdown_ends_within_its_grace_plus_the_cancel_grace_whatever_runs(
        stub: StubbornPlugin) -> None:
    clock = stub.clock
    h = harness_with("""
        [kernel]
        shutdown_grace = "3s"
        """, [("stubborn", stub)], clock=clock, parts=KernelParts(cancel_grace=2.0))
    await h.start()
    for _ in range(3):
        await h.kernel.submit(SubmitRequest(action="stubborn"))
    await h.idle()
    t0 = clock.monotonic()
    await h.stop()  # advances fake seconds one at a time until run() returns
    assert clock.monotonic() - t0 <= 3 + 2 + 1
    assert h.kernel.runner.abandoned == 3


async def test_an_occurrence_skipped_behind_a_queued_one_says_so() -> None:
    h = make_harness("""
        [scheduler]
        max_concurrency = 1
        [[tasks]]
        id = "beat"
        schedule = "@every 5s"
        action = "rec"
        """)
    await h.start()
    await h.kernel.submit(SubmitRequest(action="rec", payload={"mode": "block"}))
    await h.advance(10)
    (skip,) = await h.runs(outcome=Outcome.SKIPPED)
    assert "waiting to start" in skip.detail and "still going" not in skip.detail
    h.rec.release.set()
    await h.stop()


# ------------------------------------------------------------------------- counters
async def test_counters_agree_with_the_events_for_every_kind_of_job() -> None:
    h = make_harness("""
        [[tasks]]
        id = "cron"
        schedule = "@every 10s"
        action = "rec"
        [[tasks]]
        id = "flaky"
        schedule = "@every 30s"
        action = "rec"
        payload = { mode = "conn" }
        retry = { max_attempts = 2, initial_delay = "1s" }
        [[tasks]]
        id = "child"
        action = "rec"
        after = ["cron"]
        [[tasks]]
        id = "orphan"
        action = "rec"
        after = ["flaky"]
        """)
    await h.start()
    await h.kernel.submit(SubmitRequest(action="rec", delay=5))
    await h.kernel.trigger("cron")
    await h.advance(65)
    kinds = Counter(e.kind.value for e in h.events if isinstance(e, JobSubmitted))
    assert {"submit", "trigger", "cron", "retry", "dependent"} <= set(kinds)
    c = h.kernel.counters
    submitted = sum(kinds.values())
    started = sum(isinstance(e, RunStarted) for e in h.events)
    finished = Counter(type(e).__name__ for e in h.events if isinstance(e, RunFinished))
    assert c.submitted == submitted
    assert c.started == started
    assert (c.succeeded, c.failed, c.skipped) == (
        finished["RunSucceeded"], finished["RunFailed"], finished["RunSkipped"])
    assert c.skipped >= 1  # "orphan" is skipped each time "flaky" gives up
    # every submitted job ended as a run or still waits
    assert submitted == c.succeeded + c.failed + c.skipped + c.timed_out + c.cancelled + \
        h.kernel.snapshot().pending_jobs + h.kernel.snapshot().queued + \
        len(h.kernel.snapshot().running)
    assert h.kernel.snapshot().counters == c
    await h.stop()


# ------------------------------------------------------------------------- GPU
@dataclass
class CountingProbe(FakeGpuProbe):
    """The FAKE probe, counting how often the cards are read."""

    reads: int = 0
    total_mb: list[int] = field(default_factory=lambda: [24_000])
    used_by_others_mb: list[int] = field(default_factory=lambda: [23_000])

    def gpus(self) -> list[GpuInfo]:
        self.reads += 1
        return super().gpus()


async def test_the_gpu_is_read_once_per_plan_however_many_jobs_are_held() -> None:
    probe = CountingProbe()
    h = make_harness("""
        [scheduler]
        queue_depth = 10000
        """, parts=KernelParts(gpu_probe=probe))
    await h.start()
    await h.kernel.submit_many([SubmitRequest(action="rec", gpu_memory_mb=2000)
                                for _ in range(3000)])  # none fits: 1 GB free
    await h.idle()
    assert h.kernel.snapshot().queued == 3000
    before = probe.reads
    h.kernel._pump()  # one plan
    assert probe.reads - before <= 1
    await h.stop()


# ------------------------------------------------------------------------- retries
async def test_a_retry_waits_its_jittered_backoff_on_the_kernel_clock() -> None:
    seed = 7
    h = make_harness("""
        [[tasks]]
        id = "flaky"
        action = "rec"
        payload = { mode = "conn" }
        retry = { max_attempts = 3, initial_delay = "20s", max_delay = "60s" }
        """, parts=KernelParts(rng=random.Random(seed)))
    await h.start()
    await h.kernel.trigger("flaky")
    await h.advance(200, step=0.25)
    calls = [c.at for c in h.rec.calls]
    assert len(calls) == 3
    ref = random.Random(seed)
    d1, d2 = ref.uniform(0, 20), ref.uniform(0, 40)
    assert calls[1] - calls[0] == pytest.approx(d1, abs=0.26) and d1 > 0.25
    assert calls[2] - calls[1] == pytest.approx(d2, abs=0.26)
    await h.stop()


# ------------------------------------------------------------------------- finish writes
async def test_a_failed_finish_write_is_kept_and_written_again() -> None:
    store = FaultyStore()
    h = make_harness("", store=store)
    await h.start()
    store.finish_failures = 3
    res = await h.kernel.submit(SubmitRequest(action="rec"))
    await h.idle()
    assert h.kernel.unsaved == 1 and await store.get_job(res.job.id) is not None
    await h.advance(10)  # 0.5 + 1 + 2 s of backoff
    assert h.kernel.unsaved == 0
    assert await store.get_job(res.job.id) is None  # the success is recorded: never re-run
    (run,) = await h.runs()
    assert run.outcome is Outcome.SUCCEEDED
    await h.stop()


async def test_an_outcome_still_unsaved_at_stop_is_written_at_the_flush() -> None:
    store = FaultyStore()
    h = make_harness("", store=store)
    await h.start()
    store.finish_failures = 1
    await h.kernel.submit(SubmitRequest(action="rec"))
    await h.idle()
    assert h.kernel.unsaved == 1
    await h.stop()
    await store.open()  # the same in-memory store, opened again to read it
    assert [r.outcome for r in await h.runs()] == [Outcome.SUCCEEDED]


# ------------------------------------------------------------------------- clock steps
async def test_schedules_go_on_after_the_wall_clock_is_corrected_backwards() -> None:
    clock = FakeClock()
    h = make_harness("""
        [[tasks]]
        id = "beat"
        schedule = "@every 1s"
        action = "rec"
        """, clock=clock)
    await h.start()
    await h.advance(3)
    clock.set_wall(clock.wall() + 3 * 3600)  # booted with a wrong clock...
    await h.advance(35, step=1)  # the loop looks at the wall clock at least every 30 s
    ahead = len(h.rec.calls)
    clock.set_wall(T0 + 100)  # ...then NTP steps it back
    await h.advance(40, step=1)
    late = [c.scheduled_at for c in h.rec.calls[ahead:] if c.scheduled_at is not None]
    assert late and min(late) < T0 + 3 * 3600  # not silent until the future instant
    await h.stop()


# ------------------------------------------------------------------------- stop and restart
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_stop_and_restart_keep_pending_and_rerun_running_jobs(
        tmp_path: Path, kind: str) -> None:
    store: Store = MemoryStore() if kind == "memory" else SqliteStore(tmp_path / "k.sqlite3")
    clock = FakeClock()
    h = make_harness("""
        [kernel]
        shutdown_grace = "1s"
        """, store=store, clock=clock)
    await h.start()
    pending = [await h.kernel.submit(SubmitRequest(action="rec", delay=60)) for _ in range(5)]
    running = await h.kernel.submit(SubmitRequest(action="rec", payload={"mode": "block"}))
    await h.idle()
    for _ in range(1000):  # SQLite writes go through a real thread: wait for the condition
        if h.rec.calls:
            break
        await asyncio.sleep(0.005)
    assert [c.job_id for c in h.rec.calls] == [running.job.id]
    await h.stop()
    if kind == "sqlite":
        store = SqliteStore(tmp_path / "k.sqlite3")
    h2 = make_harness("", store=store, clock=clock)
    h2.rec.release.set()
    await h2.start()
    assert h2.kernel.counters.recovered == 1
    await h2.advance(61)
    for _ in range(1000):  # SQLite writes go through a real thread: wait for the condition
        if len(h2.rec.calls) >= 6:
            break
        await asyncio.sleep(0.005)
    calls = {c.job_id: c for c in h2.rec.calls}
    assert set(calls) == {running.job.id} | {p.job.id for p in pending}
    assert calls[running.job.id].attempt == 2  # it was running at the stop: attempt raised
    assert all(calls[p.job.id].attempt == 1 for p in pending)
    await h2.stop()


# ------------------------------------------------------------------------- progress
class ProgressPlugin:
    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def run(self, ctx: RunContext, payload: Any) -> Any:
        ctx.progress(3, 10, "batch 3 of 10")
        await self.go.wait()
        return None

    @hookimpl
    def register_actions(self, context: PluginContext) -> list[Action]:
        return [Action("steps", self.run, "test action that reports progress")]


async def test_progress_reported_by_an_action_is_in_the_snapshot() -> None:
    plugin = ProgressPlugin()
    h = harness_with("", [("steps", plugin)])
    await h.start()
    await h.kernel.submit(SubmitRequest(action="steps"))
    await h.idle()
    (run,) = h.kernel.snapshot().running
    assert (run.done, run.total, run.note) == (3.0, 10.0, "batch 3 of 10")
    plugin.go.set()
    await h.stop()


async def test_metrics_snapshot_and_tui_agree_on_a_mixed_workload() -> None:
    """The issue's probe: cron, one-shot, retry, dependent and skipped runs; then the kernel's
    counters, the Prometheus exposition and the TUI's totals show the same numbers."""
    import io
    import re

    from rich.console import Console

    from kernel import tui
    from kernel.metrics import KernelMetrics

    h = make_harness("""
        [scheduler]
        max_concurrency = 1
        [[tasks]]
        id = "cron"
        schedule = "@every 5s"
        action = "rec"
        [[tasks]]
        id = "flaky"
        schedule = "@every 20s"
        action = "rec"
        payload = { mode = "conn" }
        retry = { max_attempts = 2, initial_delay = "1s" }
        [[tasks]]
        id = "child"
        action = "rec"
        after = ["cron"]
        [[tasks]]
        id = "orphan"
        action = "rec"
        after = ["flaky"]
        """)
    metrics = KernelMetrics()
    h.kernel.bus.subscribe(metrics)
    await h.start()
    await h.kernel.submit(SubmitRequest(action="rec", delay=3))
    await h.kernel.submit(SubmitRequest(action="rec", payload={"mode": "sleep", "seconds": 9}))
    await h.advance(45)
    snap = h.kernel.snapshot()
    c = snap.counters
    assert c.skipped >= 1 and c.failed >= 1 and c.succeeded >= 5  # a mixed workload indeed
    text = metrics.render(snap)[0].decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(
            rf"^autoglm_kernel_{name}_total(?:{{[^}}]*}})? (\S+)$", text, re.M))

    assert total("jobs_submitted") == c.submitted
    assert total("runs_started") == c.started
    assert total("runs_succeeded") == c.succeeded
    assert total("runs_failed") == c.failed
    assert total("runs_skipped") == c.skipped
    assert total("runs_cancelled") == c.cancelled
    view = tui.view_from_snapshot(snap)
    con = Console(width=160, height=48, color_system=None, record=True, file=io.StringIO())
    con.print(tui.render(view, 160, 48))
    drawn = con.export_text()
    assert f"total ok {c.succeeded} fail {c.failed} " in drawn
    assert f"skip {c.skipped} cancel {c.cancelled}" in drawn and f"submitted {c.submitted}" in drawn
    await h.stop()


async def test_cancel_of_a_run_that_ignores_it_reports_the_abandonment(
        stub: StubbornPlugin) -> None:
    h = harness_with("", [("stubborn", stub)], clock=stub.clock,
                     parts=KernelParts(cancel_grace=3.0))
    await h.start()
    res = await h.kernel.submit(SubmitRequest(action="stubborn"))
    await h.idle()
    asking = asyncio.create_task(h.kernel.cancel_and_wait(res.job.id))
    await h.idle()
    assert not asking.done()  # it waits for the run to end, on the kernel's clock
    await h.advance(3)
    rep = await asking
    assert (rep.was, rep.ended, rep.outcome, rep.error_code) == (
        JobState.RUNNING, True, "cancelled", "ERR_ABANDONED")
    await h.stop()


async def test_kernel_started_names_the_api_address() -> None:
    import functools

    from kernel.api.server import api_service
    from kernel.events import KernelStarted

    h = make_harness("""
        [server]
        host = "127.0.0.1"
        port = 0
        """, parts=KernelParts(services=[functools.partial(api_service, require_token=False)]))
    await h.start()
    (ev,) = [e for e in h.events if isinstance(e, KernelStarted)]
    assert ev.api_url is not None and ev.api_url.startswith("http://127.0.0.1:")
    assert ev.api_url == h.kernel.api_url
    await h.stop()


async def test_a_small_backward_wall_step_does_not_run_an_occurrence_again() -> None:
    clock = FakeClock()
    h = make_harness("""
        [[tasks]]
        id = "minute"
        schedule = "* * * * *"
        action = "rec"
        [[tasks]]
        id = "tick"
        schedule = "@every 1s"
        action = "rec"
        """, clock=clock)
    await h.start()
    await h.advance(60.5)  # the minute task ran for T0 + 60
    assert [c.scheduled_at for c in h.rec.calls if c.task_id == "minute"] == [T0 + 60]
    clock.set_wall(clock.wall() - 3)  # NTP steps back 3 s (over the 1 s jump threshold)
    await h.advance(70, step=1)
    minute = [c.scheduled_at for c in h.rec.calls if c.task_id == "minute"]
    assert minute == [T0 + 60, T0 + 120]  # T0 + 60 did not run twice
    await h.stop()


async def test_follow_ups_of_a_refused_outcome_wait_until_it_is_durable() -> None:
    store = FaultyStore()
    h = make_harness("""
        [[tasks]]
        id = "up"
        action = "rec"
        [[tasks]]
        id = "down"
        action = "rec"
        after = ["up"]
        """, store=store)
    await h.start()
    store.finish_failures = 1
    await h.kernel.trigger("up")
    await h.idle()
    assert [c.task_id for c in h.rec.calls] == ["up"]  # "down" waits for up's outcome
    await h.advance(10)  # the kept outcome is written again; then "down" runs, once
    assert [c.task_id for c in h.rec.calls] == ["up", "down"]
    assert await store.list_jobs() == []  # nothing left to run again at the next start
    await h.stop()


async def test_a_job_that_comes_back_while_it_still_runs_waits_for_that_run() -> None:
    """Fleet: a fenced kernel that registered again may claim its own job back while the old
    attempt still runs here. One run per job id: the newcomer waits until that run ended."""
    import msgspec

    h = make_harness("")
    await h.start()
    res = await h.kernel.submit(SubmitRequest(action="rec", payload={"mode": "block"}))
    await h.idle()
    again = msgspec.structs.replace(res.job, attempt=2, recovered=True)
    h.kernel._claimed([again])  # what the fleet member hands over after a rescue
    await h.advance(3)
    assert [c.attempt for c in h.rec.calls] == [1]  # not started beside the running attempt
    assert len(h.kernel.snapshot().running) == 1
    h.rec.release.set()
    await h.advance(3)
    assert [c.attempt for c in h.rec.calls] == [1, 2]  # it ran once the first had ended
    await h.stop()


async def test_a_cancel_the_store_refused_leaves_the_job_held() -> None:
    store = FaultyStore()
    h = make_harness("", store=store)
    await h.start()
    res = await h.kernel.submit(SubmitRequest(action="rec", delay=30))
    store.cancel_fails = True
    with pytest.raises(StoreFull):
        await h.kernel.cancel(res.job.id)
    await h.advance(31)  # not cancelled, so it runs as it would have
    assert [c.job_id for c in h.rec.calls] == [res.job.id]
    await h.stop()


async def test_a_pause_during_a_reload_is_not_undone_by_it() -> None:
    import msgspec

    from kernel.config import TaskConfig

    h = make_harness("""
        [[tasks]]
        id = "beat"
        schedule = "@every 10s"
        action = "rec"
        """)
    await h.start()
    k = h.kernel
    gate = asyncio.Event()
    states = k.store.schedule_states

    async def slow_states() -> Any:  # the reload is held after reading the stored states
        result = await states()
        await gate.wait()
        return result

    k.store.schedule_states = slow_states  # type: ignore[method-assign]
    changed = msgspec.structs.replace(k.config, tasks=[
        TaskConfig(id="beat", action="rec", schedule="@every 20s")])
    reload = asyncio.create_task(k.reload(changed, "file change"))
    await asyncio.sleep(0)
    pausing = asyncio.create_task(k.pause("beat"))
    await asyncio.sleep(0)
    gate.set()
    await reload
    await pausing
    k.store.schedule_states = states  # type: ignore[method-assign]
    assert k.timetable.tasks["beat"].paused and k.timetable.tasks["beat"].handle is None
    assert (await k.store.schedule_states())["beat"].paused
    await h.advance(60)
    assert h.rec.calls == []
    await h.stop()
