"""completion.settle is pure: a result in, the run record, the event and follow-ups out."""

from __future__ import annotations

import itertools
import random

import pytest

from kernel import completion
from kernel.completion import Result
from kernel.config import RetryPolicy
from kernel.errors import ActionError, ErrorCode, Retry
from kernel.events import RunFailed, RunSkipped, RunSucceeded, RunTimedOut
from kernel.records import Job, JobKind, Outcome

NOW = 1_000.0


def job(**kw: object) -> Job:
    base: dict[str, object] = {"id": "j1", "action": "a", "task_id": "t", "due_at": NOW - 1,
                               "scheduled_at": NOW - 1, "trace_id": "tr"}
    base.update(kw)
    return Job(**base)  # type: ignore[arg-type]


def ids() -> completion.NewId:
    counter = itertools.count(1)
    return lambda: f"new{next(counter)}"


def deps(names: list[str]) -> completion.MakeDependents:
    def make(up: Job, span: str, now: float) -> list[Job]:
        return [Job(id=f"dep-{n}", action="a", task_id=n, kind=JobKind.DEPENDENT, due_at=now,
                    trace_id=up.trace_id, parent_span_id=span) for n in names]
    return make


def settle(j: Job, res: Result, retry: RetryPolicy | None = None, seed: int = 1,
           dependents: completion.MakeDependents | None = None) -> completion.Settlement:
    return completion.settle(j, "span", res, started=NOW - 0.5, now=NOW, duration=0.5,
                             retry=retry, rng=random.Random(seed), new_id=ids(),
                             dependents=dependents or deps(["d"]))


def test_success_starts_dependents_with_the_trace_and_parent_span() -> None:
    s = settle(job(), completion.succeeded("ok"))
    assert isinstance(s.event, RunSucceeded)
    assert s.run.outcome is Outcome.SUCCEEDED and s.run.detail == "ok"
    assert [(d.id, d.trace_id, d.parent_span_id) for d in s.follow] == [("dep-d", "tr", "span")]
    assert s.skipped == [] and s.retry_at is None


def test_failure_without_retries_skips_dependents() -> None:
    s = settle(job(), completion.classify(ActionError("boom")))
    assert isinstance(s.event, RunFailed) and not s.event.will_retry
    assert s.follow == [] and [d.id for d in s.skipped] == ["dep-d"]


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_retry_waits_the_backoff_drawn_from_the_rng_within_the_cap(attempt: int) -> None:
    policy = RetryPolicy(max_attempts=10, initial_delay=2.0, max_delay=10.0, multiplier=2.0)
    s = settle(job(attempt=attempt), completion.classify(ConnectionRefusedError("x")), policy,
               seed=attempt)
    cap = min(10.0, 2.0 * 2 ** (attempt - 1))
    expected = random.Random(attempt).uniform(0, cap)
    assert s.retry_at == pytest.approx(NOW + expected)
    assert 0 < s.retry_at - NOW <= cap
    (r,) = s.follow
    assert (r.kind, r.attempt, r.due_at, r.id) == (JobKind.RETRY, attempt + 1, s.retry_at, "new1")
    assert s.skipped == []  # dependents wait for the last attempt
    assert isinstance(s.event, RunFailed) and s.event.will_retry


def test_retry_after_from_the_action_wins_over_the_backoff() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=100.0)
    s = settle(job(), completion.classify(Retry(delay=7.0)), policy)
    assert s.retry_at == NOW + 7.0


def test_last_attempt_is_retries_exhausted_with_the_original_code() -> None:
    policy = RetryPolicy(max_attempts=2)
    s = settle(job(attempt=2), completion.classify(ConnectionRefusedError("x")), policy)
    assert s.run.error_code == ErrorCode.ERR_RETRIES_EXHAUSTED.value
    assert s.run.detail.startswith("[ERR_CONN_TIMEOUT]")
    assert s.follow == [] and len(s.skipped) == 1


def test_a_timeout_is_retryable_and_published_as_timed_out() -> None:
    res = Result(Outcome.TIMED_OUT, ErrorCode.ERR_TIMEOUT, "timed out", retryable=True)
    s = settle(job(), res, RetryPolicy(max_attempts=2))
    assert isinstance(s.event, RunTimedOut) and s.event.will_retry


def test_an_overlap_skip_is_no_verdict_on_dependents() -> None:
    s = settle(job(), Result(Outcome.SKIPPED, ErrorCode.ERR_SKIPPED_OVERLAP, "busy"))
    assert isinstance(s.event, RunSkipped) and s.skipped == [] and s.follow == []
    s = settle(job(), Result(Outcome.SKIPPED, ErrorCode.ERR_DEPENDENCY_FAILED, "up failed"))
    assert len(s.skipped) == 1


def test_an_ad_hoc_job_has_one_attempt_and_no_dependents() -> None:
    s = settle(job(task_id=None), completion.classify(ConnectionRefusedError("x")))
    assert s.follow == [] and s.skipped == [] and s.run.error_code == "ERR_CONN_TIMEOUT"


def test_classify_maps_exceptions_to_codes() -> None:
    assert completion.classify(ZeroDivisionError("z")).code is ErrorCode.ERR_ACTION_FAILED
    assert completion.classify(TimeoutError()).retryable
    assert completion.succeeded("x" * 5000).detail == "x" * completion.DETAIL_MAX
