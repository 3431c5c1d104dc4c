"""The cron evaluator: walk wall time field by field, then map it onto UTC by the DST policy.

How ``next_after(t)`` works: take the zone's constant-offset segment that holds ``t`` (see
:mod:`kernel.triggers._zone`); inside it wall time is UTC plus one offset, so the next matching
wall second is found by bit arithmetic on the compiled fields (next matching day, then next
matching second of that day) and converted back by subtracting the offset. If that lands past
the segment's end, the seam is handled by the policy below and the walk goes on in the next
segment. No datetime arithmetic is done in the walk except ``date.fromordinal``.

DST policy
----------
A job is *wildcard* when its minute **or** its hour field is written with a leading ``*``
(``*/15 * * * *``, ``0 * * * *``, ``* 1-6 * * *``, ``*/20 2 * * *``, ``@hourly``); every other
job is *fixed-time* (``30 2 * * *``, ``0 9-17 * * *``, ``0,30 1,2 * * *``, ``@daily``). This is
Vixie cron's and cronie's rule (``MIN_STAR | HR_STAR`` in ``cron.c``), also cronsim's. The
seconds field of a 6- or 7-field expression does not count (cron has none): ``* 30 2 * * *``
is fixed-time.

* Fall back (a wall time occurs twice): a fixed-time job runs once, at the first occurrence
  (Berlin, 2026-10-25: ``30 2 * * *`` at 02:30 CEST only; croniter runs it at 02:30 CEST and
  again at 02:30 CET). A wildcard job follows real elapsed time and runs in both passes:
  ``30 * * * *`` at 02:30 CEST and again at 02:30 CET; ``* 1-6 * * *`` every minute of both
  passes of 02:00-02:59.
* Spring forward (wall times skipped): a fixed-time job whose wall time falls in the gap runs
  once, at the end of the gap (``30 2 * * *``, Berlin 2026-03-29: 03:00 CEST; Lord Howe's
  half-hour gap: 02:15 runs at 02:30; Samoa's skipped 2011-12-30: ``0 9 * * *`` runs at
  2011-12-31 00:00). Several gap times of one job collapse into that single run, and so does a
  gap time with a regular time at the end of the gap (``0 2,3 * * *``). This holds from any
  starting instant, the last second before the gap included. A wildcard job just skips the
  missing wall times (``30 * * * *``: 01:30 CET, then 03:30 CEST; ``*/15 2 * * *`` has no run
  that day); nothing extra runs.
* ``@every`` is not wall time at all and ignores DST (see :mod:`kernel.triggers.every`).
"""

from __future__ import annotations

import math
from datetime import date

from kernel.triggers._fields import DayRule, Field
from kernel.triggers._zone import MAX_INSTANT, MIN_INSTANT, Zone

_EPOCH_ORDINAL = 719163  # date(1970, 1, 1).toordinal()


class CronSchedule:
    """A compiled cron expression in one zone.

    It holds the second, minute and hour masks itself (shared ``int`` objects from the compiled
    fields) and a shared :class:`DayRule`, so a distinct schedule costs one small object.
    """

    __slots__ = ("_day", "_fixed", "_h", "_h0", "_hi", "_lo", "_m", "_m0", "_s", "_s0", "_zone",
                 "expr", "tz")

    def __init__(self, expr: str, tz: str, zone: Zone, second: Field, minute: Field, hour: Field,
                 day: DayRule, fixed: bool) -> None:
        self.expr = expr
        self.tz = tz
        self._zone = zone
        self._s, self._m, self._h = second.mask, minute.mask, hour.mask
        self._s0, self._m0, self._h0 = second.low, minute.low, hour.low
        self._day = day
        self._fixed = fixed
        # Memo: next_after(x) == _hi for every _lo <= x < _hi (empty until the first call).
        self._lo = 0.0
        self._hi = 0.0

    def __repr__(self) -> str:
        kind = "fixed-time" if self._fixed else "wildcard"
        return f"CronSchedule({self.expr!r}, tz={self.tz!r}, {kind})"

    @property
    def fixed_time(self) -> bool:
        """True when the DST policy treats this as a fixed wall-clock time (neither the minute
        nor the hour field starts with ``*``)."""
        return self._fixed

    def next_after(self, instant: float) -> float | None:
        if self._lo <= instant < self._hi:
            return self._hi
        s = math.floor(instant) + 1
        if not MIN_INSTANT <= s <= MAX_INSTANT:
            if s > MAX_INSTANT:
                return None
            raise ValueError(f"instant {instant!r} is before 1900")
        zone = self._zone
        fixed = self._fixed
        while True:
            start, end, off, prev = zone.segment(s)
            if fixed and s == start and off > prev:
                # The walk begins exactly as a spring-forward gap ends (asked for in the last
                # second before it): the gap's wall times [start + prev, start + off) belong to
                # this seam too, and a match among them runs now, at the end of the gap.
                r = self._next_wall(start + prev)
                if r is not None and r < start + off:
                    c = start
                    break
            if fixed and prev > off and s < start + prev - off:
                # Just after a fall-back: these wall times already occurred; fixed-time jobs
                # ran then, so resume where the wall clock passes its pre-transition reading.
                s = start + prev - off
                if s >= end:
                    continue
            r = self._next_wall(s + off)
            if r is None:
                return None
            c = r - off
            if c < end:
                break
            if fixed and r < end + zone.offset_at(end):
                c = end  # the wall time lies in a spring-forward gap: run as the gap ends
                break
            s = end
            if s > MAX_INSTANT:
                return None
        res = float(c)
        self._lo = instant
        self._hi = res
        return res

    def _next_wall(self, w: int) -> int | None:
        """The first matching wall second at or after ``w`` (wall seconds since 1970-01-01)."""
        days, sod = divmod(w, 86400)
        # The next matching second of this day, or -1 (inlined: this is the arming hot path).
        h = sod // 3600
        m = sod // 60 % 60
        tod = -1
        if (self._h >> h) & 1:
            if (self._m >> m) & 1:
                x = self._s >> (sod % 60)
                if x:
                    tod = sod + (x & -x).bit_length() - 1
            if tod < 0:
                x = self._m >> (m + 1)
                if x:
                    tod = h * 3600 + (m + (x & -x).bit_length()) * 60 + self._s0
        if tod < 0:
            x = self._h >> (h + 1)
            if x:
                tod = (h + (x & -x).bit_length()) * 3600 + self._m0 * 60 + self._s0
        rule = self._day
        if rule.any_day:
            if tod >= 0:
                return w - sod + tod
            return w - sod + 86400 + self._h0 * 3600 + self._m0 * 60 + self._s0
        ordn = days + _EPOCH_ORDINAL
        if tod < 0:  # nothing left today: the answer is the first time of a later day
            ordn += 1
        d = date.fromordinal(ordn)
        dd = d.day
        found = rule.next_day(d.year, d.month, dd, ordn - dd + 1)
        if not found:
            return None
        if found == ordn and tod >= 0:
            return w - sod + tod
        return (found - _EPOCH_ORDINAL) * 86400 + self._h0 * 3600 + self._m0 * 60 + self._s0
