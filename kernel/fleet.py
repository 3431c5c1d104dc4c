"""Fleet membership: several kernels share one PostgreSQL store (``backend = "postgres"``).

One ``FleetMember`` per kernel process. It registers a fresh kernel id, renews one heartbeat
row, rescues the jobs of kernels whose heartbeat expired (any member may: no leader), and
claims jobs due within a short horizon into this kernel's timers (claim-ahead, ``FOR UPDATE
SKIP LOCKED`` in the store). A member that loses its heartbeat (the store says it was declared
dead, or the database was unreachable for longer than the TTL) fences itself at once: it drops
the jobs it claimed, stops starting new ones, and registers again under a fresh id.

It knows the store's fleet methods (``FleetStore``) and what the kernel hands it when built
(the clock, callbacks); it never imports the kernel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .clock import Clock
from .config import FLEET_TTL_HEARTBEATS, FleetSection, secs
from .errors import StoreError
from .records import Job, RunRecord, ScheduleState, SubmitResult

log = logging.getLogger("kernel.fleet")


@runtime_checkable
class FleetStore(Protocol):
    """The store methods fleet mode needs (``kernel.store.postgres.PostgresStore``)."""

    async def register_kernel(self, kernel_id: str, host: str, pid: int,
                              now: float | None) -> None: ...
    async def heartbeat(self, kernel_id: str, now: float | None) -> bool: ...
    async def kernels(self) -> Sequence[Any]: ...
    async def expire_kernel(self, kernel_id: str) -> Any: ...
    async def rescue_expired(self, now: float | None, ttl: float) -> Any: ...
    async def claim_due(self, owner: str, now: float, horizon: float, limit: int, *,
                        max_gpu_memory_mb: int | None = None) -> list[Job]: ...
    async def release(self, owner: str, job_ids: Sequence[str]) -> int: ...
    async def submit_claimed(self, jobs: Sequence[Job], now: float, owner: str,
                             claim_before: float, limit: int | None = None
                             ) -> tuple[list[SubmitResult], list[bool]]: ...
    async def mark_running_owned(self, owner: str, job_id: str, started_at: float,
                                 attempt: int) -> bool: ...
    async def finish_owned(self, owner: str, job_id: str, run: RunRecord,
                           follow_up: Sequence[Job] = ()) -> bool: ...
    async def fire(self, jobs: Sequence[Job], now: float, *, owner: str | None = None,
                   claim_before: float | None = None) -> list[bool]: ...
    async def purge_fired(self, before: float, batch: int = 5000) -> int: ...
    async def listen(self, wake: Callable[[], None]) -> None: ...
    async def schedule_states(self) -> dict[str, ScheduleState]: ...
    async def advance_schedule_state(self, state: ScheduleState) -> None: ...


@dataclass(frozen=True, slots=True)
class FleetSettings:
    heartbeat: float = 2.0       # seconds between heartbeats (and rescues)
    ttl: float = 10.0            # a kernel silent this long is declared dead by the others
    horizon: float = 2.0         # claim jobs due within this many seconds
    batch: int = 500             # jobs per claim
    fired_keep: float = 86_400.0  # fired occurrences are forgotten after this (> any grace)


TTL_HEARTBEATS = FLEET_TTL_HEARTBEATS
"""``[fleet] ttl`` must be at least this many heartbeats: one late heartbeat is not a death."""


@dataclass(frozen=True, slots=True)
class MemberView:
    """One kernel of the fleet, for ``/snapshot`` and the TUI."""

    id: str
    host: str
    pid: int
    heartbeat_age: float
    me: bool


def settings_from(section: FleetSection) -> FleetSettings:
    """``[fleet]`` of the configuration, in seconds (``FleetSection`` checked it: a ``ttl`` of
    at least ``TTL_HEARTBEATS`` heartbeats)."""
    d = FleetSettings()
    got = FleetSettings(heartbeat=secs(section.heartbeat) or d.heartbeat,
                        ttl=secs(section.ttl) or d.ttl,
                        horizon=secs(section.claim_horizon) or d.horizon,
                        batch=section.claim_batch)
    return got


def new_kernel_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class FleetMember:
    def __init__(self, store: FleetStore, clock: Clock, settings: FleetSettings, *,
                 on_claimed: Callable[[list[Job]], None],
                 on_fenced: Callable[[], None],
                 on_pauses: Callable[[dict[str, ScheduleState]], None],
                 max_gpu_memory_mb: Callable[[], int | None],
                 gpu_held: Callable[[], list[str]],
                 drop_queued: Callable[[Sequence[str]], object],
                 room: Callable[[], int] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.settings = settings
        self.id = new_kernel_id()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._on_claimed = on_claimed
        self._on_fenced = on_fenced
        self._on_pauses = on_pauses
        self._max_gpu = max_gpu_memory_mb
        self._gpu_held = gpu_held
        self._drop_queued = drop_queued
        # how many more jobs this kernel can start within the claim horizon (the kernel's
        # estimate: see Kernel._room); None: no limit but the claim batch
        self._room = room
        self._starved = False  # jobs may be waiting that this kernel had no room for
        self._reserved = 0     # room taken by claims in flight (take_room)
        self.fenced = True            # until join()
        self.stopping = False         # the kernel stops: claim nothing more
        self._wake = asyncio.Event()
        self._last_beat = -1.0        # monotonic instant of the last successful heartbeat
        self._held_ticks: dict[str, int] = {}
        self.members: tuple[MemberView, ...] = ()
        self._rank = -1   # this kernel's place among the live members (sorted ids); see mine()
        self._live = 0
        self.claimed = 0
        self.rescued = 0

    # ---- joining and leaving -----------------------------------------------------------------
    async def join(self) -> None:
        """Register; take back at once the jobs of this box's previous process (same host,
        its pid gone), without waiting for the TTL."""
        for k in await self.store.kernels():
            if k.host == self.host and k.id != self.id and not _alive(k.pid):
                r = await self.store.expire_kernel(k.id)
                log.info("took back %d job(s) of this box's previous kernel %s (pid %d)",
                         len(r.jobs), k.id, k.pid)
        await self.store.register_kernel(self.id, self.host, self.pid, None)
        self.fenced = False
        self._last_beat = self.clock.monotonic()
        await self.store.listen(self._wake.set)
        log.info("joined the fleet as %s", self.id)

    async def leave(self) -> None:
        """An orderly stop: give back what this kernel claimed, at once."""
        self.fenced = True
        try:
            r = await self.store.expire_kernel(self.id)
            if r.jobs:
                log.info("gave back %d claimed job(s) to the fleet", len(r.jobs))
        except StoreError as exc:
            log.warning("leaving the fleet failed (the others rescue our jobs after the TTL): "
                        "[%s] %s", exc.code, exc)

    def wake(self) -> None:
        self._wake.set()

    def claim_before(self, now: float) -> float:
        return now + self.settings.horizon

    def room(self) -> int | None:
        """How many more jobs this kernel may take now (claim at insert or claim ahead), less
        the room of claims in flight (:meth:`take_room`)."""
        return None if self._room is None else max(0, self._room() - self._reserved)

    def take_room(self) -> int | None:
        """:meth:`room`, reserved until :meth:`return_room` (once what was claimed is held
        here): claims in flight together, e.g. parallel submissions, share the room instead
        of each taking all of it."""
        room = self.room()
        if room is not None:
            self._reserved += room
        return room

    def return_room(self, room: int | None) -> None:
        if room is not None:
            self._reserved -= room

    def left_unclaimed(self) -> None:
        """Jobs this kernel had no room for were left to the fleet: claim again when it has
        room (if no other kernel took them by then)."""
        self._starved = True

    def room_freed(self) -> None:
        """Runs ended here: claim again if jobs were left for lack of room."""
        if self._starved:
            self._wake.set()

    # ---- the services ------------------------------------------------------------------------
    async def heartbeats(self) -> None:
        """Renew, fence on loss, rescue the dead, follow fleet-wide pauses, purge old fired
        occurrences now and then."""
        s = self.settings
        beats = 0
        while True:
            await self.clock.sleep(s.heartbeat)
            beats += 1
            try:
                alive = await self.store.heartbeat(self.id, None)
            except StoreError as exc:
                log.warning("heartbeat failed: [%s] %s", exc.code, exc)
                if self.clock.monotonic() - self._last_beat > s.ttl:
                    await self._fence("the database was unreachable for longer than the TTL")
                continue
            if not alive:
                await self._fence("the fleet declared this kernel dead (a missed heartbeat)")
                continue
            self._last_beat = self.clock.monotonic()
            try:
                r = await self.store.rescue_expired(None, s.ttl)
                if r.jobs or r.kernels:
                    self.rescued += len(r.jobs)
                    log.warning("rescued %d job(s) of dead kernel(s) %s (%d had started: they "
                                "run again, recovered)", len(r.jobs), ", ".join(r.kernels),
                                len(r.restarted))
                    self._wake.set()
                self._on_pauses(await self.store.schedule_states())
                await self._view()
                await self._release_gpu_held()
                if beats % 300 == 0:
                    await self.store.purge_fired(self.clock.wall() - s.fired_keep)
            except StoreError as exc:
                log.warning("fleet upkeep failed: [%s] %s", exc.code, exc)

    async def claims(self) -> None:
        """Claim jobs due within the horizon, in batches of at most the room this kernel has
        (a burst posted to one busy box is left to the idle ones); woken by NOTIFY, by runs
        ending here while jobs were left for lack of room, polling anyway."""
        s = self.settings
        while True:
            # a wake (NOTIFY, room freed, jobs left unclaimed) from here on is not lost: it
            # lets the wait below return at once
            self._wake.clear()
            got = limit = 0
            if not self.fenced and not self.stopping:
                self._starved = False  # (set again below, or by left_unclaimed meanwhile)
                room = self.take_room()
                limit = s.batch if room is None else min(s.batch, room)
                jobs: list[Job] = []
                try:
                    if limit > 0:
                        jobs = await self.store.claim_due(
                            self.id, self.clock.wall(), s.horizon, limit,
                            max_gpu_memory_mb=self._max_gpu())
                except StoreError as exc:
                    log.warning("claiming jobs failed: [%s] %s", exc.code, exc)
                finally:
                    self.return_room(room)
                got = len(jobs)
                if jobs:
                    self.claimed += got
                    self._on_claimed(jobs)
                if got >= limit:  # took all it had room for: more may wait; claim on room
                    self._starved = True
            if got >= s.batch:
                await asyncio.sleep(0)
                continue
            await self.clock.sleep_until(self.clock.monotonic() + s.horizon / 2, self._wake)

    # ---- internals ---------------------------------------------------------------------------
    async def _fence(self, why: str) -> None:
        log.error("fencing: %s; dropping the jobs this kernel claimed and registering again", why)
        self.fenced = True
        self._on_fenced()
        self.id = new_kernel_id()
        try:
            await self.store.register_kernel(self.id, self.host, self.pid, None)
        except StoreError as exc:
            log.error("registering again failed: [%s] %s", exc.code, exc)
            return
        self.fenced = False
        self._last_beat = self.clock.monotonic()
        log.info("registered again as %s", self.id)

    async def _view(self) -> None:
        try:
            ks = await self.store.kernels()
        except StoreError:
            return
        newest = max((k.heartbeat_at for k in ks), default=0.0)
        self.follow(tuple(MemberView(k.id, k.host, k.pid, max(0.0, newest - k.heartbeat_at),
                                     k.id == self.id) for k in ks))

    def follow(self, members: tuple[MemberView, ...]) -> None:
        """Take a new view of the fleet: the members, and this kernel's share of the cron
        tasks among the live ones (heartbeat younger than the TTL)."""
        self.members = members
        live = sorted(m.id for m in members if m.heartbeat_age <= self.settings.ttl)
        self._rank = live.index(self.id) if self.id in live else -1
        self._live = len(live)

    def mine(self, task_id: str) -> bool:
        """Is ``task_id`` in this kernel's share? Each kernel fires the occurrences of its own
        share first and the others' only after them, as a fallback (a fired occurrence is won
        once fleet-wide whoever fires it), so a second's herd is spread over the fleet instead
        of going whole to whichever kernel commits first. A stable hash of the task id over
        the live kernels, sorted by id; alone, or not in the view yet: every task."""
        if self._live < 2 or self._rank < 0:
            return True
        return zlib.crc32(task_id.encode()) % self._live == self._rank

    async def _release_gpu_held(self) -> None:
        """GPU jobs held here for two heartbeats go back to the fleet: another box may have
        the memory (they are claimed again by whoever can admit them)."""
        held = set(self._gpu_held())
        ticks = {jid: self._held_ticks.get(jid, 0) + 1 for jid in held}
        self._held_ticks = ticks
        give = [jid for jid, n in ticks.items() if n >= 2]
        if give:  # released first: dropped here only once the fleet has them back
            n = await self.store.release(self.id, give)
            self._drop_queued(give)
            for jid in give:
                ticks.pop(jid, None)
            log.info("gave back %d GPU job(s) this box cannot admit soon", n)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
