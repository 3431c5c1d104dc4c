"""A real MemoryStore with injected write faults, as a full disk would cause them (the SQLite
translation of real disk errors is tested in tests/store). One class for every test that needs
a store that refuses writes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kernel.errors import StoreFull
from kernel.records import Job, RunRecord, SubmitResult
from kernel.store.memory import MemoryStore


class FaultyStore(MemoryStore):
    """``full``: submissions and finishes fail; ``finish_failures``: the next N finishes fail;
    ``cancel_fails``: cancels fail. ``finish_tries`` counts finish calls. Finishes yield once
    to the loop, as a real store's write does."""

    full = False
    finish_failures = 0
    cancel_fails = False
    finish_tries = 0

    async def submit(self, jobs: Sequence[Job], now: float) -> list[SubmitResult]:
        if self.full:
            raise StoreFull("database or disk is full")
        return await super().submit(jobs, now)

    async def finish(self, job_id: str, run: RunRecord, follow_up: Sequence[Job] = ()) -> None:
        self.finish_tries += 1
        if self.full:
            raise StoreFull("database or disk is full")
        if self.finish_failures > 0:
            self.finish_failures -= 1
            raise StoreFull("database or disk is full")
        await asyncio.sleep(0)
        await super().finish(job_id, run, follow_up)

    async def cancel(self, job_id: str, run: RunRecord | None = None) -> Job | None:
        if self.cancel_fails:
            raise StoreFull("database or disk is full")
        return await super().cancel(job_id, run)
