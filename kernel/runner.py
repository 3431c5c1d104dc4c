"""The runner: the only table of running jobs. Start, call the action, cancel, time out, drain.

Each run is an asyncio task the runner owns (``_tasks``). A run ends in one of two ways:
- its action returns or raises; the runner classifies that (``completion.classify``) and hands
  the result to ``on_done``;
- it is **abandoned**: a run that was cancelled (time-out, ``DELETE``, overlap, shutdown) and
  did not stop within ``cancel_grace`` seconds. Its slot is freed at once and it is recorded
  with ERR_ABANDONED; whatever the action does afterwards is ignored. So no action, however
  it treats ``CancelledError``, can hold a slot or keep the kernel from stopping.

Time-outs are deadlines in ``Timers`` (no helper task per run): the kernel's loop hands expired
ones to ``expired()``. The runner knows nothing of the store, the dispatcher or the bus: the
kernel passes ``on_start`` (mark the run durable, publish) and ``on_done`` (asynchronous:
settle and make durable).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from math import inf
from typing import Any

from . import ids
from .clock import Clock
from .completion import Result, classify, succeeded
from .errors import ErrorCode
from .hookspecs import RunContext
from .plugins import PluginSet
from .records import Job, JobState, Outcome
from .snapshot import RunningView
from .timers import Timers

log = logging.getLogger("kernel.runner")

CANCEL_GRACE = 5.0  # seconds a cancelled action has to stop before it is abandoned

SHUTDOWN = "shutdown"


class RunningJob:
    __slots__ = ("_ended", "abandoned", "cancel_reason", "deadline", "in_action", "job", "owner",
                 "progress", "span_id", "start_failed", "started_mono", "started_wall", "task",
                 "timed_out", "timeout", "watch")

    def __init__(self, job: Job, span_id: str, started_mono: float,
                 timeout: float | None) -> None:
        self.job = job
        self.span_id = span_id
        self.started_mono = started_mono
        self.started_wall = 0.0
        self.timeout = timeout
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason: str | None = None
        self.deadline = inf          # monotonic instant of the armed deadline (Timers)
        self.watch: float | None = None  # the length of the armed deadline
        self.in_action = False       # awaiting the action (a time-out may cancel only then)
        self.timed_out = False
        self.abandoned = False
        self.progress: tuple[float, float | None, str] | None = None  # (done, total, note)
        self.owner: str | None = None   # fleet: the kernel id that held the job when it started
        self.start_failed = False       # the start was refused (not ours, or not checkable)
        self._ended: asyncio.Event | None = None  # made only when someone waits for the end

    def ended(self) -> asyncio.Event:
        """Set once the run's outcome is recorded (or it was abandoned)."""
        if self._ended is None:
            self._ended = asyncio.Event()
        return self._ended

    def _end(self) -> None:
        if self._ended is not None:
            self._ended.set()

    def report(self, done: float, total: float | None, note: str) -> None:
        self.progress = (done, total, note)

    @property
    def key(self) -> str:
        return self.job.id

    def __repr__(self) -> str:
        return (f"<RunningJob {self.job.id} action={self.job.action} "
                f"cancel={self.cancel_reason} abandoned={self.abandoned}>")


OnStart = Callable[[RunningJob], Awaitable[None]]  # before the action (durable mark)
OnDone = Callable[[RunningJob, Result, bool], Awaitable[None]]  # (run, result, shutdown)


