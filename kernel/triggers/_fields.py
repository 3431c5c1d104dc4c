"""Cron fields: the text of one field compiled into a bitmask, and the two rules built from them.

A field compiles to a :class:`Field`: an ``int`` whose bit *v* is set when value *v* matches, plus
the day rules that depend on the month (``L``, ``L-n``, ``LW``, ``nW`` in day-of-month; ``nL``,
``n#k`` in day-of-week). Fields are immutable and shared by every schedule that spells them the
same. Second, minute and hour masks go straight into the schedule object; the four day fields
combine into a shared :class:`DayRule` ("the next matching date").

Errors are raised as :class:`FieldSyntaxError` (the problem text only); the caller knows the whole
expression and turns it into a :class:`~kernel.errors.CronError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

SECOND, MINUTE, HOUR, DOM, MONTH, DOW, YEAR = range(7)

LABELS = ("second", "minute", "hour", "day-of-month", "month", "day-of-week", "year")
VALID = (
    "0-59",
    "0-59",
    "0-23",
    "1-31, L, L-n, LW, nW, ?",
    "1-12 or JAN-DEC",
    "0-7 (0 and 7 = Sunday) or SUN-SAT, nL, n#k with k 1-5, ?",
    "1970-2099",
)
SYNTAX = "each comma-separated item is *, a value, a-b, */n, a-b/n or a/n"

_LO = (0, 0, 0, 1, 1, 0, 1970)
_HI = (59, 59, 23, 31, 12, 7, 2099)
#: Upper end of ``*`` and ``a/n``: day-of-week cycles 0-6 (7 is only an alias of Sunday).
_STAR_HI = (59, 59, 23, 31, 12, 6, 2099)

MONTH_NAMES = {n: i + 1 for i, n in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"))}
DOW_NAMES = {n: i for i, n in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}
_NAMES: tuple[dict[str, int], ...] = ({}, {}, {}, {}, MONTH_NAMES, DOW_NAMES, {})

_MONTH_DAYS = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MAX_MONTH_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MONTH_LABEL = ("", "January", "February", "March", "April", "May", "June", "July", "August",
                "September", "October", "November", "December")

_LAST_MINUS = re.compile(r"L-(\d+)", re.IGNORECASE | re.ASCII)
_NEAREST = re.compile(r"(\d+)W", re.IGNORECASE | re.ASCII)
_DOW_LAST = re.compile(r"(\w+)L|L(\d)", re.IGNORECASE | re.ASCII)  # 5L, FRIL, croniter's L5
_DOW_NTH = re.compile(r"(\w+)#(\d+)", re.ASCII)

# Special day rules: (kind, a, b). Day-of-month: ("L", n, 0) = n-th day before the last,
# ("LW", 0, 0) = last weekday, ("W", n, 0) = weekday nearest the n-th. Day-of-week:
# ("l", wd, 0) = last weekday wd of the month, ("#", wd, k) = k-th weekday wd.
Special = tuple[str, int, int]


class FieldSyntaxError(ValueError):
    """One field is wrong; ``problem`` names the offending text."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Field:
    mask: int
    star: bool = False
    specials: tuple[Special, ...] = ()
    low: int = 0  # the smallest value in ``mask`` (-1 when only specials)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _value(kind: int, text: str) -> int:
    if _is_number(text):
        v = int(text)
        if not _LO[kind] <= v <= _HI[kind]:
            raise FieldSyntaxError(f"value {v} is out of range")
        return v
    v2 = _NAMES[kind].get(text.upper())
    if v2 is None:
        if not _NAMES[kind]:
            raise FieldSyntaxError(f"{text!r} is not a number; {SYNTAX}")
        raise FieldSyntaxError(f"unknown name {text!r}")
    return v2


