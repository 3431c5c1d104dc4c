"""Expression text to schedule objects, with every intermediate step memoised.

Parsing is layered so that distinct expressions still share work: a field's text compiles once
(``"*/15"`` as a minute field), a (day-of-month, month, day-of-week, year) quadruple becomes one
shared :class:`DayRule`, and a zone name one shared :class:`Zone` with its transition table. A
new schedule is then one ``split``, a handful of dict hits and one small object.
:class:`ScheduleCache` adds the last layer: identical (expr, tz) pairs get the very same
schedule object, whose ``next_after`` memo then serves every task that uses it.

The memo tables are bounded (cleared when they pass ``MEMO_LIMIT`` entries), so hostile input
can cost time but not unbounded memory. A :class:`Compiler` holds them; ``parse_schedule`` uses
one module-level instance (pure memoisation, no behaviour depends on it), and each
``ScheduleCache`` owns its own.
"""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kernel.errors import CronError
from kernel.triggers._fields import (
    DOM,
    DOW,
    HOUR,
    LABELS,
    MINUTE,
    MONTH,
    SECOND,
    VALID,
    YEAR,
    DayRule,
    Field,
    FieldSyntaxError,
    parse_field,
)
from kernel.triggers._zone import Zone
from kernel.triggers.base import Schedule
from kernel.triggers.cron import CronSchedule
from kernel.triggers.every import VALID as EVERY_VALID
from kernel.triggers.every import EverySchedule, parse_duration

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_SHAPES = ("5 fields (minute hour day-of-month month day-of-week), 6 with seconds first, "
           "7 with seconds first and year last, or @yearly @annually @monthly @weekly @daily "
           "@midnight @hourly @every DURATION")
_TZ_VALID = "an IANA time zone name such as UTC, Europe/Berlin or America/New_York"
MEMO_LIMIT = 1 << 17
_ZERO = parse_field(SECOND, "0")


class Compiler:
    """Turns (expr, tz) into schedules, sharing compiled fields, rules and zones."""

    __slots__ = ("_days", "_fields", "_zones")

    def __init__(self) -> None:
        self._fields: tuple[dict[str, Field], ...] = tuple({} for _ in LABELS)
        self._days: dict[tuple[str, str, str, str], DayRule] = {}
        self._zones: dict[str, Zone] = {}

    def zone(self, expr: str, tz: str) -> Zone:
        z = self._zones.get(tz)
        if z is None:
            try:
                info = ZoneInfo(tz)
            except (ZoneInfoNotFoundError, ValueError, TypeError):
                raise CronError(expr, "tz", f"unknown time zone {tz!r}", _TZ_VALID) from None
            if len(self._zones) >= MEMO_LIMIT:
                self._zones.clear()
            z = self._zones[tz] = Zone(tz, info)
        return z

    def parse(self, expr: str, tz: str = "UTC") -> Schedule:
        """A schedule for ``expr`` in ``tz``; raises :class:`CronError` naming the bad field."""
        zone = self._zones.get(tz)
        if zone is None:
            zone = self.zone(expr, tz)
        parts = expr.split()
        if parts and parts[0][0] == "@":
            return self._macro(expr, tz, zone, parts)
        return self._cron(expr, tz, zone, parts)

    def _macro(self, expr: str, tz: str, zone: Zone, parts: list[str]) -> Schedule:
        name = parts[0].lower()
        if name == "@every":
            text = "".join(parts[1:])
            period = parse_duration(text)
            if period is None:
                problem = f"{text!r} is not a positive duration" if text else "needs a duration"
                raise CronError(expr, "@every", problem, EVERY_VALID)
            return EverySchedule(expr, tz, period)
        five = MACROS.get(name)
        if five is None or len(parts) > 1:
            problem = f"unknown macro {parts[0]!r}" if five is None else "takes no arguments"
            raise CronError(expr, "expression", problem, _SHAPES)
        return self._cron(expr, tz, zone, five.split())

    def _cron(self, expr: str, tz: str, zone: Zone, parts: list[str]) -> CronSchedule:
        # The hot path of arming: memo hits inline, misses through _field / _day_rule.
        n = len(parts)
        fields = self._fields
        if n == 5:
            mi, hr, dom, mon, dow = parts
            second = _ZERO
            yr = "*"
        else:
            if n == 6:
                sec, mi, hr, dom, mon, dow = parts
                yr = "*"
            elif n == 7:
                sec, mi, hr, dom, mon, dow, yr = parts
            else:
                raise CronError(expr, "expression", f"has {n} fields", _SHAPES)
            second = fields[SECOND].get(sec) or self._field(expr, SECOND, sec)
        minute = fields[MINUTE].get(mi) or self._field(expr, MINUTE, mi)
        hour = fields[HOUR].get(hr) or self._field(expr, HOUR, hr)
        day = self._days.get((dom, mon, dow, yr)) or self._day_rule(expr, dom, mon, dow, yr)
        # Fixed-time unless the minute or the hour is written with a leading "*" (cronie's
        # MIN_STAR | HR_STAR); the seconds field does not count (cronie has none).
        return CronSchedule(expr, tz, zone, second, minute, hour, day,
                            mi[0] != "*" and hr[0] != "*")

    def _field(self, expr: str, kind: int, text: str) -> Field:
        memo = self._fields[kind]
        f = memo.get(text)
        if f is None:
            try:
                f = parse_field(kind, text)
            except FieldSyntaxError as e:
                raise CronError(expr, LABELS[kind], e.problem, VALID[kind]) from None
            if len(memo) >= MEMO_LIMIT:
                memo.clear()
            memo[text] = f
        return f

    def _day_rule(self, expr: str, dom: str, mon: str, dow: str, yr: str) -> DayRule:
        year = self._field(expr, YEAR, yr)
        rule = DayRule(self._field(expr, DOM, dom), self._field(expr, MONTH, mon),
                       self._field(expr, DOW, dow), year)
        why = rule.impossible(dom)
        if why is not None:
            raise CronError(expr, LABELS[DOM], f"can never fire: {why}", VALID[DOM])
        if not year.star:
            y = (year.mask & -year.mask).bit_length() - 1
            if not rule.next_day(y, 1, 1, date(y, 1, 1).toordinal()):
                raise CronError(expr, LABELS[YEAR], f"can never fire: no date in {yr!r} matches "
                                f"day-of-month {dom!r}, month {mon!r}, day-of-week {dow!r}",
                                VALID[YEAR])
        if len(self._days) >= MEMO_LIMIT:
            self._days.clear()
        self._days[(dom, mon, dow, yr)] = rule
        return rule


