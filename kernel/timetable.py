"""The timetable: the tasks of the configuration and when they run.

It holds one ``TaskRuntime`` per task (its parsed schedule, pause state, armed occurrence and
last outcome), arms each task's next occurrence in ``Timers``, decides misfires, pause and
resume, backfills and reload diffs, and is the **one job factory**: every job a task makes
(cron occurrence, trigger, backfill, dependent run) comes from ``task_job``.

It does no I/O: methods return what to make durable (``Firing``: occurrences to submit, a
misfire record, a schedule state to save) and the kernel does it. Time policy (see the README):
- a stored ``last_scheduled_at`` in the future (more than ``FUTURE_TOLERANCE`` ahead: the wall
  clock was wrong when it was written) is clamped to now at start, with a warning;
- when the wall clock steps (either way) every task is re-armed from the corrected clock, never
  before its last occurrence; after a large backward step (beyond ``FUTURE_TOLERANCE``: the
  clock was ahead by hours), the last occurrence is clamped to now and the schedule goes on
  from there; in a fleet the instants that already ran under the wrong clock are not run again
  (the fired table), on one box they may run again when their instants come round (the store
  keeps no record of finished occurrences).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import ids
from .clock import Clock
from .config import Config, Misfire, TaskConfig, secs
from .dispatch import TaskRules
from .errors import BadPayload, NotFound
from .misfire import plan_misfires
from .records import Job, JobKind, MisfireRecord, ScheduleState
from .snapshot import TaskView
from .timers import Tick, Timers
from .triggers import Schedule, ScheduleCache

log = logging.getLogger("kernel.timetable")

BACKFILL_MAX = 10_000
FUTURE_TOLERANCE = 5.0  # seconds a stored last_scheduled_at may lie ahead of the wall clock


@dataclass(slots=True)
class TaskRuntime:
    cfg: TaskConfig
    schedule: Schedule | None
    tz: str
    rules: TaskRules = field(default_factory=TaskRules)
    timeout: float | None = None       # cfg's durations in seconds, decoded once
    grace: float = 0.0
    jitter: float = 0.0
    gpu: int | None = None
    paused: bool = False
    handle: int | None = None
    next_due: float | None = None      # wall instant of the armed occurrence
    last_scheduled_at: float | None = None
    last_outcome: str | None = None
    last_error_code: str | None = None
    last_finished_at: float | None = None
    generation: int = 0

    @property
    def id(self) -> str:
        return self.cfg.id

    @property
    def armable(self) -> bool:
        return self.schedule is not None and self.cfg.enabled and not self.paused

    def state(self) -> ScheduleState:
        return ScheduleState(task_id=self.cfg.id, last_scheduled_at=self.last_scheduled_at,
                             paused=self.paused, next_due_at=self.next_due)


@dataclass(slots=True)
class Firing:
    """What the timetable decided and the kernel must make durable, in this order: record the
    misfire, submit the occurrences (``overlap``: subject to the overlap policy), save the
    state."""

    occurrences: list[tuple[TaskRuntime, float]] = field(default_factory=list)
    misfire: MisfireRecord | None = None
    state: ScheduleState | None = None
    overlap: bool = True

    def __bool__(self) -> bool:
        return bool(self.occurrences) or self.misfire is not None or self.state is not None


@dataclass(frozen=True, slots=True)
class ReloadDiff:
    added: list[str]
    removed: list[str]
    changed: list[str]
    new_timetable: set[str]   # changed tasks whose schedule, zone or enabled flag changed


OnScheduled = Callable[[str, float, float], None]  # (task id, due instant, wall now)


class Timetable:
    def __init__(self, clock: Clock, timers: Timers, *, timezone: str,
                 on_scheduled: OnScheduled = lambda _t, _d, _w: None) -> None:
        self.clock = clock
        self.timers = timers
        self.timezone = timezone
        self._on_scheduled = on_scheduled
        self._cron = ScheduleCache()
        self.tasks: dict[str, TaskRuntime] = {}
        self._dependents: dict[str, list[str]] = {}
        self.stopped = False  # no more arming (shutdown)

    # ---- lookups -----------------------------------------------------------------------------
    def get(self, task_id: str) -> TaskRuntime:
        rt = self.tasks.get(task_id)
        if rt is None:
            raise NotFound(f"no task {task_id!r} (tasks: {', '.join(sorted(self.tasks))})")
        return rt

    def rules(self, task_id: str) -> TaskRules | None:
        rt = self.tasks.get(task_id)
        return None if rt is None else rt.rules

    def is_current(self, rt: TaskRuntime) -> bool:
        return self.tasks.get(rt.cfg.id) is rt

    # ---- the one job factory -----------------------------------------------------------------
    def task_job(self, rt: TaskRuntime, kind: JobKind, *, wall: float, due_at: float,
                 scheduled_at: float | None, trace_id: str | None = None,
                 parent_span_id: str | None = None,
                 payload: dict[str, Any] | None = None) -> Job:
        tc = rt.cfg
        return Job(
            id=ids.job_id(), action=tc.action,
            payload=dict(tc.payload) if payload is None else payload, task_id=tc.id,
            kind=kind, due_at=due_at, scheduled_at=scheduled_at, priority=tc.priority,
            timeout=rt.timeout, trace_id=trace_id or ids.trace_id(),
            parent_span_id=parent_span_id, created_at=wall, gpu_memory_mb=tc.gpu_memory_mb,
            gpu=rt.gpu)

    def occurrence_jobs(self, occ: Iterable[tuple[TaskRuntime, float]], wall: float) -> list[Job]:
        """CRON jobs for occurrences; raises each task's ``last_scheduled_at``."""
        jobs: list[Job] = []
        make, cron = self.task_job, JobKind.CRON
        for rt, at in occ:
            jobs.append(make(rt, cron, wall=wall, due_at=at, scheduled_at=at))
            last = rt.last_scheduled_at
            if last is None or last < at:
                rt.last_scheduled_at = at
        return jobs

    def dependent_jobs(self, upstream: Job, span: str, wall: float) -> list[Job]:
        out: list[Job] = []
        for dep_id in self._dependents.get(upstream.task_id or "", ()):
            rt = self.tasks.get(dep_id)
            if rt is None or not rt.cfg.enabled or rt.paused:
                continue
            out.append(self.task_job(rt, JobKind.DEPENDENT, wall=wall, due_at=wall,
                                     scheduled_at=upstream.scheduled_at,
                                     trace_id=upstream.trace_id, parent_span_id=span))
        return out

    def trigger_job(self, task_id: str, payload: dict[str, Any] | None, wall: float) -> Job:
        rt = self.get(task_id)
        return self.task_job(rt, JobKind.TRIGGER, wall=wall, due_at=wall, scheduled_at=wall,
                             payload=payload)

    def backfill_jobs(self, task_id: str, start: float, end: float, wall: float) -> list[Job]:
        """Jobs for the task's occurrences in ``[start, end]`` (Temporal's backfill)."""
        rt = self.get(task_id)
        if rt.schedule is None:
            raise BadPayload(f"task {task_id!r} has no schedule to backfill")
        if end < start:
            raise BadPayload("end: must not be before start")
        jobs: list[Job] = []
        t = rt.schedule.next_after(start - 1e-6)
        while t is not None and t <= end:
            if len(jobs) >= BACKFILL_MAX:
                raise BadPayload(f"the range holds more than {BACKFILL_MAX} occurrences; split it")
            jobs.append(self.task_job(rt, JobKind.BACKFILL, wall=wall, due_at=wall,
                                      scheduled_at=t))
            t = rt.schedule.next_after(t)
        return jobs

    # ---- installing and arming ---------------------------------------------------------------
    def install(self, tc: TaskConfig, state: ScheduleState | None) -> Firing:
        """Add or replace a task; arm it; return the misfires to make durable."""
        tz = tc.tz or self.timezone
        rt = TaskRuntime(
            cfg=tc, schedule=self._cron.get(tc.schedule, tz) if tc.schedule else None, tz=tz,
            rules=TaskRules(max_instances=tc.max_instances, overlap=tc.overlap,
                            concurrency_key=tc.concurrency_key),
            timeout=secs(tc.timeout), grace=secs(tc.misfire_grace) or 0.0,
            jitter=secs(tc.jitter) or 0.0, gpu=tc.gpu if isinstance(tc.gpu, int) else None)
        now = self.clock.wall()
        firing = Firing()
        if state is not None:
            rt.paused = state.paused
            rt.last_scheduled_at = state.last_scheduled_at
        old = self.tasks.get(tc.id)
        if old is not None:
            self.disarm(old)
            rt.generation = old.generation + 1
            rt.last_outcome, rt.last_error_code = old.last_outcome, old.last_error_code
            rt.last_finished_at = old.last_finished_at
            if old.last_scheduled_at is not None and (
                    rt.last_scheduled_at is None or rt.last_scheduled_at < old.last_scheduled_at):
                rt.last_scheduled_at = old.last_scheduled_at  # the store may lag (a failed write)
        if rt.last_scheduled_at is not None and rt.last_scheduled_at > now + FUTURE_TOLERANCE:
            log.warning("task %s: its last occurrence is recorded at %s, %.0f s in the future "
                        "(the wall clock was ahead when it was written); starting again from now",
                        tc.id, _iso(rt.last_scheduled_at), rt.last_scheduled_at - now)
            rt.last_scheduled_at = now
            firing.state = rt.state()
        self.tasks[tc.id] = rt
        if not rt.armable:
            return firing
        if rt.last_scheduled_at is not None and rt.last_scheduled_at < now:
            m = self.misfires(rt, rt.last_scheduled_at, now)
            m.state = m.state or firing.state
            firing = m
        self.arm_next(rt, max(now, rt.last_scheduled_at or now))
        return firing

    def remove(self, task_id: str) -> None:
        rt = self.tasks.pop(task_id, None)
        if rt is not None:
            self.disarm(rt)

    def rebuild_dependents(self) -> None:
        deps: dict[str, list[str]] = {}
        for rt in self.tasks.values():
            for up in rt.cfg.after:
                deps.setdefault(up, []).append(rt.cfg.id)
        self._dependents = deps

    def arm_next(self, rt: TaskRuntime, after: float, wall: float | None = None,
                 nxt: float | None = None) -> None:
        """Arm the first occurrence strictly after ``after`` (a wall instant). A caller arming
        many passes ``wall`` (now) and ``nxt`` (that occurrence, if it computed it already)."""
        self.disarm(rt)
        if rt.schedule is None or not rt.armable or self.stopped:
            return
        if nxt is None:
            nxt = rt.schedule.next_after(after)
        if nxt is None:
            return
        jitter = rt.jitter
        fire_at = nxt + (random.Random(f"{rt.cfg.id}:{nxt}").uniform(0, jitter) if jitter else 0)
        rt.next_due = nxt
        rt.handle = self.timers.arm_tick(Tick(rt.cfg.id, nxt, rt.generation), fire_at)
        self._on_scheduled(rt.cfg.id, nxt, self.clock.wall() if wall is None else wall)

    def disarm(self, rt: TaskRuntime) -> None:
        if rt.handle is not None:
            self.timers.cancel(rt.handle)
            rt.handle = None
        rt.next_due = None

    def rearm_all(self) -> list[ScheduleState]:
        """The wall clock stepped: re-arm every task from the corrected clock. Returns the
        states to save (tasks whose last occurrence now lies in the future)."""
        wall = self.clock.wall()
        log.warning("the wall clock jumped; re-arming cron occurrences and delayed jobs")
        saves: list[ScheduleState] = []
        for rt in self.tasks.values():
            if rt.last_scheduled_at is not None and rt.last_scheduled_at > wall + FUTURE_TOLERANCE:
                log.warning("task %s: the wall clock went back %.0f s; its schedule goes on from "
                            "the corrected clock", rt.cfg.id, rt.last_scheduled_at - wall)
                rt.last_scheduled_at = wall
                saves.append(rt.state())
            if rt.handle is not None and rt.next_due is not None:
                after = min(rt.next_due - 0.001, wall)
                if rt.last_scheduled_at is not None:  # never again an instant that already ran
                    after = max(after, rt.last_scheduled_at)
                self.arm_next(rt, after)
        return saves

    # ---- what came due -----------------------------------------------------------------------
    def sort_ticks(self, ticks: list[Tick], wall: float) -> tuple[
            list[tuple[TaskRuntime, float]], list[tuple[TaskRuntime, float]]]:
        """Split due ticks into occurrences to fire now and stale ones (missed by more than the
        task's grace: a stall or a wall step; decided by the misfire policy)."""
        fire: list[tuple[TaskRuntime, float]] = []
        stale: list[tuple[TaskRuntime, float]] = []
        for tick in ticks:
            rt = self.tasks.get(tick.task_id)
            if rt is None or rt.generation != tick.generation:
                continue
            rt.handle = None
            if wall + 0.0005 < tick.at:  # early (the wall clock went back a little): wait
                rt.handle = self.timers.arm_tick(tick, tick.at)
                continue
            if tick.at < wall - rt.grace:
                stale.append((rt, tick.at))
                continue
            fire.append((rt, tick.at))
        return fire, stale

    def after_fired(self, rt: TaskRuntime, at: float, wall: float) -> Firing | None:
        """Arm the occurrence after ``at``; when the loop stalled past it, decide the missed
        ones by policy and return them."""
        if not self.is_current(rt):
            return None
        nxt = rt.schedule.next_after(at) if rt.schedule else None
        if nxt is not None and nxt < wall - rt.grace:
            firing = self.misfires(rt, at, wall)
            self.arm_next(rt, max(wall, rt.last_scheduled_at or wall))
            return firing
        self.arm_next(rt, at, wall, nxt)
        return None

    def stale(self, rt: TaskRuntime, at: float, wall: float) -> Firing | None:
        if not self.is_current(rt):
            return None
        firing = self.misfires(rt, at - 0.001, wall)
        self.arm_next(rt, max(wall, rt.last_scheduled_at or wall))
        return firing

    def misfires(self, rt: TaskRuntime, last: float, now: float,
                 until: float | None = None) -> Firing:
        """Decide by the task's policy its occurrences in ``(last, until or now]``."""
        assert rt.schedule is not None
        tc = rt.cfg
        plan = plan_misfires(tc.id, rt.schedule, last, now, policy=tc.misfire,
                             grace=rt.grace, max_catch_up=tc.max_catch_up, until=until)
        firing = Firing(misfire=plan.record, overlap=False)
        if plan.record is not None:
            r = plan.record
            if r.missed:
                log.warning("task %s missed %d occurrence(s) from %s to %s; policy %s ran %d",
                            tc.id, r.missed, _iso(r.first_missed), _iso(r.last_missed),
                            r.policy, r.ran)
            else:  # all of them late within the grace: nothing was missed
                log.info("task %s: %d occurrence(s) came late (within misfire_grace); policy %s "
                         "ran %d", tc.id, len(plan.run), r.policy, r.ran)
        if plan.run:
            # caught-up occurrences queue behind each other whatever the overlap policy
            firing.occurrences = [(rt, t) for t in plan.run]
        elif plan.last_considered is not None and tc.misfire is Misfire.SKIP:
            # never back: a fleet's refire decides a window that may end before occurrences
            # fired since
            rt.last_scheduled_at = max(rt.last_scheduled_at or 0.0, plan.last_considered)
            firing.state = rt.state()
        if plan.last_considered is not None:
            rt.last_scheduled_at = max(rt.last_scheduled_at or 0.0, plan.last_considered)
        return firing

    # ---- pause, resume, reload ---------------------------------------------------------------
    def pause(self, task_id: str) -> ScheduleState:
        rt = self.get(task_id)
        rt.paused = True
        self.disarm(rt)
        return rt.state()

    def resume(self, task_id: str) -> ScheduleState:
        rt = self.get(task_id)
        rt.paused = False
        now = self.clock.wall()
        # occurrences while paused are not misfires: start again from now
        rt.last_scheduled_at = max(rt.last_scheduled_at or 0.0, now)
        self.arm_next(rt, now)
        return rt.state()

    @staticmethod
    def diff(old: Config, new: Config) -> ReloadDiff:
        o = {t.id: t for t in old.tasks}
        n = {t.id: t for t in new.tasks}
        old_tz, new_tz = old.kernel.timezone, new.kernel.timezone

        def timetable(t: TaskConfig, tz: str) -> tuple[Any, ...]:
            return (t.schedule, t.tz or tz, t.enabled)

        both = set(o) & set(n)
        fresh = {k for k in both if timetable(o[k], old_tz) != timetable(n[k], new_tz)}
        return ReloadDiff(added=sorted(set(n) - set(o)), removed=sorted(set(o) - set(n)),
                          changed=sorted(k for k in both if o[k] != n[k] or k in fresh),
                          new_timetable=fresh)

    def views(self, running: Mapping[str, int]) -> tuple[TaskView, ...]:
        """The tasks, for the snapshot (``running``: runs in flight per task)."""
        return tuple(
            TaskView(id=rt.cfg.id, action=rt.cfg.action, schedule=rt.cfg.schedule,
                     tz=rt.tz, enabled=rt.cfg.enabled, paused=rt.paused, next_due=rt.next_due,
                     last_outcome=rt.last_outcome, last_error_code=rt.last_error_code,
                     last_finished_at=rt.last_finished_at, after=tuple(rt.cfg.after),
                     running=running.get(rt.cfg.id, 0))
            for rt in self.tasks.values())

    def stop(self) -> None:
        self.stopped = True
        for rt in self.tasks.values():
            self.disarm(rt)

    def __repr__(self) -> str:
        armed = sum(1 for rt in self.tasks.values() if rt.handle is not None)
        return f"<Timetable tasks={len(self.tasks)} armed={armed}>"


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()