def _item_mask(kind: int, item: str) -> int:
    """Bits for one plain item: ``*``, ``v``, ``a-b``, each with an optional ``/step``."""
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not _is_number(step_text):
            raise FieldSyntaxError(f"step {step_text!r} in {item!r} is not a positive integer")
        step = int(step_text)
        span = _STAR_HI[kind] - _LO[kind] + 1
        if not 1 <= step <= span:
            raise FieldSyntaxError(f"step {step} in {item!r} must be 1-{span}")
    if base == "*":
        a, b = _LO[kind], _STAR_HI[kind]
    elif "-" in base:
        left, _, right = base.partition("-")
        if not left or not right:
            raise FieldSyntaxError(f"range {base!r} needs a value on both sides of '-'")
        a, b = _value(kind, left), _value(kind, right)
        if kind == YEAR and a > b:
            raise FieldSyntaxError(f"range {base!r} is reversed: years do not wrap; write the "
                                   f"earlier year first: '{b}-{a}'")
    else:
        a = _value(kind, base)
        b = max(a, _STAR_HI[kind]) if slash else a
    if kind == DOW and a == 7 and b != 7:
        a = 0
    mask = 0
    if a <= b:
        for v in range(a, b + 1, step):
            mask |= 1 << v
    else:  # a wrapping range of a cyclic field (FRI-MON, 22-2): the step carries over the wrap
        lo, size = _LO[kind], _STAR_HI[kind] - _LO[kind] + 1
        for p in range(0, (b - a) % size + 1, step):
            mask |= 1 << (lo + (a - lo + p) % size)
    if kind == DOW and mask & 0x80:  # 7 is Sunday
        mask = (mask | 1) & 0x7F
    return mask


def _dom_special(item: str) -> Special | None:
    up = item.upper()
    if up == "L":
        return ("L", 0, 0)
    if up == "LW":
        return ("LW", 0, 0)
    m = _LAST_MINUS.fullmatch(item)
    if m:
        n = int(m.group(1))
        if n > 30:
            raise FieldSyntaxError(f"{item!r}: L-n needs n in 0-30")
        return ("L", n, 0)
    m = _NEAREST.fullmatch(item)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= 31:
            raise FieldSyntaxError(f"{item!r}: nW needs n in 1-31")
        return ("W", n, 0)
    if "L" in up or "W" in up:
        raise FieldSyntaxError(f"{item!r} is not L, L-n, LW or nW")
    return None


def _dow_special(item: str) -> Special | None:
    if item.upper() == "L":
        raise FieldSyntaxError("'L' alone is ambiguous in day-of-week: write nL (5L or FRIL = "
                               "last Friday) or use L in day-of-month")
    m = _DOW_NTH.fullmatch(item)
    if m:
        k = int(m.group(2))
        if not 1 <= k <= 5:
            raise FieldSyntaxError(f"{item!r}: n#k needs k in 1-5")
        return ("#", _value(DOW, m.group(1)) % 7, k)
    m = _DOW_LAST.fullmatch(item)
    if m:  # no day name ends in L, so any item ending in L is "last weekday n of the month"
        return ("l", _value(DOW, m.group(1) or m.group(2)) % 7, 0)
    if "#" in item:
        raise FieldSyntaxError(f"{item!r} is not n#k")
    return None


def parse_field(kind: int, text: str) -> Field:
    """Compile the text of one field; raises :class:`FieldSyntaxError`."""
    if text == "?":
        if kind not in (DOM, DOW):
            raise FieldSyntaxError("'?' is only allowed in day-of-month and day-of-week")
        return Field(_full_mask(kind), star=True, low=_LO[kind])
    if text == "*":
        return Field(_full_mask(kind), star=True, low=_LO[kind])
    mask = 0
    specials: list[Special] = []
    for item in text.split(","):
        if not item:
            raise FieldSyntaxError(f"empty item in list {text!r}")
        if "?" in item:
            raise FieldSyntaxError("'?' must stand alone in its field")
        sp = _dom_special(item) if kind == DOM else _dow_special(item) if kind == DOW else None
        if sp is not None:
            if sp not in specials:
                specials.append(sp)
            continue
        mask |= _item_mask(kind, item)
    return Field(mask, star=False, specials=tuple(specials), low=_low_bit(mask))


def _full_mask(kind: int) -> int:
    m = 0
    for v in range(_LO[kind], _STAR_HI[kind] + 1):
        m |= 1 << v
    return m


def _low_bit(x: int) -> int:
    return (x & -x).bit_length() - 1


def _is_leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def _specials_mask(specials: tuple[Special, ...], ml: int, fw: int) -> int:
    """Days of a month (``ml`` days long, day 1 on weekday ``fw``, Sunday 0) that the rules hit."""
    mask = 0
    for kind, a, b in specials:
        if kind == "L":
            d = ml - a
            if d < 1:
                continue
        elif kind == "LW":
            wd = (fw + ml - 1) % 7
            d = ml - 1 if wd == 6 else ml - 2 if wd == 0 else ml
        elif kind == "W":
            a = min(a, ml)  # 31W in a 30-day month means the 30th's nearest (as croniter)
            wd = (fw + a - 1) % 7
            if wd == 6:
                d = a - 1 if a > 1 else a + 2
            elif wd == 0:
                d = a + 1 if a < ml else a - 2
            else:
                d = a
        elif kind == "l":
            d = ml - ((fw + ml - 1 - a) % 7)
        else:  # "#"
            d = 1 + (a - fw) % 7 + 7 * (b - 1)
            if d > ml:
                continue
        mask |= 1 << d
    return mask


