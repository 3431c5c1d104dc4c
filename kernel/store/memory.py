"""An in-memory store with the same contract as the SQLite one (tests, ephemeral runs).

Jobs are kept as their encoded bytes, exactly as the SQLite store keeps them, so both stores
return equal values and neither shares mutable objects with its callers. Every method runs
without awaiting between its reads and writes, which makes each one atomic.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from kernel.errors import StoreError
from kernel.records import (
    Job,
    JobState,
    MisfireRecord,
    RunQuery,
    RunRecord,
    ScheduleState,
    SubmitResult,
)
from kernel.store import schema
from kernel.store.base import Store


@dataclass(slots=True)
class _Row:
    seq: int
    due_at: float
    state: str
    task_id: str | None
    occurrence: tuple[str, float] | None
    attempt: int
    started_at: float | None
    body: bytes

    def job(self) -> Job:
        return schema.decode_job(self.state, self.attempt, self.started_at, self.body)


@dataclass(slots=True)
class _Key:
    job_id: str
    expires_at: float | None
    body: bytes


class MemoryStore(Store):
    """A :class:`~kernel.store.base.Store` in process memory; nothing survives the process."""

    def __init__(self) -> None:
        self._open = False
        self._seq = itertools.count(1)
        self._jobs: dict[str, _Row] = {}
        self._occurrences: dict[tuple[str, float], str] = {}
        self._dedup: dict[str, _Key] = {}
        self._runs: list[tuple[float, int, RunRecord]] = []  # sorted by (finished_at, seq)
        self._states: dict[str, ScheduleState] = {}
        self._misfires: list[tuple[int, MisfireRecord]] = []

    def __repr__(self) -> str:
        return f"MemoryStore(open={self._open}, jobs={len(self._jobs)}, runs={len(self._runs)})"

    def _check(self) -> None:
        if not self._open:
            raise StoreError("the in-memory store is not open")

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    # -- writes -----------------------------------------------------------------------------

    def _insert(self, job: Job, now: float, body: bytes) -> SubmitResult:
        key = job.dedup_key
        if key is not None:
            held = self._dedup.get(key)
            if held is not None and (held.expires_at is None or held.expires_at > now):
                row = self._jobs.get(held.job_id)
                found = row.job() if row is not None else schema.decode_snapshot(held.body)
                return SubmitResult(job=found, existed=True)
        existing = self._jobs.get(job.id)
        occurrence: tuple[str, float] | None = None
        if schema.is_occurrence(job) and job.task_id is not None and job.scheduled_at is not None:
            occurrence = (job.task_id, job.scheduled_at)
            if existing is None and (other := self._occurrences.get(occurrence)) is not None:
                existing = self._jobs[other]
        if existing is not None:
            return SubmitResult(job=existing.job(), existed=True)
        self._jobs[job.id] = _Row(
            next(self._seq), job.due_at, job.state, job.task_id, occurrence, job.attempt,
            job.started_at, body,
        )
        if occurrence is not None:
            self._occurrences[occurrence] = job.id
            self._raise_last_scheduled(*occurrence)
        if key is not None:
            self._dedup[key] = _Key(job.id, job.dedup_expires_at, body)
        return SubmitResult(job=job)

    def _raise_last_scheduled(self, task_id: str, at: float) -> None:
        st = self._states.get(task_id)
        if st is None:
            self._states[task_id] = ScheduleState(task_id=task_id, last_scheduled_at=at)
        elif st.last_scheduled_at is None or st.last_scheduled_at < at:
            st.last_scheduled_at = at

    def _remove(self, job_id: str) -> _Row | None:
        row = self._jobs.pop(job_id, None)
        if row is not None and row.occurrence is not None:
            self._occurrences.pop(row.occurrence, None)
        return row

    def _add_run(self, run: RunRecord) -> None:
        bisect.insort(self._runs, (run.finished_at, next(self._seq), run))

    async def submit(self, jobs: Sequence[Job], now: float) -> list[SubmitResult]:
        self._check()
        bodies = [schema.encode_job(job) for job in jobs]  # all or nothing: encode first
        return [self._insert(job, now, body) for job, body in zip(jobs, bodies, strict=True)]

    async def mark_running(self, job_id: str, started_at: float, attempt: int) -> None:
        self._check()
        row = self._jobs.get(job_id)
        if row is None:
            return
        row.state = JobState.RUNNING
        row.started_at = started_at
        row.attempt = attempt

    async def finish(self, job_id: str, run: RunRecord, follow_up: Sequence[Job] = ()) -> None:
        self._check()
        bodies = [schema.encode_job(job) for job in follow_up]
        self._remove(job_id)
        self._add_run(run)
        for job, body in zip(follow_up, bodies, strict=True):
            self._insert(job, run.finished_at, body)

    async def cancel(self, job_id: str, run: RunRecord | None = None) -> Job | None:
        self._check()
        row = self._remove(job_id)
        if row is None:
            return None
        if run is not None:
            self._add_run(run)
        return row.job()

    async def set_schedule_state(self, state: ScheduleState) -> None:
        self._check()
        old = self._states.get(state.task_id)
        last = state.last_scheduled_at
        if old is not None and old.last_scheduled_at is not None:
            last = old.last_scheduled_at if last is None else max(last, old.last_scheduled_at)
        self._states[state.task_id] = ScheduleState(
            task_id=state.task_id,
            last_scheduled_at=last,
            paused=state.paused,
            next_due_at=state.next_due_at,
        )

    async def record_misfire(self, rec: MisfireRecord) -> None:
        self._check()
        self._misfires.append((next(self._seq), rec))

    async def prune_history(
        self,
        now: float,
        *,
        max_rows: int | None,
        max_age: float | None,
        batch: int = 5000,
    ) -> int:
        self._check()
        cut = 0
        if max_age is not None:
            cut = bisect.bisect_left(self._runs, (now - max_age,))
        if max_rows is not None:
            cut = max(cut, len(self._runs) - max(max_rows, 0))
        del self._runs[:cut]
        return cut

    async def purge_dedup(self, now: float, batch: int = 5000) -> int:
        self._check()
        expired = [
            k for k, v in self._dedup.items() if v.expires_at is not None and v.expires_at <= now
        ]
        for k in expired:
            del self._dedup[k]
        return len(expired)

    # -- reads ------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        self._check()
        row = self._jobs.get(job_id)
        return row.job() if row is not None else None

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        self._check()
        return [row.job() for i in job_ids if (row := self._jobs.get(i)) is not None]

    def _ordered(self) -> list[_Row]:
        return sorted(self._jobs.values(), key=lambda r: (r.due_at, r.seq))

    async def list_jobs(
        self,
        *,
        state: JobState | None = None,
        task_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        self._check()
        rows = [
            r
            for r in self._ordered()
            if (state is None or r.state == state) and (task_id is None or r.task_id == task_id)
        ]
        return [r.job() for r in rows[max(offset, 0) : max(offset, 0) + max(limit, 0)]]

    async def count_jobs(self) -> int:
        self._check()
        return len(self._jobs)

    async def load_pending(self, batch: int = 10_000) -> AsyncIterator[list[Job]]:
        self._check()
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        rows = self._ordered()  # the snapshot: later writes are not mixed in
        for i in range(0, len(rows), batch):
            yield [r.job() for r in rows[i : i + batch]]

    async def schedule_states(self) -> dict[str, ScheduleState]:
        self._check()
        return {
            k: ScheduleState(
                task_id=v.task_id,
                last_scheduled_at=v.last_scheduled_at,
                paused=v.paused,
                next_due_at=v.next_due_at,
            )
            for k, v in self._states.items()
        }

    async def misfires(self, task_id: str | None = None, limit: int = 100) -> list[MisfireRecord]:
        self._check()
        recs = [(r.decided_at, s, r) for s, r in self._misfires if task_id in (None, r.task_id)]
        recs.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [r for _, _, r in recs[: max(limit, 0)]]

    async def query_runs(self, q: RunQuery) -> list[RunRecord]:
        self._check()
        out: list[RunRecord] = []
        skip = max(q.offset, 0)
        for _, _, run in reversed(self._runs):
            if len(out) >= q.limit:
                break
            if (
                (q.task_id is not None and run.task_id != q.task_id)
                or (q.outcome is not None and run.outcome != q.outcome)
                or (q.trace_id is not None and run.trace_id != q.trace_id)
                or (q.job_id is not None and run.job_id != q.job_id)
                or (q.since is not None and run.finished_at < q.since)
                or (q.until is not None and run.finished_at >= q.until)
            ):
                continue
            if skip:
                skip -= 1
                continue
            out.append(run)
        return out

    async def health(self) -> dict[str, object]:
        running = sum(1 for r in self._jobs.values() if r.state == JobState.RUNNING)
        return {
            "ok": self._open,
            "path": None,
            "error": None if self._open else "not open",
            "pending": len(self._jobs) - running,
            "running": running,
            "history_rows": len(self._runs),
            "backend": "memory",
        }


__all__ = ["MemoryStore"]
