"""Edge cases found in review: cancels before an action starts, wall-clock steps, stalls,
reloads that change a timetable, cancel_other with queued jobs, failing plugin services,
non-finite instants."""

from __future__ import annotations

import math

import pytest

from kernel.app import SubmitRequest
from kernel.errors import BadPayload
from kernel.events import Event
from kernel.hookspecs import Action, PluginContext, hookimpl
from kernel.plugins import load as load_plugins
from kernel.records import Outcome
from kernel.store.memory import MemoryStore

from .harness import make_config, make_harness

T0 = 1_767_225_600.0


async def test_cancel_right_after_submit_releases_the_slot_and_is_recorded() -> None:
    store = MemoryStore()
    h = make_harness("[scheduler]\nmax_concurrency = 1\n", store=store)
    await h.start()
    first = await h.kernel.submit(SubmitRequest(action="rec"))
    await h.kernel.cancel(first.job.id)  # before its action had a chance to start
    second = await h.kernel.submit(SubmitRequest(action="rec"))
    await h.advance(1)
    assert [c.job_id for c in h.rec.calls] == [second.job.id]
    outcomes = {r.job_id: r.outcome for r in await h.runs()}
    assert outcomes == {first.job.id: Outcome.CANCELLED, second.job.id: Outcome.SUCCEEDED}
    await h.stop()
    h2 = make_harness("", store=store, clock=h.clock)  # a restart does not run it again
    await h2.start()
    await h2.idle()
    assert h2.rec.calls == []
    await h2.stop()


async def test_a_wall_clock_step_forward_does_not_delay_cron_occurrences() -> None:
    h = make_harness("""
        [[tasks]]
        id = "hourly"
        schedule = "0 * * * *"
        action = "rec"
        """)
    await h.start()
    await h.advance(600)                       # 00:10
    h.clock.set_wall(h.clock.wall() + 1800)    # NTP steps the wall clock to 00:40
    await h.advance(20 * 60 + 31, step=1)      # monotonic 20.5 min later: wall 01:00:31
    assert [c.scheduled_at for c in h.rec.calls] == [T0 + 3600]
    assert h.rec.calls[0].at <= T0 + 3600 + 31
    await h.stop()


@pytest.mark.parametrize(("policy", "expected"), [("skip", 0), ("coalesce", 1)])
async def test_a_stalled_loop_applies_the_misfire_policy_to_the_late_tick(
        policy: str, expected: int) -> None:
    h = make_harness(f"""
        [[tasks]]
        id = "daily"
        schedule = "0 0 * * *"
        action = "rec"
        misfire = "{policy}"
        misfire_grace = "60s"
        """)
    await h.start()
    await h.clock.jump(2 * 86400 + 3600)  # the loop could not run for two days
    await h.idle()
    assert len(h.rec.calls) == expected
    await h.stop()


async def test_reloading_a_new_timetable_runs_no_instants_from_before_the_reload() -> None:
    h = make_harness("""
        [[tasks]]
        id = "t"
        schedule = "0 * * * *"
        action = "rec"
        misfire = "catch_up"
        max_catch_up = 100
        """)
    await h.start()
    await h.advance(3600 + 58 * 60)   # 01:58, last occurrence 01:00
    h.rec.calls.clear()
    await h.kernel.reload(make_config("""
        [[tasks]]
        id = "t"
        schedule = "*/5 * * * *"
        action = "rec"
        misfire = "catch_up"
        max_catch_up = 100
        """))
    await h.idle()
    assert h.rec.calls == []
    await h.advance(3 * 60)
    assert [c.scheduled_at for c in h.rec.calls] == [T0 + 2 * 3600]
    await h.stop()


async def test_reload_notices_a_change_of_the_default_time_zone() -> None:
    text = """
        [kernel]
        timezone = "{tz}"
        [[tasks]]
        id = "nine"
        schedule = "0 9 * * *"
        action = "rec"
        """
    h = make_harness(text.format(tz="UTC"))
    await h.start()
    ev = await h.kernel.reload(make_config(text.format(tz="Asia/Shanghai")))
    assert ev.changed == ["nine"]
    await h.advance(3600 + 1)
    assert [c.scheduled_at for c in h.rec.calls] == [T0 + 3600]  # 09:00 +08:00
    await h.stop()


async def test_cancel_other_records_the_queued_jobs_it_supersedes() -> None:
    h = make_harness("""
        [[tasks]]
        id = "t"
        schedule = "@every 10s"
        action = "rec"
        overlap = "cancel_other"
        payload = { mode = "sleep", seconds = 25 }
        """)
    await h.start()
    await h.advance(10)
    trig = await h.kernel.trigger("t")  # queued behind the running occurrence
    await h.advance(10)
    runs = {r.job_id: r for r in await h.runs()}
    assert runs[trig.id].outcome is Outcome.CANCELLED
    await h.stop()


class _BrokenService:
    """A plugin subscriber whose background work fails (an SMTP server that went away)."""

    def handle(self, event: Event) -> None:
        pass

    async def run(self) -> None:
        raise OSError("connection refused")

    @hookimpl
    def register_subscribers(self, context: PluginContext) -> list[object]:
        return [self]

    @hookimpl
    def register_actions(self, context: PluginContext) -> list[Action]:
        return []


async def test_a_failing_plugin_service_does_not_stop_the_kernel() -> None:
    h = make_harness("""
        [[tasks]]
        id = "t"
        schedule = "@every 1s"
        action = "rec"
        """)
    extra = load_plugins(PluginContext(), extra=[("rec", h.rec), ("broken", _BrokenService())],
                         use_entry_points=False)
    h.kernel.plugins.subscribers.extend(extra.subscribers)
    await h.start()
    await h.advance(3)
    assert len(h.rec.calls) == 3
    assert h.task is not None and not h.task.done()
    await h.stop()


@pytest.mark.parametrize("field", ["at", "delay", "timeout"])
async def test_non_finite_instants_are_refused_before_anything_is_stored(field: str) -> None:
    h = make_harness("")
    await h.start()
    with pytest.raises(BadPayload):
        await h.kernel.submit(SubmitRequest(action="rec", **{field: math.inf}))
    assert await h.store.count_jobs() == 0
    await h.stop()
