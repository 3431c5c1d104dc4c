"""The journal: every write the job path makes to the store, in one room.

What a submission, a cron occurrence, a start and a finish make durable, in their single-box
form or, in a fleet (``FleetMember`` given), their owner-checked form; and the outcomes the
store refused (disk full, I/O error), kept in memory and written again with backoff until it
takes them (``keep_saving`` is the service, ``flush`` the last try at shutdown).

Store errors are reported through ``on_failed`` and decided here: a refused occurrence runs from
memory on one box (it will not survive a crash) but not in a fleet (it would run on every box);
a refused RUNNING mark lets the run go on; a refused finish is kept. Submissions raise: nothing
that was not committed is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from .clock import Clock
from .errors import StoreError, Superseded
from .fleet import FleetMember
from .records import Job, RunRecord, SubmitResult
from .store.base import Store

log = logging.getLogger("kernel.journal")

SAVE_RETRY_FIRST = 0.5   # seconds before a refused finish is written again (doubling)
SAVE_RETRY_MAX = 30.0


SAVED = "saved"            # the outcome is durable
KEPT = "kept"              # the store refused it: kept in memory, written again later
SUPERSEDED = "superseded"  # fleet: the job is another kernel's now; follow-ups dropped


@dataclass(slots=True)
class _Unsaved:
    job_id: str
    run: RunRecord
    follow: list[Job]
    owner: str | None
    on_saved: Callable[[], None] | None
    tries: int = 1


class Journal:
    def __init__(self, store: Store, clock: Clock, *, fleet: FleetMember | None,
                 on_failed: Callable[[StoreError], None]) -> None:
        self.store = store
        self.clock = clock
        self.fleet = fleet
        self._on_failed = on_failed
        self._unsaved: list[_Unsaved] = []
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()  # the service and the last flush at stop, one at a time

    # ---- new jobs ------------------------------------------------------------------------------
    async def new_jobs(self, jobs: list[Job], wall: float, *, claim_all: bool = False
                       ) -> tuple[list[SubmitResult], list[Job]]:
        """Store new jobs (acknowledged only after commit); returns the results and the new
        jobs this kernel holds. In a fleet only those due within the claim horizon that this
        kernel has room for (``FleetMember.room``), or all (``claim_all``), are claimed at
        insert; the others wait for whichever kernel claims them.

        :raises StoreError: nothing was stored.
        """
        if self.fleet is None:
            results = await self.store.submit(jobs, wall)
            return results, [r.job for r in results if not r.existed]
        before = math.inf if claim_all else self.fleet.claim_before(wall)
        room = None if claim_all else self.fleet.take_room()
        try:
            results, owned = await self.fleet.store.submit_claimed(jobs, wall, self.fleet.id,
                                                                   before, room)
        finally:  # the caller holds what was claimed before it next yields
            self.fleet.return_room(room)
        mine = [r.job for r, o in zip(results, owned, strict=True) if o and not r.existed]
        if room is not None and len(mine) >= room:
            self.fleet.left_unclaimed()
        return results, mine

    async def occurrences(self, jobs: list[Job], wall: float) -> list[Job] | None:
        """Make cron occurrences durable; the ones to run here. One box: the new ones (or all
        of them from memory when the store fails). A fleet: the ones this kernel won (each runs
        once fleet-wide); ``None`` when the database failed and none was fired (running them
        from memory would run them on every box): the caller fires them again later, which
        never runs one twice (the fleet keys occurrences by task and instant)."""
        if self.fleet is not None:
            try:
                won = await self.fleet.store.fire(jobs, wall, owner=self.fleet.id,
                                                  claim_before=self.fleet.claim_before(wall))
            except StoreError as exc:
                self._on_failed(exc)
                log.error("%d cron occurrence(s) not fired yet: the fleet's database failed; "
                          "fired again, by each task's misfire policy, once it answers",
                          len(jobs))
                return None
            return [j for j, mine in zip(jobs, won, strict=True) if mine]
        try:
            results = await self.store.submit(jobs, wall)
        except StoreError as exc:
            self._on_failed(exc)  # keep serving: run them from memory (lost at a crash)
            return list(jobs)
        return [r.job for r in results if not r.existed]

    # ---- a run ---------------------------------------------------------------------------------
    async def started(self, job: Job, at: float, owner: str | None = None) -> None:
        """The RUNNING mark, committed before the action starts. ``owner``: (fleet) the
        kernel id that claimed the job (it may have registered again since).

        :raises Superseded: (fleet) the job is no longer this kernel's: do not start it.
        :raises StoreError: (fleet) ownership could not be checked: do not start it now.
        """
        if self.fleet is not None:
            if not await self.fleet.store.mark_running_owned(owner or self.fleet.id, job.id, at,
                                                             job.attempt):
                raise Superseded(f"job {job.id} is no longer this kernel's (rescued by another "
                                 "or cancelled); not started")
            return
        try:
            await self.store.mark_running(job.id, at, job.attempt)
        except StoreError as exc:
            self._on_failed(exc)

    async def finished(self, job_id: str, run: RunRecord, follow: list[Job], *,
                       owner: str | None = None,
                       on_saved: Callable[[], None] | None = None) -> str:
        """Record an outcome with its follow-ups (one transaction): SAVED, SUPERSEDED (fleet:
        the job is another kernel's now; the run was recorded as superseded, the follow-ups
        dropped), or KEPT: the store refused it, it is written again later, and ``on_saved``
        (arming the follow-ups) is called only once it is durable."""
        try:
            return SAVED if await self._write(job_id, run, follow, owner) else SUPERSEDED
        except StoreError as exc:
            self._on_failed(exc)
            log.error("the outcome of job %s (%s) is kept in memory and written again until "
                      "the store takes it; if the kernel stops first, the job is run again at "
                      "the next start (recovered)", job_id, run.outcome.value)
            self._unsaved.append(_Unsaved(job_id, run, list(follow), owner, on_saved))
            self._wake.set()
            return KEPT

    async def _write(self, job_id: str, run: RunRecord, follow: list[Job],
                     owner: str | None) -> bool:
        if self.fleet is not None:
            return await self.fleet.store.finish_owned(owner or self.fleet.id, job_id, run,
                                                       follow)
        await self.store.finish(job_id, run, follow)
        return True

    # ---- refused outcomes ----------------------------------------------------------------------
    @property
    def unsaved(self) -> int:
        """Outcomes the store has not taken yet (kept in memory, written again with backoff)."""
        return len(self._unsaved)

    async def keep_saving(self) -> None:
        """A service: write again the outcomes the store refused, with backoff."""
        delay = SAVE_RETRY_FIRST
        while True:
            if not self._unsaved:
                self._wake.clear()
                await self._wake.wait()
                delay = SAVE_RETRY_FIRST
                continue
            await self.clock.sleep(delay)
            delay = SAVE_RETRY_FIRST if await self.flush() else min(delay * 2, SAVE_RETRY_MAX)

    async def flush(self) -> bool:
        """Write the kept outcomes, oldest first; False at the first refusal."""
        async with self._flushing:
            while self._unsaved:
                u = self._unsaved[0]
                try:
                    ours = await self._write(u.job_id, u.run, u.follow, u.owner)
                except StoreError as exc:
                    u.tries += 1
                    log.warning("writing the outcome of job %s failed again (try %d): [%s] %s",
                                u.job_id, u.tries, exc.code, exc)
                    return False
                self._unsaved.remove(u)
                log.info("the outcome of job %s is stored now (after %d tries)", u.job_id,
                         u.tries)
                if ours and u.on_saved is not None:
                    u.on_saved()
            return True

    def __repr__(self) -> str:
        return f"<Journal fleet={self.fleet is not None} unsaved={len(self._unsaved)}>"
