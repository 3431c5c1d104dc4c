"""The kernel: wiring of clock, wheel, store, dispatcher, plugins and events, and its lifecycle.

The ``Kernel`` holds no scheduling policy of its own: the wheel says what is due, the dispatcher
says what starts, the store makes it durable, actions do the work, observers watch the bus.

One loop (``_timer_loop``) sleeps until the wheel's next deadline (or a wake-up), collects what is
due, persists cron occurrences in one batch, offers jobs to the dispatcher and starts its plan.
Every run is a task in the ``runs`` TaskGroup; services (maintenance, plugin subscribers, the API
server, the config watcher) live in the ``services`` TaskGroup. Shutdown: stop accepting and
arming, let running jobs finish for ``shutdown_grace`` seconds, cancel the rest (they stay
RUNNING in the store and are recovered at the next start), close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from math import inf
from typing import Any

import msgspec

from . import ids
from .clock import Clock
from .config import Config, Misfire, TaskConfig, secs
from .dispatch import Dispatcher, Gate, Limits, TaskRules, Verdict
from .errors import (
    ActionError,
    ActionNotFound,
    BadPayload,
    ErrorCode,
    GpuUnavailable,
    KernelError,
    NotFound,
    QueueFull,
    Retry,
    ShuttingDown,
    StoreError,
    SubmitError,
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
    RunFailed,
    RunFinished,
    RunSkipped,
    RunStarted,
    RunSucceeded,
    RunTimedOut,
    StoreFailed,
)
from .gpu import GpuGate, GpuProbe, NvmlProbe
from .hookspecs import RunContext
from .misfire import plan_misfires
from .plugins import PluginSet
from .records import Job, JobKind, JobState, Outcome, RunRecord, ScheduleState, SubmitResult
from .retry import retry_delay
from .store.base import Store
from .triggers import Schedule, ScheduleCache
from .wheel import TimingWheel

log = logging.getLogger("kernel")

DETAIL_MAX = 2048
MAINTENANCE_EVERY = 60.0
BACKFILL_MAX = 10_000
_KEEP_EMPTY_GROUPS = 64  # empty timeout groups kept for reuse (a run per group costs a dict)
WALL_CHECK_EVERY = 30.0  # seconds between looks at the wall clock while timers are armed
WALL_JUMP = 1.0  # a change of wall - monotonic larger than this is a step of the wall clock
FIRE_CHUNK = 1024  # occurrences made durable and offered per store round trip
# Garbage collector tuning while the kernel runs (KernelParts.gc_tuning): every run allocates a
# dozen GC-tracked objects (task, coroutine, context, records), so CPython's default first
# threshold (700) collects every ~60 runs and, worse, the oldest generation is re-scanned
# whenever it has grown by a quarter, which with a million armed jobs is ~0.3 s a time.
GC_GEN0_THRESHOLD = 20_000
GC_FREEZE_MIN = 10_000  # at start-up, with this many timers armed: collect once, then freeze


class SubmitRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A one-shot job submission (Python API, HTTP ``POST /jobs``, CLI ``submit``)."""

    action: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    delay: float | None = None     # seconds from now
    at: float | None = None        # wall instant (epoch seconds); exclusive with delay
    dedup_key: str | None = None
    dedup_ttl: float | None = None  # seconds; default [store] dedup_ttl
    priority: int = 0
    timeout: float | None = None
    traceparent: str | None = None
    gpu_memory_mb: int = 0
    gpu: int | None = None


@dataclass(slots=True)
class TaskRuntime:
    cfg: TaskConfig
    schedule: Schedule | None
    rules: TaskRules = field(default_factory=TaskRules)
    timeout: float | None = None       # cfg's durations in seconds, decoded once
    grace: float = 0.0
    jitter: float = 0.0
    paused: bool = False
    handle: int | None = None
    next_due: float | None = None      # wall instant of the armed occurrence
    last_scheduled_at: float | None = None
    last_outcome: str | None = None
    last_error_code: str | None = None
    last_finished_at: float | None = None
    generation: int = 0


class _Tick:
    """A wheel item: task ``task_id``'s occurrence at wall instant ``at``."""

    __slots__ = ("at", "generation", "task_id")

    def __init__(self, task_id: str, at: float, generation: int) -> None:
        self.task_id = task_id
        self.at = at
        self.generation = generation


@dataclass(slots=True)
class Counters:
    submitted: int = 0
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    skipped: int = 0
    recovered: int = 0
    misfired: int = 0


@dataclass(slots=True)
class _Outcome:
    outcome: Outcome
    code: ErrorCode | None = None
    detail: str = ""
    retryable: bool = False
    retry_after: float | None = None


@dataclass(slots=True)
class _RunningJob:
    job: Job
    task: asyncio.Task[None]
    span_id: str
    started_mono: float
    timeout: float | None
    cancel_reason: str | None = None
    deadline: float = inf        # monotonic instant its action times out (when it has a timeout)
    in_action: bool = False      # awaiting the action (a timeout may cancel only then)
    timed_out: bool = False


class _Deadlines:
    """Timeouts of running actions: for each distinct timeout length, the running jobs in start
    order, which is deadline order (the clock is monotonic). Adding, removing and finding the
    earliest are O(1), and only running jobs are held: a finished run leaves nothing behind
    (no cancelled timer, no asyncio ``TimerHandle``, no helper task)."""

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        self._groups: dict[float, OrderedDict[str, _RunningJob]] = {}

    def add(self, r: _RunningJob, length: float, now: float) -> float:
        g = self._groups.get(length)
        if g is None:
            g = self._groups[length] = OrderedDict()
        r.deadline = now + length
        g[r.job.id] = r
        return r.deadline

    def remove(self, r: _RunningJob, length: float) -> None:
        g = self._groups.get(length)
        if g is not None:
            g.pop(r.job.id, None)
            if not g and len(self._groups) > _KEEP_EMPTY_GROUPS:
                del self._groups[length]

    def next_deadline(self) -> float | None:
        best = inf
        for g in self._groups.values():
            if g:
                d = next(iter(g.values())).deadline
                if d < best:
                    best = d
        return None if best == inf else best

    def expire(self, now: float) -> list[_RunningJob]:
        out: list[_RunningJob] = []
        for length, g in list(self._groups.items()):
            while g:
                r = next(iter(g.values()))
                if r.deadline > now:
                    break
                g.popitem(last=False)
                out.append(r)
            if not g and len(self._groups) > _KEEP_EMPTY_GROUPS:
                del self._groups[length]
        return out


