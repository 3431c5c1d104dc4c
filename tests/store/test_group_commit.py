"""``GroupCommit``: the queue and loop both stores' writers use. Driven by a commit function whose
groups the test ends by hand, so what is in flight at each moment is decided, not timed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kernel.errors import StoreError
from kernel.store.group import GroupCommit
from kernel.store.sqlite_tx import Op


class HeldCommits:
    """A commit function that records each group and holds it until :meth:`end` is called."""

    def __init__(self) -> None:
        self.groups: list[list[Op]] = []
        self.gates: list[asyncio.Event] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, group: list[Op]) -> None:
        gate = asyncio.Event()
        number = len(self.groups) + 1  # each op's result: the number of its group
        self.groups.append(group)
        self.gates.append(gate)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            for op in group:
                op.fail(StoreError("cancelled in the commit"))
            raise
        finally:
            self.in_flight -= 1
        for op in group:
            op.result = number
            op.settle()

    def end(self, k: int) -> None:
        self.gates[k].set()


class Free(Op):
    """An operation that commutes with others (as starts, finishes and submissions do)."""

    commutes = True


def op() -> Op:
    return Free(asyncio.get_running_loop().create_future())


def ordered() -> Op:
    """An operation that keeps its place (as a task's state write does)."""
    return Op(asyncio.get_running_loop().create_future())


class Heavy(Op):
    """A call that carries five jobs (an Op's weight)."""

    weight = 5


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.mark.parametrize("depth", [1, 2, 3])
async def test_at_most_depth_groups_are_in_flight_and_later_requests_wait_for_a_free_one(
        depth: int) -> None:
    commits = HeldCommits()
    g = GroupCommit(commits, "test", max_weight=100, depth=depth)
    writer = asyncio.ensure_future(g.run())
    futs: list[asyncio.Future[Any]] = []
    for _ in range(depth + 2):  # one request at a time: each one finds the writer idle
        futs.append(g.put(op()))
        await settle()
    assert len(commits.groups) == depth  # depth groups of one; the rest queued together
    assert commits.in_flight == depth
    commits.end(0)
    await settle()
    assert futs[0].done() and futs[0].result() == 1
    assert len(commits.groups) == depth + 1  # the queued requests went as one group
    assert [len(gr) for gr in commits.groups[depth:]] == [2]
    for k in range(1, depth + 1):
        commits.end(k)
    g.close()
    await asyncio.wait_for(writer, 5)
    assert all(f.done() and not f.exception() for f in futs)
    assert commits.most_in_flight == depth


async def test_close_waits_for_the_groups_in_flight_then_refuses_new_requests() -> None:
    commits = HeldCommits()
    g = GroupCommit(commits, "test", max_weight=100, depth=2)
    writer = asyncio.ensure_future(g.run())
    a = g.put(op())
    await settle()
    b = g.put(op())
    await settle()
    g.close()
    await settle()
    assert not writer.done()  # two commits still in flight: nothing may be left unsettled
    commits.end(1)
    await settle()
    assert not writer.done() and b.done() and not a.done()
    commits.end(0)
    await asyncio.wait_for(writer, 5)
    assert a.result() == 1 and b.result() == 2
    with pytest.raises(StoreError):
        g.put(op())


async def test_a_cancelled_writer_fails_what_is_queued_and_what_is_in_flight() -> None:
    commits = HeldCommits()
    g = GroupCommit(commits, "test", max_weight=100, depth=2)
    writer = asyncio.ensure_future(g.run())
    futs = [g.put(op())]
    await settle()
    futs.append(g.put(op()))
    await settle()
    futs.append(g.put(op()))  # queued: both commits are in flight
    await settle()
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    await settle()
    assert all(f.done() for f in futs)
    assert all(isinstance(f.exception(), StoreError) for f in futs)


async def test_one_call_is_never_split_and_a_group_stops_at_max_weight() -> None:
    commits = HeldCommits()
    g = GroupCommit(commits, "test", max_weight=3, depth=1)
    writer = asyncio.ensure_future(g.run())
    first = g.put(op())
    await settle()  # in flight alone
    rest = [g.put(Heavy(asyncio.get_running_loop().create_future())), g.put(op())]
    await settle()
    commits.end(0)
    await settle()
    assert first.done()
    assert [len(gr) for gr in commits.groups] == [1, 1]  # the heavy call fills a group alone
    commits.end(1)
    await settle()
    commits.end(2)
    g.close()
    await asyncio.wait_for(writer, 5)
    assert all(f.done() for f in rest)


async def test_an_ordered_operation_waits_for_the_groups_before_it_and_holds_off_later_ones(
        ) -> None:
    commits = HeldCommits()
    g = GroupCommit(commits, "test", max_weight=100, depth=2)
    writer = asyncio.ensure_future(g.run())
    first = g.put(op())
    await settle()
    state = g.put(ordered())  # issued after `first`, which is not committed yet
    await settle()
    assert len(commits.groups) == 1  # it did not go beside the group in flight
    commits.end(0)
    await settle()
    assert first.done() and len(commits.groups) == 2 and commits.groups[1][0].fut is state
    later = g.put(op())
    await settle()
    assert len(commits.groups) == 2  # nothing overtakes the ordered group in flight
    commits.end(1)
    await settle()
    assert state.done() and len(commits.groups) == 3 and commits.groups[2][0].fut is later
    commits.end(2)
    g.close()
    await asyncio.wait_for(writer, 5)
    assert commits.most_in_flight == 1


async def test_commuting_groups_still_go_two_at_a_time_after_an_ordered_one() -> None:
    commits = HeldCommits()
    g = GroupCommit(commits, "test", max_weight=100, depth=2)
    writer = asyncio.ensure_future(g.run())
    g.put(ordered())
    await settle()
    commits.end(0)
    await settle()
    g.put(op())
    await settle()
    g.put(op())
    await settle()
    assert commits.in_flight == 2
    commits.end(1)
    commits.end(2)
    g.close()
    await asyncio.wait_for(writer, 5)


async def test_defaults_and_bounds_one_group_at_a_time_and_exactly_max_weight_per_group(
        ) -> None:
    commits = HeldCommits()
    g = GroupCommit(commits, "test", max_weight=2)  # depth defaults to one in flight
    writer = asyncio.ensure_future(g.run())
    g.put(op())
    await settle()
    for _ in range(5):  # queued while the first is in flight
        g.put(op())
    await settle()
    assert commits.in_flight == 1
    for k in range(4):
        commits.end(k)
        await settle()
    assert [len(gr) for gr in commits.groups] == [1, 2, 2, 1]  # a group stops at max_weight
    assert commits.most_in_flight == 1
    g.close()
    await asyncio.wait_for(writer, 5)

    one = HeldCommits()
    g1 = GroupCommit(one, "test", max_weight=0)  # at least one job per group
    w1 = asyncio.ensure_future(g1.run())
    g1.put(op())
    await settle()
    g1.put(op())
    g1.put(op())
    await settle()
    for k in range(3):
        one.end(k)
        await settle()
    assert [len(gr) for gr in one.groups] == [1, 1, 1]
    g1.close()
    await asyncio.wait_for(w1, 5)
