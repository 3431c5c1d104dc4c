"""The dispatcher's synchronous decisions: priority, aging, FIFO, limits, overlap policies."""

from __future__ import annotations

from kernel.config import Overlap, Policy
from kernel.dispatch import Dispatcher, Limits, TaskRules, Verdict
from kernel.records import Job


def job(i: str, *, prio: int = 0, task: str | None = None) -> Job:
    return Job(id=i, action="log", due_at=0.0, priority=prio, task_id=task)


def ids(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs]


def test_highest_priority_first_fifo_within_priority() -> None:
    d = Dispatcher(Limits(max_concurrency=10, aging=1000.0))
    for i, p in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 9)]:
        d.offer(job(i, prio=p), now=0.0)
    assert ids(d.plan(0.0)) == ["e", "b", "d", "a", "c"]


def test_fifo_policy_ignores_priority() -> None:
    d = Dispatcher(Limits(max_concurrency=10, policy=Policy.FIFO))
    for t, (i, p) in enumerate([("a", 0), ("b", 5), ("c", 9)]):
        d.offer(job(i, prio=p), now=float(t))
    assert ids(d.plan(10.0)) == ["a", "b", "c"]


def test_aging_lets_an_old_low_priority_job_overtake() -> None:
    # aging 10 s: priority 3 is worth a 30 s head start, so a job waiting 31 s wins over it
    d = Dispatcher(Limits(max_concurrency=1, aging=10.0))
    d.offer(job("old_low", prio=0), now=0.0)
    d.offer(job("new_high", prio=3), now=31.0)
    assert ids(d.plan(31.0)) == ["old_low"]
    d2 = Dispatcher(Limits(max_concurrency=1, aging=10.0))
    d2.offer(job("old_low", prio=0), now=0.0)
    d2.offer(job("new_high", prio=3), now=29.0)
    assert ids(d2.plan(29.0)) == ["new_high"]


def test_low_priority_is_not_starved_by_a_stream_of_high_ones() -> None:
    d = Dispatcher(Limits(max_concurrency=1, aging=5.0))
    d.offer(job("low", prio=0), now=0.0)
    started: list[str] = []
    for t in range(100):  # a new priority-2 job every second, one slot
        d.offer(job(f"h{t}", prio=2), now=float(t))
        for j in d.plan(float(t)):
            started.append(j.id)
            d.finished(j)
    assert "low" in started
    assert started.index("low") <= 11  # waits at most (2 - 0) * 5 s behind the stream


def test_max_concurrency_and_finished_release() -> None:
    d = Dispatcher(Limits(max_concurrency=2))
    for i in "abc":
        d.offer(job(i), now=0.0)
    first = d.plan(0.0)
    assert ids(first) == ["a", "b"]
    assert d.plan(0.0) == []
    d.finished(first[0])
    assert ids(d.plan(0.0)) == ["c"]


def test_queue_room_is_bounded() -> None:
    d = Dispatcher(Limits(max_concurrency=1, queue_depth=2))
    assert d.has_room()
    d.offer(job("a"), now=0.0)
    d.offer(job("b"), now=0.0)
    assert not d.has_room()


def test_max_instances_holds_a_second_run_of_the_same_task() -> None:
    rules = {"t": TaskRules(max_instances=1, overlap=Overlap.BUFFER_ALL)}
    d = Dispatcher(Limits(max_concurrency=5), rules=rules.get)
    d.offer(job("1", task="t"), now=0.0, occurrence=True)
    d.offer(job("x"), now=0.0)
    d.offer(job("2", task="t"), now=0.0, occurrence=True)
    assert ids(d.plan(0.0)) == ["1", "x"]
    assert "already runs" in (d.held_reason("2") or "")


def _busy(overlap: Overlap) -> Dispatcher:
    d = Dispatcher(Limits(max_concurrency=5), rules={"t": TaskRules(overlap=overlap)}.get)
    d.offer(job("run1", task="t"), now=0.0, occurrence=True)
    assert ids(d.plan(0.0)) == ["run1"]
    return d