@dataclass(frozen=True, slots=True)
class TaskView:
    id: str
    action: str
    schedule: str | None
    tz: str
    enabled: bool
    paused: bool
    next_due: float | None
    last_outcome: str | None
    last_error_code: str | None
    last_finished_at: float | None
    after: tuple[str, ...]
    running: int


@dataclass(frozen=True, slots=True)
class RunningView:
    job_id: str
    task_id: str | None
    action: str
    trace_id: str
    attempt: int
    elapsed: float
    timeout: float | None


@dataclass(frozen=True, slots=True)
class QueuedView:
    job_id: str
    task_id: str | None
    action: str
    priority: int
    held: str | None   # why it is not starting (max_instances, concurrency key, GPU memory)


@dataclass(frozen=True, slots=True)
class GpuView:
    index: int
    name: str
    total_mb: int
    free_mb: int
    reserved_mb: int
    utilization_pct: int | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    tasks: tuple[TaskView, ...]
    running: tuple[RunningView, ...]
    queued: int
    timers: int
    pending_jobs: int
    counters: Counters
    max_concurrency: int
    queue_depth: int
    gpus: tuple[GpuView, ...] = ()
    gpu_note: str | None = None
    queued_jobs: tuple[QueuedView, ...] = ()


@dataclass(slots=True)
class KernelParts:
    """Extra parts the composition root may hand in (tests pass fakes here)."""

    gates: Sequence[Gate] = ()
    gpu_probe: GpuProbe | None = None   # default: NVML (no cards where there is no GPU)
    services: Sequence[Callable[[Kernel], Coroutine[Any, Any, None]]] = ()
    rng: random.Random = field(default_factory=random.Random)
    gc_tuning: bool = True   # see GC_GEN0_THRESHOLD; off for a kernel embedded in another app


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
        self.api_url: str | None = None
        self._rng = parts.rng
        self._gc_tuning = parts.gc_tuning
        self._extra_services = list(parts.services)
        self._cron = ScheduleCache()
        self._wheel: TimingWheel[Job | _Tick] = TimingWheel(resolution=0.001,
                                                            start=clock.monotonic())
        sched = config.scheduler
        self.gpu = GpuGate(parts.gpu_probe or NvmlProbe())
        self._dispatcher = Dispatcher(
            Limits(max_concurrency=sched.max_concurrency, queue_depth=sched.queue_depth,
                   policy=sched.policy, aging=secs(sched.aging) or 30.0,
                   concurrency_limits=dict(sched.concurrency_limits)),
            rules=self._task_rules, gates=[self.gpu, *parts.gates])
        self._tasks: dict[str, TaskRuntime] = {}
        self._dependents: dict[str, list[str]] = {}
        self._pending: dict[str, tuple[Job, int]] = {}   # in the wheel: id -> (job, handle)
        self._running: dict[str, _RunningJob] = {}
        self._wake = asyncio.Event()
        self._sleep_until = -inf  # the deadline the timer loop sleeps until; -inf while awake
        self._deadlines = _Deadlines()
        self._loggers: dict[str, logging.Logger] = {}
        self._pump_pending = False
        self._stopped = asyncio.Event()
        self._accepting = False
        self._stopping = False
        self._runs: asyncio.TaskGroup | None = None
        self._service_tasks: list[asyncio.Task[None]] = []
        self._deferred: list[Awaitable[None]] = []

    # ================================================================ lifecycle
    async def run(self, *, started: asyncio.Event | None = None) -> None:
        """Run until ``stop()``: recover, arm, serve, then shut down in order."""
        await self.store.open()
        gc_saved: tuple[tuple[int, int, int], bool] | None = None
        try:
            recovered = await self._recover()
            states = await self.store.schedule_states()
            for tc in self.config.tasks:
                await self._install(tc, states.get(tc.id))
            self._rebuild_dependents()
            if self._gc_tuning:
                gc_saved = _tune_gc(len(self._wheel))
            self._accepting = not self._stopping  # stop() may come during start-up
            self.bus.publish(KernelStarted(
                at=self.clock.wall(), data_dir=str(self.config.data_dir()),
                store=self._store_name(), api_url=self.api_url, tasks=len(self._tasks),
                recovered_jobs=recovered))
            async with asyncio.TaskGroup() as services:
                for sub in self.plugins.subscribers:
                    self.bus.subscribe(sub.handle)
                    self._service_tasks.append(services.create_task(
                        self._guarded(type(sub).__name__, sub.run())))
                self._service_tasks.append(services.create_task(self._maintenance()))
                for svc in self._extra_services:
                    self._service_tasks.append(services.create_task(svc(self)))
                if started is not None:
                    started.set()
                async with asyncio.TaskGroup() as runs:
                    self._runs = runs
                    for aw in self._deferred:
                        runs.create_task(_as_coro(aw))
                    self._deferred.clear()
                    self._pump()
                    await self._timer_loop()
                    await self._drain()
                self._runs = None
                for t in self._service_tasks:
                    t.cancel()
        finally:
            self._accepting = False
            if gc_saved is not None:
                _restore_gc(*gc_saved)
            await self.store.close()
            self._stopped.set()

    def stop(self, reason: str = "requested") -> None:
        """Begin an orderly shutdown (safe to call from a signal handler's callback)."""
        if self._stopping:
            return
        self._stopping = True
        self._accepting = False
        self.bus.publish(KernelStopping(at=self.clock.wall(), reason=reason))
        self._wake.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _drain(self) -> None:
        grace = secs(self.config.kernel.shutdown_grace) or 0.0
        if self._running:
            log.info("waiting up to %.0f s for %d running job(s)", grace, len(self._running))
            deadline = self.clock.monotonic() + grace
            while self._running and self.clock.monotonic() < deadline:
                done = asyncio.Event()
                tasks = [r.task for r in self._running.values()]
                waiter = asyncio.ensure_future(asyncio.wait(tasks))
                waiter.add_done_callback(functools.partial(_set_event, done))
                try:
                    await self.clock.sleep_until(deadline, done)
                finally:
                    waiter.cancel()
        for r in list(self._running.values()):
            self._cancel_run(r, "shutdown")

    def _cancel_run(self, r: _RunningJob, reason: str) -> None:
        """Cancel a run only while it awaits its action; before that, ``_call_action`` sees the
        reason and does not start the action; after it, the run records its own outcome."""
        if r.cancel_reason is None:
            r.cancel_reason = reason
        if r.in_action and not r.task.done():
            r.task.cancel()

    # ================================================================ recovery and arming
    async def _guarded(self, name: str, work: Awaitable[None]) -> None:
        """A plugin's background work: its failure is logged, never fatal to the kernel."""
        try:
            await work
        except Exception:
            log.exception("plugin service %s failed; the kernel carries on without it", name)

    async def _recover(self) -> int:
        count = 0
        async for batch in self.store.load_pending():
            for job in batch:
                if job.state is JobState.RUNNING:
                    job.attempt += 1
                    job.recovered = True
                    job.state = JobState.PENDING
                    self.counters.recovered += 1
                if not math.isfinite(job.due_at):  # written by an older, laxer version
                    job.due_at = self.clock.wall()
                self._arm_job(job)
                count += 1
        if count:
            log.info("recovered %d pending job(s) (%d were running at the last stop)",
                     count, self.counters.recovered)
        return count

    def _schedule_of(self, tc: TaskConfig) -> Schedule | None:
        if not tc.schedule:
            return None
        return self._cron.get(tc.schedule, tc.tz or self.config.kernel.timezone)

    async def _install(self, tc: TaskConfig, state: ScheduleState | None) -> None:
        rt = TaskRuntime(
            cfg=tc, schedule=self._schedule_of(tc),
            rules=TaskRules(max_instances=tc.max_instances, overlap=tc.overlap,
                            concurrency_key=tc.concurrency_key),
            timeout=secs(tc.timeout), grace=secs(tc.misfire_grace) or 0.0,
            jitter=secs(tc.jitter) or 0.0)
        if state is not None:
            rt.paused = state.paused
            rt.last_scheduled_at = state.last_scheduled_at
        old = self._tasks.get(tc.id)
        if old is not None:
            rt.generation = old.generation + 1
            rt.last_outcome, rt.last_error_code = old.last_outcome, old.last_error_code
            rt.last_finished_at = old.last_finished_at
            if old.last_scheduled_at is not None and (
                    rt.last_scheduled_at is None or rt.last_scheduled_at < old.last_scheduled_at):
                rt.last_scheduled_at = old.last_scheduled_at  # the store may lag (a failed write)
        self._tasks[tc.id] = rt
        if not tc.enabled or rt.paused or rt.schedule is None:
            return
        now = self.clock.wall()
        if rt.last_scheduled_at is not None and rt.last_scheduled_at < now:
            await self._apply_misfires(rt, rt.last_scheduled_at, now)
        self._arm_next(rt, max(now, rt.last_scheduled_at or now))

    async def _apply_misfires(self, rt: TaskRuntime, last: float, now: float) -> None:
        assert rt.schedule is not None
        tc = rt.cfg
        plan = plan_misfires(tc.id, rt.schedule, last, now, policy=tc.misfire,
                             grace=secs(tc.misfire_grace) or 0.0, max_catch_up=tc.max_catch_up)
        if plan.record is not None:
            self.counters.misfired += plan.record.missed
            log.warning("task %s missed %d occurrence(s) from %s to %s; policy %s ran %d",
                        tc.id, plan.record.missed, _iso(plan.record.first_missed),
                        _iso(plan.record.last_missed), plan.record.policy, plan.record.ran)
            with self._store_guard():
                await self.store.record_misfire(plan.record)
            self.bus.publish(MisfireDecided(at=now, record=plan.record))
        if plan.run:
            # caught-up occurrences queue behind each other whatever the overlap policy
            await self._fire_occurrences([(rt, t) for t in plan.run], overlap=False)
        elif plan.last_considered is not None and tc.misfire is Misfire.SKIP:
            rt.last_scheduled_at = plan.last_considered
            with self._store_guard():
                await self.store.set_schedule_state(self._state_of(rt))
        if plan.last_considered is not None:
            rt.last_scheduled_at = max(rt.last_scheduled_at or 0.0, plan.last_considered)

    def _arm_next(self, rt: TaskRuntime, after: float, wall: float | None = None,
                  nxt: float | None = None) -> None:
        """Arm the first occurrence strictly after ``after`` (a wall instant). A caller arming
        many passes ``wall`` (now) and ``nxt`` (that occurrence, if it computed it already)."""
        self._disarm(rt)
        if rt.schedule is None or rt.paused or not rt.cfg.enabled or self._stopping:
            return
        if nxt is None:
            nxt = rt.schedule.next_after(after)
        if nxt is None:
            return
        jitter = rt.jitter
        fire_at = nxt + (random.Random(f"{rt.cfg.id}:{nxt}").uniform(0, jitter) if jitter else 0)
        rt.next_due = nxt
        deadline = self.clock.wall_to_mono(fire_at)
        rt.handle = self._wheel.schedule(deadline, _Tick(rt.cfg.id, nxt, rt.generation))
        if deadline < self._sleep_until:
            self._wake.set()
        self.bus.publish(JobScheduled(at=self.clock.wall() if wall is None else wall,
                                      task_id=rt.cfg.id, due_at=nxt))

    def _disarm(self, rt: TaskRuntime) -> None:
        if rt.handle is not None:
            self._wheel.cancel(rt.handle)
            rt.handle = None
        rt.next_due = None

    def _arm_job(self, job: Job) -> None:
        deadline = self.clock.wall_to_mono(job.due_at)
        self._pending[job.id] = (job, self._wheel.schedule(deadline, job))
        if deadline < self._sleep_until:
            self._wake.set()

    # ================================================================ the loop
    async def _timer_loop(self) -> None:
        clock = self.clock
        wheel = self._wheel
        offset = clock.wall() - clock.monotonic()
        while not self._stopping:
            deadline = wheel.next_deadline()
            timeout = self._deadlines.next_deadline()
            if timeout is not None and (deadline is None or timeout < deadline):
                deadline = timeout
            if deadline is not None:  # wall-anchored timers: look at the wall clock now and then
                deadline = min(deadline, clock.monotonic() + WALL_CHECK_EVERY)
            self._sleep_until = inf if deadline is None else deadline
            await clock.sleep_until(deadline, self._wake)
            self._sleep_until = -inf  # awake: arming needs no wake-up, the loop looks again
            self._wake.clear()
            if self._stopping:
                break
            now = clock.monotonic()
            new_offset = clock.wall() - now
            if abs(new_offset - offset) > WALL_JUMP:
                offset = new_offset
                self._rearm_wall_timers()
            for r in self._deadlines.expire(now):
                self._time_out(r)
            due = wheel.advance(now)
            if due:
                await self._on_due(due)
            self._pump()

    def _rearm_wall_timers(self) -> None:
        """The wall clock stepped (NTP, suspend/resume): re-derive every wall-anchored deadline."""
        log.warning("the wall clock jumped; re-arming cron occurrences and delayed jobs")
        for rt in self._tasks.values():
            if rt.handle is not None and rt.next_due is not None:
                self._arm_next(rt, rt.next_due - 0.001)
        for job, handle in list(self._pending.values()):
            self._wheel.cancel(handle)
            self._arm_job(job)

    def _time_out(self, r: _RunningJob) -> None:
        if self._running.get(r.job.id) is r and r.in_action and not r.task.done():
            r.timed_out = True
            r.cancel_reason = "timeout"
            r.task.cancel()

    async def _on_due(self, due: list[Job | _Tick]) -> None:
        now_mono = self.clock.monotonic()
        wall = self.clock.wall()
        occurrences: list[tuple[TaskRuntime, float]] = []
        stale: list[tuple[TaskRuntime, float]] = []
        for item in due:
            if isinstance(item, _Tick):
                rt = self._tasks.get(item.task_id)
                if rt is None or rt.generation != item.generation:
                    continue
                rt.handle = None
                if wall + 0.0005 < item.at:  # the wall clock went back: wait for the instant
                    rt.handle = self._wheel.schedule(self.clock.wall_to_mono(item.at), item)
                    continue
                if item.at < wall - rt.grace:  # itself missed (stall, wall jump): by policy
                    stale.append((rt, item.at))
                    continue
                occurrences.append((rt, item.at))
            else:
                if self._pending.pop(item.id, None) is None:
                    continue
                self._offer(item, now_mono)
        # a herd of occurrences (thousands of tasks on one instant) goes in chunks: the first
        # runs start after one store round trip, not after the whole herd is durable
        for i in range(0, len(occurrences), FIRE_CHUNK):
            chunk = occurrences[i:i + FIRE_CHUNK]
            await self._fire_occurrences(chunk)
            self._pump()
            await asyncio.sleep(0)  # let the runs just started go (a store may not yield)
            wall = self.clock.wall()
            for rt, at in chunk:
                if self._tasks.get(rt.cfg.id) is not rt:
                    continue
                nxt = rt.schedule.next_after(at) if rt.schedule else None
                if nxt is not None and nxt < wall - rt.grace:
                    # the loop stalled (suspend, overload): decide the missed ones by policy
                    await self._apply_misfires(rt, at, wall)
                    self._arm_next(rt, max(wall, rt.last_scheduled_at or wall))
                else:
                    self._arm_next(rt, at, wall, nxt)
        for rt, at in stale:
            if self._tasks.get(rt.cfg.id) is rt:
                await self._apply_misfires(rt, at - 0.001, wall)
                self._arm_next(rt, max(wall, rt.last_scheduled_at or wall))

    async def _fire_occurrences(self, occ: Iterable[tuple[TaskRuntime, float]], *,
                                overlap: bool = True) -> None:
        """Turn occurrences into durable CRON jobs (one batch) and offer them."""
        jobs: list[Job] = []
        wall = self.clock.wall()
        job_id, trace_id, cron = ids.job_id, ids.trace_id, JobKind.CRON
        for rt, at in occ:
            tc = rt.cfg
            jobs.append(Job(
                id=job_id(), action=tc.action, payload=dict(tc.payload), task_id=tc.id,
                kind=cron, due_at=at, scheduled_at=at, priority=tc.priority,
                timeout=rt.timeout, trace_id=trace_id(), created_at=wall,
                gpu_memory_mb=tc.gpu_memory_mb, gpu=tc.gpu if isinstance(tc.gpu, int) else None))
            last = rt.last_scheduled_at
            if last is None or last < at:
                rt.last_scheduled_at = at
        if not jobs:
            return
        try:
            results = await self.store.submit(jobs, wall)
        except StoreError as exc:
            # keep serving: run the occurrences from memory (they will not survive a crash)
            self._store_failed(exc)
            results = [SubmitResult(job=j) for j in jobs]
        now_mono = self.clock.monotonic()
        offer = self._offer
        submitted = 0
        for res in results:
            if res.existed:
                continue
            submitted += 1
            offer(res.job, now_mono, occurrence=overlap)
        self.counters.submitted += submitted

    def _offer(self, job: Job, now_mono: float, *, occurrence: bool = False) -> None:
        decision = self._dispatcher.offer(job, now_mono, occurrence=occurrence,
                                          concurrency_key=self._concurrency_key(job))
        if decision.verdict is Verdict.SKIPPED:
            self._spawn(self._finish_unrun(job, Outcome.SKIPPED, ErrorCode.ERR_SKIPPED_OVERLAP,
                                           "previous run still going (overlap policy)"))
        elif decision.verdict is Verdict.CANCEL_RUNNING:
            for jid in decision.cancel:
                r = self._running.get(jid)
                if r is not None:
                    self._cancel_run(r, "overlap")
            for old in decision.dropped:
                self._spawn(self._finish_unrun(old, Outcome.CANCELLED, ErrorCode.ERR_CANCELLED,
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
        if self._stopping or self._runs is None:
            return
        for job in self._dispatcher.plan(self.clock.monotonic()):
            self._start(job)

    def _pump_soon(self) -> None:
        """Plan once for all the runs that finish in this turn of the event loop."""
        if not self._pump_pending:
            self._pump_pending = True
            asyncio.get_running_loop().call_soon(self._pump_later)

    def _pump_later(self) -> None:
        self._pump_pending = False
        self._pump()

    def _start(self, job: Job) -> None:
        assert self._runs is not None
        span = ids.span_id()
        timeout = self._timeout_for(job)
        task = self._runs.create_task(self._run_job(job, span, timeout))
        self._running[job.id] = _RunningJob(job, task, span, self.clock.monotonic(), timeout)

    def _spawn(self, coro: Awaitable[None]) -> None:
        """Own a short piece of follow-up work in the runs group (or the caller awaits it)."""
        if self._runs is not None:
            self._runs.create_task(_as_coro(coro))
        else:
            self._deferred.append(coro)  # before the runs group exists: started with it

    def _timeout_for(self, job: Job) -> float | None:
        if job.timeout is not None:
            return job.timeout
        rt = self._tasks.get(job.task_id) if job.task_id else None
        if rt is not None and rt.timeout is not None:
            return rt.timeout
        return self.config.scheduler.timeout_sec

    # ================================================================ one run
    async def _run_job(self, job: Job, span: str,
                       timeout: float | None) -> None:
        wall = self.clock.wall()
        t0 = self.clock.monotonic()
        job.state = JobState.RUNNING
        job.started_at = wall
        try:
            await self.store.mark_running(job.id, wall, job.attempt)
        except StoreError as exc:
            self._store_failed(exc)
        self.counters.started += 1
        self.bus.publish(RunStarted(
            at=wall, job_id=job.id, task_id=job.task_id, action=job.action,
            trace_id=job.trace_id, span_id=span, attempt=job.attempt,
            scheduled_at=job.scheduled_at, lateness=max(0.0, wall - job.due_at),
            recovered=job.recovered))
        logger = self._loggers.get(job.action)
        if logger is None:
            logger = self._loggers[job.action] = logging.getLogger(f"kernel.action.{job.action}")
        ctx = RunContext(
            job_id=job.id, task_id=job.task_id, action=job.action, trace_id=job.trace_id,
            span_id=span, attempt=job.attempt, scheduled_at=job.scheduled_at, timeout=timeout,
            log=logging.LoggerAdapter(logger, {
                "trace_id": job.trace_id, "task_id": job.task_id, "job_id": job.id,
                "attempt": job.attempt}),
            parent_span_id=job.parent_span_id, gpu_index=self.gpu.assignment(job.id))
        shutdown = False
        r = self._running.get(job.id)
        try:
            result = await self._call_action(job, ctx, timeout, r)
            res = _Outcome(Outcome.SUCCEEDED, detail=_short(result))
        except asyncio.CancelledError:
            reason = r.cancel_reason if r is not None else "shutdown"
            if reason == "shutdown":
                shutdown = True
                res = _Outcome(Outcome.CANCELLED, ErrorCode.ERR_CANCELLED,
                               "cancelled by shutdown; it is run again at the next start")
            else:
                _uncancel()
                res = _Outcome(Outcome.CANCELLED, ErrorCode.ERR_CANCELLED, f"cancelled ({reason})")
        except Exception as exc:  # classified below; an action's bug never stops the kernel
            res = _classify(exc)
        if r is not None and r.timed_out and not shutdown:
            # the action's own answer to the cancellation does not matter: it ran out of time
            res = _Outcome(Outcome.TIMED_OUT, ErrorCode.ERR_TIMEOUT,
                           f"timed out after {timeout:g} s", retryable=True)
        duration = self.clock.monotonic() - t0
        if shutdown:
            self._running.pop(job.id, None)
            self._dispatcher.finished(job)
            self.counters.cancelled += 1
            self.bus.publish(RunCancelled(at=self.clock.wall(), run=self._record(
                job, span, res, wall), duration=duration))
            return
        await self._complete(job, span, res, wall, duration)

    async def _call_action(self, job: Job, ctx: RunContext, timeout: float | None,
                           r: _RunningJob | None) -> Any:
        """Await the action in this run's own task. A timeout is a deadline the timer loop
        watches (``_Deadlines``); when it passes, the loop cancels this task while it is inside
        the action, and ``_run_job`` reports TIMED_OUT."""
        action = self.plugins.action(job.action)
        payload = self.plugins.decode_payload(action, job.payload)
        aw = action.run(ctx, payload)
        if r is None:  # not tracked as running (cannot happen via _start): no timeout
            return await aw
        if timeout is not None:
            deadline = self._deadlines.add(r, timeout, self.clock.monotonic())
            if deadline < self._sleep_until:
                self._wake.set()
        if r.cancel_reason is not None:  # cancelled before the action started
            if inspect.iscoroutine(aw):
                aw.close()
            raise asyncio.CancelledError
        r.in_action = True
        try:
            return await aw
        finally:
            r.in_action = False
            if timeout is not None:
                self._deadlines.remove(r, timeout)

    def _record(self, job: Job, span: str, res: _Outcome, started: float | None) -> RunRecord:
        return RunRecord(
            job_id=job.id, task_id=job.task_id, action=job.action, trace_id=job.trace_id,
            span_id=span, scheduled_at=job.scheduled_at, started_at=started,
            finished_at=self.clock.wall(), attempt=job.attempt, outcome=res.outcome,
            error_code=res.code.value if res.code else None, detail=res.detail[:DETAIL_MAX],
            recovered=job.recovered)

    async def _complete(self, job: Job, span: str, res: _Outcome, started: float,
                        duration: float) -> None:
        follow: list[Job] = []
        skipped: list[Job] = []
        retry_at: float | None = None
        rt = self._tasks.get(job.task_id) if job.task_id else None
        wall = self.clock.wall()
        if res.outcome in (Outcome.FAILED, Outcome.TIMED_OUT) and res.retryable:
            max_attempts = rt.cfg.retry.max_attempts if rt is not None else 1
            if job.attempt < max_attempts:
                delay = res.retry_after
                if delay is None:
                    assert rt is not None
                    delay = retry_delay(rt.cfg.retry, job.attempt, self._rng)
                retry_at = wall + delay
                follow.append(msgspec.structs.replace(
                    job, id=ids.job_id(), kind=JobKind.RETRY, attempt=job.attempt + 1,
                    due_at=retry_at, created_at=wall, state=JobState.PENDING, recovered=False,
                    started_at=None, dedup_key=None, dedup_expires_at=None))
            elif max_attempts > 1:
                res.detail = f"[{res.code}] {res.detail}"
                res.code = ErrorCode.ERR_RETRIES_EXHAUSTED
        if job.task_id and retry_at is None:
            if res.outcome is Outcome.SUCCEEDED:
                follow.extend(self._dependent_jobs(job, span, wall))
            elif res.outcome is not Outcome.SKIPPED or res.code is ErrorCode.ERR_DEPENDENCY_FAILED:
                skipped = self._dependent_jobs(job, span, wall)
        run = self._record(job, span, res, started)
        try:
            await self.store.finish(job.id, run, follow)
        except StoreError as exc:
            self._store_failed(exc)
        self._running.pop(job.id, None)
        self._dispatcher.finished(job)
        if rt is not None and self._tasks.get(rt.cfg.id) is rt:
            rt.last_outcome = res.outcome.value
            rt.last_error_code = run.error_code
            rt.last_finished_at = run.finished_at
        self._count(res.outcome)
        if res.outcome is Outcome.FAILED:
            self.bus.publish(RunFailed(at=wall, run=run, duration=duration,
                                       will_retry=retry_at is not None, retry_at=retry_at))
        elif res.outcome is Outcome.TIMED_OUT:
            self.bus.publish(RunTimedOut(at=wall, run=run, duration=duration,
                                         will_retry=retry_at is not None, retry_at=retry_at))
        else:
            ev_cls = _FINISHED_EVENT.get(res.outcome, RunFinished)
            self.bus.publish(ev_cls(at=wall, run=run, duration=duration))
        for j in follow:
            self._arm_job(j)
        for dep in skipped:
            await self._skip_dependent(dep, job)
        self._pump_soon()

    def _dependent_jobs(self, upstream: Job, span: str, wall: float) -> list[Job]:
        out: list[Job] = []
        for dep_id in self._dependents.get(upstream.task_id or "", ()):
            rt = self._tasks.get(dep_id)
            if rt is None or not rt.cfg.enabled or rt.paused:
                continue
            tc = rt.cfg
            out.append(Job(
                id=ids.job_id(), action=tc.action, payload=dict(tc.payload), task_id=tc.id,
                kind=JobKind.DEPENDENT, due_at=wall, scheduled_at=upstream.scheduled_at,
                priority=tc.priority, timeout=secs(tc.timeout), trace_id=upstream.trace_id,
                parent_span_id=span, created_at=wall, **_gpu_fields(tc)))
        return out

    async def _skip_dependent(self, dep: Job, upstream: Job) -> None:
        """Record ``dep`` as skipped because ``upstream`` failed (and its dependents, in turn)."""
        try:
            await self.store.submit([dep], self.clock.wall())
        except StoreError as exc:
            self._store_failed(exc)
        res = _Outcome(Outcome.SKIPPED, ErrorCode.ERR_DEPENDENCY_FAILED,
                       f"upstream task {upstream.task_id!r} did not succeed")
        wall = self.clock.wall()
        await self._complete(dep, ids.span_id(), res, wall, 0.0)

    async def _finish_unrun(self, job: Job, outcome: Outcome, code: ErrorCode,
                            detail: str) -> None:
        run = self._record(job, ids.span_id(), _Outcome(outcome, code, detail), None)
        try:
            await self.store.finish(job.id, run, ())
        except StoreError as exc:
            self._store_failed(exc)
        self._count(outcome)
        cls = RunSkipped if outcome is Outcome.SKIPPED else RunCancelled
        self.bus.publish(cls(at=run.finished_at, run=run, duration=0.0))

    def _count(self, outcome: Outcome) -> None:
        c = self.counters
        if outcome is Outcome.SUCCEEDED:
            c.succeeded += 1
        elif outcome is Outcome.FAILED:
            c.failed += 1
        elif outcome is Outcome.TIMED_OUT:
            c.timed_out += 1
        elif outcome is Outcome.CANCELLED:
            c.cancelled += 1
        else:
            c.skipped += 1

    # ================================================================ public API
    async def submit(self, req: SubmitRequest) -> SubmitResult:
        return (await self.submit_many([req]))[0]

    async def submit_many(self, reqs: Sequence[SubmitRequest]) -> list[SubmitResult]:
        """Validate, persist (acknowledged only after commit), then arm. All or nothing."""
        if not self._accepting:
            raise ShuttingDown("the kernel is not accepting jobs (starting or stopping)")
        wall = self.clock.wall()
        jobs = []
        for i, req in enumerate(reqs):
            try:
                jobs.append(self._job_from(req, wall))
            except SubmitError as exc:
                if len(reqs) > 1:
                    raise type(exc)(f"item {i}: {exc.message}") from None
                raise
        due_now = sum(1 for j in jobs if j.due_at <= wall)
        if due_now and self._dispatcher.queued + due_now > self.config.scheduler.queue_depth:
            raise QueueFull(
                f"the ready queue is full ({self._dispatcher.queued} of "
                f"{self.config.scheduler.queue_depth} waiting); nothing was stored")
        results = await self.store.submit(jobs, wall)
        self._accept([r.job for r in results if not r.existed])
        return results

    def _accept(self, jobs: Iterable[Job]) -> None:
        """Jobs just made durable: due ones go straight to the ready queue, others to the wheel."""
        wall = self.clock.wall()
        mono = self.clock.monotonic()
        for job in jobs:
            self.counters.submitted += 1
            if job.due_at <= wall:
                self._offer(job, mono)
            else:
                self._arm_job(job)
            self.bus.publish(JobSubmitted(
                at=wall, job_id=job.id, task_id=job.task_id, action=job.action, kind=job.kind,
                due_at=job.due_at, trace_id=job.trace_id))
        self._pump()

    def _job_from(self, req: SubmitRequest, wall: float, *, task_id: str | None = None,
                  kind: JobKind = JobKind.SUBMIT) -> Job:
        action = self.plugins.action(req.action)
        self.plugins.decode_payload(action, req.payload)
        if req.delay is not None and req.at is not None:
            raise BadPayload("give either 'delay' or 'at', not both")
        for name in ("delay", "at", "timeout"):
            value = getattr(req, name)
            if value is not None and not math.isfinite(value):
                raise BadPayload(f"{name}: must be a finite number")
        if req.delay is not None and req.delay < 0:
            raise BadPayload("delay: must be 0 or more seconds")
        if req.timeout is not None and req.timeout <= 0:
            raise BadPayload("timeout: must be a positive number of seconds")
        if req.gpu_memory_mb < 0:
            raise BadPayload("gpu_memory_mb: must be 0 or more")
        if req.gpu_memory_mb:
            self._check_gpu(req.gpu_memory_mb, req.gpu)
        due = wall + (req.delay or 0.0) if req.at is None else req.at
        tp = ids.parse_traceparent(req.traceparent)
        ttl = req.dedup_ttl if req.dedup_ttl is not None else secs(self.config.store.dedup_ttl)
        return Job(
            id=ids.job_id(), action=req.action, payload=req.payload, task_id=task_id, kind=kind,
            due_at=due, scheduled_at=due, priority=req.priority, timeout=req.timeout,
            dedup_key=req.dedup_key,
            dedup_expires_at=(wall + (ttl or 0.0)) if req.dedup_key else None,
            trace_id=tp[0] if tp else ids.trace_id(), parent_span_id=tp[1] if tp else None,
            created_at=wall, gpu_memory_mb=req.gpu_memory_mb, gpu=req.gpu)

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
        entry = self._pending.pop(job_id, None)
        job = None
        if entry is not None:
            job, handle = entry
            self._wheel.cancel(handle)
        else:
            job = self._dispatcher.remove(job_id)
        if job is not None:
            run = self._record(job, ids.span_id(), _Outcome(
                Outcome.CANCELLED, ErrorCode.ERR_CANCELLED, "cancelled by request"), None)
            await self.store.cancel(job_id, run)
            self.counters.cancelled += 1
            self.bus.publish(RunCancelled(at=run.finished_at, run=run, duration=0.0))
            return job
        r = self._running.get(job_id)
        if r is not None:
            self._cancel_run(r, "request")
            return r.job
        stored = await self.store.get_job(job_id)
        if stored is not None:  # stored but not armed here (should not happen): remove it
            await self.store.cancel(job_id)
            return stored
        raise NotFound(f"no pending or running job {job_id!r}")

    async def get_job(self, job_id: str) -> Job | None:
        if job_id in self._pending:
            return self._pending[job_id][0]
        if job_id in self._running:
            return self._running[job_id].job
        return await self.store.get_job(job_id)

    def _task(self, task_id: str) -> TaskRuntime:
        rt = self._tasks.get(task_id)
        if rt is None:
            raise NotFound(f"no task {task_id!r} (tasks: {', '.join(sorted(self._tasks))})")
        return rt

    async def pause(self, task_id: str) -> None:
        rt = self._task(task_id)
        rt.paused = True
        self._disarm(rt)
        await self.store.set_schedule_state(self._state_of(rt))

    async def resume(self, task_id: str) -> None:
        rt = self._task(task_id)
        rt.paused = False
        # occurrences while paused are not misfires: start again from now
        rt.last_scheduled_at = max(rt.last_scheduled_at or 0.0, self.clock.wall())
        await self.store.set_schedule_state(self._state_of(rt))
        self._arm_next(rt, self.clock.wall())

    async def trigger(self, task_id: str, payload: dict[str, Any] | None = None) -> Job:
        """Run a task now, outside its schedule."""
        rt = self._task(task_id)
        tc = rt.cfg
        req = SubmitRequest(action=tc.action, payload=payload if payload is not None
                            else dict(tc.payload), priority=tc.priority,
                            timeout=secs(tc.timeout), **_gpu_fields(tc))
        return (await self._submit_task_jobs([self._job_from(
            req, self.clock.wall(), task_id=tc.id, kind=JobKind.TRIGGER)]))[0]

    async def backfill(self, task_id: str, start: float, end: float) -> list[Job]:
        """Run the task's occurrences in ``[start, end]`` (Temporal's backfill)."""
        rt = self._task(task_id)
        if rt.schedule is None:
            raise BadPayload(f"task {task_id!r} has no schedule to backfill")
        if end < start:
            raise BadPayload("end: must not be before start")
        wall = self.clock.wall()
        jobs: list[Job] = []
        t = rt.schedule.next_after(start - 1e-6)
        while t is not None and t <= end:
            if len(jobs) >= BACKFILL_MAX:
                raise BadPayload(f"the range holds more than {BACKFILL_MAX} occurrences; "
                                 "split it")
            tc = rt.cfg
            jobs.append(Job(
                id=ids.job_id(), action=tc.action, payload=dict(tc.payload), task_id=tc.id,
                kind=JobKind.BACKFILL, due_at=wall, scheduled_at=t, priority=tc.priority,
                timeout=secs(tc.timeout), trace_id=ids.trace_id(), created_at=wall,
                **_gpu_fields(tc)))
            t = rt.schedule.next_after(t)
        return await self._submit_task_jobs(jobs)

    async def _submit_task_jobs(self, jobs: list[Job]) -> list[Job]:
        if not self._accepting:
            raise ShuttingDown("the kernel is not accepting jobs (starting or stopping)")
        if not jobs:
            return []
        results = await self.store.submit(jobs, self.clock.wall())
        self._accept([r.job for r in results if not r.existed])
        return [r.job for r in results]

    async def reload(self, new: Config, source: str = "reload") -> ConfigReloaded:
        """Apply a validated config's tasks: arm added, disarm removed, re-arm changed ones.
        Runs in flight finish under the definition they started with."""
        old = {t.id: t for t in self.config.tasks}
        fresh = {t.id: t for t in new.tasks}
        old_tz, new_tz = self.config.kernel.timezone, new.kernel.timezone

        def timetable(t: TaskConfig, tz: str) -> tuple[Any, ...]:
            return (t.schedule, t.tz or tz, t.enabled)

        added = sorted(set(fresh) - set(old))
        removed = sorted(set(old) - set(fresh))
        changed = sorted(k for k in set(old) & set(fresh)
                         if old[k] != fresh[k] or timetable(old[k], old_tz) != timetable(fresh[k], new_tz))
        states = await self.store.schedule_states()
        now = self.clock.wall()
        for tid in changed:
            if timetable(old[tid], old_tz) != timetable(fresh[tid], new_tz):
                # a new timetable starts now: its instants before the reload were never due
                st = states.get(tid)
                states[tid] = ScheduleState(
                    task_id=tid, paused=st.paused if st else False,
                    last_scheduled_at=max(now, (st.last_scheduled_at if st else None) or now))
        self.config.kernel.timezone = new_tz
        for tid in removed:
            rt = self._tasks.pop(tid, None)
            if rt is not None:
                self._disarm(rt)
        self.config.tasks = list(new.tasks)
        for tid in added + changed:
            rt = self._tasks.get(tid)
            if rt is not None:
                self._disarm(rt)
            await self._install(fresh[tid], states.get(tid))
        self._rebuild_dependents()
        self._pump()
        ev = ConfigReloaded(at=self.clock.wall(), source=source, added=added, removed=removed,
                            changed=changed)
        self.bus.publish(ev)
        log.info("config reloaded from %s: added %s, removed %s, changed %s",
                 source, added or "-", removed or "-", changed or "-")
        return ev

    def report_reload_error(self, source: str, error: KernelError) -> ConfigReloaded:
        ev = ConfigReloaded(at=self.clock.wall(), source=source, added=[], removed=[],
                            changed=[], error=str(error))
        self.bus.publish(ev)
        log.error("config reload from %s rejected; the old configuration keeps running:\n%s",
                  source, error)
        return ev

    def snapshot(self) -> Snapshot:
        mono = self.clock.monotonic()
        running_by_task: dict[str, int] = {}
        for r in self._running.values():
            if r.job.task_id:
                running_by_task[r.job.task_id] = running_by_task.get(r.job.task_id, 0) + 1
        tasks = tuple(
            TaskView(id=rt.cfg.id, action=rt.cfg.action, schedule=rt.cfg.schedule,
                     tz=rt.cfg.tz or self.config.kernel.timezone, enabled=rt.cfg.enabled,
                     paused=rt.paused, next_due=rt.next_due, last_outcome=rt.last_outcome,
                     last_error_code=rt.last_error_code, last_finished_at=rt.last_finished_at,
                     after=tuple(rt.cfg.after), running=running_by_task.get(rt.cfg.id, 0))
            for rt in self._tasks.values())
        running = tuple(
            RunningView(job_id=r.job.id, task_id=r.job.task_id, action=r.job.action,
                        trace_id=r.job.trace_id, attempt=r.job.attempt,
                        elapsed=mono - r.started_mono, timeout=r.timeout)
            for r in self._running.values())
        gpus = tuple(GpuView(c.index, c.name, c.total_mb, c.free_mb, reserved,
                             c.utilization_pct) for c, reserved in self.gpu.views())
        return Snapshot(at=self.clock.wall(), tasks=tasks, running=running,
                        queued=self._dispatcher.queued, timers=len(self._wheel),
                        pending_jobs=len(self._pending), counters=self.counters,
                        max_concurrency=self.config.scheduler.max_concurrency,
                        queue_depth=self.config.scheduler.queue_depth, gpus=gpus,
                        gpu_note=self.gpu.probe.unavailable_reason,
                        queued_jobs=tuple(
                            QueuedView(j.id, j.task_id, j.action, j.priority,
                                       self._dispatcher.held_reason(j.id))
                            for j in self._dispatcher.queued_jobs()[:50]))

    @property
    def dispatcher(self) -> Dispatcher:
        return self._dispatcher

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ================================================================ helpers
    def _task_rules(self, task_id: str) -> TaskRules | None:
        rt = self._tasks.get(task_id)
        return None if rt is None else rt.rules

    def _rebuild_dependents(self) -> None:
        deps: dict[str, list[str]] = {}
        for rt in self._tasks.values():
            for up in rt.cfg.after:
                deps.setdefault(up, []).append(rt.cfg.id)
        self._dependents = deps

    def _state_of(self, rt: TaskRuntime) -> ScheduleState:
        return ScheduleState(task_id=rt.cfg.id, last_scheduled_at=rt.last_scheduled_at,
                             paused=rt.paused, next_due_at=rt.next_due)

    def _store_failed(self, exc: StoreError) -> None:
        log.error("store error [%s]: %s", exc.code, exc)
        self.bus.publish(StoreFailed(at=self.clock.wall(), error_code=exc.code.value,
                                     message=str(exc)))

    @contextlib.contextmanager
    def _store_guard(self) -> Any:
        try:
            yield
        except StoreError as exc:
            self._store_failed(exc)

    def _store_name(self) -> str:
        if self.config.store.backend == "memory":
            return "memory (nothing persists)"
        return str(self.config.store_path())

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


_FINISHED_EVENT: dict[Outcome, type[RunFinished]] = {
    Outcome.SUCCEEDED: RunSucceeded, Outcome.CANCELLED: RunCancelled, Outcome.SKIPPED: RunSkipped}


def _tune_gc(armed: int) -> tuple[tuple[int, int, int], bool]:
    """Raise the first GC threshold; after arming a large start-up heap (recovered jobs,
    thousands of tasks), collect once and freeze it, so that later full collections skip it
    (its objects are still freed by reference counting when they go). Returns what to undo."""
    old = gc.get_threshold()
    frozen = armed >= GC_FREEZE_MIN
    if frozen:
        gc.collect()
        gc.freeze()
    gc.set_threshold(max(old[0], GC_GEN0_THRESHOLD), old[1], old[2])
    return old, frozen


def _restore_gc(old: tuple[int, int, int], frozen: bool) -> None:
    gc.set_threshold(*old)
    if frozen:
        gc.unfreeze()


def _uncancel() -> None:
    """This task handled a cancellation meant for its action and goes on (to record it)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()


def _gpu_fields(tc: TaskConfig) -> dict[str, Any]:
    return {"gpu_memory_mb": tc.gpu_memory_mb,
            "gpu": tc.gpu if isinstance(tc.gpu, int) else None}


def _classify(exc: Exception) -> _Outcome:
    if isinstance(exc, Retry):
        return _Outcome(Outcome.FAILED, exc.code, exc.message, retryable=True,
                        retry_after=exc.delay)
    if isinstance(exc, ActionError):
        return _Outcome(Outcome.FAILED, exc.code, exc.message, retryable=exc.retryable)
    if isinstance(exc, ActionNotFound | BadPayload):
        return _Outcome(Outcome.FAILED, exc.code, exc.message)
    if isinstance(exc, KernelError):
        return _Outcome(Outcome.FAILED, exc.code, exc.message)
    if isinstance(exc, ConnectionError | TimeoutError):
        return _Outcome(Outcome.FAILED, ErrorCode.ERR_CONN_TIMEOUT,
                        f"{type(exc).__name__}: {exc}", retryable=True)
    return _Outcome(Outcome.FAILED, ErrorCode.ERR_ACTION_FAILED, f"{type(exc).__name__}: {exc}")


def _short(result: Any) -> str:
    if result is None:
        return ""
    text = result if isinstance(result, str) else repr(result)
    return text[:DETAIL_MAX]


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


async def _as_coro(aw: Awaitable[None]) -> None:
    await aw


def _set_event(ev: asyncio.Event, _f: object) -> None:
    ev.set()
