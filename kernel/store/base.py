"""The store contract: what the kernel may rely on, whichever implementation it is given.

Every implementation (:mod:`~kernel.store.sqlite`, :mod:`~kernel.store.memory`) passes the same
contract suite (``tests/store/test_contract.py``).

Rules common to every method:

* The store never reads a clock. A method that needs "now" takes it as an argument; instants are
  wall seconds since the Unix epoch (``float``).
* A write returns only once it is durable (committed); if it raises, nothing of it is visible.
* Jobs are values: the store keeps a copy of what it is given and its reads return fresh
  objects, so mutating a job after ``submit`` or a returned one changes nothing stored.
  (``submit`` hands back the caller's own object for a job it stored.)
* Only :class:`~kernel.errors.StoreError` subclasses escape (plus
  :class:`~kernel.errors.BadPayload` for a payload that cannot be encoded, and ``ValueError``
  for an invalid argument); library errors are translated where they arise.
* Using a store that is not open raises :class:`~kernel.errors.StoreError`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Self

from kernel.records import (
    Job,
    JobState,
    MisfireRecord,
    RunQuery,
    RunRecord,
    ScheduleState,
    SubmitResult,
)


class Store(abc.ABC):
    """Durable jobs, schedule state, run history and misfire decisions."""

    # -- lifecycle ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Make the store usable: create the schema or migrate it forward.

        Post: reads and writes may be called. Opening an open store is a no-op.

        :raises StoreCorrupt: the file is not a database of ours, or its schema is newer than
            this kernel knows; the file is left untouched.
        :raises StoreReadOnly: the file or its directory cannot be written.
        :raises StoreLocked: another connection holds the write lock past the busy timeout.
        :raises StoreError: anything else that prevents opening (the message names the path).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush every pending (grouped) write, then release the store.

        Post: every write whose call was made before ``close`` has been committed or has failed
        with its error; later calls raise :class:`~kernel.errors.StoreError`. Idempotent.
        """

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- writes ---------------------------------------------------------------------------------

    @abc.abstractmethod
    async def submit(self, jobs: Sequence[Job], now: float) -> list[SubmitResult]:
        """Store ``jobs``; one result per job, in order. Durable (committed) before it returns.

        Concurrent calls may be committed together (group commit); each caller's call returns
        only after that commit. If the commit fails, every call in it raises and nothing of
        them is visible. A caller cancelled while waiting does not withdraw its write: it may
        still be committed (as with any request whose answer is lost).

        * Dedup: a job whose ``dedup_key`` is live (another job stored it with
          ``dedup_expires_at`` > ``now``, or ``None`` = never expires) stores nothing and
          returns ``SubmitResult(job=<that job>, existed=True)``. The job returned is its stored
          state, or, if it is no longer stored (finished or cancelled), its submitted form with
          ``state=DONE``. An expired key is taken over. Within one call (or one group commit)
          the first job with a key wins.
        * Cron occurrences (``kind=CRON``): ``(task_id, scheduled_at)`` is unique among stored
          jobs; a second one returns the stored job with ``existed=True``. Each stored
          occurrence raises ``schedule_states()[task_id].last_scheduled_at`` to at least its
          ``scheduled_at``, in the same transaction.
        * A job whose ``id`` is already stored returns the stored job with ``existed=True``.

        :raises BadPayload: a job's payload cannot be encoded; nothing of this call was stored.
        :raises StoreReadOnly, StoreFull, StoreLocked, StoreError: nothing was stored.
        """

    @abc.abstractmethod
    async def mark_running(self, job_id: str, started_at: float, attempt: int) -> None:
        """Record that an attempt started: ``state=RUNNING``, ``started_at``, ``attempt``.

        Post: after a restart, :meth:`load_pending` yields the job with ``state=RUNNING``.
        A ``job_id`` that is not stored (cancelled meanwhile) is ignored.

        :raises StoreError: the write failed.
        """

    @abc.abstractmethod
    async def finish(
        self, job_id: str, run: RunRecord, follow_up: Sequence[Job] = ()
    ) -> None:
        """Atomically delete the job, add ``run`` to history and store ``follow_up`` jobs.

        Follow-ups (a retry, dependent jobs) obey :meth:`submit`'s rules, with
        ``run.finished_at`` as "now"; one that exists already is silently not stored again.
        A ``job_id`` that is no longer stored (cancelled meanwhile) is not an error.

        :raises StoreError: nothing of it is visible.
        """

    @abc.abstractmethod
    async def cancel(self, job_id: str, run: RunRecord | None = None) -> Job | None:
        """Remove a stored job, adding ``run`` to history if given and the job was found.

        Returns the job as it was stored (``state`` tells whether an attempt was running: the
        caller stops it), or ``None`` if no job ``job_id`` is stored (nothing is written).
        Dedup keys stay live until they expire.

        :raises StoreError: nothing was removed.
        """

    @abc.abstractmethod
    async def set_schedule_state(self, state: ScheduleState) -> None:
        """Insert or replace a task's schedule state.

        ``last_scheduled_at`` never moves backwards: the stored value is the larger of the two,
        so a stale read cannot undo an occurrence a concurrent :meth:`submit` recorded.
        """

    @abc.abstractmethod
    async def record_misfire(self, rec: MisfireRecord) -> None:
        """Append a misfire decision."""

    @abc.abstractmethod
    async def prune_history(
        self,
        now: float,
        *,
        max_rows: int | None,
        max_age: float | None,
        batch: int = 5000,
    ) -> int:
        """Apply run-history retention; returns the number of rows deleted.

        Deletes runs with ``finished_at < now - max_age``, then the oldest runs beyond the
        newest ``max_rows`` (ordered by ``finished_at``, then insertion). Deletes at most
        ``batch`` rows per transaction, so other writes are committed in between.
        ``None`` disables that limit.
        """

    @abc.abstractmethod
    async def purge_dedup(self, now: float, batch: int = 5000) -> int:
        """Forget dedup keys with ``dedup_expires_at <= now``, ``batch`` per transaction.

        Returns the number of keys removed. Live keys and stored jobs are untouched.
        """

    # -- reads ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> Job | None:
        """The stored job ``job_id``, or ``None``."""

    @abc.abstractmethod
    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        """The stored jobs among ``job_ids``, in the order asked (missing ids are skipped)."""

    @abc.abstractmethod
    async def list_jobs(
        self,
        *,
        state: JobState | None = None,
        task_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        """Stored jobs matching the filters, ordered by ``due_at`` then submission order."""

    @abc.abstractmethod
    async def count_jobs(self) -> int:
        """The number of stored jobs (pending and running)."""

    @abc.abstractmethod
    def load_pending(self, batch: int = 10_000) -> AsyncIterator[list[Job]]:
        """Every stored job, pending and running, as lists of at most ``batch`` jobs.

        Ordered by ``due_at`` then submission order across batches. Running jobs keep
        ``state=RUNNING`` (the kernel marks them recovered). The iteration sees the jobs stored
        when it started (a snapshot): writes made meanwhile are not mixed in.

        :raises StoreError: reading failed.
        """

    @abc.abstractmethod
    async def schedule_states(self) -> dict[str, ScheduleState]:
        """Every task's schedule state, by task id."""

    @abc.abstractmethod
    async def misfires(self, task_id: str | None = None, limit: int = 100) -> list[MisfireRecord]:
        """Misfire decisions, newest ``decided_at`` first, optionally for one task."""

    @abc.abstractmethod
    async def query_runs(self, q: RunQuery) -> list[RunRecord]:
        """Run history matching ``q``, newest ``finished_at`` first.

        ``since`` is inclusive and ``until`` exclusive, both on ``finished_at``; ``task_id``,
        ``outcome`` and ``trace_id`` match exactly; then ``offset`` and ``limit``.
        """

    @abc.abstractmethod
    async def health(self) -> dict[str, object]:
        """A snapshot for probes and the TUI; never raises.

        Keys: ``ok`` (bool), ``path`` (str or ``None``), ``error`` (the last failure's message
        or ``None``), ``pending`` and ``running`` (job counts; ``-1`` if unknown), plus
        implementation-specific keys.
        """


__all__ = ["Store"]
