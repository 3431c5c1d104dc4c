"""Pure policies: misfire decisions after downtime, retry backoff with full jitter."""

from __future__ import annotations

import random

import pytest

from kernel.config import Misfire, RetryPolicy
from kernel.misfire import plan_misfires
from kernel.retry import backoff_cap, retry_delay
from kernel.triggers import parse_schedule

EVERY_MIN = parse_schedule("* * * * *", "UTC")
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def plan(policy: Misfire, down_for: float, *, grace: float = 30.0, max_catch_up: int = 10,
         sched=EVERY_MIN, scan_limit: int = 100_000):  # type: ignore[no-untyped-def]
    return plan_misfires("t", sched, T0, T0 + down_for, policy=policy, grace=grace,
                         max_catch_up=max_catch_up, scan_limit=scan_limit)


def test_nothing_missed_within_grace_runs_late_occurrences() -> None:
    p = plan(Misfire.COALESCE, 80.0)  # occurrences at +60 (20 s late): within grace
    assert p.run == (T0 + 60,)
    assert p.record is None
    assert p.last_considered == T0 + 60


def test_coalesce_runs_once_for_all_missed() -> None:
    p = plan(Misfire.COALESCE, 600.0)  # +60..+600: 10 occurrences; +600 is 0 s late
    assert p.record is not None
    assert p.record.missed == 9 and p.record.ran == 1  # the on-time one covers them
    assert p.run == (T0 + 600,)
    p2 = plan(Misfire.COALESCE, 630.0 - 1)  # +600 is 29 s late: in grace
    assert p2.run == (T0 + 600,)
    p3 = plan(Misfire.COALESCE, 645.0)  # every occurrence is > 30 s late
    assert p3.record is not None and p3.record.missed == 9 and p3.record.ran == 1
    assert p3.run == (T0 + 600,)
    assert p3.record.first_missed == T0 + 60 and p3.record.last_missed == T0 + 600


def test_catch_up_is_bounded_by_max_catch_up_keeping_the_newest() -> None:
    p = plan(Misfire.CATCH_UP, 3600.0 + 45, max_catch_up=5)
    assert p.record is not None
    assert p.record.missed == 55 and p.record.ran == 5
    assert p.run == tuple(T0 + 60 * k for k in range(56, 61))


def test_skip_runs_nothing_but_records_it() -> None:
    p = plan(Misfire.SKIP, 3600.0 + 45)
    assert p.run == ()
    assert p.record is not None and p.record.missed == 60 and p.record.ran == 0
    assert p.last_considered == T0 + 3600


def test_a_week_of_per_second_downtime_is_no_burst() -> None:
    per_sec = parse_schedule("@every 1s", "UTC")
    p = plan(Misfire.CATCH_UP, 7 * 86400.0, sched=per_sec, max_catch_up=3, scan_limit=10_000)
    assert p.record is not None
    assert p.record.missed >= 10_000  # counting stopped at the scan limit
    assert len(p.run) == 3
    assert max(p.run) == T0 + 7 * 86400.0
    assert p.last_considered == T0 + 7 * 86400.0


@pytest.mark.parametrize(("policy", "runs"), [
    (Misfire.COALESCE, 1), (Misfire.SKIP, 1), (Misfire.CATCH_UP, 3)])
def test_many_occurrences_within_grace_are_no_burst(policy: Misfire, runs: int) -> None:
    per_sec = parse_schedule("@every 1s", "UTC")
    p = plan(policy, 45.0, sched=per_sec, grace=60.0, max_catch_up=3)
    assert len(p.run) == runs and p.run[-1] == T0 + 45
    assert p.record is not None and p.record.missed == 45 - runs


def test_retry_delay_is_full_jitter_within_exponential_cap() -> None:
    pol = RetryPolicy(max_attempts=10, initial_delay=1.0, max_delay=30.0, multiplier=2.0)
    assert [backoff_cap(pol, n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    rng = random.Random(7)
    for attempt in range(1, 8):
        samples = [retry_delay(pol, attempt, rng) for _ in range(500)]
        assert all(0.0 <= s <= backoff_cap(pol, attempt) for s in samples)
        # full jitter: spread over the whole interval, not clustered at the cap
        assert min(samples) < 0.1 * backoff_cap(pol, attempt)
        assert max(samples) > 0.9 * backoff_cap(pol, attempt)


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_retry_delay_is_deterministic_with_a_seeded_rng(attempt: int) -> None:
    pol = RetryPolicy(max_attempts=5)
    assert retry_delay(pol, attempt, random.Random(1)) == retry_delay(pol, attempt,
                                                                      random.Random(1))
