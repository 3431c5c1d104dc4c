"""Review of session 16's kernel changes (3067f46..HEAD), on PostgreSQL: defects shown by tests.

Each test here demonstrated a defect (it failed on the code reviewed); all are fixed now.
"""

from __future__ import annotations

import asyncio

import pytest

import kernel.app
from kernel.clock import SystemClock
from kernel.hookspecs import PluginContext
from kernel.main import build
from kernel.plugins import load as load_plugins

from ..harness import make_config
from .conftest import Fleet
from .test_kernel_fleet import Ledger, until
from .test_refire import FireFailsStore


async def test_catch_up_runs_occurrences_the_failure_kept_not_ones_fired_since(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    # the refire waits 4 s (backoff after a failure that lasted a while): deterministic here
    monkeypatch.setattr(kernel.app, "REFIRE_FIRST", 4.0)
    store = FireFailsStore(fleet.cluster.dsn, schema=fleet.schema)
    ledger = Ledger()
    plugins = load_plugins(PluginContext(), extra=[("rec", ledger.plugin(0))],
                           use_entry_points=False)
    k = build(make_config("""
        [[tasks]]
        id = "beat"
        schedule = "* * * * * *"
        action = "rec"
        misfire = "catch_up"
        max_catch_up = 2
        overlap = "allow_all"
        misfire_grace = "1s"
        """), clock=SystemClock(), plugins=plugins, store=store)
    started = asyncio.Event()
    task = asyncio.create_task(k.run(started=started))
    try:
        await asyncio.wait_for(started.wait(), 30)
        await until(lambda: len(ledger.rows) >= 1, 10)
        store.down = True
        await until(lambda: len(store.failed) >= 2, 10)
        store.down = False  # answers again: later occurrences fire as usual
        failed = set(store.failed)
        # the refire comes 4 s after the first failure: wait for its decision (bounded)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not (recs := await store.misfires("beat")):
            assert loop.time() < deadline, "the refire decided nothing"
            await asyncio.sleep(0.05)
        assert recs[0].policy == "catch_up" and recs[0].ran == 2, recs  # (catch_up, "ran 2")
        await until(lambda: bool(failed & {r[3] for r in ledger.rows}), 10)
        ran = {r[3] for r in ledger.rows}
        assert len(ran) >= 4  # the occurrences after the outage ran
        # catch_up, max_catch_up = 2: the newest two the failure kept run late
        assert failed & ran, (sorted(failed), sorted(ran))
    finally:
        k.stop("test")
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)


async def test_concurrent_submissions_claim_no_more_than_the_room_together(
        fleet: Fleet) -> None:
    from kernel.app import SubmitRequest

    from .test_kernel_fleet import Kernels

    ledger = Ledger()
    ks = Kernels(fleet, ledger)
    ledger.hold.clear()
    try:
        await ks.start("[scheduler]\nmax_concurrency = 2\n", n=2)
        k0 = ks.kernels[0]
        await asyncio.gather(*(k0.submit(SubmitRequest(action="rec", payload={"hold": True}))
                               for _ in range(8)))
        # the idle box claims what kernel 0 left (NOTIFY, or its poll: claim_horizon 0.5 s)
        await until(lambda: sum(1 for r in ledger.rows if r[0] == 1) >= 2, 10)
        held = len(k0.runner) + k0._dispatcher.queued + k0.timers.pending_jobs
        on_1 = sum(1 for r in ledger.rows if r[0] == 1)
        assert held <= 2 and on_1 == 2, f"kernel 0 holds {held} with 2 slots; kernel 1 ran {on_1}"
    finally:
        ledger.hold.set()
        await ks.stop()
