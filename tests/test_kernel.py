"""The kernel end to end on a fake clock: cron firing, one-shots, timeouts, retries,
dependencies, overlap, queue limits, pause/resume, misfires across restarts, reload, shutdown."""

from __future__ import annotations

import pytest

from kernel.app import SubmitRequest
from kernel.errors import ActionNotFound, BadPayload, QueueFull
from kernel.events import JobScheduled, MisfireDecided, RunStarted
from kernel.records import Outcome
from kernel.store.memory import MemoryStore

from .harness import make_config, make_harness

T0 = 1_767_225_600.0  # FakeClock's default wall time: 2026-01-01T00:00:00Z


async def test_cron_task_fires_on_schedule_without_drift() -> None:
    h = make_harness("""
        [[tasks]]
        id = "tick"
        schedule = "@every 5s"
        action = "rec"
        """)
    await h.start()
    await h.advance(16)
    assert [c.scheduled_at for c in h.rec.calls] == [T0 + 5, T0 + 10, T0 + 15]
    assert [c.at for c in h.rec.calls] == [T0 + 5, T0 + 10, T0 + 15]
    await h.advance(3600, step=7)  # big, uneven steps: still exactly on the 5 s grid
    assert len(h.rec.calls) == 3 + 720
    assert all(c.scheduled_at is not None and c.scheduled_at % 5 == 0 for c in h.rec.calls)
    await h.stop()


async def test_six_field_cron_and_time_zone() -> None:
    h = make_harness("""
        [[tasks]]
        id = "seconds"
        schedule = "30 * * * * *"
        action = "rec"
        [[tasks]]
        id = "shanghai_9am"
        schedule = "0 9 * * *"
        tz = "Asia/Shanghai"
        action = "rec"
        """)
    await h.start()
    await h.advance(2 * 3600)
    by_task = {}
    for c in h.rec.calls:
        by_task.setdefault(c.task_id, []).append(c.scheduled_at)
    assert by_task["seconds"][:2] == [T0 + 30, T0 + 90]
    assert by_task["shanghai_9am"] == [T0 + 3600]  # 09:00 +08:00 = 01:00Z
    await h.stop()


async def test_disabled_tasks_are_loaded_but_not_armed() -> None:
    h = make_harness("""
        [[tasks]]
        id = "off"
        schedule = "* * * * * *"
        action = "rec"
        enabled = false
        """)
    await h.start()
    await h.advance(10)
    assert h.rec.calls == []
    assert [t.id for t in h.kernel.snapshot().tasks] == ["off"]
    await h.stop()


async def test_one_shot_delay_and_absolute_instant() -> None:
    h = make_harness("")
    await h.start()
    r1 = await h.kernel.submit(SubmitRequest(action="rec", delay=10, payload={"n": 1}))
    r2 = await h.kernel.submit(SubmitRequest(action="rec", at=T0 + 4, payload={"n": 2}))
    await h.advance(9.9)
    assert [c.payload["n"] for c in h.rec.calls] == [2]
    await h.advance(0.1)
    assert [c.job_id for c in h.rec.calls] == [r2.job.id, r1.job.id]
    assert h.rec.calls[1].at == pytest.approx(T0 + 10)
    runs = await h.runs()
    assert [r.outcome for r in runs] == [Outcome.SUCCEEDED, Outcome.SUCCEEDED]
    await h.stop()


async def test_submission_errors_are_specific_and_store_nothing() -> None:
    h = make_harness("")
    await h.start()
    with pytest.raises(ActionNotFound, match="unknown action 'nope'.*installed actions"):
        await h.kernel.submit(SubmitRequest(action="nope"))
    with pytest.raises(BadPayload, match="payload for action 'exec'.*`args`"):
        await h.kernel.submit(SubmitRequest(action="exec", payload={"args": ["x"]}))
    with pytest.raises(BadPayload, match="either 'delay' or 'at'"):
        await h.kernel.submit(SubmitRequest(action="rec", delay=1, at=T0))
    assert await h.store.count_jobs() == 0
    await h.stop()


async def test_dedup_key_returns_the_existing_job() -> None:
    h = make_harness("")
    await h.start()
    a = await h.kernel.submit(SubmitRequest(action="rec", delay=5, dedup_key="k"))
    b = await h.kernel.submit(SubmitRequest(action="rec", delay=5, dedup_key="k"))
    assert b.existed and b.job.id == a.job.id
    await h.advance(6)
    assert len(h.rec.calls) == 1
    await h.stop()


