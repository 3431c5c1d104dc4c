"""Timers: the wheel, pending jobs held encoded, run deadlines, wall-clock steps (fake clock)."""

from __future__ import annotations

import asyncio

from kernel.clock import FakeClock, settle
from kernel.records import Job
from kernel.timers import Deadlines, Tick, Timers

T0 = 1_767_225_600.0


def job(jid: str, due: float, **kw: object) -> Job:
    return Job(id=jid, action="a", due_at=due, payload={"n": jid}, **kw)  # type: ignore[arg-type]


class Run:
    def __init__(self, key: str) -> None:
        self._key = key
        self.deadline = 0.0

    @property
    def key(self) -> str:
        return self._key


async def test_pending_jobs_come_back_whole_when_due_in_deadline_order() -> None:
    clock = FakeClock()
    t = Timers(clock)
    t.arm_job(job("b", T0 + 2, priority=3))
    t.arm_job(job("a", T0 + 1))
    assert t.pending_jobs == 2 and len(t) == 2
    await clock.advance(1.5)
    due = t.expire()
    assert [j.id for j in due.jobs] == ["a"]
    assert due.jobs[0].payload == {"n": "a"}


def test_take_and_peek_a_pending_job() -> None:
    clock = FakeClock()
    t = Timers(clock)
    t.arm_job(job("a", T0 + 10))
    peek = t.peek_job("a")
    assert peek is not None and peek.payload == {"n": "a"}
    taken = t.take_job("a")
    assert taken is not None and taken.id == "a"
    assert t.take_job("a") is None and t.pending_jobs == 0 and len(t) == 0


def test_re_arming_a_job_replaces_its_timer() -> None:
    clock = FakeClock()
    t = Timers(clock)
    t.arm_job(job("a", T0 + 10))
    t.arm_job(job("a", T0 + 20))
    assert len(t) == 1 and t.pending_jobs == 1


def test_a_wall_step_re_derives_pending_deadlines() -> None:
    clock = FakeClock()
    t = Timers(clock)
    t.arm_job(job("a", T0 + 3600))
    clock.set_wall(T0 + 3599)  # the wall clock stepped forward 59'59" (NTP)
    assert t.wall_stepped()
    assert not t.wall_stepped()  # one step, seen once
    deadline = t.next_deadline()
    assert deadline is not None and deadline - clock.monotonic() <= 1.0 + 1e-6


def test_cron_ticks_and_cancel() -> None:
    clock = FakeClock()
    t = Timers(clock)
    h = t.arm_tick(Tick("task", T0 + 1, 0), T0 + 1)
    t.arm_tick(Tick("other", T0 + 1, 0), T0 + 1)
    t.cancel(h)
    asyncio.run(clock.advance(2))
    assert [x.task_id for x in t.expire().ticks] == ["other"]


def test_deadlines_expire_in_order_and_leave_nothing_behind() -> None:
    d = Deadlines()
    r1, r2, r3 = Run("1"), Run("2"), Run("3")
    d.add(r1, 5.0, 0.0)
    d.add(r2, 1.0, 0.0)
    d.add(r3, 5.0, 1.0)
    assert d.next_deadline() == 1.0
    assert sorted(r.key for r in d.expire(5.0)) == ["1", "2"]
    assert d.next_deadline() == 6.0
    d.remove(r3, 5.0)
    assert d.next_deadline() is None and len(d) == 0


async def test_wait_wakes_for_an_earlier_timer_armed_while_sleeping() -> None:
    clock = FakeClock()
    t = Timers(clock)
    t.arm_job(job("late", T0 + 100))
    waiter = asyncio.create_task(t.wait())
    await asyncio.sleep(0)
    t.arm_job(job("soon", T0 + 1))  # earlier than what it sleeps until: wakes it
    await settle()
    assert waiter.done()


def test_a_pending_job_comes_back_equal_to_what_was_armed() -> None:
    """Held as one bytes (its field values), a job keeps every field: enums, payload, GPU."""
    from kernel.records import JobKind, JobState

    clock = FakeClock()
    t = Timers(clock)
    armed = job("x", T0 + 30, task_id="t", kind=JobKind.RETRY, scheduled_at=T0 + 29,
                priority=-2, timeout=1.5, attempt=3, dedup_key="k", dedup_expires_at=T0 + 99,
                trace_id="ab" * 16, parent_span_id="cd" * 8, created_at=T0,
                state=JobState.PENDING, recovered=True, gpu_memory_mb=512, gpu=1)
    t.arm_job(armed)
    assert t.peek_job("x") == armed
    assert t.take_job("x") == armed and len(t) == 0


async def test_a_job_due_before_the_wheel_started_is_held_and_comes_due() -> None:
    """A due instant before the wheel's start (a recovered job long overdue): held with its
    handle, cancellable, and due at once."""
    clock = FakeClock()
    t = Timers(clock)
    t.arm_job(job("old", T0 - 3600))
    t.arm_job(job("old2", T0 - 7200))
    assert t.take_job("old2") is not None and len(t) == 1
    await clock.advance(0.01)
    assert [j.id for j in t.expire().jobs] == ["old"]


async def test_the_loop_never_sleeps_less_than_a_millisecond_before_a_deadline() -> None:
    """uvloop rounds a timeout below 1 ms to 0: a shorter sleep would spin until the deadline.
    A deadline 0.3 ms ahead is slept as 1 ms; one already due is not slept at all."""
    slept: list[float | None] = []

    class Recording(FakeClock):
        async def sleep_until(self, deadline: float | None, wake: asyncio.Event) -> None:
            slept.append(None if deadline is None else deadline - self.monotonic())

    clock = Recording()
    t = Timers(clock)
    t.arm_job(job("soon", clock.wall() + 0.0003))
    await t.wait()
    assert slept[-1] is not None and slept[-1] >= 0.001 - 1e-9
    await clock.advance(0.002)
    await t.wait()
    assert slept[-1] is not None and slept[-1] <= 0
