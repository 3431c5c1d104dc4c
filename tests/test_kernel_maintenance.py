"""Deterministic (fake clock) tests of dedup-key expiry and history retention through the kernel,
and the CPU-time rlimit of exec."""

from __future__ import annotations

import sys

import pytest

from kernel.app import SubmitRequest
from kernel.records import Outcome

from .harness import make_harness
from .test_exec_action import one_run


async def test_dedup_key_expires_after_its_ttl() -> None:
    h = make_harness("")
    await h.start()
    a = await h.kernel.submit(SubmitRequest(action="rec", dedup_key="nightly-2026-01-01",
                                            dedup_ttl=60))
    await h.advance(59)
    b = await h.kernel.submit(SubmitRequest(action="rec", dedup_key="nightly-2026-01-01",
                                            dedup_ttl=60))
    assert b.existed and b.job.id == a.job.id
    await h.advance(2)
    c = await h.kernel.submit(SubmitRequest(action="rec", dedup_key="nightly-2026-01-01",
                                            dedup_ttl=60))
    assert not c.existed and c.job.id != a.job.id
    await h.idle()
    assert [x.job_id for x in h.rec.calls] == [a.job.id, c.job.id]
    await h.stop()


async def test_history_retention_by_count_and_age_runs_in_the_background() -> None:
    h = make_harness("""
        [store]
        history_max_rows = 50
        history_max_age = "1h"
        [[tasks]]
        id = "t"
        schedule = "@every 1s"
        action = "rec"
        """)
    await h.start()
    await h.advance(200, step=1)
    runs = await h.runs()
    # 200 runs happened; the minutely prune keeps 50, plus what ran since the last prune
    assert 50 <= len(runs) <= 50 + 60
    assert max(r.finished_at for r in runs) == pytest.approx(h.clock.wall())  # newest kept
    await h.kernel.pause("t")
    await h.advance(3 * 3600, step=60)
    assert await h.runs() == []  # older than an hour: pruned by age
    await h.stop()


async def test_expired_dedup_keys_are_purged_in_the_background() -> None:
    h = make_harness("")
    await h.start()
    await h.kernel.submit(SubmitRequest(action="rec", dedup_key="k", dedup_ttl=10))
    await h.advance(120, step=10)
    assert await h.store.purge_dedup(h.clock.wall()) == 0  # the kernel already purged it
    await h.stop()


@pytest.mark.slow
async def test_exec_cpu_time_limit_stops_a_runaway_child() -> None:
    h = make_harness("")
    await h.start()
    await h.kernel.submit(SubmitRequest(action="exec", payload={
        "argv": [sys.executable, "-c", "while True: pass"], "limits": {"cpu_sec": 1}}))
    run = await one_run(h)
    assert run.outcome is Outcome.FAILED and run.error_code == "ERR_EXEC_FAILED"
    assert "killed by signal" in run.detail
    await h.stop()