_DEFAULT = Compiler()


def parse_schedule(expr: str, tz: str = "UTC") -> Schedule:
    """Parse ``expr`` (cron, macro or ``@every``) for zone ``tz``; raises :class:`CronError`."""
    return _DEFAULT.parse(expr, tz)


class ScheduleCache:
    """Hands out one shared schedule object per (expr, tz); parse once, memoise ``next_after``.

    Entries live until :meth:`discard` or :meth:`clear`: the kernel holds one per distinct
    schedule in its configuration, so the table is as large as the configuration.
    """

    __slots__ = ("_by_tz", "_compiler")

    def __init__(self, compiler: Compiler | None = None) -> None:
        self._compiler = Compiler() if compiler is None else compiler
        self._by_tz: dict[str, dict[str, Schedule]] = {}

    def get(self, expr: str, tz: str = "UTC") -> Schedule:
        """The schedule for (expr, tz), parsed on first use; raises :class:`CronError`."""
        by_expr = self._by_tz.get(tz)
        if by_expr is not None:
            sched = by_expr.get(expr)
            if sched is not None:
                return sched
        sched = self._compiler.parse(expr, tz)
        if by_expr is None:
            by_expr = self._by_tz[tz] = {}
        by_expr[expr] = sched
        return sched

    def discard(self, expr: str, tz: str = "UTC") -> None:
        by_expr = self._by_tz.get(tz)
        if by_expr is not None:
            by_expr.pop(expr, None)

    def clear(self) -> None:
        self._by_tz.clear()

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_tz.values())

    def __repr__(self) -> str:
        return f"<ScheduleCache schedules={len(self)} zones={len(self._by_tz)}>"


def preview(expr: str, tz: str, after: float, count: int) -> list[datetime]:
    """The next ``count`` fire times after ``after`` as aware datetimes in ``tz``.

    Fewer come back when the schedule ends (a year field); :class:`CronError` when it never
    fires again at all (``0 0 0 1 1 ? 2020`` previewed from 2026).
    """
    sched = parse_schedule(expr, tz)
    info = ZoneInfo(tz)
    out: list[datetime] = []
    t: float = after
    for _ in range(count):
        nxt = sched.next_after(t)
        if nxt is None:
            break
        out.append(datetime.fromtimestamp(nxt, info))
        t = nxt
    if not out and count > 0:
        field = LABELS[YEAR] if len(expr.split()) == 7 else "expression"
        when = datetime.fromtimestamp(after, info).isoformat()
        raise CronError(expr, field, f"never fires after {when}",
                        "a schedule with a fire time still to come")
    return out