class Runner:
    def __init__(self, clock: Clock, timers: Timers, plugins: PluginSet, *,
                 on_start: OnStart, on_done: OnDone,
                 gpu_index: Callable[[str], int | None] = lambda _jid: None,
                 cancel_grace: float = CANCEL_GRACE) -> None:
        self.clock = clock
        self.timers = timers
        self.plugins = plugins
        self._on_start = on_start
        self._on_done = on_done
        self._gpu_index = gpu_index
        self.cancel_grace = cancel_grace
        self.running: dict[str, RunningJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()       # runs
        self._given_up: set[asyncio.Task[None]] = set()    # abandoned runs, still referenced
        self._followups: set[asyncio.Task[None]] = set()   # recording abandoned runs
        self._loggers: dict[str, logging.Logger] = {}
        self.abandoned = 0

    def __len__(self) -> int:
        return len(self.running)

    def get(self, job_id: str) -> RunningJob | None:
        return self.running.get(job_id)

    # ---- starting ----------------------------------------------------------------------------
    def start(self, job: Job, timeout: float | None) -> RunningJob:
        r = RunningJob(job, ids.span_id(), self.clock.monotonic(), timeout)
        self.running[job.id] = r
        task = asyncio.get_running_loop().create_task(self._run(r))
        r.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return r

    async def _run(self, r: RunningJob) -> None:
        job = r.job
        wall = self.clock.wall()
        r.started_wall = wall
        job.state = JobState.RUNNING
        job.started_at = wall
        shutdown = False
        try:
            await self._on_start(r)
            res = succeeded(await self._call(r))
        except asyncio.CancelledError:
            reason = r.cancel_reason or SHUTDOWN
            if reason == SHUTDOWN:
                shutdown = True
                res = Result(Outcome.CANCELLED, ErrorCode.ERR_CANCELLED,
                             "cancelled by shutdown; it is run again at the next start")
            else:
                _uncancel()
                res = Result(Outcome.CANCELLED, ErrorCode.ERR_CANCELLED, f"cancelled ({reason})")
        except Exception as exc:  # classified; an action's bug never stops the kernel
            res = classify(exc)
        if r.abandoned:  # already recorded when it was given up on: its answer is too late
            log.warning("abandoned run %s (%s) ended at last: %s", job.id, job.action,
                        res.outcome.value)
            return
        self._unwatch(r)
        if r.timed_out and not shutdown:
            # the action's own answer to the cancellation does not matter: it ran out of time
            res = Result(Outcome.TIMED_OUT, ErrorCode.ERR_TIMEOUT,
                         f"timed out after {r.timeout:g} s", retryable=True)
        if self.running.get(job.id) is r:
            del self.running[job.id]
        try:
            await self._on_done(r, res, shutdown)
        finally:
            r._end()

    def _context(self, r: RunningJob) -> RunContext:
        job = r.job
        logger = self._loggers.get(job.action)
        if logger is None:
            logger = self._loggers[job.action] = logging.getLogger(f"kernel.action.{job.action}")
        return RunContext(
            job_id=job.id, task_id=job.task_id, action=job.action, trace_id=job.trace_id,
            span_id=r.span_id, attempt=job.attempt, scheduled_at=job.scheduled_at,
            timeout=r.timeout,
            log=logging.LoggerAdapter(logger, {
                "trace_id": job.trace_id, "task_id": job.task_id, "job_id": job.id,
                "attempt": job.attempt}),
            parent_span_id=job.parent_span_id, gpu_index=self._gpu_index(job.id),
            on_progress=r.report)

    async def _call(self, r: RunningJob) -> Any:
        """Await the action in this run's own task; the payload is decoded here, once."""
        job = r.job
        action = self.plugins.action(job.action)
        payload = self.plugins.decode_payload(action, job.payload)
        aw = action.run(self._context(r), payload)
        if r.cancel_reason is not None:  # cancelled before the action started
            if inspect.iscoroutine(aw):
                aw.close()
            raise asyncio.CancelledError
        if r.timeout is not None:
            self._watch(r, r.timeout)
        r.in_action = True
        try:
            return await aw
        finally:
            r.in_action = False

    # ---- deadlines ---------------------------------------------------------------------------
    def _watch(self, r: RunningJob, length: float) -> None:
        self._unwatch(r)
        r.watch = length
        self.timers.add_deadline(r, length)

    def _unwatch(self, r: RunningJob) -> None:
        if r.watch is not None:
            self.timers.remove_deadline(r, r.watch)
            r.watch = None

    def expired(self, r: RunningJob) -> None:
        """A deadline of ``r`` passed: its time-out (cancel it), or, for a run already
        cancelled, its grace to stop (abandon it)."""
        r.watch = None
        if self.running.get(r.job.id) is not r or r.abandoned:
            return
        if r.cancel_reason is None and r.in_action:
            r.timed_out = True
            self.cancel(r, "timeout")
        elif r.cancel_reason is not None:
            self._abandon(r)

    # ---- stopping ----------------------------------------------------------------------------
    def cancel(self, r: RunningJob, reason: str) -> None:
        """Cancel a run. Before its action starts, the run sees the reason and does not start
        it; inside the action, its task is cancelled, and it has ``cancel_grace`` seconds to
        stop before it is abandoned."""
        if r.cancel_reason is None:
            r.cancel_reason = reason
        task = r.task
        if r.in_action and task is not None and not task.done():
            task.cancel()
            if reason != SHUTDOWN:
                self._watch(r, self.cancel_grace)

    def _abandon(self, r: RunningJob) -> None:
        r.abandoned = True
        self.abandoned += 1
        if self.running.get(r.job.id) is r:
            del self.running[r.job.id]
        self._give_up(r)
        what = "time-out" if r.timed_out else (r.cancel_reason or "cancel")
        log.error("run %s (action %s) did not stop within %g s of its %s; abandoned: its slot "
                  "is freed and its result will be ignored", r.job.id, r.job.action,
                  self.cancel_grace, what)
        res = Result(Outcome.TIMED_OUT if r.timed_out else Outcome.CANCELLED,
                     ErrorCode.ERR_ABANDONED,
                     f"did not stop within {self.cancel_grace:g} s after its {what}; abandoned")
        done = self._on_done(r, res, False)
        task = asyncio.get_running_loop().create_task(_as_coro(done))
        task.add_done_callback(lambda _t: r._end())
        self._followups.add(task)
        task.add_done_callback(self._followups.discard)

    def _give_up(self, r: RunningJob) -> None:
        task = r.task
        if task is not None and task in self._tasks:
            self._tasks.discard(task)
            self._given_up.add(task)
            task.add_done_callback(self._given_up.discard)

    async def drain(self, grace: float) -> list[RunningJob]:
        """Shutdown: let runs finish for ``grace`` seconds, cancel the rest, give them
        ``cancel_grace`` to stop, and return those that would not (abandoned; they stay RUNNING
        in the store and are run again at the next start)."""
        clock = self.clock
        if self.running:
            log.info("waiting up to %.0f s for %d running job(s)", grace, len(self.running))
            await self._wait_runs(clock.monotonic() + grace)
        for r in list(self.running.values()):
            self.cancel(r, SHUTDOWN)
        if self.running:
            await self._wait_runs(clock.monotonic() + self.cancel_grace)
        stuck = list(self.running.values())
        for r in stuck:
            r.abandoned = True
            self.abandoned += 1
            self.running.pop(r.job.id, None)
            self._give_up(r)
            log.error("run %s (action %s) ignored its cancellation at shutdown; abandoned "
                      "(it runs again at the next start)", r.job.id, r.job.action)
        # what is left is short: runs that stopped settling their outcome, and the records of
        # abandoned runs (store writes)
        while self._tasks or self._followups:
            await asyncio.wait([*self._tasks, *self._followups])
        return stuck

    @property
    def abandoned_tasks(self) -> int:
        """Abandoned runs whose task has not ended (yet): the process owner may have to exit
        without waiting for them."""
        return sum(1 for t in self._given_up if not t.done())

    async def _wait_runs(self, deadline: float) -> None:
        while self.running and self.clock.monotonic() < deadline:
            tasks = [r.task for r in self.running.values() if r.task is not None]
            if not tasks:
                return
            done = asyncio.Event()
            waiter = asyncio.ensure_future(asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED))
            waiter.add_done_callback(functools.partial(_set, done))
            try:
                await self.clock.sleep_until(deadline, done)
            finally:
                waiter.cancel()
            await asyncio.sleep(0)

    def views(self, now_mono: float) -> tuple[RunningView, ...]:
        """The running jobs, for the snapshot."""
        return tuple(
            RunningView(job_id=r.job.id, task_id=r.job.task_id, action=r.job.action,
                        trace_id=r.job.trace_id, attempt=r.job.attempt,
                        elapsed=now_mono - r.started_mono, timeout=r.timeout,
                        done=r.progress[0] if r.progress else None,
                        total=r.progress[1] if r.progress else None,
                        note=r.progress[2] if r.progress else "")
            for r in self.running.values())

    def __repr__(self) -> str:
        return f"<Runner running={len(self.running)} abandoned={self.abandoned}>"


def _uncancel() -> None:
    """This task handled a cancellation meant for its action and goes on (to record it)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()


def _set(ev: asyncio.Event, _f: object) -> None:
    ev.set()


async def _as_coro(aw: Awaitable[None]) -> None:
    await aw
