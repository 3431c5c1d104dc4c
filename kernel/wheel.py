"""A hierarchical timing wheel: millions of timers, O(1) schedule and cancel, no clock reads.

A pure data structure (Varghese & Lauck; the Linux timer wheel and Kafka's purgatory are the
models): the caller passes ``now``; nothing here sleeps, reads a clock or knows asyncio::

    wheel = TimingWheel[str](resolution=0.001, start=clock.monotonic())
    h = wheel.schedule(deadline, "job-17")      # an int handle
    wheel.cancel(h)                             # True: it was pending and is now cancelled
    due = wheel.advance(clock.monotonic())      # every item with deadline <= now, in order
    wake_at = wheel.next_deadline()             # None when nothing is pending

``advance(now)`` returns exactly the pending items whose deadline is ``<= now`` (none later, none
held back), ordered by deadline and, for equal deadlines, by schedule order. A ``now`` before
:attr:`TimingWheel.now` counts as "time did not move". Deadlines in the past are accepted and
come out on the next ``advance``. ``next_deadline()`` is the earliest pending deadline; it is
earlier than that only when that entry was cancelled (cancelled entries leave lazily).

Design
------
**Ticks decide buckets, deadlines decide firing.** Deadline ``d`` is in tick
``floor(d * (1/resolution))``, counted from the start's tick. All that matters is that this never
decreases with ``d``: then ``d <= now`` implies ``tick(d) <= tick(now)``, and an item can never
hide in a tick after ``now``'s. Each entry keeps its exact deadline, and the entries of ``now``'s
own tick are compared with ``now`` itself, so ``resolution`` never makes a timer early or late;
it only sets how much one bucket holds.

**Levels, absolute alignment.** Ticks are read as base-256 digits; level ``k`` has 256 buckets.
An item with tick ``t`` scheduled while the wheel is at tick ``cur`` goes to level ``k``, the
highest digit in which ``t`` and ``cur`` differ, bucket ``digit_k(t)``; items at or before
``cur`` go to the level-0 bucket of ``cur``. So a level-``k`` bucket covers an aligned block of
256**k ticks, and every future item on level ``k`` is due before every one on level ``k+1``:
the earliest bucket is the lowest set bit of the lowest non-empty level's occupancy bitmap (a
Python int). ``advance`` therefore jumps any idle gap in O(levels) instead of stepping through
ticks: when ``now`` moves, at the highest digit that changed the buckets passed over are taken
whole, lower levels are emptied, and the bucket ``now`` lands in is entered. Levels are added on
demand (a timer 4 years ahead at 1 ms sits on level 4; 8 levels span 584 million years), so
there is no overflow list and nothing special about far deadlines.

**Sort a bucket once when time enters it, instead of cascading every item.** Classic wheels
move every item down one level each time its bucket is reached; in Python that per-item loop
would cost more than all the rest. Here, entering a level-``k`` bucket (``k >= 1``) sorts it by
deadline in one C-level ``sorted`` call and makes it that level's *run*: a sorted array consumed
from the front with ``bisect`` as time moves, so firing costs one slice per ``advance``, not
Python work per item. A run is never inserted into: a new item inside its range differs from
``cur`` in a lower digit and lands on a lower level. ``advance`` takes what is due from each
place and, if it took from more than one, merges with one stable sort. A bucket of more than
64k entries is not sorted whole (sorting millions at once costs several times more per item
than sorting 16k): it is cascaded, sorted 16k at a time and appended a slice per bucket to the
(empty) levels below.

Cost: the one ``advance`` that enters a bucket pays for all of it. A window of timers that
straddles a 65.5 s level-2 boundary (1 ms ticks) puts everything past the boundary into one
bucket: with 1M timers over 60 s that call takes ~0.2-0.4 s, with 10M ~2 s (2-vCPU VM).

**Ties without comparing sequence numbers.** For a fixed deadline the level an item lands on
never rises as ``cur`` advances, so of two equal deadlines in different containers the one on
the higher level was scheduled first (a cascade keeps this: it fills levels that time has just
emptied, before anything newer lands there). Inside a container equal deadlines stay in
schedule order (appends are, sorts are stable). ``advance`` concatenates what it takes from the
highest level down and sorts stably by deadline alone.

**Memory: no object per timer.** A bucket is three parallel containers: an ``array('d')`` of
deadlines, an ``array('q')`` of sequence numbers and a list of items: 24 bytes a timer plus
growth slack (about 26 measured; 27-37 bytes of RSS with allocator overhead). A handle is the
int ``tick << 64 | seq`` (36 bytes if the caller keeps it).

**Cancel without a dict per timer.** From a handle's tick and sequence number ``cancel`` knows
whether the item already fired: if an ``advance`` ran after it was scheduled (its seq is below
the seq at the last ``advance``) and its tick is before the current tick, it did; for the
current tick, whose entries fire piecemeal, the seqs fired in it are kept in a set cleared when
the tick moves. Cancelling puts the seq in a set (so ``len`` is exact at once); the entry is
dropped when ``advance`` takes it. When cancelled entries outnumber both the live ones and
65,536, every container is compacted (amortised O(1) per cancel, the rule asyncio applies to its
heap); a compacted seq is kept in its container's sorted ``array('q')`` (8 bytes) until the
container is gone, so that cancelling the same handle again still answers ``False``.

**Bulk loading.** ``schedule_many`` sorts chunks of 16k in C and appends one slice per bucket
(the cascade's code), with no Python-level work per item; buckets filled that way hold
sorted runs, which make the sort on entering cheap.

Handles must come from ``schedule`` on the same wheel; other ints may be answered wrongly.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from itertools import compress
from math import floor, inf, isfinite, nextafter
from operator import itemgetter, not_
from typing import Any, Generic, TypeVar

__all__ = ["TimingWheel"]

T = TypeVar("T")

_BITS = 8  # schedule() spells 8 and 255 out as literals
_SLOTS = 1 << _BITS
_MASK = _SLOTS - 1
_SEQ_BITS = 64  # cancel() spells this and the mask out as literals
_SEQ_MASK = (1 << _SEQ_BITS) - 1


class _Bucket:
    """Parallel arrays of one bucket (or run): deadlines, sequence numbers, items.

    ``pos``: entries before it were already taken (runs only). ``nsorted``: the first
    ``nsorted`` entries are known to be sorted by deadline. ``removed``: sorted sequence numbers
    of cancelled entries compacted out of this container (``None`` when there are none).
    """

    __slots__ = ("ds", "its", "nsorted", "pos", "removed", "ss")

    def __init__(self) -> None:
        self.ds = array("d")
        self.ss = array("q")
        self.its: list[Any] = []
        self.pos = 0
        self.nsorted = 0
        self.removed: array[int] | None = None

    def sort(self) -> None:
        """Drop taken entries and sort the rest by deadline (stable)."""
        p = self.pos
        if p:
            del self.ds[:p], self.ss[:p], self.its[:p]
            self.pos = 0
            self.nsorted = max(0, self.nsorted - p)
        n = len(self.ds)
        if self.nsorted >= n or n < 2:
            self.nsorted = n
            return
        dl = self.ds.tolist()
        take = itemgetter(*sorted(range(n), key=dl.__getitem__))  # stable
        self.ds = array("d", take(dl))
        self.ss = array("q", take(self.ss.tolist()))
        self.its = list(take(self.its))
        self.nsorted = n

    def was_removed(self, seq: int) -> bool:
        r = self.removed
        if r is None:
            return False
        i = bisect_left(r, seq)
        return i < len(r) and r[i] == seq


def _drain(
    lvl: list[_Bucket | None],
    drain: int,
    pd: list[array[float]],
    ps: list[array[int]],
    pi: list[list[Any]],
) -> int:
    """Take every bucket of ``lvl`` whose bit is set in ``drain``, in slot order, as pieces.

    :returns: how many of the pieces are already sorted.
    """
    n_sorted = 0
    while drain:
        low = drain & -drain
        drain ^= low
        i = low.bit_length() - 1
        b = lvl[i]
        lvl[i] = None
        if b is not None and b.ds:
            pd.append(b.ds)
            ps.append(b.ss)
            pi.append(b.its)
            if b.nsorted >= len(b.ds):
                n_sorted += 1
    return n_sorted


class TimingWheel(Generic[T]):
    """Timers keyed by float deadlines (monotonic seconds); see the module docstring.

    :param resolution: bucket width in seconds (> 0). It does not make timers early or late:
        ``advance`` compares exact deadlines. It sets how much work one bucket holds.
    :param start: the current monotonic time; :attr:`now` starts there.
    """

    # compact when more cancelled entries are held than this many and than live * this fraction
    _COMPACT_MIN = 65536
    _COMPACT_FRACTION = 1.0
    _CHUNK = 1 << 14  # schedule_many and cascades sort this many at a time
    _RUN_MAX = 1 << 16  # an entered bucket up to this size is sorted whole; a bigger one cascades

    def __init__(self, resolution: float = 0.001, start: float = 0.0) -> None:
        if not (isfinite(resolution) and resolution > 0):
            raise ValueError(f"resolution must be a positive number of seconds, got {resolution!r}")
        if not isfinite(start):
            raise ValueError(f"start must be a finite time, got {start!r}")
        inv = 1.0 / resolution
        if not isfinite(inv):
            raise ValueError(f"resolution {resolution!r} is too small")
        self._res = float(resolution)
        self._inv = inv
        self._base = floor(start * inv)
        self._now = float(start)
        self._cur = 0  # tick of self._now, counted from self._base
        self._levels: list[list[_Bucket | None]] = [[None] * _SLOTS]
        self._bits: list[int] = [0]  # per level: bit i set <=> _levels[k][i] is not None
        self._runs: list[_Bucket | None] = [None]  # per level k >= 1: the entered bucket
        self._cur_min = inf  # earliest deadline in the current level-0 bucket (or lower)
        self._seq = 0  # next sequence number
        self._adv_seq = 0  # self._seq at the last advance()
        self._gone_lo = 1 << 63  # every seq ever compacted away is in [_gone_lo, _gone_hi]
        self._gone_hi = -1
        self._gone = 0  # fired + cancelled; pending = self._seq - self._gone
        self._canc: set[int] = set()  # seqs of cancelled entries still held in a container
        self._fired: set[int] = set()  # seqs taken by advance() within the current tick
        self._ndc: tuple[array[float], int, float] | None = None  # next_deadline's cache

    # ------------------------------------------------------------------ public API

    @property
    def now(self) -> float:
        """The latest ``now`` passed to :meth:`advance` (or ``start``)."""
        return self._now

    def __len__(self) -> int:
        """Pending timers: scheduled, not fired, not cancelled."""
        return self._seq - self._gone

    def __repr__(self) -> str:
        nd = self.next_deadline()
        held = sum(b.bit_count() for b in self._bits) + sum(r is not None for r in self._runs)
        return (
            f"<TimingWheel now={self._now!r} pending={self._seq - self._gone} cancelled={len(self._canc)} "
            f"next_deadline={nd!r} resolution={self._res!r} levels={len(self._levels)} "
            f"containers={held}>"
        )

    def schedule(self, deadline: float, item: T) -> int:
        """Add ``item`` due at ``deadline`` (monotonic seconds; past is fine). O(1).

        :returns: a handle for :meth:`cancel`.
        :raises ValueError: ``deadline`` is NaN or infinite.
        """
        try:
            t = floor(deadline * self._inv) - self._base
        except (ValueError, OverflowError):
            raise ValueError(f"deadline must be a finite number, got {deadline!r}") from None
        s = self._seq
        self._seq = s + 1
        cur = self._cur
        # literals on this path: 8 is _BITS, 255 is _MASK
        if t > cur:
            x = t ^ cur
            if x > 255:
                k = (x.bit_length() - 1) >> 3
                idx = (t >> (k << 3)) & 255
                try:
                    lvl = self._levels[k]
                except IndexError:
                    self._grow(k)
                    lvl = self._levels[k]
            else:
                k = 0
                idx = t & 255
                lvl = self._levels[0]
        else:
            k = 0
            idx = cur & 255
            lvl = self._levels[0]
            if deadline < self._cur_min:
                self._cur_min = deadline
        b = lvl[idx]
        if b is None:
            b = lvl[idx] = _Bucket()
            self._bits[k] |= 1 << idx
        b.ds.append(deadline)
        b.ss.append(s)
        b.its.append(item)
        return (t << _SEQ_BITS) | s

    def schedule_many(self, deadlines: Sequence[float], items: Sequence[T]) -> None:
        """Schedule ``items[i]`` at ``deadlines[i]`` for every i, as if by ``schedule`` in that
        order, without returning handles. Each chunk of 16k is sorted once (in C) and appended
        to its buckets as slices, so there is no Python-level work per item.

        :raises ValueError: lengths differ, or a deadline is NaN or infinite (nothing is added).
        """
        n = len(deadlines)
        if len(items) != n:
            raise ValueError(f"{n} deadlines but {len(items)} items")
        if not all(map(isfinite, deadlines)):
            bad = next(d for d in deadlines if not isfinite(d))
            raise ValueError(f"deadline must be a finite number, got {bad!r}")
        for c in range(0, n, self._CHUNK):
            dl = list(deadlines[c : c + self._CHUNK])
            seq = self._seq
            self._seq = seq + len(dl)
            self._place_chunk(dl, list(range(seq, self._seq)), list(items[c : c + self._CHUNK]))

    def _place_chunk(self, dl: list[float], sl: list[int], il: list[Any]) -> None:
        """Sort one chunk by deadline (stable: ties keep their order) and append it to its
        buckets relative to the current tick."""
        if not dl:
            return
        if len(dl) < 2:
            self._place_sorted(array("d", dl), array("q", sl), il)
            return
        take = itemgetter(*sorted(range(len(dl)), key=dl.__getitem__))
        self._place_sorted(array("d", take(dl)), array("q", take(sl)), list(take(il)))

    def _place_sorted(self, ds: array[float], ss: array[int], its: list[Any]) -> None:
        """Append entries sorted by deadline to their buckets, one slice per bucket."""
        n = len(ds)
        cur = self._cur
        inv = self._inv
        base = self._base
        p = 0
        lo = self._lo(cur + 1)
        if ds[0] < lo:  # due at or before the current tick
            p = bisect_left(ds, lo)
            self._extend(0, cur & _MASK, ds, ss, its, 0, p)
            if ds[0] < self._cur_min:
                self._cur_min = ds[0]
        while p < n:
            t = floor(ds[p] * inv) - base
            k = ((t ^ cur).bit_length() - 1) // _BITS
            sh = k * _BITS
            e = bisect_left(ds, self._lo(((t >> sh) + 1) << sh), p)
            if k >= len(self._levels):
                self._grow(k)
            self._extend(k, (t >> sh) & _MASK, ds, ss, its, p, e)
            p = e

    def cancel(self, handle: int) -> bool:
        """Cancel a pending timer. O(1) (amortised, counting compaction).

        :returns: ``True`` if it was pending and is now cancelled; ``False`` if the handle is
            unknown, already fired or already cancelled.
        """
        s = handle & 0xFFFFFFFFFFFFFFFF  # _SEQ_MASK
        canc = self._canc
        if s >= self._seq or s in canc:
            return False
        if s < self._adv_seq:  # an advance() ran since it was scheduled
            t = handle >> 64  # _SEQ_BITS
            cur = self._cur
            if t < cur or (t == cur and s in self._fired):
                return False
        if self._gone_lo <= s <= self._gone_hi and self._was_compacted(handle >> 64, s):
            return False
        canc.add(s)
        self._gone += 1
        n = len(canc)
        if n > self._COMPACT_MIN and n > (self._seq - self._gone) * self._COMPACT_FRACTION:
            self._compact()
        return True

    def next_deadline(self) -> float | None:
        """The earliest pending deadline, or ``None`` when nothing is pending: the time at which
        :meth:`advance` will next return something. It is earlier than that only when the
        earliest entry was cancelled (cancelled entries are dropped lazily); ``advance`` at that
        time then returns nothing and a fresh call gives a later answer. Never later.

        O(levels), plus a ``min`` over the entries added since the last call to the earliest
        bucket not entered yet (that minimum is cached)."""
        if self._seq == self._gone:
            return None
        best = inf
        cur = self._cur
        d0 = cur & _MASK
        if self._bits[0] >> d0 & 1:
            best = self._cur_min
        for run in self._runs:
            if run is not None and run.pos < len(run.ds):
                v = run.ds[run.pos]
                if v < best:
                    best = v
        for k, bits in enumerate(self._bits):
            if not k:
                bits = bits >> (d0 + 1) << (d0 + 1)
            if bits:
                # the lowest non-empty level's lowest bucket holds the earliest future entries
                i = (bits & -bits).bit_length() - 1
                b = self._levels[k][i]
                assert b is not None
                ds = b.ds
                n = len(ds)
                c = self._ndc
                if c is not None and c[0] is ds and c[1] <= n:
                    v = c[2] if c[1] == n else min(c[2], min(ds[c[1] :]))
                elif n:
                    v = min(ds)
                else:  # emptied by compaction: its first tick
                    sh = k * _BITS
                    v = self._lo(((cur >> (sh + _BITS)) << (sh + _BITS)) | (i << sh))
                self._ndc = (ds, n, v)
                if v < best:
                    best = v
                break
        return best

    def advance(self, now: float) -> list[T]:
        """Move time to ``now`` and return every pending item with ``deadline <= now``, by
        deadline, ties in schedule order. Jumps of any size cost O(levels) plus the items.

        :raises ValueError: ``now`` is NaN or infinite.
        """
        if not now >= self._now:
            if now != now:
                raise ValueError("now must be a finite time, got nan")
            now = self._now
        inv = self._inv
        try:
            ntb = floor(now * inv)  # absolute tick of now
        except OverflowError:
            raise ValueError(f"now must be a finite time, got {now!r}") from None
        nt = ntb - self._base
        cur = self._cur
        runs = self._runs
        pd: list[array[float]] = []  # pieces taken, highest level first
        ps: list[array[int]] = []
        pi: list[list[Any]] = []
        nsp = 0  # how many of the pieces are sorted
        later: list[tuple[int, _Bucket]] = []  # an entered bucket to cascade
        if nt > cur:
            h = ((cur ^ nt).bit_length() - 1) // _BITS
            if self._fired:
                self._fired = set()  # they are before the new tick: cancel() knows by the tick
        else:
            h = -1
        for k in range(len(runs) - 1, 0, -1):
            run = runs[k]
            if k > h:  # this level's digit did not change: take the due front of its run
                if run is not None:
                    p = run.pos
                    rd = run.ds
                    if p < len(rd) and rd[p] <= now:
                        self._take_run(k, run, p, bisect_right(rd, now, p), pd, ps, pi, ntb)
                        nsp += 1
            else:
                nsp += self._move_level(k, h, cur, nt, now, ntb, pd, ps, pi, later)
        # level 0: single ticks; the bucket at the current tick may be partly due
        lvl = self._levels[0]
        bits_l = self._bits
        d0 = nt & _MASK
        if h >= 0:
            bits = bits_l[0]
            if h:
                drain = bits
                bits_l[0] = 0
            else:
                drain = bits & ((1 << d0) - 1) & -(1 << (cur & _MASK))
                bits_l[0] = bits = bits & ~drain
            if drain:
                nsp += _drain(lvl, drain, pd, ps, pi)
            self._cur = nt
            self._cur_min = inf
            if not h and bits >> d0 & 1:
                b = lvl[d0]
                assert b is not None
                if b.ds:
                    self._cur_min = b.ds[0] if b.nsorted >= len(b.ds) else min(b.ds)
            for k, b in later:
                self._cascade(k, b)
        if self._cur_min <= now:
            b = lvl[d0]
            assert b is not None
            b.sort()
            bd = b.ds
            q = bisect_right(bd, now)
            if q:
                d = bd[:q]
                pd.append(d)
                ps.append(b.ss[:q])
                pi.append(b.its[:q])
                nsp += 1
                if d[-1] * inv >= ntb:  # some are in the current tick: remember them
                    self._fired.update(ps[-1][bisect_left(d, ntb, key=lambda x: floor(x * inv)) :])
                del bd[:q], b.ss[:q], b.its[:q]
                b.nsorted -= q
            if bd:
                self._cur_min = bd[0]
            else:
                self._cur_min = inf
                if b.removed is None:
                    lvl[d0] = None
                    bits_l[0] &= ~(1 << d0)
        self._now = now
        self._adv_seq = self._seq
        if not pd:
            return []
        if nsp == 1 and len(pd) == 1 and not self._canc:  # the common case: one sorted slice
            self._gone += len(pi[0])
            return pi[0]
        return self._combine(pd, ps, pi, nsp)

    # ------------------------------------------------------------------ internals

    def _move_level(
        self,
        k: int,
        h: int,
        cur: int,
        nt: int,
        now: float,
        ntb: int,
        pd: list[array[float]],
        ps: list[array[int]],
        pi: list[list[Any]],
        later: list[tuple[int, _Bucket]],
    ) -> int:
        """Time moves from tick ``cur`` to ``nt``; level ``k`` (>= 1) is at or below ``h``, the
        highest digit that changed: take its old run and the buckets passed over whole, and
        enter the bucket ``nt`` is in (only on level ``h``; below it nothing is left): sort it
        into the level's run, or, if it holds more than ``_RUN_MAX``, add it to ``later`` to
        be cascaded once the current tick is ``nt``.

        :returns: how many of the pieces taken are sorted.
        """
        nsp = 0
        runs = self._runs
        run = runs[k]
        if run is not None:
            runs[k] = None
            p = run.pos
            if p < len(run.ds):
                pd.append(run.ds[p:] if p else run.ds)
                ps.append(run.ss[p:] if p else run.ss)
                pi.append(run.its[p:] if p else run.its)
                nsp += 1
        bits = self._bits[k]
        if not bits:
            return nsp
        lvl = self._levels[k]
        if k < h:
            self._bits[k] = 0
            return nsp + _drain(lvl, bits, pd, ps, pi)
        sh = k * _BITS
        enter = (nt >> sh) & _MASK
        drain = bits & ((1 << enter) - 1) & -(2 << ((cur >> sh) & _MASK))
        self._bits[k] = bits & ~drain & ~(1 << enter)
        if drain:
            nsp += _drain(lvl, drain, pd, ps, pi)
        if bits >> enter & 1:
            b = lvl[enter]
            lvl[enter] = None
            assert b is not None
            if len(b.ds) > self._RUN_MAX:  # too big to sort in one go: spread it out, lower down
                later.append((k, b))
                return nsp
            b.sort()
            runs[k] = b
            if b.ds and b.ds[0] <= now:
                self._take_run(k, b, 0, bisect_right(b.ds, now), pd, ps, pi, ntb)
                nsp += 1
            elif not b.ds and b.removed is None:
                runs[k] = None
        return nsp

    def _cascade(self, k: int, b: _Bucket) -> None:
        """Spread the entered level-``k`` bucket ``b`` over the levels below, relative to the
        current tick, sorting it a chunk at a time: a big sort costs far more per item than
        many small ones. The lower levels are empty (time just left their old blocks), so
        each item lands before anything scheduled after it: ties stay in schedule order."""
        ds, ss, its = b.ds, b.ss, b.its
        for c in range(0, len(ds), self._CHUNK):
            e = c + self._CHUNK
            self._place_chunk(ds[c:e].tolist(), ss[c:e].tolist(), its[c:e])
        b.ds = array("d")
        b.ss = array("q")
        b.its = []
        b.nsorted = 0
        if b.removed is not None:  # keep its compacted seqs where _was_compacted looks
            self._runs[k] = b

    def _combine(
        self, pd: list[array[float]], ps: list[array[int]], pi: list[list[Any]], nsp: int
    ) -> list[Any]:
        """The pieces as one list in (deadline, schedule) order, cancelled entries left out."""
        one_sorted = len(pd) == 1 and nsp == 1
        if len(pd) == 1:
            d_all, s_all, i_all = pd[0], ps[0], pi[0]
        else:
            d_all = array("d")
            s_all = array("q")
            i_all = []
            for d_, s_, i_ in zip(pd, ps, pi, strict=True):
                d_all += d_
                s_all += s_
                i_all += i_
        canc = self._canc
        if canc:
            dead = canc.intersection(s_all)
            if dead:
                canc -= dead
                keep = list(map(not_, map(dead.__contains__, s_all)))
                i_all = list(compress(i_all, keep))
                if not one_sorted:
                    d_all = array("d", compress(d_all, keep))
        if not one_sorted and len(i_all) > 1:
            dl = d_all.tolist()
            i_all = list(itemgetter(*sorted(range(len(dl)), key=dl.__getitem__))(i_all))
        self._gone += len(i_all)
        return i_all

    def _take_run(
        self,
        k: int,
        run: _Bucket,
        p: int,
        q: int,
        pd: list[array[float]],
        ps: list[array[int]],
        pi: list[list[Any]],
        ntb: int,
    ) -> None:
        """Take entries [p, q) of the sorted run of level ``k`` as one piece; remember the
        sequence numbers of those in the current tick (absolute tick ``ntb``)."""
        rd = run.ds
        d = rd[p:q]
        s = run.ss[p:q]
        pd.append(d)
        ps.append(s)
        pi.append(run.its[p:q])
        inv = self._inv
        if d[-1] * inv >= ntb:
            self._fired.update(s[bisect_left(d, ntb, key=lambda x: floor(x * inv)) :])
        n = len(rd)
        if q >= n:
            if run.removed is None:
                self._runs[k] = None
            else:
                run.ds = array("d")
                run.ss = array("q")
                run.its = []
                run.pos = run.nsorted = 0
        elif q > 64 and q * 2 > n:
            del rd[:q], run.ss[:q], run.its[:q]
            run.pos = 0
            run.nsorted = n - q
        else:
            run.pos = q
            run.its[p:q] = [None] * (q - p)  # let fired items go

    def _extend(
        self,
        k: int,
        idx: int,
        ds: array[float],
        ss: array[int],
        its: list[Any],
        p: int,
        e: int,
    ) -> None:
        lvl = self._levels[k]
        b = lvl[idx]
        if b is None:
            b = lvl[idx] = _Bucket()
            self._bits[k] |= 1 << idx
        if not b.ds:
            b.nsorted = e - p
        b.ds += ds[p:e]
        b.ss += ss[p:e]
        b.its += its[p:e]

    def _grow(self, k: int) -> None:
        while len(self._levels) <= k:
            self._levels.append([None] * _SLOTS)
            self._bits.append(0)
            self._runs.append(None)

    def _lo(self, tick: int) -> float:
        """The smallest float whose tick is >= ``tick`` (``inf`` past the float range)."""
        a = tick + self._base
        inv = self._inv
        try:
            g = a / inv
            if not isfinite(g * inv):
                return inf
            while floor(g * inv) >= a:
                g = nextafter(g, -inf)
            while floor(g * inv) < a:
                g = nextafter(g, inf)
        except OverflowError:
            return inf
        return g

    def _containers(self) -> Iterator[_Bucket]:
        for lvl in self._levels:
            for b in lvl:
                if b is not None:
                    yield b
        for r in self._runs:
            if r is not None:
                yield r

    def _compact(self) -> None:
        """Drop every cancelled entry; remember their sequence numbers per container."""
        canc = self._canc
        for c in self._containers():
            p = c.pos
            if p:
                del c.ds[:p], c.ss[:p], c.its[:p]
                c.pos = 0
                c.nsorted = max(0, c.nsorted - p)
            if not c.ss:
                continue
            sl = c.ss.tolist()
            flags = list(map(canc.__contains__, sl))
            if not any(flags):
                continue
            keep = list(map(not_, flags))
            was_sorted = c.nsorted >= len(c.ds)
            gone = list(compress(sl, flags))
            c.ds = array("d", list(compress(c.ds.tolist(), keep)))
            c.ss = array("q", list(compress(sl, keep)))
            c.its = list(compress(c.its, keep))
            c.nsorted = len(c.ds) if was_sorted else 0
            if c.removed is not None:
                gone += c.removed
            gone.sort()
            c.removed = array("q", gone)
            self._gone_lo = min(self._gone_lo, gone[0])
            self._gone_hi = max(self._gone_hi, gone[-1])
        canc.clear()
        slot = self._levels[0][self._cur & _MASK]
        self._cur_min = min(slot.ds) if slot is not None and slot.ds else inf

    def _was_compacted(self, t: int, s: int) -> bool:
        """Whether the entry (tick ``t``, seq ``s``) was cancelled and compacted away."""
        cur = self._cur
        lvl0 = self._levels[0]
        if t < cur:  # scheduled in the past, after the last advance: the current bucket
            b = lvl0[cur & _MASK]
            return b is not None and b.was_removed(s)
        for k, lvl in enumerate(self._levels):
            sh = k * _BITS
            if (t >> (sh + _BITS)) != (cur >> (sh + _BITS)):
                continue
            d = (t >> sh) & _MASK
            c = self._runs[k] if k and d == (cur >> sh) & _MASK else lvl[d]
            if c is not None and c.was_removed(s):
                return True
        return False
