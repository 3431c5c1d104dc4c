"""Completion: what a finished attempt means. Pure: no clock, no store, no bus.

``classify(exc)`` turns what an action raised into a ``Result``; ``settle(...)`` turns a result
into a ``Settlement``: the run record for history, the event to publish, and the follow-ups (a
retry job, the dependent jobs to run, or the dependents to record as skipped). The kernel makes
the settlement durable in one store call, then publishes and arms. Everything time-dependent
(``now``) and random (``rng``) comes in as an argument, so a settlement is a function of its
inputs and is tested without a loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .config import RetryPolicy
from .errors import (
    ActionError,
    ActionNotFound,
    BadPayload,
    ErrorCode,
    KernelError,
    Retry,
    Superseded,
)
from .events import (
    RunCancelled,
    RunFailed,
    RunFinished,
    RunSkipped,
    RunSucceeded,
    RunTimedOut,
)
from .records import Job, JobKind, JobState, Outcome, RunRecord
from .retry import retry_delay

DETAIL_MAX = 2048


@dataclass(slots=True)
class Result:
    """How one attempt ended, before the kernel decides what follows."""

    outcome: Outcome
    code: ErrorCode | None = None
    detail: str = ""
    retryable: bool = False
    retry_after: float | None = None


@dataclass(slots=True)
class Settlement:
    run: RunRecord
    event: RunFinished
    follow: list[Job] = field(default_factory=list)    # to arm: the retry, or dependents to run
    skipped: list[Job] = field(default_factory=list)   # dependents to record as skipped
    retry_at: float | None = None


MakeDependents = Callable[[Job, str, float], Sequence[Job]]
NewId = Callable[[], str]


def classify(exc: BaseException) -> Result:
    """What an action's exception means (``Retry`` asks for another attempt)."""
    if isinstance(exc, Superseded):  # not ours to run: neither a failure nor a retry
        return Result(Outcome.CANCELLED, exc.code, exc.message)
    if isinstance(exc, Retry):
        return Result(Outcome.FAILED, exc.code, exc.message, retryable=True,
                      retry_after=exc.delay)
    if isinstance(exc, ActionError):
        return Result(Outcome.FAILED, exc.code, exc.message, retryable=exc.retryable)
    if isinstance(exc, ActionNotFound | BadPayload | KernelError):
        return Result(Outcome.FAILED, exc.code, exc.message)
    if isinstance(exc, ConnectionError | TimeoutError):
        return Result(Outcome.FAILED, ErrorCode.ERR_CONN_TIMEOUT,
                      f"{type(exc).__name__}: {exc}", retryable=True)
    return Result(Outcome.FAILED, ErrorCode.ERR_ACTION_FAILED, f"{type(exc).__name__}: {exc}")


def succeeded(result: Any) -> Result:
    if result is None:
        return Result(Outcome.SUCCEEDED)
    text = result if isinstance(result, str) else repr(result)
    return Result(Outcome.SUCCEEDED, detail=text[:DETAIL_MAX])


def record(job: Job, span: str, res: Result, started: float | None, now: float) -> RunRecord:
    return RunRecord(
        job_id=job.id, task_id=job.task_id, action=job.action, trace_id=job.trace_id,
        span_id=span, scheduled_at=job.scheduled_at, started_at=started, finished_at=now,
        attempt=job.attempt, outcome=res.outcome,
        error_code=res.code.value if res.code else None, detail=res.detail[:DETAIL_MAX],
        recovered=job.recovered)


def event_for(run: RunRecord, duration: float, retry_at: float | None = None) -> RunFinished:
    o = run.outcome
    if o is Outcome.FAILED:
        return RunFailed(at=run.finished_at, run=run, duration=duration,
                         will_retry=retry_at is not None, retry_at=retry_at)
    if o is Outcome.TIMED_OUT:
        return RunTimedOut(at=run.finished_at, run=run, duration=duration,
                           will_retry=retry_at is not None, retry_at=retry_at)
    cls = _FINISHED_EVENT.get(o, RunFinished)
    return cls(at=run.finished_at, run=run, duration=duration)


def settle(job: Job, span: str, res: Result, *, started: float | None, now: float,
           duration: float, retry: RetryPolicy | None, rng: random.Random, new_id: NewId,
           dependents: MakeDependents) -> Settlement:
    """Decide what follows one finished attempt.

    - A retryable failure or time-out with attempts left becomes a RETRY job due after the
      action's ``Retry(delay)`` or the task's backoff (``retry`` None: an ad-hoc job, one try).
    - With no attempts left (and more than one allowed) the code becomes ERR_RETRIES_EXHAUSTED.
    - A task run that succeeded starts its dependents; one that did not (and will not retry)
      skips them, except a skip for overlap, which is no verdict on the upstream work.
    """
    follow: list[Job] = []
    skipped: list[Job] = []
    retry_at: float | None = None
    if res.outcome in (Outcome.FAILED, Outcome.TIMED_OUT) and res.retryable:
        max_attempts = retry.max_attempts if retry is not None else 1
        if job.attempt < max_attempts:
            delay = res.retry_after
            if delay is None:
                assert retry is not None
                delay = retry_delay(retry, job.attempt, rng)
            retry_at = now + delay
            follow.append(msgspec.structs.replace(
                job, id=new_id(), kind=JobKind.RETRY, attempt=job.attempt + 1,
                due_at=retry_at, created_at=now, state=JobState.PENDING, recovered=False,
                started_at=None, dedup_key=None, dedup_expires_at=None))
        elif max_attempts > 1:
            res.detail = f"[{res.code}] {res.detail}"
            res.code = ErrorCode.ERR_RETRIES_EXHAUSTED
    if job.task_id and retry_at is None:
        if res.outcome is Outcome.SUCCEEDED:
            follow.extend(dependents(job, span, now))
        elif res.outcome is not Outcome.SKIPPED or res.code is ErrorCode.ERR_DEPENDENCY_FAILED:
            skipped.extend(dependents(job, span, now))
    run = record(job, span, res, started, now)
    return Settlement(run=run, event=event_for(run, duration, retry_at), follow=follow,
                      skipped=skipped, retry_at=retry_at)


def dependency_failed(upstream: Job) -> Result:
    return Result(Outcome.SKIPPED, ErrorCode.ERR_DEPENDENCY_FAILED,
                  f"upstream task {upstream.task_id!r} did not succeed")


_FINISHED_EVENT: dict[Outcome, type[RunFinished]] = {
    Outcome.SUCCEEDED: RunSucceeded, Outcome.CANCELLED: RunCancelled, Outcome.SKIPPED: RunSkipped}
