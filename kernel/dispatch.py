"""The dispatcher: which ready jobs start now. Synchronous decisions only; the kernel awaits.

``offer()`` decides what happens to a job that came due (enqueue, skip, or cancel the running
ones, by the task's overlap policy); ``plan()`` picks the jobs to start given priorities,
``max_concurrency``, per-task ``max_instances``, per-key limits and resource gates (GPU memory),
and marks them running; ``finished()`` releases what a job held.

Priority with aging: a job of priority ``p`` enqueued at ``t`` has effective priority
``p + (now - t) / aging``. Ordering by that is the same as ordering by ``t - p * aging`` (``now``
is common to all), so one heap keyed on ``t - p * aging`` serves both priority and aging: a job
never waits behind higher priorities for more than ``(p_high - p) * aging`` seconds. ``fifo``
keys on ``t`` alone. Ties keep submission order.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .config import Overlap, Policy
from .records import Job


@dataclass(frozen=True, slots=True)
class TaskRules:
    """What the dispatcher needs to know about a task."""

    max_instances: int = 1
    overlap: Overlap = Overlap.SKIP
    concurrency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrency: int = 8
    queue_depth: int = 1024
    policy: Policy = Policy.PRIORITY_AWARE
    aging: float = 30.0
    concurrency_limits: dict[str, int] = field(default_factory=dict)


class Gate(Protocol):
    """A resource that must admit a job before it starts (GPU memory, for example)."""

    def try_admit(self, job: Job) -> bool:
        """Reserve what ``job`` needs and return True, or return False to hold it."""
        ...

    def release(self, job: Job) -> None:
        """Give back what ``try_admit`` reserved for ``job``."""
        ...


class Verdict(enum.Enum):
    ENQUEUED = "enqueued"
    SKIPPED = "skipped"          # overlap skip / buffer_one already full
    CANCEL_RUNNING = "cancel"    # enqueued; the kernel must cancel `cancel` first


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    cancel: tuple[str, ...] = ()
    dropped: tuple[Job, ...] = ()   # queued jobs superseded by cancel_other (to be recorded)


_ENQUEUED = Decision(Verdict.ENQUEUED)
_SKIPPED = Decision(Verdict.SKIPPED)


@dataclass(slots=True)
class _Entry:
    key: float
    seq: int
    job: Job
    enqueued_at: float
    concurrency_key: str | None
    overlap_exempt: bool


# the heap holds (key, seq, entry): tuples compare in C, and seq is unique, so the comparison
# never reaches the entry (a Python-level __lt__ cost a microsecond per comparison)
_HeapItem = tuple[float, int, _Entry]


@dataclass(slots=True)
class _Running:
    job: Job
    concurrency_key: str | None
    started_at: float


class Dispatcher:
    def __init__(
        self,
        limits: Limits,
        rules: Callable[[str], TaskRules | None] = lambda _task_id: None,
        gates: Iterable[Gate] = (),
    ) -> None:
        self.limits = limits
        self._rules = rules
        self._gates = list(gates)
        self._heap: list[_HeapItem] = []
        self._seq = itertools.count()
        self._running: dict[str, _Running] = {}
        self._by_task: Counter[str] = Counter()
        self._queued_by_task: Counter[str] = Counter()
        self._by_key: Counter[str] = Counter()
        self._held: dict[str, str] = {}  # job id -> why it is not starting (for the snapshot)
        self.ended = 0  # runs that released their slot, ever (a fleet kernel's rate of ends)

    # ---- what the kernel asks -------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._heap)

    @property
    def waiting_for_a_slot(self) -> int:
        """Queued jobs that only a free slot holds back: not those a limit or gate holds
        (a concurrency key, ``max_instances``, GPU memory), which hold no slot."""
        return max(0, len(self._heap) - len(self._held))

    @property
    def running(self) -> dict[str, Job]:
        return {k: r.job for k, r in self._running.items()}

    def has_room(self) -> bool:
        """Whether a new submission due now may join the ready queue (``queue_depth``)."""
        return len(self._heap) < self.limits.queue_depth

    def running_count(self, task_id: str) -> int:
        """Runs of ``task_id`` now (O(1))."""
        return self._by_task[task_id]

    def running_of(self, task_id: str) -> list[str]:
        return [jid for jid, r in self._running.items() if r.job.task_id == task_id]

    def queued_jobs(self) -> list[Job]:
        return [e.job for _k, _s, e in sorted(self._heap)]

    def held_reason(self, job_id: str) -> str | None:
        return self._held.get(job_id)

    def held(self) -> dict[str, str]:
        """Queued jobs a limit or gate holds back, with the reason."""
        return dict(self._held)

    def remove_many(self, job_ids: set[str] | None = None) -> list[Job]:
        """Take queued jobs out (all of them when ``job_ids`` is None): a fenced fleet member
        gives up what it claimed. Running jobs are not touched."""
        keep: list[_HeapItem] = []
        out: list[Job] = []
        for item in self._heap:
            job = item[2].job
            if job_ids is None or job.id in job_ids:
                out.append(job)
                if job.task_id:
                    self._queued_by_task[job.task_id] -= 1
                self._held.pop(job.id, None)
            else:
                keep.append(item)
        if out:
            heapq.heapify(keep)
            self._heap = keep
        return out

    # ---- decisions --------------------------------------------------------------------------
    def offer(self, job: Job, now: float, *, occurrence: bool = False,
              concurrency_key: str | None = None) -> Decision:
        """A job came due. Occurrences of a task are subject to its overlap policy."""
        rules = self._rules(job.task_id) if job.task_id else None
        key = (rules.concurrency_key if rules else None) or concurrency_key
        if occurrence and rules is not None and job.task_id is not None:
            busy = self._by_task[job.task_id] >= rules.max_instances
            queued = self._queued_by_task[job.task_id]
            if busy or queued:
                if rules.overlap is Overlap.SKIP:
                    return _SKIPPED
                if rules.overlap is Overlap.BUFFER_ONE and queued >= 1:
                    return _SKIPPED
                if rules.overlap is Overlap.CANCEL_OTHER:
                    dropped = self._drop_queued(job.task_id)
                    self._push(job, now, key, overlap_exempt=True)
                    return Decision(Verdict.CANCEL_RUNNING, tuple(self.running_of(job.task_id)),
                                    dropped)
                if rules.overlap is Overlap.ALLOW_ALL:
                    self._push(job, now, key, overlap_exempt=True)
                    return _ENQUEUED
        self._push(job, now, key, overlap_exempt=bool(
            rules is not None and rules.overlap is Overlap.ALLOW_ALL))
        return _ENQUEUED

    def plan(self, now: float, *, scan_limit: int = 10_000) -> list[Job]:
        """Pick the jobs that start now and mark them running. Blocked jobs keep their place."""
        if not self._heap:
            return []
        starts: list[Job] = []
        deferred: list[_HeapItem] = []
        for gate in self._gates:  # e.g. the GPU gate reads the cards once for the whole plan
            begin = getattr(gate, "begin_plan", None)
            if begin is not None:
                begin()
        free = self.limits.max_concurrency - len(self._running)
        scanned = 0
        heap = self._heap
        held = self._held
        pop = heapq.heappop
        while heap and free > 0 and scanned < scan_limit:
            item = pop(heap)
            entry = item[2]
            scanned += 1
            why = self._blocked(entry)
            job = entry.job
            if why is not None:
                held[job.id] = why
                deferred.append(item)
                continue
            if held:
                held.pop(job.id, None)
            if job.task_id:
                self._queued_by_task[job.task_id] -= 1
                self._by_task[job.task_id] += 1
            if entry.concurrency_key:
                self._by_key[entry.concurrency_key] += 1
            self._running[job.id] = _Running(job, entry.concurrency_key, now)
            starts.append(job)
            free -= 1
        for item in deferred:
            heapq.heappush(heap, item)
        for gate in self._gates:
            end = getattr(gate, "end_plan", None)
            if end is not None:
                end()
        return starts

    def finished(self, job: Job) -> None:
        """``job`` stopped running (any outcome): release its slot, key and reservations."""
        r = self._running.pop(job.id, None)
        if r is None:
            return
        self.ended += 1
        if job.task_id:
            self._by_task[job.task_id] -= 1
        if r.concurrency_key:
            self._by_key[r.concurrency_key] -= 1
        for gate in self._gates:
            gate.release(job)

    def remove(self, job_id: str) -> Job | None:
        """Take a queued job out (cancelled by a user). Running jobs are not touched."""
        for i, (_k, _s, e) in enumerate(self._heap):
            if e.job.id == job_id:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                if e.job.task_id:
                    self._queued_by_task[e.job.task_id] -= 1
                self._held.pop(job_id, None)
                return e.job
        return None

    # ---- internals --------------------------------------------------------------------------
    def _push(self, job: Job, now: float, key: str | None, *, overlap_exempt: bool) -> None:
        if self.limits.policy is Policy.FIFO:
            sort_key = now
        else:
            sort_key = now - job.priority * self.limits.aging
        seq = next(self._seq)
        heapq.heappush(self._heap, (sort_key, seq, _Entry(sort_key, seq, job, now, key,
                                                          overlap_exempt)))
        if job.task_id:
            self._queued_by_task[job.task_id] += 1

    def _drop_queued(self, task_id: str) -> tuple[Job, ...]:
        keep = [item for item in self._heap if item[2].job.task_id != task_id]
        if len(keep) == len(self._heap):
            return ()
        dropped = tuple(item[2].job for item in self._heap if item[2].job.task_id == task_id)
        self._heap = keep
        heapq.heapify(self._heap)
        self._queued_by_task[task_id] = 0
        for j in dropped:
            self._held.pop(j.id, None)
        return dropped

    def _blocked(self, entry: _Entry) -> str | None:
        job = entry.job
        if job.task_id and not entry.overlap_exempt:
            rules = self._rules(job.task_id)
            limit = rules.max_instances if rules else 1
            if self._by_task[job.task_id] >= limit:
                return f"task {job.task_id!r} already runs {limit} instance(s)"
        key = entry.concurrency_key
        if key is not None:
            key_limit = self.limits.concurrency_limits.get(key)
            if key_limit is not None and self._by_key[key] >= key_limit:
                return f"concurrency key {key!r} is at its limit of {key_limit}"
        admitted: list[Gate] = []
        for gate in self._gates:
            if not gate.try_admit(job):
                for g in admitted:
                    g.release(job)
                why = getattr(gate, "last_reason", {}).get(job.id)
                return str(why) if why else f"waiting for {type(gate).__name__}"
            admitted.append(gate)
        return None

    def __repr__(self) -> str:
        return (f"<Dispatcher queued={len(self._heap)} running={len(self._running)}"
                f" max={self.limits.max_concurrency}>")
