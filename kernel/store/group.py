"""Group commit: one queue of write operations, committed in groups by one task.

Every write of a store appends an :class:`~kernel.store.sqlite_tx.Op` (its arguments and its
future) and awaits the future. :meth:`GroupCommit.run`, the store's writer task, takes everything
queued (up to ``max_weight`` jobs; one call is never split) and hands it to the store's
``commit`` coroutine, which runs it as one transaction and settles every future. While a commit
is in flight new requests queue up, so the group size follows the load without a timer: an idle
store commits a lone request at once, a busy one hundreds per transaction.

``depth`` groups may be in flight at once (the PostgreSQL store: 2, one per writer connection),
so that the server executes one while the kernel builds the next, instead of the two taking
turns. Only groups of operations that commute (``Op.commutes``: submissions, starts and
finishes, each for its own jobs) go beside each other: an operation that depends on another is
issued after that one's future settled, i.e. after its group committed, so their relative order
is free. A group holding anything else (a task's state, a cancel) waits until every group
before it committed, and no group starts while it is in flight: those keep the order they were
issued in (two state writes of one task must end as the last one issued). SQLite has one
writer: depth 1.

Used by the SQLite and the PostgreSQL store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from kernel.errors import StoreError
from kernel.store.sqlite_tx import Op


class GroupCommit:
    """The queue and the loop of a store's writer task.

    :param commit: runs one group as one transaction and settles (or fails) its operations.
    :param where: names the store in error messages.
    :param max_weight: the most jobs one group takes.
    :param depth: groups committed at once (each on its own connection, by ``commit``).
    """

    def __init__(self, commit: Callable[[list[Op]], Awaitable[None]], where: str,
                 max_weight: int, depth: int = 1) -> None:
        self._commit = commit
        self.where = where
        self.max_weight = max(1, max_weight)
        self.depth = max(1, depth)
        self.queue: list[Op] = []
        self._wake = asyncio.Event()
        self.closing = False

    def __repr__(self) -> str:
        return f"GroupCommit({self.where!r}, queued={len(self.queue)}, closing={self.closing})"

    def put(self, op: Op) -> asyncio.Future[Any]:
        """Queue ``op``; its future settles after the commit of its group."""
        if self.closing:
            raise StoreError(f"{self.where}: the store is not open")
        self.queue.append(op)
        if not self._wake.is_set():
            self._wake.set()
        return op.fut

    def close(self) -> None:
        """Let :meth:`run` return once the queue is drained (every queued write committed or
        failed); later :meth:`put` calls raise."""
        self.closing = True
        self._wake.set()

    async def run(self) -> None:
        """The writer task's body: commit groups until closed and drained."""
        queue = self.queue
        inflight: dict[asyncio.Task[None], bool] = {}  # commit -> holds ordered operations
        try:
            while True:
                if queue:
                    size = taken = 0
                    for op in queue:
                        size += op.weight
                        taken += 1
                        if size >= self.max_weight:
                            break
                    group = queue[:taken]
                    ordered = self.depth > 1 and not all(op.commutes for op in group)
                    if inflight and (len(inflight) >= self.depth or ordered
                                     or any(inflight.values())):
                        await asyncio.wait(list(inflight), return_when=asyncio.FIRST_COMPLETED)
                        continue
                    del queue[:taken]
                    if self.depth == 1:
                        await self._commit(group)
                    else:
                        task = asyncio.ensure_future(self._commit(group))
                        inflight[task] = ordered
                        task.add_done_callback(lambda t: inflight.pop(t, None))
                elif inflight and self.closing:  # drain: wait for the commits in flight
                    await asyncio.wait(list(inflight))
                elif self.closing:
                    return
                else:
                    self._wake.clear()
                    await self._wake.wait()
                    await asyncio.sleep(0)  # let coroutines that are already runnable join
        finally:  # cancelled (an event loop torn down with the store open): nobody hangs
            for task in list(inflight):
                task.cancel()  # the commit fails its own operations
            for op in queue:
                op.fail(StoreError(f"{self.where}: the store's writer stopped; not stored"))
            queue.clear()


__all__ = ["GroupCommit"]