async def test_timeout_cancels_the_action_and_records_err_timeout() -> None:
    h = make_harness("""
        [[tasks]]
        id = "slow"
        schedule = "@every 60s"
        action = "rec"
        timeout = "5s"
        payload = { mode = "sleep", seconds = 100 }
        """)
    await h.start()
    await h.advance(66)
    (run,) = await h.runs()
    assert run.outcome is Outcome.TIMED_OUT and run.error_code == "ERR_TIMEOUT"
    assert run.finished_at == T0 + 65
    assert h.rec.finished == []
    await h.stop()


async def test_retries_with_backoff_then_exhausted() -> None:
    h = make_harness("""
        [[tasks]]
        id = "flaky"
        schedule = "@every 1h"
        action = "rec"
        payload = { mode = "conn" }
        retry = { max_attempts = 3, initial_delay = "10s", multiplier = 2 }
        """)
    await h.start()
    await h.advance(3600 + 40, step=0.5)
    attempts = [(c.attempt, c.at - T0 - 3600) for c in h.rec.calls]
    assert [a for a, _ in attempts] == [1, 2, 3]
    assert 0 <= attempts[1][1] <= 10.5 and attempts[1][1] <= attempts[2][1] <= attempts[1][1] + 20.5
    assert len({c.trace_id for c in h.rec.calls}) == 1
    runs = await h.runs()
    assert [r.error_code for r in runs] == ["ERR_CONN_TIMEOUT", "ERR_CONN_TIMEOUT",
                                            "ERR_RETRIES_EXHAUSTED"]
    assert "[ERR_CONN_TIMEOUT]" in runs[-1].detail
    await h.stop()


async def test_action_requested_retry_delay_and_non_retryable_errors() -> None:
    h = make_harness("""
        [[tasks]]
        id = "asks"
        schedule = "@every 1h"
        action = "rec"
        payload = { mode = "retry", delay = 7 }
        retry = { max_attempts = 2 }
        [[tasks]]
        id = "fatal"
        schedule = "@every 1h"
        action = "rec"
        payload = { mode = "bug" }
        retry = { max_attempts = 5 }
        """)
    await h.start()
    await h.advance(3600 + 10)
    asks = [c for c in h.rec.calls if c.task_id == "asks"]
    assert [c.at - T0 for c in asks] == [3600, 3607]
    fatal = [c for c in h.rec.calls if c.task_id == "fatal"]
    assert len(fatal) == 1  # a plain exception is not retried
    (run,) = await h.runs(task_id="fatal")
    assert run.error_code == "ERR_ACTION_FAILED" and "ZeroDivisionError" in run.detail
    await h.stop()


async def test_dependency_chain_shares_trace_and_failure_skips_downstream() -> None:
    h = make_harness("""
        [[tasks]]
        id = "prep"
        schedule = "@every 1h"
        action = "rec"
        [[tasks]]
        id = "infer"
        after = ["prep"]
        action = "rec"
        [[tasks]]
        id = "alert"
        after = ["infer"]
        action = "rec"
        [[tasks]]
        id = "bad"
        schedule = "30 * * * *"
        action = "rec"
        payload = { mode = "fail" }
        [[tasks]]
        id = "after_bad"
        after = ["bad"]
        action = "rec"
        [[tasks]]
        id = "after_after_bad"
        after = ["after_bad"]
        action = "rec"
        """)
    await h.start()
    await h.advance(3600 + 1)
    chain = [c for c in h.rec.calls if c.task_id in ("prep", "infer", "alert")]
    assert [c.task_id for c in chain] == ["prep", "infer", "alert"]
    assert len({c.trace_id for c in chain}) == 1
    assert chain[1].parent_span_id is not None
    assert not [c for c in h.rec.calls if c.task_id in ("after_bad", "after_after_bad")]
    skipped = await h.runs(outcome=Outcome.SKIPPED)
    assert sorted(r.task_id or "" for r in skipped) == ["after_after_bad", "after_bad"]
    assert {r.error_code for r in skipped} == {"ERR_DEPENDENCY_FAILED"}
    (bad,) = await h.runs(task_id="bad")
    assert {r.trace_id for r in skipped} == {bad.trace_id}
    await h.stop()


