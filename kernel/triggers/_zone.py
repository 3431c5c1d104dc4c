"""A time zone as a sequence of constant-offset segments, for walking wall time.

:class:`Zone` answers one question: for a UTC instant *s*, which segment ``[start, end)`` of
constant UTC offset holds it, what is that offset, and what was the offset before ``start``
(the previous segment's). The cron evaluator walks wall time inside one segment (where wall =
UTC + offset is monotonic) and handles the seams between segments by its DST policy.

zoneinfo does not expose its transition table, so it is rebuilt by probing: for each 4-year block
the offset is sampled once a day and every change is narrowed to the second by bisection. A pair
of changes that cancel out within one day would go unseen (no zone in the tz database has one
since 1970). Blocks are computed on first use and kept; a block costs about 1.5k ``utcoffset``
calls (~1 ms) once per zone.
"""

from __future__ import annotations

from bisect import bisect_right
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

#: 1461 days: four years, one of them leap, so blocks start on 1 January (UTC) until 2100.
BLOCK = 1461 * 86400
#: First and last instants the evaluator handles: 1900-01-01 and 9999-12-30, both 00:00Z.
MIN_INSTANT = int(datetime(1900, 1, 1, tzinfo=UTC).timestamp())
MAX_INSTANT = int(datetime(9999, 12, 30, tzinfo=UTC).timestamp())

_ZERO = timedelta(0)
_Block = tuple[list[int], list[int], int]  # change instants, offset from each on, offset at start


class Zone:
    """Offset segments of one IANA zone; blocks of transitions are found lazily and kept."""

    __slots__ = ("_blocks", "_last", "info", "name")

    def __init__(self, name: str, info: ZoneInfo) -> None:
        self.name = name
        self.info = info
        self._blocks: dict[int, _Block] = {}
        self._last = (0, 0, 0, 0)  # the segment found last: most lookups are near "now"

    def __repr__(self) -> str:
        return f"Zone({self.name!r}, blocks={len(self._blocks)})"

    def _offset(self, s: int) -> timedelta:
        return datetime.fromtimestamp(s, self.info).utcoffset() or _ZERO

    def _block(self, b: int) -> _Block:
        blk = self._blocks.get(b)
        if blk is None:
            blk = self._blocks[b] = self._scan(b)
        return blk

    def _scan(self, b: int) -> _Block:
        lo = b * BLOCK
        hi = min(lo + BLOCK, MAX_INSTANT + 86400)
        info = self.info
        fromts = datetime.fromtimestamp
        trans: list[int] = []
        offs: list[int] = []
        first = prev = self._offset(min(lo, MAX_INSTANT))
        t = lo
        while t < hi - 1:
            nxt = min(t + 86400, hi - 1)
            cur = fromts(nxt, info).utcoffset()
            if cur != prev:
                a, z = t, nxt  # offset(a) == prev, offset(z) == cur: find the first second of cur
                while z - a > 1:
                    mid = (a + z) // 2
                    if self._offset(mid) == prev:
                        a = mid
                    else:
                        z = mid
                cur = self._offset(z)
                trans.append(z)
                offs.append(int(cur.total_seconds()))
                prev = cur
            t = nxt
        return trans, offs, int(first.total_seconds())

    def segment(self, s: int) -> tuple[int, int, int, int]:
        """``(start, end, offset, previous offset)`` for the segment holding instant ``s``.

        ``end`` may be a block boundary where the offset does not change; ``start`` and the
        previous offset are exact (looked up one block back when needed, and equal to the
        offset itself when nothing changed in the previous four years).
        """
        last = self._last
        if last[0] <= s < last[1]:
            return last
        last = self._last = self._find(s)
        return last

    def _find(self, s: int) -> tuple[int, int, int, int]:
        b = s // BLOCK
        trans, offs, first = self._block(b)
        i = bisect_right(trans, s) - 1
        end = trans[i + 1] if i + 1 < len(trans) else (b + 1) * BLOCK
        if i >= 0:
            return trans[i], end, offs[i], offs[i - 1] if i else first
        ptrans, poffs, pfirst = self._block(b - 1)
        if not ptrans:
            return b * BLOCK, end, first, first
        return ptrans[-1], end, first, poffs[-2] if len(ptrans) > 1 else pfirst

    def offset_at(self, s: int) -> int:
        trans, offs, first = self._block(s // BLOCK)
        i = bisect_right(trans, s) - 1
        return offs[i] if i >= 0 else first
