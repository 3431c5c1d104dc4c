"""The timetable on its own: arming, the one job factory, misfires, clock steps, reload diffs."""

from __future__ import annotations

from kernel.clock import FakeClock
from kernel.config import Config
from kernel.records import JobKind, ScheduleState
from kernel.timers import Timers
from kernel.timetable import FUTURE_TOLERANCE, Timetable

from ..harness import make_config

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def cfg(text: str) -> Config:
    return make_config(text)


EVERY = cfg("""
    [[tasks]]
    id = "tick"
    schedule = "@every 1s"
    action = "rec"
    timeout = "30s"
    gpu_memory_mb = 100
    gpu = 1
    [[tasks]]
    id = "after"
    action = "rec"
    after = ["tick"]
    """)


def table(clock: FakeClock) -> tuple[Timetable, list[tuple[str, float]]]:
    seen: list[tuple[str, float]] = []
    tt = Timetable(clock, Timers(clock), timezone="UTC",
                   on_scheduled=lambda t, due, _w: seen.append((t, due)))
    return tt, seen


def test_install_arms_the_next_occurrence() -> None:
    clock = FakeClock()
    tt, seen = table(clock)
    for tc in EVERY.tasks:
        assert not tt.install(tc, None)
    tt.rebuild_dependents()
    assert seen == [("tick", T0 + 1)]
    assert tt.tasks["tick"].next_due == T0 + 1 and tt.tasks["after"].next_due is None


def test_every_job_a_task_makes_comes_from_one_factory() -> None:
    clock = FakeClock()
    tt, _ = table(clock)
    for tc in EVERY.tasks:
        tt.install(tc, None)
    tt.rebuild_dependents()
    rt = tt.tasks["tick"]
    (occ,) = tt.occurrence_jobs([(rt, T0 + 1)], T0 + 1)
    trig = tt.trigger_job("tick", None, T0)
    (back,) = tt.backfill_jobs("tick", T0 - 1, T0 - 0.5, T0)
    (dep,) = tt.dependent_jobs(occ, "span", T0 + 2)
    for j, kind in ((occ, JobKind.CRON), (trig, JobKind.TRIGGER), (back, JobKind.BACKFILL)):
        assert (j.kind, j.timeout, j.gpu_memory_mb, j.gpu) == (kind, 30.0, 100, 1)
    assert (dep.kind, dep.task_id, dep.trace_id, dep.parent_span_id) == (
        JobKind.DEPENDENT, "after", occ.trace_id, "span")
    assert rt.last_scheduled_at == T0 + 1  # firing raised it


def test_a_stored_last_occurrence_in_the_future_is_clamped_at_start() -> None:
    clock = FakeClock()
    tt, seen = table(clock)
    ahead = T0 + 3 * 3600  # written while the wall clock was 3 h ahead
    f = tt.install(EVERY.tasks[0], ScheduleState(task_id="tick", last_scheduled_at=ahead))
    assert f.state is not None and f.state.last_scheduled_at == T0  # saved back, clamped
    assert seen == [("tick", T0 + 1)]  # not silent for three hours


def test_a_small_lead_is_tolerated() -> None:
    clock = FakeClock()
    tt, seen = table(clock)
    tt.install(EVERY.tasks[0], ScheduleState(task_id="tick",
                                             last_scheduled_at=T0 + FUTURE_TOLERANCE - 1))
    assert seen == [("tick", T0 + FUTURE_TOLERANCE)]


def test_a_backward_wall_step_re_arms_from_the_corrected_clock() -> None:
    clock = FakeClock()
    tt, _seen = table(clock)
    tt.install(EVERY.tasks[0], None)
    clock.set_wall(T0 + 3 * 3600)  # forward 3 h (a bad clock at boot)
    rt = tt.tasks["tick"]
    tt.occurrence_jobs([(rt, T0 + 3 * 3600)], clock.wall())
    tt.arm_next(rt, T0 + 3 * 3600)
    clock.set_wall(T0 + 10)  # NTP corrects it
    saves = tt.rearm_all()
    assert [s.last_scheduled_at for s in saves] == [T0 + 10]
    assert rt.next_due == T0 + 11


def test_misfires_coalesce_into_one_run_with_a_record() -> None:
    clock = FakeClock()
    tt, _ = table(clock)
    f = tt.install(EVERY.tasks[0], ScheduleState(task_id="tick", last_scheduled_at=T0 - 600))
    assert f.misfire is not None and f.misfire.missed > 500
    assert [at for _rt, at in f.occurrences] == [T0] and not f.overlap


def test_paused_tasks_are_not_armed_and_resume_starts_from_now() -> None:
    clock = FakeClock()
    tt, seen = table(clock)
    tt.install(EVERY.tasks[0], ScheduleState(task_id="tick", paused=True,
                                             last_scheduled_at=T0 - 600))
    assert seen == []
    clock.set_wall(T0 + 100)
    st = tt.resume("tick")
    assert st.last_scheduled_at == T0 + 100 and seen == [("tick", T0 + 101)]


def test_reload_diff_names_new_timetables() -> None:
    new = cfg("""
        [[tasks]]
        id = "tick"
        schedule = "@every 2s"
        action = "rec"
        [[tasks]]
        id = "fresh"
        action = "rec"
        """)
    d = Timetable.diff(EVERY, new)
    assert (d.added, d.removed, d.changed, d.new_timetable) == (
        ["fresh"], ["after"], ["tick"], {"tick"})