class DayRule:
    """Day-of-month, month, day-of-week and year: ``next_day`` finds the next matching date.

    Day-of-month and day-of-week are ORed when both are restricted (Vixie cron, croniter); a
    field written ``*`` or ``?`` is unrestricted and the other one alone decides.
    """

    __slots__ = ("any_day", "dom", "dom_sp", "dow_days", "dow_sp", "mode", "months", "years")

    def __init__(self, dom: Field, month: Field, dow: Field, year: Field | None) -> None:
        self.dom, self.dom_sp = dom.mask, dom.specials
        self.dow_sp = dow.specials
        self.months = month.mask
        self.years = None if year is None or year.star else year.mask
        # dow_days[fw]: the days 1-31 whose weekday is in the field, for a month starting on fw.
        days = []
        for fw in range(7):
            m = 0
            for d in range(1, 32):
                if (dow.mask >> ((fw + d - 1) % 7)) & 1:
                    m |= 1 << d
            days.append(m)
        self.dow_days = tuple(days)
        # 0: any day, 1: day-of-month decides, 2: day-of-week decides, 3: either.
        self.mode = (0 if dom.star else 1) | (0 if dow.star else 2)
        #: Every date matches: the evaluator skips the day search.
        self.any_day = self.mode == 0 and month.star and self.years is None

    def month_days(self, y: int, mo: int, fw: int) -> tuple[int, int]:
        """(mask of matching days, length) for month ``mo`` of ``y`` whose 1st is weekday fw."""
        ml = _MONTH_DAYS[mo] + (1 if mo == 2 and _is_leap(y) else 0)
        full = (2 << ml) - 2
        mode = self.mode
        if mode == 0:
            return full, ml
        if mode & 1:
            dom = self.dom
            if self.dom_sp:
                dom |= _specials_mask(self.dom_sp, ml, fw)
            if mode == 1:
                return dom & full, ml
        else:
            dom = 0
        dow = self.dow_days[fw]
        if self.dow_sp:
            dow |= _specials_mask(self.dow_sp, ml, fw)
        return (dom | dow) & full, ml

    def next_day(self, y: int, mo: int, dd: int, first: int) -> int:
        """Ordinal of the first matching date on or after (y, mo, dd); ``first`` is the ordinal
        of (y, mo, 1). Returns 0 if none before year 10000."""
        months, years = self.months, self.years
        while True:
            if years is not None and not (years >> y) & 1:
                rest = years >> (y + 1)
                if not rest:
                    return 0
                y += 1 + _low_bit(rest)
                mo, dd = 1, 1
                first = date(y, 1, 1).toordinal()
            if not (months >> mo) & 1:
                rest = months >> (mo + 1)
                if rest:
                    mo += 1 + _low_bit(rest)
                else:
                    y += 1
                    if y > 9999:
                        return 0
                    mo = _low_bit(months)
                dd = 1
                first = date(y, mo, 1).toordinal()
                continue
            mask, ml = self.month_days(y, mo, first % 7)
            rest = mask >> dd
            if rest:
                return first + dd - 2 + (rest & -rest).bit_length()
            first += ml
            dd = 1
            mo += 1
            if mo == 13:
                mo = 1
                y += 1
                if y > 9999:
                    return 0

    def impossible(self, dom_text: str) -> str | None:
        """Why no date can ever match (day-of-month alone against the months), or None."""
        if self.mode != 1:
            return None  # any weekday (and n#k, nL) occurs in every month sooner or later
        for mo in range(1, 13):
            if (self.months >> mo) & 1:
                ml = _MAX_MONTH_DAYS[mo]
                if self.dom & ((2 << ml) - 2):
                    return None
                for kind, a, _ in self.dom_sp:
                    if kind != "L" or ml - a >= 1:
                        return None
        months = [_MONTH_LABEL[mo] for mo in range(1, 13) if (self.months >> mo) & 1]
        return f"day {dom_text!r} never occurs in {', '.join(months)}"
