"""The timing wheel against a heapq reference model (Hypothesis stateful), plus unit tests."""

from __future__ import annotations

import heapq
import math
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kernel.wheel import TimingWheel

YEAR = 365.25 * 86400.0


class _EagerWheel(TimingWheel[int]):
    """Takes every rare path early: compacts as soon as two cancelled entries are held, sorts
    in chunks of 3 and cascades any entered bucket of more than 2 entries."""

    _COMPACT_MIN = 1
    _COMPACT_FRACTION = 0.0
    _CHUNK = 3
    _RUN_MAX = 2


class _SoonerCompactingWheel(TimingWheel[int]):
    """Compacts once 300 cancelled entries are held and they are 5 % of the live ones;
    cascades entered buckets of more than 1000 entries, in chunks of 300."""

    _COMPACT_MIN = 300
    _COMPACT_FRACTION = 0.05
    _CHUNK = 300
    _RUN_MAX = 1000


class _Model:
    """The obvious implementation: a heap of (deadline, seq, item)."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.heap: list[tuple[float, int, int]] = []
        self.state: dict[int, str] = {}  # item -> pending / fired / cancelled

    def schedule(self, deadline: float, item: int) -> None:
        heapq.heappush(self.heap, (deadline, item, item))
        self.state[item] = "pending"

    def cancel(self, item: int) -> bool:
        if self.state.get(item) != "pending":
            return False
        self.state[item] = "cancelled"
        return True

    def advance(self, now: float) -> list[int]:
        self.now = max(self.now, now)
        out = []
        while self.heap and self.heap[0][0] <= self.now:
            _, _, item = heapq.heappop(self.heap)
            if self.state[item] == "pending":
                self.state[item] = "fired"
                out.append(item)
        return out

    def pending(self) -> list[float]:
        return [d for d, _, item in self.heap if self.state[item] == "pending"]


# offsets from "now" that hit the interesting places: ties, tick boundaries, the past,
# bucket edges at each level, years ahead
_offsets = st.one_of(
    st.integers(-40, 600).map(lambda k: k / 4),  # in units of resolution, many ties
    st.floats(-5.0, 5.0, allow_nan=False),
    st.sampled_from([0.0, 0.256, 0.255, 65.536, 65.535, 16777.216, 3600.0, 86400.0]),
    st.floats(0.0, 5 * YEAR, allow_nan=False),
)


class WheelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.wheel: TimingWheel[int] = TimingWheel()
        self.model = _Model(0.0)
        self.handles: dict[int, int] = {}  # item -> handle
        self.next_item = 0
        self.res = 0.001

    @initialize(
        res=st.sampled_from([0.001, 0.01, 1.0, 0.25, 1e-6]),
        start=st.sampled_from([0.0, 1000.0, 123456.789, -5.0, 1e6 + 0.3]),
        eager=st.booleans(),
    )
    def setup(self, res: float, start: float, eager: bool) -> None:
        cls = _EagerWheel if eager else TimingWheel
        self.wheel = cls(resolution=res, start=start)
        self.model = _Model(start)
        self.res = res

    def _deadline(self, off: float, in_ticks: bool) -> float:
        return self.model.now + (off * self.res if in_ticks else off)

    @rule(off=_offsets, in_ticks=st.booleans())
    def schedule(self, off: float, in_ticks: bool) -> None:
        d = self._deadline(off, in_ticks)
        item = self.next_item
        self.next_item += 1
        self.handles[item] = self.wheel.schedule(d, item)
        self.model.schedule(d, item)

    @rule(offs=st.lists(_offsets, max_size=12), in_ticks=st.booleans())
    def schedule_many(self, offs: list[float], in_ticks: bool) -> None:
        ds = [self._deadline(o, in_ticks) for o in offs]
        items = list(range(self.next_item, self.next_item + len(ds)))
        self.next_item += len(ds)
        self.wheel.schedule_many(ds, items)
        for d, item in zip(ds, items, strict=True):
            self.model.schedule(d, item)

    @rule(data=st.data())
    def schedule_same_as_earlier(self, data: st.DataObject) -> None:
        """A new timer with exactly the deadline of an earlier one (ties across levels)."""
        if not self.model.heap:
            return
        d = data.draw(st.sampled_from(sorted({e[0] for e in self.model.heap})))
        item = self.next_item
        self.next_item += 1
        self.handles[item] = self.wheel.schedule(d, item)
        self.model.schedule(d, item)

    @rule(data=st.data(), frac=st.floats(0.0, 1.0))
    def schedule_tie_after_advance(self, data: st.DataObject, frac: float) -> None:
        """Move part of the way to a pending deadline, then schedule another timer at exactly
        that deadline: the two now sit on different levels and must fire in schedule order."""
        pending = self.model.pending()
        if not pending:
            return
        d = data.draw(st.sampled_from(sorted(set(pending))))
        if d > self.model.now:
            now = self.model.now + (d - self.model.now) * frac
            assert self.wheel.advance(now) == self.model.advance(now)
        item = self.next_item
        self.next_item += 1
        self.handles[item] = self.wheel.schedule(d, item)
        self.model.schedule(d, item)

    @precondition(lambda self: bool(self.handles))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(sorted(self.handles)))
        assert self.wheel.cancel(self.handles[item]) == self.model.cancel(item)

    @rule(seq=st.integers(0, 2**40))
    def cancel_unknown(self, seq: int) -> None:
        if seq < self.next_item:
            seq += self.next_item + 10**9  # never issued
        assert self.wheel.cancel(seq) is False

    @rule(
        step=st.one_of(
            st.just(0.0),
            st.integers(-3, 700).map(lambda k: k / 3),  # in ticks, lands inside ticks
            st.floats(0.0, 100.0, allow_nan=False),
            st.sampled_from([3600.0, 86400.0, YEAR, 4.2 * YEAR]),
        ),
        in_ticks=st.booleans(),
    )
    def advance(self, step: float, in_ticks: bool) -> None:
        now = self.model.now + (step * self.res if in_ticks else step)
        got = self.wheel.advance(now)
        want = self.model.advance(now)
        assert got == want
        assert self.wheel.now == self.model.now

    @precondition(lambda self: len(self.wheel) > 0)
    @rule()
    def advance_to_next_deadline(self) -> None:
        nd = self.wheel.next_deadline()
        assert nd is not None
        got = self.wheel.advance(nd)
        assert got == self.model.advance(nd)

    @invariant()
    def same_len_and_next_deadline(self) -> None:
        pending = self.model.pending()
        assert len(self.wheel) == len(pending)
        nd = self.wheel.next_deadline()
        if not pending:
            assert nd is None
        else:
            assert nd is not None
            assert nd <= min(pending)


WheelMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWheelModel = WheelMachine.TestCase


# ---------------------------------------------------------------------- unit tests


def test_fires_exactly_at_deadline_not_before() -> None:
    w: TimingWheel[str] = TimingWheel(start=100.0)
    w.schedule(100.0005, "a")  # inside the first tick
    w.schedule(100.25, "b")
    assert w.advance(100.0004) == []
    assert w.advance(100.0005) == ["a"]
    assert w.advance(math.nextafter(100.25, 0)) == []
    assert w.advance(100.25) == ["b"]
    assert len(w) == 0
    assert w.next_deadline() is None


def test_order_by_deadline_then_schedule_order() -> None:
    w: TimingWheel[str] = TimingWheel(start=0.0)
    w.schedule(5.0, "x1")  # far from now: a high level
    w.schedule(2.0, "early")
    w.advance(4.999)  # x1 is now in a sorted run
    w.schedule(5.0, "x2")  # same deadline, scheduled later, lands on level 0
    w.schedule(4.9995, "y")
    w.schedule(5.0, "x3")
    assert w.advance(10.0) == ["y", "x1", "x2", "x3"]


def test_ties_across_levels_fire_in_schedule_order() -> None:
    w: TimingWheel[str] = TimingWheel(resolution=1.0, start=0.0)  # buckets: 1 s, 256 s, 65536 s
    w.schedule(70000.0, "level 2")
    w.advance(65536.5)  # enters the level-2 bucket: "level 2" is now in a sorted run
    w.schedule(70000.0, "level 1")  # same block of 65536 ticks, differs at digit 1
    w.advance(69999.5)  # enters the level-1 bucket
    w.schedule(70000.0, "level 0")
    assert w.advance(70000.0) == ["level 2", "level 1", "level 0"]


def test_past_deadlines_come_out_on_next_advance_even_if_now_does_not_move() -> None:
    w: TimingWheel[int] = TimingWheel(start=50.0)
    w.advance(60.0)
    w.schedule(10.0, 1)
    w.schedule(59.0, 2)
    w.schedule(60.0, 3)
    w.schedule(60.0001, 4)
    assert w.next_deadline() == 10.0
    assert w.advance(60.0) == [1, 2, 3]
    assert w.advance(55.0) == []  # time does not go back
    assert w.now == 60.0
    assert w.advance(60.0001) == [4]


def test_far_future_timer_years_ahead() -> None:
    start = 1000.0
    w: TimingWheel[str] = TimingWheel(resolution=0.001, start=start)
    four_years = start + 4 * YEAR
    h = w.schedule(four_years, "leap-day")
    w.schedule(start + 1.0, "soon")
    nd = w.next_deadline()
    assert nd is not None and start < nd <= start + 1.0
    assert w.advance(start + 1.0) == ["soon"]
    nd = w.next_deadline()
    assert nd is not None and nd <= four_years
    assert w.advance(four_years - 1e-3) == []
    assert len(w) == 1
    assert w.advance(four_years) == ["leap-day"]
    assert w.cancel(h) is False


def test_big_idle_jumps_do_not_step_through_ticks() -> None:
    # a microsecond resolution: 100 years is 3e15 ticks, which no tick-by-tick loop finishes
    w: TimingWheel[int] = TimingWheel(resolution=1e-6, start=0.0)
    deadlines = [3600.0 * i + 0.5 for i in range(1, 50)] + [100 * YEAR]
    for i, d in enumerate(deadlines):
        w.schedule(d, i)
    t0 = time.perf_counter()
    out: list[int] = []
    for now in (7200.25, 86400.0 * 3, 50 * YEAR, 200 * YEAR):
        out += w.advance(now)
        nd = w.next_deadline()
        if w:
            assert nd is not None and nd > now
    assert time.perf_counter() - t0 < 1.0
    assert out == list(range(len(deadlines)))


def test_next_deadline_is_the_earliest_deadline() -> None:
    w: TimingWheel[int] = TimingWheel(resolution=0.01, start=0.0)
    assert w.next_deadline() is None
    w.schedule(12.3456, 1)  # a level-1 bucket that time has not entered yet
    assert w.next_deadline() == 12.3456
    w.schedule(12.3, 2)
    assert w.next_deadline() == 12.3
    w.schedule(5000.0, 3)
    assert w.advance(12.3) == [2]
    assert w.next_deadline() == 12.3456  # now read from a sorted run
    assert w.advance(12.3456) == [1]
    assert w.next_deadline() == 5000.0
    assert w.advance(5000.0) == [3]
    assert w.next_deadline() is None


def test_cancel_semantics() -> None:
    w: TimingWheel[str] = TimingWheel(start=0.0)
    a = w.schedule(1.0, "a")
    b = w.schedule(2.0, "b")
    c = w.schedule(0.5, "c")
    assert len(w) == 3
    assert w.cancel(a) is True
    assert w.cancel(a) is False  # already cancelled
    assert len(w) == 2
    assert w.advance(1.5) == ["c"]
    assert w.cancel(c) is False  # already fired
    assert w.cancel(a) is False  # cancelled, then its slot was processed
    assert w.cancel(123456789) is False  # never issued
    assert w.cancel(b) is True
    assert len(w) == 0
    assert w.next_deadline() is None
    assert w.advance(10.0) == []


def test_cancel_in_the_current_tick_after_a_partial_advance() -> None:
    w: TimingWheel[str] = TimingWheel(resolution=1.0, start=0.0)
    a = w.schedule(5.2, "a")
    b = w.schedule(5.7, "b")
    assert w.advance(5.5) == ["a"]  # same tick as b
    assert w.cancel(a) is False
    assert w.cancel(b) is True
    assert w.cancel(b) is False
    assert w.advance(6.0) == []


def test_compaction_keeps_cancel_answers_right() -> None:
    w = _EagerWheel(start=0.0)
    hs = [w.schedule(10.0 + i * 0.1, i) for i in range(100)]
    for h in hs[:80]:
        assert w.cancel(h) is True
    assert len(w) == 20
    for h in hs[:80]:
        assert w.cancel(h) is False  # compacted away, still known as cancelled
    assert w.cancel(hs[90]) is True
    assert w.advance(100.0) == [i for i in range(80, 100) if i != 90]


def test_compacted_cancel_is_remembered_in_runs_and_in_the_current_bucket() -> None:
    w = _EagerWheel(start=0.0)
    x = w.schedule(5.0, 1)  # level 1 ...
    y = w.schedule(5.1, 2)
    w.schedule(5.2, 3)
    assert w.advance(4.999) == []  # ... whose bucket is now entered: a sorted run
    assert w.cancel(x) is True
    assert w.cancel(y) is True  # two cancelled: compaction
    assert w.cancel(x) is False
    assert w.cancel(y) is False
    p = w.schedule(1.0, 4)  # in the past: the current level-0 bucket
    q = w.schedule(2.0, 5)
    assert w.cancel(p) is True
    assert w.cancel(q) is True  # compaction
    assert w.cancel(p) is False
    assert len(w) == 1
    assert w.advance(6.0) == [3]


def test_schedule_many_is_schedule_in_order() -> None:
    ds = [3.0, 1.0, 3.0, 0.0, 70.0, 1.0, -1.0, 5 * YEAR, 0.0005]
    w1: TimingWheel[int] = TimingWheel(start=0.0)
    w2: TimingWheel[int] = TimingWheel(start=0.0)
    for i, d in enumerate(ds):
        w1.schedule(d, i)
    w2.schedule_many(ds, list(range(len(ds))))
    assert len(w1) == len(w2) == len(ds)
    assert w1.next_deadline() == w2.next_deadline()
    for now in (0.0, 1.0, 2.0, 100.0, 10 * YEAR):
        assert w1.advance(now) == w2.advance(now)


def test_compacted_cancel_is_remembered_across_a_cascade() -> None:
    w = _EagerWheel(resolution=1.0, start=0.0)
    hs = [w.schedule(70000.0 + i, i) for i in range(5)]  # one level-2 bucket
    assert w.cancel(hs[0]) and w.cancel(hs[1])  # compacted out of that bucket
    assert w.advance(65536.5) == []  # enters it: 3 left > _RUN_MAX, so it cascades
    assert w.cancel(hs[0]) is False
    assert w.cancel(hs[1]) is False
    assert w.cancel(hs[2]) is True
    assert w.advance(80000.0) == [3, 4]


def test_schedule_many_in_chunks_and_cascades() -> None:
    ds = [3.0, 1.0, 3.0, 0.0, 70.0, 1.0, -1.0, 5 * YEAR, 0.0005, 1.0, 3.0]
    w = _EagerWheel(start=0.0)
    w.schedule_many(ds, list(range(len(ds))))
    w.schedule_many(ds, list(range(100, 100 + len(ds))))
    want = [i for _, i in sorted((d, i) for i, d in enumerate(ds + ds))]
    got = w.advance(2.0) + w.advance(10 * YEAR)
    assert got == [i if i < len(ds) else i - len(ds) + 100 for i in want]


def test_rejects_nan_and_infinite_times() -> None:
    w: TimingWheel[int] = TimingWheel()
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            w.schedule(bad, 1)
        with pytest.raises(ValueError, match="finite"):
            w.schedule_many([1.0, bad], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        w.advance(math.nan)
    with pytest.raises(ValueError, match="resolution"):
        TimingWheel(resolution=0.0)
    with pytest.raises(ValueError, match="2 deadlines but 1 items"):
        w.schedule_many([1.0, 2.0], [1])
    assert len(w) == 0


def test_repr_is_readable() -> None:
    w: TimingWheel[str] = TimingWheel(start=10.0)
    h = w.schedule(11.0, "a")
    w.schedule(12.0, "b")
    w.cancel(h)
    assert repr(w) == (
        "<TimingWheel now=10.0 pending=1 cancelled=1 next_deadline=11.0 resolution=0.001 "
        "levels=2 containers=2>"
    )


@pytest.mark.parametrize(
    ("lag", "eager", "bulk"),
    [(0.0, False, False), (30.0, False, True), (30.0, True, False), (65.0, True, True)],
)
def test_many_timers_against_sorted(lag: float, eager: bool, bulk: bool) -> None:
    """20k timers over 60 s (with the window straddling a level-2 boundary when the wheel
    started ``lag`` s earlier), every 7th cancelled, drained in uneven steps."""
    import random

    rng = random.Random(7)
    now = 5000.123
    w: TimingWheel[int] = (_SoonerCompactingWheel if eager else TimingWheel)(start=now - lag)
    ds = [now + rng.random() * 60.0 for _ in range(20000)]
    ds[100:110] = [ds[99]] * 10  # ties
    if bulk:
        w.schedule_many(ds[:10000], list(range(10000)))
        hs = [w.schedule(d, i) for i, d in enumerate(ds[10000:], 10000)]
        cancelled = set(range(10000, 20000, 7))
        for i in cancelled:
            assert w.cancel(hs[i - 10000])
    else:
        hs = [w.schedule(d, i) for i, d in enumerate(ds)]
        cancelled = set(range(0, 20000, 7))
        for i in cancelled:
            assert w.cancel(hs[i])
    if eager:
        assert w._gone_hi >= 0  # compaction did run
    want = [i for _, i in sorted((d, i) for i, d in enumerate(ds) if i not in cancelled)]
    got: list[int] = []
    end = now + 61.0
    while now < end:
        now += rng.choice([0.0004, 0.0173, 0.3, 2.5])
        got += w.advance(now)
    assert got == want
    assert len(w) == 0
    assert w.next_deadline() is None