async def test_overlap_skip_records_skipped_occurrences() -> None:
    h = make_harness("""
        [[tasks]]
        id = "long"
        schedule = "@every 10s"
        action = "rec"
        payload = { mode = "sleep", seconds = 25 }
        """)
    await h.start()
    await h.advance(41)
    runs = await h.runs(task_id="long")
    outcomes = [(r.scheduled_at - T0 if r.scheduled_at else None, r.outcome) for r in runs]
    assert (20.0, Outcome.SKIPPED) in outcomes and (30.0, Outcome.SKIPPED) in outcomes
    assert (10.0, Outcome.SUCCEEDED) in outcomes
    assert [c.scheduled_at - T0 for c in h.rec.calls if c.scheduled_at] == [10, 40]
    await h.stop()


async def test_overlap_cancel_other_cancels_the_running_one() -> None:
    h = make_harness("""
        [[tasks]]
        id = "long"
        schedule = "@every 10s"
        action = "rec"
        overlap = "cancel_other"
        payload = { mode = "sleep", seconds = 25 }
        """)
    await h.start()
    await h.advance(21)
    runs = await h.runs(task_id="long")
    assert [r.outcome for r in runs] == [Outcome.CANCELLED]
    assert runs[0].scheduled_at == T0 + 10
    assert [c.scheduled_at - T0 for c in h.rec.calls if c.scheduled_at] == [10, 20]
    await h.stop()


async def test_queue_full_refuses_new_submissions_but_keeps_accepted_ones() -> None:
    h = make_harness("""
        [scheduler]
        max_concurrency = 1
        queue_depth = 2
        """)
    await h.start()
    await h.kernel.submit(SubmitRequest(action="rec", payload={"mode": "block"}))
    await h.idle()
    await h.kernel.submit(SubmitRequest(action="rec"))
    await h.kernel.submit(SubmitRequest(action="rec"))
    with pytest.raises(QueueFull, match="ready queue is full"):
        await h.kernel.submit(SubmitRequest(action="rec"))
    assert await h.store.count_jobs() == 3
    # a delayed submission is a timer, not a queue entry: accepted
    await h.kernel.submit(SubmitRequest(action="rec", delay=60))
    h.rec.release.set()
    await h.advance(61)
    assert len(h.rec.finished) == 4
    await h.stop()


async def test_pause_and_resume() -> None:
    h = make_harness("""
        [[tasks]]
        id = "t"
        schedule = "@every 10s"
        action = "rec"
        """)
    await h.start()
    await h.advance(11)
    await h.kernel.pause("t")
    await h.advance(60)
    assert len(h.rec.calls) == 1
    await h.kernel.resume("t")
    await h.advance(10)
    assert [c.scheduled_at - T0 for c in h.rec.calls if c.scheduled_at] == [10, 80]
    await h.stop()


async def test_trigger_and_backfill() -> None:
    h = make_harness("""
        [[tasks]]
        id = "daily"
        schedule = "0 2 * * *"
        action = "rec"
        """)
    await h.start()
    await h.kernel.trigger("daily")
    jobs = await h.kernel.backfill("daily", T0 - 3 * 86400, T0)
    assert [j.scheduled_at for j in jobs] == [T0 - 3 * 86400 + 7200, T0 - 2 * 86400 + 7200,
                                              T0 - 86400 + 7200]
    await h.advance(1)
    assert len(h.rec.calls) == 4
    await h.stop()


@pytest.mark.parametrize(("policy", "expected_runs"), [
    ("coalesce", 1), ("catch_up", 3), ("skip", 0)])
async def test_misfires_after_downtime_follow_the_policy(policy: str,
                                                         expected_runs: int) -> None:
    text = f"""
        [[tasks]]
        id = "minutely"
        schedule = "* * * * *"
        action = "rec"
        misfire = "{policy}"
        max_catch_up = 3
        misfire_grace = "10s"
        """
    store = MemoryStore()
    h = make_harness(text, store=store)
    await h.start()
    await h.advance(61)
    await h.stop()
    assert len(h.rec.calls) == 1
    # down for an hour and a bit, then restart on the same store
    h2 = make_harness(text, store=store, clock=h.clock)
    h.clock.set_wall(h.clock.wall() + 3600 + 30)
    await h2.start()
    await h2.idle()
    assert len(h2.rec.calls) == expected_runs
    decided = [e for e in h2.events if isinstance(e, MisfireDecided)]
    assert decided and decided[0].record.ran == expected_runs
    assert decided[0].record.missed == 60 - expected_runs
    assert await store.misfires("minutely")
    # nothing runs twice afterwards, and the schedule carries on at the next minute
    await h2.advance(60)
    scheduled = [c.scheduled_at for c in h.rec.calls + h2.rec.calls]
    assert len(scheduled) == len(set(scheduled))
    await h2.stop()