def test_overlap_skip() -> None:
    d = _busy(Overlap.SKIP)
    assert d.offer(job("o2", task="t"), 1.0, occurrence=True).verdict is Verdict.SKIPPED
    assert d.queued == 0


def test_overlap_buffer_one_keeps_exactly_one() -> None:
    d = _busy(Overlap.BUFFER_ONE)
    assert d.offer(job("o2", task="t"), 1.0, occurrence=True).verdict is Verdict.ENQUEUED
    assert d.offer(job("o3", task="t"), 2.0, occurrence=True).verdict is Verdict.SKIPPED
    assert d.plan(2.0) == []  # still running
    d.finished(job("run1", task="t"))
    assert ids(d.plan(3.0)) == ["o2"]


def test_overlap_buffer_all_runs_each_in_turn() -> None:
    d = _busy(Overlap.BUFFER_ALL)
    for i in range(3):
        assert d.offer(job(f"o{i}", task="t"), 1.0, occurrence=True).verdict is Verdict.ENQUEUED
    order = []
    running = job("run1", task="t")
    for _ in range(3):
        d.finished(running)
        (running,) = d.plan(5.0)
        order.append(running.id)
    assert order == ["o0", "o1", "o2"]


def test_overlap_cancel_other_asks_to_cancel_the_running_one() -> None:
    d = _busy(Overlap.CANCEL_OTHER)
    dec = d.offer(job("o2", task="t"), 1.0, occurrence=True)
    assert dec.verdict is Verdict.CANCEL_RUNNING
    assert dec.cancel == ("run1",)
    # the new one starts although run1 has not reported back yet (it is being cancelled)
    assert ids(d.plan(1.0)) == ["o2"]


def test_overlap_allow_all_starts_concurrently() -> None:
    d = _busy(Overlap.ALLOW_ALL)
    assert d.offer(job("o2", task="t"), 1.0, occurrence=True).verdict is Verdict.ENQUEUED
    assert ids(d.plan(1.0)) == ["o2"]


def test_concurrency_key_limit() -> None:
    d = Dispatcher(Limits(max_concurrency=10, concurrency_limits={"llm": 2}))
    for i in "abc":
        d.offer(job(i), now=0.0, concurrency_key="llm")
    d.offer(job("free"), now=0.0)
    started = d.plan(0.0)
    assert ids(started) == ["a", "b", "free"]
    d.finished(started[0])
    assert ids(d.plan(0.0)) == ["c"]


class FakeGpuGate:
    """A fake resource gate with a fixed budget (stands in for GPU memory)."""

    def __init__(self, budget: int) -> None:
        self.free = budget

    def try_admit(self, j: Job) -> bool:
        need = int(j.payload.get("mb", 0))
        if need > self.free:
            return False
        self.free -= need
        return True

    def release(self, j: Job) -> None:
        self.free += int(j.payload.get("mb", 0))


def test_gate_holds_jobs_that_do_not_fit_and_keeps_their_place() -> None:
    gate = FakeGpuGate(10)
    d = Dispatcher(Limits(max_concurrency=10), gates=[gate])
    big = Job(id="big", action="x", due_at=0, payload={"mb": 8}, priority=1)
    big2 = Job(id="big2", action="x", due_at=0, payload={"mb": 8}, priority=1)
    small = Job(id="small", action="x", due_at=0, payload={"mb": 2})
    for j in (big, big2, small):
        d.offer(j, now=0.0)
    assert ids(d.plan(0.0)) == ["big", "small"]
    assert gate.free == 0
    d.finished(big)
    assert ids(d.plan(1.0)) == ["big2"]
    assert gate.free == 0


def test_remove_takes_a_queued_job_out() -> None:
    d = Dispatcher(Limits(max_concurrency=0 + 1))
    d.offer(job("a"), now=0.0)
    d.offer(job("b"), now=0.0)
    assert d.remove("b") is not None
    assert d.remove("zzz") is None
    assert ids(d.plan(0.0)) == ["a"]
    assert repr(d) == "<Dispatcher queued=0 running=1 max=1>"
