"""The DST policy cross-checked near real transitions, against two independent references.

1. A brute-force model that states the documented policy directly, second by second of wall
   time in UTC: it knows each field as the *set* Hypothesis drew (never the project's parser),
   and whether the job is wildcard (its minute or hour text starts with ``*``, cronie's rule).
2. cronsim (Debian cron's DST handling, the same wildcard rule), for 5-field expressions.

Starting instants cluster round each transition, the last second before it included: that is
where the evaluator once lost a spring-forward run (issue 11, item 8a).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kernel.cron import parse_schedule

# (zone, UTC instant of a change): both kinds, whole hours, a half hour, at midnight, a whole day
TRANSITIONS = [
    ("Europe/Berlin", "2026-03-29T01:00Z"), ("Europe/Berlin", "2026-10-25T01:00Z"),
    ("America/New_York", "2026-03-08T07:00Z"), ("America/New_York", "2026-11-01T06:00Z"),
    ("America/Santiago", "2026-04-05T03:00Z"), ("America/Santiago", "2026-09-06T04:00Z"),
    ("Australia/Lord_Howe", "2026-04-04T15:00Z"), ("Australia/Lord_Howe", "2026-10-03T15:30Z"),
    ("Asia/Tehran", "2021-03-21T20:30Z"), ("Asia/Tehran", "2021-09-21T19:30Z"),
    ("Pacific/Apia", "2011-09-24T14:00Z"), ("Pacific/Apia", "2011-12-30T10:00Z"),
    ("Europe/Riga", "2021-03-28T01:00Z"), ("Europe/Riga", "2021-10-31T01:00Z"),  # cronsim's own
]


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def test_the_transitions_are_in_this_tzdata() -> None:
    for tz, when in TRANSITIONS:
        info, u = ZoneInfo(tz), utc(when)
        assert (datetime.fromtimestamp(u - 1, info).utcoffset()
                != datetime.fromtimestamp(u, info).utcoffset()), (tz, when)


# --- fields as (text, set) pairs --------------------------------------------------------------

Field = tuple[str, frozenset[int]]


def _items(lo: int, hi: int) -> st.SearchStrategy[Field]:
    value = st.integers(lo, hi)
    pair = st.tuples(value, value).map(sorted)
    step = st.integers(1, min(25, hi - lo + 1))
    return st.one_of(
        value.map(lambda v: (str(v), frozenset({v}))),
        pair.map(lambda p: (f"{p[0]}-{p[1]}", frozenset(range(p[0], p[1] + 1)))),
        st.tuples(pair, step).map(lambda t: (f"{t[0][0]}-{t[0][1]}/{t[1]}",
                                             frozenset(range(t[0][0], t[0][1] + 1, t[1])))),
    )


def field(lo: int, hi: int) -> st.SearchStrategy[Field]:
    star = st.integers(1, min(30, hi - lo + 1)).map(lambda n: (f"*/{n}", frozenset(range(lo, hi + 1, n))))
    items = st.lists(_items(lo, hi), min_size=1, max_size=3).map(
        lambda xs: (",".join(x[0] for x in xs), frozenset().union(*(x[1] for x in xs))))
    return st.one_of(st.just(("*", frozenset(range(lo, hi + 1)))), star, items)


# Hours near the transitions (local 22:00-04:00) are where the policy matters; draw them often.
HOURS = st.one_of(field(0, 23), st.lists(st.sampled_from([22, 23, 0, 1, 2, 3, 4]), min_size=1,
                                         max_size=3, unique=True).map(
    lambda hs: (",".join(map(str, hs)), frozenset(hs))))
DOWS: list[Field] = [("*", frozenset(range(7))), ("0", frozenset({0})),
                     ("1-5", frozenset(range(1, 6))), ("SAT,SUN", frozenset({0, 6}))]
SECONDS: list[Field] = [("0", frozenset({0})), ("30", frozenset({30})),
                        ("*/20", frozenset({0, 20, 40})), ("10,50", frozenset({10, 50}))]


# --- the reference model ------------------------------------------------------------------------

def reference(sec: frozenset[int], minute: Field, hour: Field, dow: frozenset[int], tz: str,
              after: float, until: int) -> list[int]:
    """Fires in (after, until], by the documented policy, one UTC minute at a time.

    Every zone here changes offset on whole minutes, so a UTC minute is one wall minute.
    wildcard: each second whose wall time matches, in both passes of a repeated hour.
    fixed-time: a matching wall time on its first occurrence only (fold 0); and the instant a
    gap ends when any skipped wall time matches (one run, merged with a regular run then).
    """
    (mtext, mins), (htext, hours) = minute, hour
    fixed = not (mtext.startswith("*") or htext.startswith("*"))
    info = ZoneInfo(tz)

    def day_and_time(d: datetime) -> bool:
        return d.minute in mins and d.hour in hours and d.isoweekday() % 7 in dow

    out: set[int] = set()
    u = int(after) // 60 * 60
    while u <= until:
        d = datetime.fromtimestamp(u, info)
        if day_and_time(d) and (d.fold == 0 or not fixed):
            out.update(u + s for s in sec)
        before = datetime.fromtimestamp(u - 1, info)
        if fixed and d.utcoffset() != before.utcoffset() and d.replace(tzinfo=None) > \
                before.replace(tzinfo=None) + timedelta(seconds=1):
            wall = before.replace(tzinfo=None) + timedelta(seconds=1)  # the first skipped minute
            while wall < d.replace(tzinfo=None):
                if day_and_time(wall):
                    out.add(u)
                    break
                wall += timedelta(minutes=1)
        u += 60
    return sorted(x for x in out if after < x <= until)


def ours(expr: str, tz: str, after: float, until: int) -> list[int]:
    sched = parse_schedule(expr, tz)
    out = []
    t = sched.next_after(after)
    while t is not None and t <= until:
        out.append(int(t))
        t = sched.next_after(t)
    return out


# offsets from the transition: the seconds right round it, then anywhere in the 10 h before
OFFSETS = st.one_of(st.sampled_from([-1.0, -0.5, 0.0, -60.0, -61.0, 1.0, -3600.0, -3601.0]),
                    st.integers(-10 * 3600, 3600).map(float))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(minute=field(0, 59), hour=HOURS, dow=st.sampled_from(DOWS), sec=st.sampled_from(SECONDS),
       six=st.booleans(), which=st.sampled_from(TRANSITIONS), offset=OFFSETS)
def test_property_matches_the_policy_reference(
    minute: Field, hour: Field, dow: Field, sec: Field, six: bool, which: tuple[str, str],
    offset: float,
) -> None:
    tz, when = which
    if not six:
        sec = SECONDS[0]
    expr = (f"{sec[0]} " if six else "") + f"{minute[0]} {hour[0]} * * {dow[0]}"
    start = utc(when) + offset
    until = int(start) + 36 * 3600
    assert ours(expr, tz, start, until) == reference(sec[1], minute, hour, dow[1], tz, start,
                                                     until), expr


@pytest.mark.parametrize(("tz", "when"), TRANSITIONS)
@pytest.mark.parametrize("expr", ["30 2 * * *", "0 0 * * *", "*/15 2 * * *", "0 2 * * 0",
                                  "* 1-6 * * *", "30 23 * * *", "0,30 0,1,2,3 * * *",
                                  "0 9 * * *", "15 */2 * * *"])
def test_every_offset_near_each_transition_matches_the_reference(
    expr: str, tz: str, when: str
) -> None:
    mi, hr, _, _, dw = expr.split()
    sets = {"30": {30}, "0": {0}, "*/15": {0, 15, 30, 45}, "*": set(range(60)), "15": {15},
            "0,30": {0, 30}}
    hours = {"2": {2}, "0": {0}, "1-6": set(range(1, 7)), "23": {23}, "0,1,2,3": {0, 1, 2, 3},
             "9": {9}, "*/2": set(range(0, 24, 2))}
    dow = frozenset({0} if dw == "0" else range(7))
    minute = (mi, frozenset(sets[mi]))
    hour = (hr, frozenset(hours[hr]))
    u = utc(when)
    for off in (-3601, -3600, -61, -60, -2, -1, -0.5, 0, 1):
        start = u + off
        until = u + 30 * 3600
        assert ours(expr, tz, start, until) == reference(frozenset({0}), minute, hour, dow, tz,
                                                         start, until), (expr, off)


# --- cronsim ------------------------------------------------------------------------------------

def cronsim_fires(expr: str, tz: str, after: float, until: int) -> list[int]:
    """cronsim's fires in (after, until]. It walks naive wall time for fixed-time jobs, so from
    inside a repeated hour it can answer an earlier instant, and a gap can yield the same
    instant for each skipped time: both are dropped, as the policy runs an instant once. For a
    wildcard job it can yield a wall time that does not exist (00:00 -04 on Santiago's gap day,
    really 01:00 -03): dropped too, as the policy (and cronie) skips missing wall times."""
    info = ZoneInfo(tz)
    it = CronSim(expr, datetime.fromtimestamp(int(after), info))
    out: list[int] = []
    for d in it:
        x = int(d.timestamp())
        if x > until:
            break
        real = datetime.fromtimestamp(x, info).replace(tzinfo=None)
        if x > after and (not out or x > out[-1]) and real == d.replace(tzinfo=None):
            out.append(x)
    return out


# cronsim walks a wildcard job's hours on aware datetimes and, after Lord Howe's half-hour fall
# back (02:00 +11 -> 01:30 +10:30), skips 02:00-02:29 +10:30, which happen once and match
# `* */2 * * *` (it answers 02:30): the reference model above covers that zone instead.
CRONSIM_TRANSITIONS = [t for t in TRANSITIONS if t[0] != "Australia/Lord_Howe"]


def test_cronsim_skips_the_half_hour_after_lord_howe_falls_back() -> None:
    start = utc("2026-04-04T15:00Z") - 1
    assert [datetime.fromtimestamp(x, ZoneInfo("Australia/Lord_Howe")).isoformat()
            for x in ours("* */2 * * *", "Australia/Lord_Howe", start, start + 1920)][:2] == [
        "2026-04-05T02:00:00+10:30", "2026-04-05T02:01:00+10:30"]
    assert cronsim_fires("* */2 * * *", "Australia/Lord_Howe", start, start + 7200)[0] == (
        utc("2026-04-04T16:00Z"))  # 02:30 +10:30


@pytest.mark.slow
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(minute=field(0, 59), hour=HOURS, dow=st.sampled_from(DOWS),
       which=st.sampled_from(CRONSIM_TRANSITIONS), offset=OFFSETS)
def test_property_agrees_with_cronsim(
    minute: Field, hour: Field, dow: Field, which: tuple[str, str], offset: float
) -> None:
    tz, when = which
    expr = f"{minute[0]} {hour[0]} * * {dow[0]}"
    # cronsim reads a one-value range with a step (`5-5/3`) as `5/3` (5 to the end, step 3)
    assume(not re.search(r"(?<!\d)(\d+)-\1/", expr))
    start = utc(when) + offset
    until = int(start) + 36 * 3600
    assert ours(expr, tz, start, until) == cronsim_fires(expr, tz, start, until), expr


def test_cronsim_and_we_agree_on_the_reported_cases() -> None:
    for expr, tz, after in [("30 2 * * *", "Europe/Berlin", "2026-03-29T01:59:59+01:00"),
                            ("0 0 * * *", "America/Santiago", "2026-09-05T23:59:59-04:00"),
                            ("* 1-6 * * *", "Europe/Berlin", "2026-10-25T00:59:59+02:00")]:
        start = datetime.fromisoformat(after).timestamp()
        until = int(start) + 86400
        theirs = cronsim_fires(expr, tz, start, until)
        assert theirs and ours(expr, tz, start, until) == theirs, expr
