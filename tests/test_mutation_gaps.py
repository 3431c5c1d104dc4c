"""Tests for the gaps a mutation audit (``scripts/mutation.py``, see docs/TESTING.md) found in
the pure rooms: each kills a mutant that every other test let survive."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest

from kernel import completion
from kernel.clock import FakeClock
from kernel.completion import Result, Settlement
from kernel.config import Misfire, Overlap, RetryPolicy
from kernel.dispatch import Dispatcher, Limits, TaskRules, Verdict
from kernel.errors import ActionError, ActionNotFound, ErrorCode, Superseded
from kernel.misfire import MisfirePlan, plan_misfires
from kernel.records import Job, Outcome
from kernel.retry import backoff_cap, retry_delay
from kernel.timers import Deadlines, Timers
from kernel.triggers import Schedule, parse_schedule, preview
from kernel.wheel import TimingWheel


# ---------------------------------------------------------------- retry (kernel/retry.py)
def test_a_zero_initial_delay_retries_at_once() -> None:
    # mutant: ``secs(policy.initial_delay) or 0.0`` -> ``or 1.0`` (0 s read as 1 s)
    policy = RetryPolicy(max_attempts=5, initial_delay=0, max_delay=60)
    assert [backoff_cap(policy, n) for n in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert retry_delay(policy, 2, random.Random(1)) == 0.0


def test_a_zero_max_delay_caps_every_wait_at_zero() -> None:
    # mutant: ``secs(policy.max_delay) or 0.0`` -> ``or 1.0``
    policy = RetryPolicy(max_attempts=5, initial_delay=2, max_delay=0)
    assert [backoff_cap(policy, n) for n in (1, 4)] == [0.0, 0.0]


# ---------------------------------------------------------------- misfire (kernel/misfire.py)
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
EVERY_MIN = parse_schedule("* * * * *", "UTC")


class CountingSchedule:
    """A schedule that counts how often it is asked for the next instant (a test double that
    delegates to a real schedule)."""

    def __init__(self, inner: Schedule) -> None:
        self.inner, self.calls = inner, 0
        self.expr, self.tz = inner.expr, inner.tz

    def next_after(self, t: float) -> float | None:
        self.calls += 1
        return self.inner.next_after(t)


def test_an_occurrence_exactly_grace_late_is_late_not_missed() -> None:
    # mutant: ``now - t <= grace`` -> ``<``. +60 is exactly 30 s late at +90: it still runs,
    # even under ``skip``, and nothing is recorded as missed
    p = plan_misfires("t", EVERY_MIN, T0, T0 + 90, policy=Misfire.SKIP, grace=30.0,
                      max_catch_up=10)
    assert p.run == (T0 + 60,) and p.record is None
    p = plan_misfires("t", EVERY_MIN, T0, T0 + 90.001, policy=Misfire.SKIP, grace=30.0,
                      max_catch_up=10)
    assert p.run == () and p.record is not None and p.record.missed == 1


def test_counting_stops_at_exactly_the_scan_limit() -> None:
    # mutants: ``scanned = 0`` -> ``1``, ``scanned += 1`` -> ``-= 1`` (never stops),
    # ``scanned >= scan_limit`` -> ``>``. A day of a per-second task, down for all of it:
    # 100 occurrences are scanned and counted, then the 30 within the grace are taken exactly.
    sched = CountingSchedule(parse_schedule("@every 1s", "UTC"))
    p = plan_misfires("t", sched, T0, T0 + 86400, policy=Misfire.CATCH_UP, grace=30.0,
                      max_catch_up=3, scan_limit=100)
    assert p.run == (T0 + 86398, T0 + 86399, T0 + 86400)
    assert p.record is not None and p.record.ran == 3
    assert p.record.missed == 100 + 30 - 3  # 100 counted, 30 late, 3 of them run
    assert sched.calls <= 100 + 31 + 2, "the scan went on past its limit"


PER_SEC = parse_schedule("@every 1s", "UTC")


def _plan(policy: Misfire, sched: Schedule, down_for: float, *, grace: float = 30.0,
          max_catch_up: int = 10, scan_limit: int = 100_000) -> MisfirePlan:
    return plan_misfires("t", sched, T0, T0 + down_for, policy=policy, grace=grace,
                         max_catch_up=max_catch_up, scan_limit=scan_limit)


def test_two_late_occurrences_are_coalesced_and_recorded() -> None:
    # mutants: ``len(late) <= 1`` -> ``<= 2`` (two late ones both run, unrecorded);
    # ``late[0]`` -> ``late[1]`` (the record's first instant)
    p = _plan(Misfire.COALESCE, PER_SEC, 2.0, grace=60.0)
    assert p.run == (T0 + 2,)
    assert p.record is not None and p.record.missed == 1 and p.record.ran == 1
    assert (p.record.first_missed, p.record.last_missed) == (T0 + 1, T0 + 2)


def test_catch_up_of_one_runs_only_the_newest() -> None:
    # mutant: ``due[-max(1, max_catch_up):]`` -> ``due[-max(2, ...):]``
    assert _plan(Misfire.CATCH_UP, EVERY_MIN, 600.0, max_catch_up=1).run == (T0 + 600,)


def test_catch_up_of_zero_runs_only_a_late_occurrence() -> None:
    # mutants: ``max_catch_up > 0`` -> ``>= 0``; ``late[-1:]`` -> ``late[1:]``
    assert _plan(Misfire.CATCH_UP, EVERY_MIN, 645.0, max_catch_up=0).run == ()
    assert _plan(Misfire.CATCH_UP, EVERY_MIN, 620.0, max_catch_up=0).run == (T0 + 600,)


def test_a_scan_that_stops_on_the_last_occurrence_keeps_the_late_ones() -> None:
    # mutant: ``nxt is not None and nxt <= now`` -> ``or``: the late ones found before the
    # limit would be dropped when nothing follows them before now
    p = _plan(Misfire.CATCH_UP, PER_SEC, 100.0, max_catch_up=3, scan_limit=100)
    assert p.run == (T0 + 98, T0 + 99, T0 + 100)


def test_a_scan_limit_jump_that_lands_on_now_runs_it() -> None:
    # mutant: ``nxt <= now`` -> ``<``: the occurrence at exactly now was lost after the jump
    p = _plan(Misfire.SKIP, PER_SEC, 100.0, grace=0.5, scan_limit=99)
    assert p.run == (T0 + 100,)


# ---------------------------------------------------------------- completion (kernel/completion.py)
NOW = 1_000.0


def _settle(res: Result, retry: RetryPolicy | None) -> Settlement:
    j = Job(id="j1", action="a", task_id="t", due_at=NOW - 1, scheduled_at=NOW - 1,
            trace_id="tr")
    return completion.settle(j, "span", res, started=NOW - 0.5, now=NOW, duration=0.5,
                             retry=retry, rng=random.Random(1), new_id=lambda: "new",
                             dependents=lambda up, span, now: [])


def test_a_failure_that_is_not_retryable_is_not_retried_whatever_the_policy() -> None:
    # mutant: ``res.outcome in (FAILED, TIMED_OUT) and res.retryable`` -> ``or``
    s = _settle(completion.classify(ActionError("boom")), RetryPolicy(max_attempts=3))
    assert s.follow == [] and s.retry_at is None
    assert s.run.error_code == ErrorCode.ERR_ACTION_FAILED.value
    # and a success is never retried, even when marked retryable by mistake
    res = completion.succeeded("ok")
    res.retryable = True
    assert _settle(res, RetryPolicy(max_attempts=3)).follow == []


def test_classify_names_what_each_kernel_error_means() -> None:
    # mutants: ``return Result(...)`` -> ``return None`` for Superseded and for the submit
    # errors (the kernel tests reach them, the room's own tests did not)
    gone = completion.classify(Superseded("rescued by another kernel"))
    assert (gone.outcome, gone.code, gone.retryable) == (
        Outcome.CANCELLED, ErrorCode.ERR_SUPERSEDED, False)
    missing = completion.classify(ActionNotFound("no action 'x'"))
    assert (missing.outcome, missing.code, missing.retryable) == (
        Outcome.FAILED, ErrorCode.ERR_ACTION_NOT_FOUND, False)


def test_a_result_of_none_is_a_success_with_no_detail() -> None:
    # mutant: ``succeeded``'s ``return Result(Outcome.SUCCEEDED)`` -> ``return None``
    res = completion.succeeded(None)
    assert res.outcome is Outcome.SUCCEEDED and res.detail == ""


# ---------------------------------------------------------------- timers (kernel/timers.py)
T1 = 1_767_225_600.0


def _job(jid: str, due: float) -> Job:
    return Job(id=jid, action="a", due_at=due)


async def test_time_passing_is_no_wall_step_and_one_second_is_not_a_step() -> None:
    # mutants: ``wall() - monotonic()`` -> ``+`` (time passing looked like a step);
    # ``<= self._wall_jump`` -> ``<`` (a step of exactly the tolerance counted)
    clock = FakeClock(wall=T1)
    t = Timers(clock)
    await clock.advance(5.0)
    assert not t.wall_stepped()
    clock.set_wall(clock.wall() + 1.0)  # exactly the 1 s tolerance: not a step
    assert not t.wall_stepped()
    clock.set_wall(clock.wall() + 0.5)  # 1.5 s from the last look: a step
    assert t.wall_stepped()


def test_the_wall_clock_is_looked_at_every_30_seconds_while_timers_are_armed() -> None:
    # mutant: WALL_CHECK_EVERY 30 -> 31 (the README promises at least every 30 s)
    clock = FakeClock(wall=T1)
    t = Timers(clock)
    t.arm_job(_job("far", T1 + 3600))
    assert t.next_deadline() == clock.monotonic() + 30.0


# ---------------------------------------------------------------- dispatch (kernel/dispatch.py)
def _djob(i: str, task: str | None = None) -> Job:
    return Job(id=i, action="log", due_at=0.0, task_id=task)


def test_held_lists_every_held_job_with_its_reason() -> None:
    # mutant: ``held()`` returns None (the snapshot's queued view reads it)
    rules = {"t": TaskRules(max_instances=1, overlap=Overlap.BUFFER_ALL)}
    d = Dispatcher(Limits(max_concurrency=4), rules=rules.get)
    d.offer(_djob("1", "t"), 0.0, occurrence=True)
    d.offer(_djob("2", "t"), 0.0, occurrence=True)
    assert [j.id for j in d.plan(0.0)] == ["1"]
    held = d.held()
    assert list(held) == ["2"] and "already runs" in held["2"]


def test_a_job_offered_without_occurrence_is_not_subject_to_overlap() -> None:
    # mutant: ``offer(..., occurrence=False)`` default -> True: a retry, a dependent or a manual
    # trigger of a busy task would be skipped by its overlap policy
    rules = {"t": TaskRules(max_instances=1, overlap=Overlap.SKIP)}
    d = Dispatcher(Limits(max_concurrency=4), rules=rules.get)
    d.offer(_djob("1", "t"), 0.0, occurrence=True)
    assert [j.id for j in d.plan(0.0)] == ["1"]
    assert d.offer(_djob("retry", "t"), 0.0).verdict is Verdict.ENQUEUED
    assert d.offer(_djob("occ", "t"), 0.0, occurrence=True).verdict is Verdict.SKIPPED


def test_plan_scans_exactly_scan_limit_jobs() -> None:
    # mutants: ``scanned = 0`` -> ``1`` (scans one fewer); ``scanned < scan_limit`` -> ``<=``
    d = Dispatcher(Limits(max_concurrency=10))
    for i in "abc":
        d.offer(_djob(i), 0.0)
    assert [j.id for j in d.plan(0.0, scan_limit=1)] == ["a"]
    assert [j.id for j in d.plan(0.0, scan_limit=2)] == ["b", "c"]


def test_remove_many_takes_the_named_queued_jobs_and_frees_their_task() -> None:
    # mutants in ``remove_many``: ``job_ids is None`` -> ``is not``, ``in`` -> ``not in``,
    # ``_queued_by_task[...] -= 1`` -> ``+= 1`` or ``-= 2``
    rules = {"t": TaskRules(max_instances=1, overlap=Overlap.BUFFER_ONE)}
    d = Dispatcher(Limits(max_concurrency=0), rules=rules.get)  # nothing starts: all queued
    d.offer(_djob("a", "t"), 0.0, occurrence=True)
    d.offer(_djob("b"), 0.0)
    assert [j.id for j in d.remove_many({"a"})] == ["a"]
    assert [j.id for j in d.queued_jobs()] == ["b"]
    # the task has nothing queued any more: a new occurrence is buffered, not skipped
    assert d.offer(_djob("a2", "t"), 0.0, occurrence=True).verdict is Verdict.ENQUEUED
    # ... and exactly one is queued now: the next one is skipped (buffer_one)
    assert d.offer(_djob("a3", "t"), 0.0, occurrence=True).verdict is Verdict.SKIPPED
    assert sorted(j.id for j in d.remove_many()) == ["a2", "b"] and d.queued == 0


# ---------------------------------------------------------------- wheel (kernel/wheel.py)
def test_one_advance_over_a_drained_bucket_returns_deadline_order() -> None:
    # mutant: ``_move_level``'s ``nsp = 0`` -> ``1``: a single unsorted bucket drained from an
    # upper level was taken for a sorted run and came out in insertion order. The stateful
    # model test did not reach that shape; here timers in random order, 70 ms .. 5 s ahead,
    # a first small advance, then one advance over all of them
    for seed in range(200):
        rng = random.Random(seed)
        w = TimingWheel[int](resolution=0.001, start=0.0)
        ds = [rng.uniform(0.07, 5.0) for _ in range(rng.randint(2, 40))]
        for i, d in enumerate(ds):
            w.schedule(d, i)
        w.advance(rng.uniform(0.0, 0.069))
        got = [ds[i] for i in w.advance(rng.uniform(0.5, 6.0))]
        assert got == sorted(got), (seed, got)


# ---------------------------------------------------------------- triggers (kernel/triggers/)
def test_a_year_range_whose_only_match_is_its_first_year_parses() -> None:
    # mutants in the "can never fire" check: the first year of the field,
    # ``(mask & -mask).bit_length() - 1``, taken as a later one (``- 2``, ``|``, no minus):
    # 29 February exists in 2028 only, so looking from a later year found nothing
    sched = parse_schedule("0 0 0 29 2 ? 2028-2030", "UTC")
    assert sched.next_after(T0) == datetime(2028, 2, 29, tzinfo=UTC).timestamp()


def test_a_preview_of_no_fire_times_is_empty_not_an_error() -> None:
    # mutant: ``if not out and count > 0`` -> ``>= 0`` (count 0 raised "never fires")
    assert preview("* * * * *", "UTC", T0, 0) == []


def _at(y: int, m: int, d: int, h: int = 0) -> float:
    return datetime(y, m, d, h, tzinfo=UTC).timestamp()


def test_2100_is_no_leap_year_but_2000_was() -> None:
    # mutants in ``_is_leap``: ``y % 100`` / ``y % 400`` -> ``*`` (every 4th year a leap year)
    feb29 = parse_schedule("0 0 29 2 *", "UTC")
    assert feb29.next_after(_at(2096, 3, 1)) == _at(2104, 2, 29)
    assert feb29.next_after(_at(1997, 3, 1)) == _at(2000, 2, 29)


def test_the_search_carries_into_the_next_year_after_december() -> None:
    # mutant in ``DayRule.next_day``: the year after December ``y += 1`` -> ``y -= 1``
    # (a year field then sent the search back into the past)
    sched = parse_schedule("0 0 0 10 * ? 2027,2029", "UTC")
    assert sched.next_after(_at(2027, 12, 15)) == _at(2029, 1, 10)


@pytest.mark.parametrize(("lower", "upper"), [("0 0 l-2 * *", "0 0 L-2 * *"),
                                              ("0 0 * * 5l", "0 0 * * 5L")])
def test_l_is_read_in_either_case(lower: str, upper: str) -> None:
    # mutants: the ``L-n`` and ``nL`` patterns' flags ``IGNORECASE | ASCII`` -> ``&`` (none)
    a, b = parse_schedule(lower, "UTC"), parse_schedule(upper, "UTC")
    assert [a.next_after(T0 + k * 86400 * 20) for k in range(6)] == [
        b.next_after(T0 + k * 86400 * 20) for k in range(6)]


class _Run:
    def __init__(self, key: str) -> None:
        self._key = key
        self.deadline = 0.0

    @property
    def key(self) -> str:
        return self._key


def test_removing_one_run_keeps_the_others_of_its_time_out_however_many_lengths() -> None:
    # mutant in ``Deadlines.remove``: ``not g and len(groups) > 64`` -> ``or``: with more than
    # 64 distinct time-out lengths, one finished run dropped the whole group of its length,
    # and the other runs of that length never timed out
    d = Deadlines()
    runs = [_Run(f"r{i}") for i in range(70)]
    for i, r in enumerate(runs):
        d.add(r, float(i + 1), now=0.0)
    twin = _Run("twin")
    d.add(twin, 1.0, now=0.5)  # a second run with the first one's length
    d.remove(runs[0], 1.0)
    assert [r.key for r in d.expire(1.5)] == ["twin"]


async def test_a_deadline_less_than_a_millisecond_ahead_is_slept_as_one_millisecond() -> None:
    # mutant: ``MIN_SLEEP`` 0.001 -> 1.001: every deadline less than a second ahead was slept
    # as a whole second
    clock = FakeClock(wall=T1)
    t = Timers(clock)
    t.arm_job(_job("soon", T1 + 0.5))
    waiter = asyncio.ensure_future(t.wait())
    await clock.advance(0.5)
    assert waiter.done(), "the timer loop slept past a deadline 0.5 s ahead"
    assert [j.id for j in t.expire().jobs] == ["soon"]
    t.arm_job(_job("sooner", clock.wall() + 0.0004))
    waiter = asyncio.ensure_future(t.wait())
    await clock.advance(0.0004)
    assert not waiter.done()  # slept as 1 ms, not 0 (uvloop would spin)
    await clock.advance(0.0006)
    assert waiter.done()
