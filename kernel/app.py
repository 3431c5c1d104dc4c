"""The kernel's face: wiring of the rooms, the lifecycle and the public methods.

The rooms (one concept each; none imports this module):
- ``timers``: the timing wheel, pending jobs (held encoded), run deadlines, the sleep;
- ``timetable``: tasks, cron arming, misfires, pause/resume, reload diffs, the one job factory;
- ``dispatch``: which ready jobs start now (a synchronous plan);
- ``runner``: the only table of running jobs: start, call, cancel, time out, abandon, drain;
- ``completion``: a pure ``settle`` from a result to the run record, the event and follow-ups;
- ``snapshot``: the counters (a bus subscriber) and the views observers read.

One loop (``_loop``) sleeps until the timers' next deadline (or a wake-up), collects what is
due, makes cron occurrences durable in chunks, offers jobs to the dispatcher and starts its
plan. Shutdown: stop accepting and arming, let running jobs finish for ``shutdown_grace``
seconds, cancel the rest (they stay RUNNING in the store and are recovered at the next start),
abandon any that ignore the cancellation, flush and close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import completion, ids
from .clock import Clock
from .completion import Result
from .config import Config, TaskConfig, secs
from .dispatch import Dispatcher, Gate, Limits, Verdict
from .errors import (
    ErrorCode,
    GpuUnavailable,
    KernelError,
    NotFound,
    QueueFull,
    ShuttingDown,
    StoreError,
    SubmitError,
    Superseded,
)
from .events import (
    ConfigReloaded,
    EventBus,
    JobScheduled,
    JobSubmitted,
    KernelStarted,
    KernelStopping,
    MisfireDecided,
    RunCancelled,
    RunStarted,
    StoreFailed,
)
from .fleet import FleetMember, FleetStore, settings_from
from .gpu import GpuGate, GpuProbe, NvmlProbe
from .journal import SAVED, SUPERSEDED, Journal
from .plugins import PluginSet
from .records import (
    Job,
    JobState,
    Outcome,
    RunQuery,
    ScheduleState,
    SubmitResult,
)
from .requests import SubmitRequest, job_from_request
from .runner import Runner, RunningJob
from .snapshot import Counters, GpuView, QueuedView, RunningView, Snapshot, TaskView
from .store import describe as describe_store
from .store.base import Store
from .timers import Timers
from .timetable import Firing, TaskRuntime, Timetable

__all__ = [
    "Counters", "GpuView", "Kernel", "KernelParts", "QueuedView", "RunningView", "Snapshot",
    "SubmitRequest", "TaskView",
]

log = logging.getLogger("kernel")

MAINTENANCE_EVERY = 60.0
FIRE_CHUNK = 1024  # occurrences made durable and offered per store round trip
API_BIND_WAIT = 10.0  # seconds KernelStarted waits for the API to be bound
RECOVERY_REPORT_EVERY = 1.0  # seconds between progress lines while re-arming a large store
REFIRE_FIRST = 0.5  # fleet: seconds before occurrences a database failure kept are fired again
REFIRE_MAX = 30.0   # (doubling up to this while it keeps failing)
RATE_WINDOW = 0.25  # fleet: seconds over which the rate of runs ending is measured (_room)


@dataclass(slots=True)
class KernelParts:
    """Extra parts the composition root may hand in (tests pass fakes here)."""

    gates: Sequence[Gate] = ()
    gpu_probe: GpuProbe | None = None   # default: NVML (no cards where there is no GPU)
    services: Sequence[Callable[[Kernel], Coroutine[Any, Any, None]]] = ()
    rng: random.Random = field(default_factory=random.Random)
    cancel_grace: float | None = None   # default: runner.CANCEL_GRACE


@dataclass(frozen=True, slots=True)
class CancelReport:
    """What a cancel did: ``ended`` False means the run still goes (it will be abandoned)."""

    job: Job
    was: JobState
    ended: bool
    outcome: str | None = None
    error_code: str | None = None


class Kernel:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock,
        store: Store,
        plugins: PluginSet,
        bus: EventBus | None = None,
        parts: KernelParts | None = None,
    ) -> None:
        parts = parts or KernelParts()
        self.config = config
        self.clock = clock
        self.store = store
        self.plugins = plugins
        self.bus = bus or EventBus()
        self.counters = Counters()
        self.bus.subscribe(self.counters.observe)
        self.api_url: str | None = None
        self._rng = parts.rng
        self._extra_services = list(parts.services)
        self.timers = Timers(clock)
        self.timetable = Timetable(clock, self.timers, timezone=config.kernel.timezone,
                                   on_scheduled=self._scheduled)
        sched = config.scheduler
        self.gpu = GpuGate(parts.gpu_probe or NvmlProbe())
        self._dispatcher = Dispatcher(
            Limits(max_concurrency=sched.max_concurrency, queue_depth=sched.queue_depth,
                   policy=sched.policy, aging=secs(sched.aging) or 30.0,
                   concurrency_limits=dict(sched.concurrency_limits)),
            rules=self.timetable.rules, gates=[self.gpu, *parts.gates])
        runner_kw = {} if parts.cancel_grace is None else {"cancel_grace": parts.cancel_grace}
        self.runner = Runner(clock, self.timers, plugins, on_start=self._run_started,
                             on_done=self._run_done, gpu_index=self.gpu.assignment, **runner_kw)
        self._lock = asyncio.Lock()   # task changes (API, config file) go through one at a time
        self._pump_pending = False
        self._stopped = asyncio.Event()
        self._accepting = False
        self._stopping = False
        self._serving = False
        self._followups: set[asyncio.Task[None]] = set()
        # fleet: task id -> (first, last) occurrence a database failure kept from being fired
        self._unfired: dict[str, tuple[float, float]] = {}
        self._refire_wake = asyncio.Event()
        self._rate_mark = (clock.monotonic(), 0)  # (instant, runs ended by then): _room
        self._end_rate = 0.0
        self._api_bound: asyncio.Event | None = None
        self.fleet: FleetMember | None = None
        if isinstance(store, FleetStore):  # several kernels share this store: see fleet.py
            self.fleet = FleetMember(
                store, clock, settings_from(config.fleet), on_claimed=self._claimed,
                on_fenced=self._fenced, on_pauses=self._follow_pauses,
                max_gpu_memory_mb=self._gpu_capacity, gpu_held=self._gpu_held,
                drop_queued=lambda ids: self._dispatcher.remove_many(set(ids)),
                room=self._room)
        self.journal = Journal(store, clock, fleet=self.fleet, on_failed=self._store_failed)

    # ================================================================ lifecycle
    async def run(self, *, started: asyncio.Event | None = None) -> None:
        """Run until ``stop()``: recover, arm, serve, then shut down in order."""
        await self.store.open()
        beats: asyncio.Task[None] | None = None
        orderly = False  # a stop, not a failure or a cancellation (the tests' stand-in for a kill)
        try:
            if self.fleet is not None:  # jobs come by claims, not by loading the store
                await self.fleet.join()
                # from the moment it joined: a long start-up (thousands of tasks catching up)
                # must not get it declared dead by the others
                beats = asyncio.create_task(self.fleet.heartbeats(), name="fleet-heartbeats")
                beats.add_done_callback(self._heartbeats_ended)
                loaded = rerun = 0
            else:
                loaded, rerun = await self._recover()
            states = await self.store.schedule_states()
            await self._make_durable_all([self.timetable.install(tc, states.get(tc.id))
                                          for tc in self.config.tasks])
            self.timetable.rebuild_dependents()
            self._accepting = not self._stopping  # stop() may come during start-up
            started_event = KernelStarted(
                at=self.clock.wall(), data_dir=str(self.config.data_dir()),
                store=self._store_name(), api_url=None, tasks=len(self.timetable.tasks),
                recovered_jobs=loaded, rerun_jobs=rerun)
            # plugins' resources (sessions, pools) live as long as the services and runs
            async with self.plugins.lifecycle():
                await self._serve(started, started_event)
            orderly = True
        finally:
            self._accepting = False
            self._serving = False
            if beats is not None:  # no heartbeat may run after leaving: it would register again
                beats.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # (logged already)
                    await beats
            if self.fleet is not None and orderly and not self.fleet.fenced:
                await self.fleet.leave()  # give back what this kernel claimed, at once
            await self.store.close()
            self._stopped.set()

    async def _serve(self, started: asyncio.Event | None, announce: KernelStarted) -> None:
        """Services and the loop; on stop: drain the runs, settle, flush, stop the services.
        ``KernelStarted`` goes out once the services began and the API (if any) is bound, so
        it names the API's address."""
        async with asyncio.TaskGroup() as services:
            service_tasks = []
            for sub in self.plugins.subscribers:
                self.bus.subscribe(sub.handle)
                service_tasks.append(services.create_task(
                    self._guarded(type(sub).__name__, sub.run())))
            service_tasks.append(services.create_task(self._maintenance()))
            service_tasks.append(services.create_task(self.journal.keep_saving()))
            if self.fleet is not None:  # (its heartbeats began at join: see run)
                service_tasks.append(services.create_task(self.fleet.claims()))
                service_tasks.append(services.create_task(self._refire()))
            for svc in self._extra_services:
                service_tasks.append(services.create_task(svc(self)))
            await asyncio.sleep(0)  # let the services begin (the API announces itself)
            if self._api_bound is not None:
                try:
                    async with asyncio.timeout(API_BIND_WAIT):
                        await self._api_bound.wait()
                except TimeoutError:
                    log.warning("the HTTP API was not listening %g s after start", API_BIND_WAIT)
            self.bus.publish(msgspec.structs.replace(announce, at=self.clock.wall(),
                                                     api_url=self.api_url))
            if started is not None:
                started.set()
            self._serving = True
            self._pump()
            await self._loop()
            self._serving = False
            stuck = await self.runner.drain(secs(self.config.kernel.shutdown_grace) or 0.0)
            if stuck:
                log.error("%d run(s) ignored their cancellation and were abandoned; they are "
                          "run again at the next start", len(stuck))
            await self._settle_followups()
            await self.journal.flush()
            for t in service_tasks:
                t.cancel()

    def stop(self, reason: str = "requested") -> None:
        """Begin an orderly shutdown (safe to call from a signal handler's callback)."""
        if self._stopping:
            return
        self._stopping = True
        self._accepting = False
        self.timetable.stopped = True
        if self.fleet is not None:
            self.fleet.stopping = True
        self.bus.publish(KernelStopping(at=self.clock.wall(), reason=reason))
        self.timers.wake()

    def expect_api(self) -> None:
        """An API service calls this as it begins: ``KernelStarted`` waits until it is bound."""
        self._api_bound = asyncio.Event()

    def api_listening(self, url: str) -> None:
        """The API service is bound at ``url``."""
        self.api_url = url
        if self._api_bound is not None:
            self._api_bound.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _guarded(self, name: str, work: Awaitable[None]) -> None:
        """A plugin's background work: its failure is logged, never fatal to the kernel."""
        try:
            await work
        except Exception:
            log.exception("plugin service %s failed; the kernel carries on without it", name)

    async def _recover(self) -> tuple[int, int]:
        count = rerun = 0
        wall = self.clock.wall()
        t0 = shown = self.clock.monotonic()
        async for batch in self.store.load_pending():
            for job in batch:
                if job.state is JobState.RUNNING:
                    job.attempt += 1
                    job.recovered = True
                    job.state = JobState.PENDING
                    rerun += 1
                if not math.isfinite(job.due_at):  # written by an older, laxer version
                    job.due_at = wall
                count += 1
            self.timers.arm_jobs(batch)
            now = self.clock.monotonic()
            if now - shown >= RECOVERY_REPORT_EVERY:  # a large store takes seconds: say so
                shown = now
                log.info("recovering: %d pending job(s) armed so far (%.0f s)", count, now - t0)
        if count:
            log.info("recovered %d pending job(s) (%d were running at the last stop)",
                     count, rerun)
        return count, rerun

    # ================================================================ the loop
    async def _loop(self) -> None:
        timers = self.timers
        while not self._stopping:
            await timers.wait()
            if self._stopping:
                break
            if timers.wall_stepped():
                for state in self.timetable.rearm_all():
                    await self._save_state(state)
            due = timers.expire()
            for r in due.runs:
                assert isinstance(r, RunningJob)
                self.runner.expired(r)
            if due.jobs:
                self._hold(due.jobs)
            if due.ticks:
                await self._on_ticks(due.ticks)
            self._pump()

    async def _on_ticks(self, ticks: list[Any]) -> None:
        tt = self.timetable
        fire, stale = tt.sort_ticks(ticks, self.clock.wall())
        # a herd of occurrences (thousands of tasks on one instant) goes in chunks: the first
        # runs start after one store round trip, not after the whole herd is durable. In a
        # fleet this kernel's share of the tasks goes first, the others' after it (a fallback
        # for a kernel that is slow or gone): each kernel wins and runs about its share
        parts = [fire]
        if self.fleet is not None and len(fire) > 1:
            mine = self.fleet.mine
            own: list[tuple[TaskRuntime, float]] = []
            others: list[tuple[TaskRuntime, float]] = []
            for o in fire:
                (own if mine(o[0].cfg.id) else others).append(o)
            parts = [own, others]
        chunks = [part[i:i + FIRE_CHUNK] for part in parts
                  for i in range(0, len(part), FIRE_CHUNK)]
        for chunk in chunks:
            await self._fire(chunk, overlap=True)
            self._pump()
            await asyncio.sleep(0)  # let the runs just started go (a store may not yield)
            wall = self.clock.wall()
            for rt, at in chunk:
                f = tt.after_fired(rt, at, wall)
                if f:
                    await self._make_durable(f)
        wall = self.clock.wall()
        for rt, at in stale:
            f = tt.stale(rt, at, wall)
            if f:
                await self._make_durable(f)

    async def _make_durable_all(self, firings: list[Firing]) -> None:
        """:meth:`_make_durable` for many tasks at once (start-up, reload): the misfire records
        and the states as concurrent writes (the store commits them in groups), the
        occurrences in chunks of ``FIRE_CHUNK``. Per task the order stays: misfire, occurrences,
        state."""
        fs = [f for f in firings if f]
        misfires = [f.misfire for f in fs if f.misfire is not None]
        if misfires:
            await self._writes([self.store.record_misfire(m) for m in misfires])
            for m in misfires:
                self.bus.publish(MisfireDecided(at=self.clock.wall(), record=m))
        for overlap in (True, False):
            occ = [o for f in fs if f.overlap is overlap for o in f.occurrences]
            for i in range(0, len(occ), FIRE_CHUNK):
                await self._fire(occ[i:i + FIRE_CHUNK], overlap=overlap)
        states = [f.state for f in fs if f.state is not None]
        if states:
            await self._writes([self._progress_write(st) for st in states])

    async def _writes(self, writes: list[Coroutine[Any, Any, None]]) -> None:
        """Await store writes together; a refused one is reported, the others still count."""
        for r in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(r, StoreError):
                self._store_failed(r)
            elif isinstance(r, BaseException):
                raise r

    async def _make_durable(self, f: Firing) -> None:
        """Carry out a timetable decision: record the misfire, fire, save the state."""
        if f.misfire is not None:
            try:
                await self.store.record_misfire(f.misfire)
            except StoreError as exc:
                self._store_failed(exc)
            self.bus.publish(MisfireDecided(at=self.clock.wall(), record=f.misfire))
        if f.occurrences:
            await self._fire(f.occurrences, overlap=f.overlap)
        if f.state is not None:
            await self._save_state(f.state)

    async def _refire(self) -> None:
        """A fleet service: occurrences a database failure kept from being fired are decided
        again once it answers, as occurrences missed while the kernel was down are: each
        task's misfire policy over the window from its earliest unfired occurrence to now (so
        ``catch_up`` runs them late, ``coalesce`` once, ``skip`` records them). Occurrences in
        that window fired meanwhile, here or elsewhere, are not run again: the fleet keys them
        by task and instant. Tried again with backoff while the database still fails."""
        delay = REFIRE_FIRST
        while True:
            if not self._unfired:
                self._refire_wake.clear()
                await self._refire_wake.wait()
                delay = REFIRE_FIRST
                continue
            await self.clock.sleep(delay)
            behind, self._unfired = self._unfired, {}
            tt = self.timetable
            wall = self.clock.wall()
            firings = []
            for task_id, (first, last) in behind.items():
                rt = tt.tasks.get(task_id)
                if rt is not None and rt.schedule is not None and not rt.paused:
                    # up to the last kept one: those after it were fired as usual
                    firings.append(tt.misfires(rt, first - 0.001, wall, until=last))
            await self._make_durable_all(firings)
            for task_id in self._unfired.keys() & behind.keys():  # failed again: same window
                self._keep_unfired(task_id, *behind[task_id])
            delay = min(delay * 2, REFIRE_MAX) if self._unfired else REFIRE_FIRST

    def _keep_unfired(self, task_id: str, first: float, last: float) -> None:
        """Widen a task's window of occurrences kept from being fired (see _refire)."""
        old = self._unfired.get(task_id)
        self._unfired[task_id] = (first, last) if old is None else (min(old[0], first),
                                                                   max(old[1], last))

    def _heartbeats_ended(self, task: asyncio.Task[None]) -> None:
        """The heartbeat service ends only when cancelled. Anything else is a bug: without
        heartbeats the fleet declares this kernel dead after the TTL and it can neither claim
        nor start, so it stops (its supervisor restarts it) rather than serve as a zombie."""
        if not task.cancelled() and task.exception() is not None:
            log.critical("the fleet heartbeat service failed; stopping the kernel",
                         exc_info=task.exception())
            self.stop("the fleet heartbeat service failed")

    def _progress_write(self, state: ScheduleState) -> Coroutine[Any, Any, None]:
        """Store a task's progress (not a pause or resume: those are ``pause``/``resume``).
        In a fleet it never touches the stored paused flag: another kernel may have paused the
        task since this one last followed the stored states."""
        if self.fleet is not None:
            return self.fleet.store.advance_schedule_state(state)
        return self.store.set_schedule_state(state)

    async def _save_state(self, state: ScheduleState) -> None:
        try:
            await self._progress_write(state)
        except StoreError as exc:
            self._store_failed(exc)

    async def _fire(self, occ: list[tuple[TaskRuntime, float]], *, overlap: bool) -> None:
        """Turn occurrences into durable CRON jobs (one batch) and offer the ones to run here."""
        wall = self.clock.wall()
        jobs = self.timetable.occurrence_jobs(occ, wall)
        if not jobs:
            return
        run_here = await self.journal.occurrences(jobs, wall)
        if run_here is None:  # fleet, database failed: fired again by policy (_refire)
            for rt, at in occ:
                self._keep_unfired(rt.cfg.id, at, at)
            self._refire_wake.set()
            return
        now_mono = self.clock.monotonic()
        for job in run_here:
            self._submitted(job, wall)
            self._offer(job, now_mono, occurrence=overlap)

    def _offer(self, job: Job, now_mono: float, *, occurrence: bool = False) -> None:
        decision = self._dispatcher.offer(job, now_mono, occurrence=occurrence,
                                          concurrency_key=self._concurrency_key(job))
        if decision.verdict is Verdict.SKIPPED:
            # the dispatcher's per-task count, not running_of(): that scans every running job,
            # once per skipped occurrence (12 % of a 100k-task herd on SQLite)
            running = self._dispatcher.running_count(job.task_id or "")
            reason = ("another run of the task is still going" if running
                      else "a run of the task is already waiting to start")
            self._finish_unrun(job, Result(Outcome.SKIPPED, ErrorCode.ERR_SKIPPED_OVERLAP,
                                           f"{reason} (overlap policy)"))
        elif decision.verdict is Verdict.CANCEL_RUNNING:
            for jid in decision.cancel:
                r = self.runner.get(jid)
                if r is not None:
                    self.runner.cancel(r, "overlap")
            for old in decision.dropped:
                self._finish_unrun(old, Result(
                    Outcome.CANCELLED, ErrorCode.ERR_CANCELLED,
                    "superseded by a newer occurrence (cancel_other)"))

    def _concurrency_key(self, job: Job) -> str | None:
        """The action's own key for a job (e.g. its model endpoint), if it defines one."""
        action = self.plugins.actions.get(job.action)
        if action is None or action.concurrency_key is None:
            return None
        try:
            return action.concurrency_key(self.plugins.decode_payload(action, job.payload))
        except Exception:  # a bad payload fails when it runs, with its own error code
            return None

    def _pump(self) -> None:
        if self._stopping or not self._serving:
            return
        start = self.runner.start
        timeout_for = self._timeout_for
        for job in self._dispatcher.plan(self.clock.monotonic()):
            start(job, timeout_for(job))

    def _pump_soon(self) -> None:
        """Plan once for all the runs that finish in this turn of the event loop."""
        if not self._pump_pending:
            self._pump_pending = True
            asyncio.get_running_loop().call_soon(self._pump_later)

    def _pump_later(self) -> None:
        self._pump_pending = False
        self._pump()
        if self.fleet is not None:
            self.fleet.room_freed()

    def _room(self) -> int:
        """Fleet: how many more jobs this kernel can start within the claim horizon, and so
        claims (at insert or ahead): its slots plus the runs it ends per second times the
        horizon, less what it holds (running, queued, claimed ahead). A kernel that runs short
        jobs fast takes a burst at insert; one whose slots are held by long runs takes what
        it has slots for and leaves the rest of a burst to the other boxes. Queued jobs that a
        limit or gate holds back (a concurrency key, GPU memory) hold no slot: not counted."""
        assert self.fleet is not None
        now = self.clock.monotonic()
        t0, n0 = self._rate_mark
        if now - t0 >= RATE_WINDOW:  # runs ended per second, over the last window
            n = self._dispatcher.ended
            self._end_rate = (n - n0) / (now - t0)
            self._rate_mark = (now, n)
        soon = (self._dispatcher.limits.max_concurrency
                + int(self._end_rate * self.fleet.settings.horizon))
        return soon - (len(self.runner) + self._dispatcher.waiting_for_a_slot
                       + self.timers.pending_jobs)

    def _timeout_for(self, job: Job) -> float | None:
        if job.timeout is not None:
            return job.timeout
        rt = self.timetable.tasks.get(job.task_id) if job.task_id else None
        if rt is not None and rt.timeout is not None:
            return rt.timeout
        return self.config.scheduler.timeout_sec

    # ================================================================ one run
    async def _run_started(self, r: RunningJob) -> None:
        job = r.job
        r.owner = self.fleet.id if self.fleet is not None else None
        try:
            await self.journal.started(job, r.started_wall, r.owner)
        except (Superseded, StoreError):
            r.start_failed = True  # the action does not start: _run_done decides what next
            raise
        self.bus.publish(RunStarted(
            at=r.started_wall, job_id=job.id, task_id=job.task_id, action=job.action,
            trace_id=job.trace_id, span_id=r.span_id, attempt=job.attempt,
            scheduled_at=job.scheduled_at, lateness=max(0.0, r.started_wall - job.due_at),
            recovered=job.recovered))

    async def _run_done(self, r: RunningJob, res: Result, shutdown: bool) -> None:
        job = r.job
        duration = self.clock.monotonic() - r.started_mono
        if r.start_failed:  # fleet: never started; not ours any more, or try again shortly
            self._dispatcher.finished(job)
            if res.code is not ErrorCode.ERR_SUPERSEDED:
                log.warning("could not check the ownership of job %s (%s): held again for 1 s",
                            job.id, res.detail)
                job.state = JobState.PENDING
                job.due_at = self.clock.wall() + 1.0
                self.timers.arm_job(job)
            self._pump_soon()
            return
        if shutdown:  # stays RUNNING in the store: run again (recovered) at the next start
            self._dispatcher.finished(job)
            self.bus.publish(RunCancelled(at=self.clock.wall(), run=completion.record(
                job, r.span_id, res, r.started_wall, self.clock.wall()), duration=duration))
            return
        await self._settle(job, r.span_id, res, r.started_wall, duration, owner=r.owner)

    async def _settle(self, job: Job, span: str, res: Result, started: float | None,
                      duration: float, *, owner: str | None = None) -> None:
        tt = self.timetable
        rt = tt.tasks.get(job.task_id) if job.task_id else None
        s = completion.settle(
            job, span, res, started=started, now=self.clock.wall(), duration=duration,
            retry=rt.cfg.retry if rt is not None else None, rng=self._rng, new_id=ids.job_id,
            dependents=tt.dependent_jobs)
        follow = s.follow

        def arm() -> None:  # follow-ups run only once the outcome that made them is durable
            if self.fleet is None:  # in a fleet they wait in the database for whoever claims
                self.timers.arm_jobs(follow)
            else:
                self.fleet.wake()

        saved = await self.journal.finished(job.id, s.run, follow, owner=owner, on_saved=arm)
        self._dispatcher.finished(job)
        if saved == SUPERSEDED:  # fleet: the job was rescued meanwhile; its new owner decides
            log.warning("the outcome of job %s is recorded as superseded: another kernel "
                        "owns it now; its follow-ups are dropped here", job.id)
            self.bus.publish(s.event)
            self._pump_soon()
            return
        if rt is not None and tt.is_current(rt):
            rt.last_outcome = s.run.outcome.value
            rt.last_error_code = s.run.error_code
            rt.last_finished_at = s.run.finished_at
        wall = s.run.finished_at
        for j in s.follow:
            self._submitted(j, wall)
        self.bus.publish(s.event)
        if saved == SAVED:
            arm()
        for dep in s.skipped:
            await self._skip_dependent(dep, job)
        self._pump_soon()

    async def _skip_dependent(self, dep: Job, upstream: Job) -> None:
        """Record ``dep`` as skipped because ``upstream`` failed (and its dependents, in turn)."""
        try:
            await self.journal.new_jobs([dep], self.clock.wall(), claim_all=True)
        except StoreError as exc:
            self._store_failed(exc)
        self._submitted(dep, self.clock.wall())
        await self._settle(dep, ids.span_id(), completion.dependency_failed(upstream),
                           self.clock.wall(), 0.0)

    def _finish_unrun(self, job: Job, res: Result) -> None:
        """Record a job that will not run (skipped by overlap, superseded)."""
        self._follow_up(self._record_unrun(job, res))

    async def _record_unrun(self, job: Job, res: Result) -> None:
        run = completion.record(job, ids.span_id(), res, None, self.clock.wall())
        await self.journal.finished(job.id, run, [])
        self.bus.publish(completion.event_for(run, 0.0))

    def _follow_up(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._followups.add(task)
        task.add_done_callback(self._followups.discard)

    async def _settle_followups(self) -> None:
        while self._followups:
            await asyncio.wait(list(self._followups))

    @property
    def unsaved(self) -> int:
        """Outcomes the store has not taken yet (kept in memory, written again with backoff)."""
        return self.journal.unsaved

    # ================================================================ public API
    async def submit(self, req: SubmitRequest) -> SubmitResult:
        return (await self.submit_many([req]))[0]

    async def submit_many(self, reqs: Sequence[SubmitRequest]) -> list[SubmitResult]:
        """Validate, persist (acknowledged only after commit), then arm. All or nothing."""
        if not self._accepting:
            raise ShuttingDown("the kernel is not accepting jobs (starting or stopping)")
        wall = self.clock.wall()
        ttl = secs(self.config.store.dedup_ttl)
        jobs = []
        for i, req in enumerate(reqs):
            try:
                job = job_from_request(req, self.plugins, wall, default_dedup_ttl=ttl)
                if job.gpu_memory_mb:
                    self._check_gpu(job.gpu_memory_mb, job.gpu)
                jobs.append(job)
            except SubmitError as exc:
                if len(reqs) > 1:
                    raise type(exc)(f"item {i}: {exc.message}") from None
                raise
        due_now = sum(1 for j in jobs if j.due_at <= wall)
        if due_now and self._dispatcher.queued + due_now > self.config.scheduler.queue_depth:
            raise QueueFull(
                f"the ready queue is full ({self._dispatcher.queued} of "
                f"{self.config.scheduler.queue_depth} waiting); nothing was stored")
        results, mine = await self.journal.new_jobs(jobs, wall)
        self._accept(results, mine)
        return results

    def _accept(self, results: list[SubmitResult], mine: list[Job]) -> None:
        """Jobs just made durable: every new one is announced; of those this kernel holds, due
        ones go straight to the ready queue, others to the wheel."""
        wall = self.clock.wall()
        for r in results:
            if not r.existed:
                self._submitted(r.job, wall)
        self._hold(mine)

    def _claimed(self, jobs: list[Job]) -> None:
        """Jobs the fleet member claimed (submitted elsewhere, rescued, follow-ups). A job
        still running here (this kernel was fenced and its own job rescued back to it) is not
        held twice: its run goes on, and its outcome is recorded as superseded."""
        self._hold(jobs)

    def _hold(self, jobs: list[Job]) -> None:
        """Due jobs to the ready queue, later ones to the timers. A job whose id still runs
        here (fleet: this kernel was fenced and its own job came back to it) waits until that
        run ends: the running table holds one run per job."""
        wall = self.clock.wall()
        mono = self.clock.monotonic()
        running = self.runner.running
        for job in jobs:
            if job.id in running:
                job.due_at = max(job.due_at, wall + 1.0)
                self.timers.arm_job(job)
            elif job.due_at <= wall:
                self._offer(job, mono)
            else:
                self.timers.arm_job(job)
        self._pump()

    def _submitted(self, job: Job, wall: float) -> None:
        self.bus.publish(JobSubmitted(
            at=wall, job_id=job.id, task_id=job.task_id, action=job.action, kind=job.kind,
            due_at=job.due_at, trace_id=job.trace_id))

    def _scheduled(self, task_id: str, due_at: float, wall: float) -> None:
        self.bus.publish(JobScheduled(at=wall, task_id=task_id, due_at=due_at))

    def _check_gpu(self, need_mb: int, gpu: int | None) -> None:
        """Refuse a GPU job that can never run here (or any, when configured to refuse)."""
        why = self.gpu.never_fits(need_mb, gpu)
        if why is None and self.config.scheduler.gpu_unavailable.value == "refuse":
            if not self.gpu.probe.gpus():
                why = self.gpu.probe.unavailable_reason or "no GPU"
        if why is not None:
            raise GpuUnavailable(f"gpu_memory_mb: {why}")

    async def cancel(self, job_id: str) -> Job:
        """Cancel a pending, queued or running job. Raises NotFound."""
        job = self.timers.take_job(job_id)
        if job is None:
            job = self._dispatcher.remove(job_id)
        if job is not None:
            run = completion.record(job, ids.span_id(), Result(
                Outcome.CANCELLED, ErrorCode.ERR_CANCELLED, "cancelled by request"), None,
                self.clock.wall())
            try:
                await self.store.cancel(job_id, run)
            except StoreError:
                self._hold([job])  # not cancelled: it stays held and runs as it would have
                raise
            self.bus.publish(RunCancelled(at=run.finished_at, run=run, duration=0.0))
            return job
        r = self.runner.get(job_id)
        if r is not None:
            self.runner.cancel(r, "request")
            return r.job
        stored = await self.store.get_job(job_id)
        if stored is not None:  # stored, not held here (fleet: another kernel's or unclaimed)
            run = completion.record(stored, ids.span_id(), Result(
                Outcome.CANCELLED, ErrorCode.ERR_CANCELLED, "cancelled by request"), None,
                self.clock.wall())
            await self.store.cancel(job_id, run)
            self.bus.publish(RunCancelled(at=run.finished_at, run=run, duration=0.0))
            return stored
        raise NotFound(f"no pending or running job {job_id!r}")

    async def cancel_and_wait(self, job_id: str) -> CancelReport:
        """``cancel``, and for a running job wait (at most the cancel grace, on the kernel's
        clock) until its outcome is recorded, to report what really happened: cancelled,
        abandoned (it ignored the cancellation), or finished anyway (it ended first)."""
        r = self.runner.get(job_id)
        job = await self.cancel(job_id)
        if r is None and job.state is JobState.RUNNING and self.fleet is not None:
            # running on another kernel: it is not run again, but this kernel cannot stop it
            # there (its outcome will be recorded as superseded); it is still running
            return CancelReport(job=job, was=JobState.RUNNING, ended=False)
        if r is None or r.job is not job:
            return CancelReport(job=job, was=job.state, ended=True,
                                outcome=Outcome.CANCELLED.value,
                                error_code=ErrorCode.ERR_CANCELLED.value)
        ended = r.ended()
        await self.clock.sleep_until(self.clock.monotonic() + self.runner.cancel_grace + 0.5,
                                     ended)
        if not ended.is_set():
            return CancelReport(job=job, was=JobState.RUNNING, ended=False)
        runs = await self.store.query_runs(RunQuery(job_id=job_id, limit=1))
        last = runs[0] if runs else None
        return CancelReport(job=job, was=JobState.RUNNING, ended=True,
                            outcome=last.outcome.value if last else None,
                            error_code=last.error_code if last else None)

    async def get_job(self, job_id: str) -> Job | None:
        job = self.timers.peek_job(job_id)
        if job is not None:
            return job
        r = self.runner.get(job_id)
        if r is not None:
            return r.job
        return await self.store.get_job(job_id)

    async def pause(self, task_id: str) -> None:
        async with self._lock:  # not between a reload's read of the states and its install
            await self.store.set_schedule_state(self.timetable.pause(task_id))

    async def resume(self, task_id: str) -> None:
        async with self._lock:
            await self.store.set_schedule_state(self.timetable.resume(task_id))

    async def trigger(self, task_id: str, payload: dict[str, Any] | None = None) -> Job:
        """Run a task now, outside its schedule."""
        job = self.timetable.trigger_job(task_id, payload, self.clock.wall())
        self.plugins.decode_payload(self.plugins.action(job.action), job.payload)
        if job.gpu_memory_mb:
            self._check_gpu(job.gpu_memory_mb, job.gpu)
        return (await self._submit_task_jobs([job]))[0]

    async def backfill(self, task_id: str, start: float, end: float) -> list[Job]:
        """Run the task's occurrences in ``[start, end]`` (Temporal's backfill)."""
        return await self._submit_task_jobs(
            self.timetable.backfill_jobs(task_id, start, end, self.clock.wall()))

    async def _submit_task_jobs(self, jobs: list[Job]) -> list[Job]:
        if not self._accepting:
            raise ShuttingDown("the kernel is not accepting jobs (starting or stopping)")
        if not jobs:
            return []
        results, mine = await self.journal.new_jobs(jobs, self.clock.wall())
        self._accept(results, mine)
        return [r.job for r in results]

    async def reload(self, new: Config, source: str = "reload") -> ConfigReloaded:
        """Apply a validated config's tasks: arm added, disarm removed, re-arm changed ones.
        Runs in flight finish under the definition they started with."""
        async with self._lock:
            return await self._reload(new, source)

    async def edit_tasks(self, edit: Callable[[list[TaskConfig]], list[TaskConfig]],
                         source: str, check: Callable[[Config], None]) -> ConfigReloaded:
        """Change the task list under the same lock as a reload: ``edit`` gets the current
        tasks and returns the new list; ``check`` validates the resulting config (raising a
        KernelError) before anything changes."""
        async with self._lock:
            new = msgspec.structs.replace(self.config, tasks=edit(list(self.config.tasks)))
            check(new)
            return await self._reload(new, source)

    async def _reload(self, new: Config, source: str) -> ConfigReloaded:
        tt = self.timetable
        diff = tt.diff(self.config, new)
        fresh = {t.id: t for t in new.tasks}
        states = await self.store.schedule_states()
        now = self.clock.wall()
        for tid in diff.new_timetable:
            # a new timetable starts now: its instants before the reload were never due
            st = states.get(tid)
            states[tid] = ScheduleState(
                task_id=tid, paused=st.paused if st else False,
                last_scheduled_at=max(now, (st.last_scheduled_at if st else None) or now))
        # a new config object: code that holds the old one (a run in flight) keeps it intact
        self.config = msgspec.structs.replace(
            self.config, tasks=list(new.tasks),
            kernel=msgspec.structs.replace(self.config.kernel, timezone=new.kernel.timezone))
        tt.timezone = new.kernel.timezone
        for tid in diff.removed:
            tt.remove(tid)
        await self._make_durable_all([tt.install(fresh[tid], states.get(tid))
                                      for tid in diff.added + diff.changed])
        tt.rebuild_dependents()
        self._pump()
        ev = ConfigReloaded(at=self.clock.wall(), source=source, added=diff.added,
                            removed=diff.removed, changed=diff.changed)
        self.bus.publish(ev)
        log.info("config reloaded from %s: added %s, removed %s, changed %s",
                 source, diff.added or "-", diff.removed or "-", diff.changed or "-")
        return ev

    def report_reload_error(self, source: str, error: KernelError) -> ConfigReloaded:
        ev = ConfigReloaded(at=self.clock.wall(), source=source, added=[], removed=[],
                            changed=[], error=str(error))
        self.bus.publish(ev)
        log.error("config reload from %s rejected; the old configuration keeps running:\n%s",
                  source, error)
        return ev

    def snapshot(self) -> Snapshot:
        runs = self.runner.views(self.clock.monotonic())
        tasks = self.timetable.views(Counter(r.task_id for r in runs if r.task_id))
        gpus = tuple(GpuView(c.index, c.name, c.total_mb, c.free_mb, reserved,
                             c.utilization_pct) for c, reserved in self.gpu.views())
        d = self._dispatcher
        return Snapshot(at=self.clock.wall(), tasks=tasks, running=runs,
                        queued=d.queued, timers=len(self.timers),
                        pending_jobs=self.timers.pending_jobs, counters=self.counters,
                        max_concurrency=self.config.scheduler.max_concurrency,
                        queue_depth=self.config.scheduler.queue_depth, gpus=gpus,
                        gpu_note=self.gpu.probe.unavailable_reason,
                        queued_jobs=tuple(
                            QueuedView(j.id, j.task_id, j.action, j.priority, d.held_reason(j.id))
                            for j in d.queued_jobs()[:50]),
                        kernel_id=self.fleet.id if self.fleet else None,
                        fleet=self.fleet.members if self.fleet else (), unsaved=self.journal.unsaved)

    @property
    def dispatcher(self) -> Dispatcher:
        return self._dispatcher

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ================================================================ fleet callbacks
    def _fenced(self) -> None:
        """This kernel lost its place in the fleet: give up every job it holds but has not
        started (runs in flight finish; their outcomes are recorded as superseded)."""
        dropped = self.timers.drop_jobs() + len(self._dispatcher.remove_many(None))
        log.error("fenced: dropped %d claimed job(s); they are rescued by the fleet", dropped)

    def _follow_pauses(self, states: dict[str, ScheduleState]) -> None:
        """Pause and resume are fleet-wide: follow what another kernel stored."""
        tt = self.timetable
        for tid, rt in tt.tasks.items():
            st = states.get(tid)
            if st is None or st.paused == rt.paused:
                continue
            if st.paused:
                tt.pause(tid)
            else:
                tt.resume(tid)

    def _gpu_capacity(self) -> int:
        """The largest GPU job this box could ever run (claims skip bigger ones)."""
        return max((c.total_mb for c in self.gpu.probe.gpus()), default=0)

    def _gpu_held(self) -> list[str]:
        return [jid for jid, why in self._dispatcher.held().items() if "GPU" in why]

    # ================================================================ helpers
    def _store_failed(self, exc: StoreError) -> None:
        log.error("store error [%s]: %s", exc.code, exc)
        self.bus.publish(StoreFailed(at=self.clock.wall(), error_code=exc.code.value,
                                     message=str(exc)))

    def _store_name(self) -> str:
        st = self.config.store
        return describe_store(st.backend, self.config.store_path(), st.dsn, st.schema)

    async def _maintenance(self) -> None:
        st = self.config.store
        while True:
            await self.clock.sleep(MAINTENANCE_EVERY)
            now = self.clock.wall()
            try:
                await self.store.prune_history(now, max_rows=st.history_max_rows,
                                               max_age=secs(st.history_max_age))
                await self.store.purge_dedup(now)
            except StoreError as exc:
                self._store_failed(exc)
