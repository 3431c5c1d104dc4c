"""Fleet: cron occurrences a database failure kept from being fired are decided again, by each
task's misfire policy, once the database answers (``Kernel._refire``).

The catch_up case is in ``test_trial_fleet.py``; here the policies that must *not* run every
missed occurrence, and a failure that never ends (nothing runs from memory on any box).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kernel.clock import SystemClock
from kernel.errors import StoreError
from kernel.hookspecs import PluginContext
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import Job, MisfireRecord
from kernel.store.postgres import PostgresStore

from ..harness import make_config
from .conftest import Fleet
from .test_kernel_fleet import Ledger, until


class FireFailsStore(PostgresStore):
    """A real store whose ``fire`` fails, as an unreachable database makes it fail, while
    ``down`` is set (a fake failure on a real database: the rest of the store works)."""

    down = False

    def __init__(self, dsn: str, *, schema: str) -> None:
        super().__init__(dsn, schema=schema)
        self.failed: list[float] = []

    async def fire(self, jobs: Sequence[Job], now: float, *, owner: str | None = None,
                   claim_before: float | None = None) -> list[bool]:
        if self.down:
            self.failed.extend(j.scheduled_at or 0.0 for j in jobs)
            raise StoreError(f"{self.where}: cannot reach PostgreSQL (injected)")
        return await super().fire(jobs, now, owner=owner, claim_before=claim_before)

    async def record_misfire(self, rec: MisfireRecord) -> None:
        if self.down:
            raise StoreError(f"{self.where}: cannot reach PostgreSQL (injected)")
        await super().record_misfire(rec)


def _kernel(fleet: Fleet, store: PostgresStore, ledger: Ledger, misfire: str) -> object:
    plugins = load_plugins(PluginContext(), extra=[("rec", ledger.plugin(0))],
                           use_entry_points=False)
    return build(make_config(f"""
        [[tasks]]
        id = "beat"
        schedule = "* * * * * *"
        action = "rec"
        misfire = "{misfire}"
        overlap = "allow_all"
        misfire_grace = "1s"
        """), clock=SystemClock(), plugins=plugins, store=store)


async def test_skip_records_the_occurrences_missed_while_the_database_was_down(
        fleet: Fleet) -> None:
    store = FireFailsStore(fleet.cluster.dsn, schema=fleet.schema)
    ledger = Ledger()
    kernel = _kernel(fleet, store, ledger, "skip")
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))  # type: ignore[attr-defined]
    try:
        await asyncio.wait_for(started.wait(), 30)
        await until(lambda: len(ledger.rows) >= 1, 10)
        store.down = True
        await until(lambda: len(store.failed) >= 4, 10)
        store.down = False
        # decided (and recorded) once the database answers, over the whole outage
        failed = sorted(store.failed)
        deadline = asyncio.get_running_loop().time() + 10
        while not (recs := await store.misfires("beat")):
            assert asyncio.get_running_loop().time() < deadline, "no misfire decision recorded"
            await asyncio.sleep(0.05)
        assert recs[0].policy == "skip" and recs[0].first_missed == failed[0], (recs, failed)
        assert recs[0].missed >= len(failed) - 2, (recs, failed)
        ran = {r[3] for r in ledger.rows}
        # the oldest failed occurrences were more than the grace late when decided: not run
        assert min(store.failed) not in ran
    finally:
        kernel.stop("test")  # type: ignore[attr-defined]
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