async def test_restart_does_not_rerun_a_finished_occurrence() -> None:
    text = """
        [[tasks]]
        id = "t"
        schedule = "@every 10s"
        action = "rec"
        """
    store = MemoryStore()
    h = make_harness(text, store=store)
    await h.start()
    await h.advance(25)
    await h.stop()
    h2 = make_harness(text, store=store, clock=h.clock)
    await h2.start()
    await h2.advance(10)
    got = [c.scheduled_at - T0 for c in h.rec.calls + h2.rec.calls if c.scheduled_at]
    assert got == [10, 20, 30]
    await h2.stop()


async def test_shutdown_waits_for_running_jobs_then_cancels_and_recovers_them() -> None:
    text = """
        [kernel]
        shutdown_grace = "5s"
        """
    store = MemoryStore()
    h = make_harness(text, store=store)
    await h.start()
    short = await h.kernel.submit(SubmitRequest(action="rec",
                                                payload={"mode": "sleep", "seconds": 3}))
    long = await h.kernel.submit(SubmitRequest(action="rec",
                                               payload={"mode": "sleep", "seconds": 100}))
    await h.idle()
    await h.stop()
    assert short.job.id in h.rec.finished and long.job.id not in h.rec.finished
    # the cancelled one is still stored as running: the next start runs it again
    h2 = make_harness(text, store=store, clock=h.clock)
    await h2.start()
    await h2.idle()
    started = [e for e in h2.events if isinstance(e, RunStarted)]
    assert [(e.job_id, e.recovered, e.attempt) for e in started] == [(long.job.id, True, 2)]
    await h2.stop()


async def test_reload_adds_removes_and_changes_tasks() -> None:
    h = make_harness("""
        [[tasks]]
        id = "keep"
        schedule = "@every 10s"
        action = "rec"
        [[tasks]]
        id = "drop"
        schedule = "@every 10s"
        action = "rec"
        [[tasks]]
        id = "change"
        schedule = "@every 10s"
        action = "rec"
        """)
    await h.start()
    await h.advance(10)
    new = make_config("""
        [[tasks]]
        id = "keep"
        schedule = "@every 10s"
        action = "rec"
        [[tasks]]
        id = "change"
        schedule = "@every 30s"
        action = "rec"
        [[tasks]]
        id = "new"
        schedule = "@every 20s"
        action = "rec"
        """)
    ev = await h.kernel.reload(new, "test")
    assert (ev.added, ev.removed, ev.changed) == (["new"], ["drop"], ["change"])
    h.rec.calls.clear()
    await h.advance(49)
    got = sorted((c.task_id or "", c.scheduled_at - T0) for c in h.rec.calls
                 if c.scheduled_at)
    assert got == [("change", 30), ("keep", 20), ("keep", 30), ("keep", 40), ("keep", 50),
                   ("new", 20), ("new", 40)]
    await h.stop()


async def test_cancel_pending_and_running_jobs() -> None:
    h = make_harness("")
    await h.start()
    pending = await h.kernel.submit(SubmitRequest(action="rec", delay=30))
    running = await h.kernel.submit(SubmitRequest(action="rec", payload={"mode": "block"}))
    await h.idle()
    await h.kernel.cancel(pending.job.id)
    await h.kernel.cancel(running.job.id)
    await h.advance(31)
    runs = await h.runs()
    assert sorted(r.outcome for r in runs) == [Outcome.CANCELLED, Outcome.CANCELLED]
    assert [c.job_id for c in h.rec.calls] == [running.job.id]
    await h.stop()


async def test_next_occurrence_is_announced() -> None:
    h = make_harness("""
        [[tasks]]
        id = "t"
        schedule = "0 0 29 2 *"
        action = "rec"
        """)
    await h.start()
    sched = [e for e in h.events if isinstance(e, JobScheduled)]
    assert sched and sched[0].due_at == 1_835_395_200.0  # 2028-02-29T00:00Z, two years ahead
    assert h.kernel.snapshot().timers == 1
    await h.stop()


async def test_a_failing_event_subscriber_does_not_harm_the_kernel() -> None:
    h = make_harness("""
        [[tasks]]
        id = "t"
        schedule = "@every 1s"
        action = "rec"
        """)

    def broken(_ev: object) -> None:
        raise RuntimeError("observer bug")

    h.kernel.bus.subscribe(broken)
    await h.start()
    await h.advance(3)
    assert len(h.rec.calls) == 3
    assert h.task is not None and not h.task.done()
    await h.stop()
