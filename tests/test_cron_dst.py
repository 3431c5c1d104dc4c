"""The DST policy across the 2026 transitions of four zones.

Transitions used (local wall times):

* Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET.
* America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
* Australia/Lord_Howe (half-hour DST): 2026-04-05 02:00 +11 -> 01:30 +10:30;
  2026-10-04 02:00 +10:30 -> 02:30 +11.
* Australia/Sydney (southern hemisphere): 2026-04-05 03:00 AEDT -> 02:00 AEST;
  2026-10-04 02:00 AEST -> 03:00 AEDT.

Besides worked examples, every schedule is compared with a brute-force reference model that
states the policy directly, minute by minute in UTC.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.cron import CronSchedule, parse_schedule
from kernel.triggers._fields import DOW, HOUR, MINUTE, parse_field
from kernel.triggers._zone import Zone

ZONES = ("Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Australia/Sydney")
# (zone, UTC instant of the change) for both 2026 transitions of each zone
TRANSITIONS = [
    ("Europe/Berlin", "2026-03-29T01:00Z"), ("Europe/Berlin", "2026-10-25T01:00Z"),
    ("America/New_York", "2026-03-08T07:00Z"), ("America/New_York", "2026-11-01T06:00Z"),
    ("Australia/Lord_Howe", "2026-04-04T15:00Z"), ("Australia/Lord_Howe", "2026-10-03T15:30Z"),
    ("Australia/Sydney", "2026-04-04T16:00Z"), ("Australia/Sydney", "2026-10-03T16:00Z"),
]


def at(tz: str, text: str) -> float:
    """Instant of a local wall time (first occurrence when ambiguous)."""
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def run(expr: str, tz: str, start: float, n: int) -> list[str]:
    sched = parse_schedule(expr, tz)
    info = ZoneInfo(tz)
    out = []
    t: float | None = start
    for _ in range(n):
        assert t is not None
        t = sched.next_after(t)
        assert t is not None
        out.append(datetime.fromtimestamp(t, info).isoformat())
    return out


def test_transitions_are_where_this_file_says() -> None:
    for tz, when in TRANSITIONS:
        info = ZoneInfo(tz)
        u = utc(when)
        before = datetime.fromtimestamp(u - 1, info).utcoffset()
        after = datetime.fromtimestamp(u, info).utcoffset()
        assert before != after, (tz, when)


def test_croniter_runs_a_fixed_time_job_twice_on_berlin_fall_back_and_we_run_it_once() -> None:
    info = ZoneInfo("Europe/Berlin")
    it = croniter("30 2 * * *", datetime(2026, 10, 24, 12, tzinfo=info))
    theirs = [it.get_next(datetime).isoformat() for _ in range(3)]
    assert theirs == ["2026-10-25T02:30:00+02:00", "2026-10-25T02:30:00+01:00",
                      "2026-10-26T02:30:00+01:00"]
    assert run("30 2 * * *", "Europe/Berlin", at("Europe/Berlin", "2026-10-24T12:00"), 2) == [
        "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]


@pytest.mark.parametrize(
    ("expr", "tz", "start", "expected"),
    [
        # fixed-time, fall back: once, at the first occurrence
        ("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00",
         ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]),
        ("30 1 * * *", "America/New_York", "2026-10-31T12:00",
         ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]),
        ("45 1 * * *", "Australia/Lord_Howe", "2026-04-04T12:00",
         ["2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"]),
        ("30 2 * * *", "Australia/Sydney", "2026-04-04T12:00",
         ["2026-04-05T02:30:00+11:00", "2026-04-06T02:30:00+10:00"]),
        ("0,20,40 2 * * *", "Europe/Berlin", "2026-10-25T00:00",
         ["2026-10-25T02:00:00+02:00", "2026-10-25T02:20:00+02:00", "2026-10-25T02:40:00+02:00",
          "2026-10-26T02:00:00+01:00"]),
        # fixed-time, spring forward: once, at the end of the gap
        ("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00",
         ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
        ("30 2 * * *", "America/New_York", "2026-03-07T12:00",
         ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]),
        ("15 2 * * *", "Australia/Lord_Howe", "2026-10-03T12:00",
         ["2026-10-04T02:30:00+11:00", "2026-10-05T02:15:00+11:00"]),
        ("30 2 * * *", "Australia/Sydney", "2026-10-03T12:00",
         ["2026-10-04T03:00:00+11:00", "2026-10-05T02:30:00+11:00"]),
        ("0,30 2 * * *", "America/New_York", "2026-03-07T12:00",
         ["2026-03-08T03:00:00-04:00", "2026-03-09T02:00:00-04:00", "2026-03-09T02:30:00-04:00"]),
        ("0 2,3 * * *", "Europe/Berlin", "2026-03-28T12:00",
         ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00", "2026-03-30T03:00:00+02:00"]),
        # wildcard (minute or hour written with *), fall back: every wall occurrence, both passes
        ("30 * * * *", "Europe/Berlin", "2026-10-25T01:00",
         ["2026-10-25T01:30:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-25T02:30:00+01:00",
          "2026-10-25T03:30:00+01:00"]),
        ("0 * * * *", "America/New_York", "2026-11-01T00:30",
         ["2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"]),
        ("*/20 * * * *", "Australia/Lord_Howe", "2026-04-05T01:10",
         ["2026-04-05T01:20:00+11:00", "2026-04-05T01:40:00+11:00", "2026-04-05T01:40:00+10:30",
          "2026-04-05T02:00:00+10:30"]),
        ("30 * * * *", "Australia/Sydney", "2026-04-05T01:00",
         ["2026-04-05T01:30:00+11:00", "2026-04-05T02:30:00+11:00", "2026-04-05T02:30:00+10:00",
          "2026-04-05T03:30:00+10:00"]),
        # wildcard, spring forward: the missing wall times are skipped, nothing extra
        ("30 * * * *", "Europe/Berlin", "2026-03-29T01:00",
         ["2026-03-29T01:30:00+01:00", "2026-03-29T03:30:00+02:00"]),
        ("*/15 * * * *", "Europe/Berlin", "2026-03-29T01:30",
         ["2026-03-29T01:45:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T03:15:00+02:00"]),
        ("*/15 * * * *", "Australia/Lord_Howe", "2026-10-04T01:30",
         ["2026-10-04T01:45:00+10:30", "2026-10-04T02:30:00+11:00", "2026-10-04T02:45:00+11:00"]),
        ("0 */2 * * *", "America/New_York", "2026-03-08T00:30",
         ["2026-03-08T04:00:00-04:00"]),
        # seconds-first 6-field and @every cross the seams like any other
        ("0 30 2 * * ?", "Europe/Berlin", "2026-03-28T12:00", ["2026-03-29T03:00:00+02:00"]),
        ("@every 1h", "Europe/Berlin", "2026-10-25T01:30",
         ["2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00", "2026-10-25T03:00:00+01:00"]),
    ],
)
def test_policy_examples(expr: str, tz: str, start: str, expected: list[str]) -> None:
    assert run(expr, tz, at(tz, start), len(expected)) == expected


def test_wildcard_fall_back_from_inside_the_first_pass() -> None:
    # 02:50 CEST lies in the first pass of the repeated hour: the next quarter is 00:00 UTC +
    # 1 h = 02:00 CET, i.e. real elapsed time, not 03:00 CET.
    start = at("Europe/Berlin", "2026-10-25T02:50")
    assert run("*/15 * * * *", "Europe/Berlin", start, 2) == [
        "2026-10-25T02:00:00+01:00", "2026-10-25T02:15:00+01:00"]
    # and a fixed-time job asked from inside the second pass does not run again
    second_pass = at("Europe/Berlin", "2026-10-25T02:10") + 3600
    assert run("30 2 * * *", "Europe/Berlin", second_pass, 1) == ["2026-10-26T02:30:00+01:00"]


# --- invariants over the whole year -------------------------------------------------------------

@pytest.mark.parametrize("tz", ZONES)
@pytest.mark.parametrize("expr", ["30 2 * * *", "0 2 * * *", "30 1 * * *", "45 1 * * *",
                                  "15 2 * * *", "0 3 * * *", "0 0 * * *"])
def test_fixed_time_daily_job_runs_exactly_once_every_local_day(expr: str, tz: str) -> None:
    sched = parse_schedule(expr, tz)
    info = ZoneInfo(tz)
    t: float | None = at(tz, "2025-12-31T12:00")
    days = []
    while True:
        assert t is not None
        t = sched.next_after(t)
        assert t is not None
        d = datetime.fromtimestamp(t, info).date()
        if d.year > 2026:
            break
        days.append(d)
    first = days[0]
    assert days == [first + timedelta(n) for n in range(365)]


@pytest.mark.parametrize("tz", ZONES)
def test_quarter_hours_follow_real_elapsed_time_across_transitions(tz: str) -> None:
    sched = parse_schedule("*/15 * * * *", tz)
    for zone, when in TRANSITIONS:
        if zone != tz:
            continue
        t: float | None = utc(when) - 2 * 86400
        for _ in range(4 * 24 * 4):
            assert t is not None
            nxt = sched.next_after(t)
            assert nxt is not None and nxt - t == 900
            t = nxt


# --- a reference model of the policy, minute by minute -----------------------------------------

def reference(expr: str, tz: str, after: float, until: int) -> list[int]:
    """Fires in (after, until] for 5-field expressions with ``*`` day-of-month and month.

    wildcard: every UTC minute whose wall time matches. fixed-time: a matching wall time
    only on its first occurrence (fold 0), plus the instant a gap ends when any skipped wall
    time matches.
    """
    mi, hr, dom, mon, dow = expr.split()
    assert dom == mon == "*"
    mmask = parse_field(MINUTE, mi).mask
    hmask = parse_field(HOUR, hr).mask
    dmask = parse_field(DOW, dow).mask
    fixed = not (mi.startswith("*") or hr.startswith("*"))  # cronie's MIN_STAR / HR_STAR
    info = ZoneInfo(tz)

    def matches(d: datetime) -> bool:
        return bool((mmask >> d.minute) & (hmask >> d.hour) & (dmask >> (d.isoweekday() % 7)) & 1)

    out = []
    u = int(after) // 60 * 60 + 60
    while u <= until:
        d = datetime.fromtimestamp(u, info)
        fire = matches(d) and (d.fold == 0 or not fixed)
        if fixed and not fire:
            before = datetime.fromtimestamp(u - 1, info).utcoffset()
            now = d.utcoffset()
            assert before is not None and now is not None
            if now > before:  # u ends a gap: were any of the skipped wall minutes due?
                wall = datetime.fromtimestamp(u - 1, info).replace(tzinfo=None, fold=0)
                wall += timedelta(seconds=1)
                while wall < d.replace(tzinfo=None):
                    fire = fire or matches(wall)
                    wall += timedelta(minutes=1)
        if fire:
            out.append(u)
        u += 60
    return out


def ours(expr: str, tz: str, after: float, until: int) -> list[int]:
    sched = parse_schedule(expr, tz)
    out = []
    t = sched.next_after(after)
    while t is not None and t <= until:
        assert t == int(t)
        out.append(int(t))
        t = sched.next_after(t)
    return out


EXPRS = ["30 2 * * *", "0 2,3 * * *", "*/15 * * * *", "30 * * * *", "0 * * * *",
         "*/7 1-3 * * *", "45 1 * * *", "15 2 * * *", "0,30 2 * * *", "* 2 * * *", "0 0 * * *",
         "*/20 */2 * * *", "30 2 * * SUN", "30 2 * * 1-6", "10 0-4 * * 0"]


@pytest.mark.parametrize(("tz", "when"), TRANSITIONS)
def test_matches_reference_model_around_each_transition(tz: str, when: str) -> None:
    u = utc(when)
    for expr in EXPRS:
        assert ours(expr, tz, u - 86400, u + 86400) == reference(expr, tz, u - 86400, u + 86400), (
            expr)


def _hour_or_minute(hi: int) -> st.SearchStrategy[str]:
    value = st.integers(0, hi).map(str)
    return st.one_of(
        st.just("*"),
        st.lists(value, min_size=1, max_size=3).map(",".join),
        st.integers(1, 20).map(lambda n: f"*/{n}"),
        st.tuples(st.integers(0, hi - 1), st.integers(1, 5)).map(
            lambda t: f"{t[0]}-{min(hi, t[0] + t[1])}"),
    )


@pytest.mark.slow
@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    minute=_hour_or_minute(59),
    hour=_hour_or_minute(23),
    dow=st.sampled_from(["*", "0", "1-6", "SAT,SUN"]),
    which=st.sampled_from(TRANSITIONS),
    offset=st.integers(-4 * 3600, 3 * 3600),
    frac=st.sampled_from([0.0, 0.5]),
)
def test_property_matches_reference_near_transitions(
    minute: str, hour: str, dow: str, which: tuple[str, str], offset: int, frac: float
) -> None:
    tz, when = which
    expr = f"{minute} {hour} * * {dow}"
    start = utc(when) + offset + frac
    until = int(start) + 2 * 86400  # both lists are cut at the same instant
    assert ours(expr, tz, start, until) == reference(expr, tz, start, until), expr


# --- the probed transition table ----------------------------------------------------------------

_ZONES: dict[str, Zone] = {}


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    tz=st.sampled_from(["Europe/Berlin", "Australia/Lord_Howe", "Pacific/Apia", "Africa/Casablanca",
                        "America/Caracas", "Asia/Kathmandu", "UTC"]),
    s=st.integers(utc("1970-01-01T00:00Z"), utc("2040-01-01T00:00Z")),
)
def test_zone_segments_agree_with_zoneinfo(tz: str, s: int) -> None:
    zone = _ZONES.get(tz) or _ZONES.setdefault(tz, Zone(tz, ZoneInfo(tz)))
    start, end, off, prev = zone.segment(s)
    info = ZoneInfo(tz)

    def offset(u: int) -> int:
        d = datetime.fromtimestamp(u, info).utcoffset()
        assert d is not None
        return int(d.total_seconds())

    assert start <= s < end
    assert offset(s) == offset(start) == offset(end - 1) == off
    assert offset(start - 1) == prev or prev == off
    assert zone.offset_at(s) == off


# --- asked for in the last second before a transition (issue 11, item 8a) -----------------------

@pytest.mark.parametrize(
    ("expr", "tz", "after", "expected"),
    [
        # the gap run at the end of the gap is found from the last second before the gap
        ("30 2 * * *", "Europe/Berlin", "2026-03-29T01:59:59+01:00",
         ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
        ("30 2 * * *", "Europe/Berlin", "2026-03-29T01:59:59.5+01:00",
         ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
        ("0 0 * * *", "America/Santiago", "2026-09-05T23:59:59-04:00",
         ["2026-09-06T01:00:00-03:00", "2026-09-07T00:00:00-03:00"]),
        ("30 2 * * *", "America/New_York", "2026-03-08T01:59:59-05:00",
         ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]),
        ("15 2 * * *", "Australia/Lord_Howe", "2026-10-04T01:59:59+10:30",
         ["2026-10-04T02:30:00+11:00", "2026-10-05T02:15:00+11:00"]),
        ("0 2 * * 0", "Europe/Berlin", "2026-03-29T01:59:59+01:00",  # 2026-03-29 is a Sunday
         ["2026-03-29T03:00:00+02:00", "2026-04-05T02:00:00+02:00"]),
        ("0 2 * * 1", "Europe/Berlin", "2026-03-29T01:59:59+01:00",  # not on a Monday
         ["2026-03-30T02:00:00+02:00"]),
        ("0 30 2 * * *", "Europe/Berlin", "2026-03-29T01:59:59+01:00",
         ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
        ("15 30 2 * * *", "Europe/Berlin", "2026-03-29T01:59:59+01:00",
         ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:15+02:00"]),
        ("0 30 2 29 3 ? 2026", "Europe/Berlin", "2026-03-29T01:59:59+01:00",
         ["2026-03-29T03:00:00+02:00"]),
        # wildcard jobs (minute or hour written with *) skip the missing wall times
        ("*/15 2 * * *", "Europe/Berlin", "2026-03-29T01:59:59+01:00",
         ["2026-03-30T02:00:00+02:00", "2026-03-30T02:15:00+02:00"]),
        ("*/15 * * * *", "Europe/Berlin", "2026-03-29T01:59:59+01:00",
         ["2026-03-29T03:00:00+02:00", "2026-03-29T03:15:00+02:00"]),
        # historic Tehran: the gap is midnight to 01:00
        ("0 0 * * *", "Asia/Tehran", "2021-03-21T23:59:59+03:30",
         ["2021-03-22T01:00:00+04:30", "2021-03-23T00:00:00+04:30"]),
        ("30 23 * * *", "Asia/Tehran", "2021-09-21T12:00:00+04:30",
         ["2021-09-21T23:30:00+04:30", "2021-09-22T23:30:00+03:30"]),
        # Samoa skipped 2011-12-30 entirely: that day's run happens once, as the gap ends
        ("0 9 * * *", "Pacific/Apia", "2011-12-29T23:59:59-10:00",
         ["2011-12-31T00:00:00+14:00", "2011-12-31T09:00:00+14:00"]),
        ("0 9 * * *", "Pacific/Apia", "2011-12-29T12:00:00-10:00",
         ["2011-12-31T00:00:00+14:00", "2011-12-31T09:00:00+14:00"]),
        ("0 0 * * *", "Pacific/Apia", "2011-12-29T23:59:59-10:00",
         ["2011-12-31T00:00:00+14:00", "2012-01-01T00:00:00+14:00"]),
    ],
)
def test_next_after_from_the_last_second_before_a_transition(
    expr: str, tz: str, after: str, expected: list[str]
) -> None:
    start = datetime.fromisoformat(after).timestamp()
    assert run(expr, tz, start, len(expected)) == expected


def test_every_second_before_a_gap_finds_the_gap_run() -> None:
    # from each of the last 120 seconds before Berlin's 2026 gap (and the first after it)
    gap_end = utc("2026-03-29T01:00Z")
    for expr in ("30 2 * * *", "0 2 * * *", "59 2 * * *", "0 2,3 * * *", "0 30 2 * * *"):
        shared = parse_schedule(expr, "Europe/Berlin")  # its next_after memo answers most
        for t in range(gap_end - 120, gap_end):
            for u in (t, t + 0.5):
                fresh = parse_schedule(expr, "Europe/Berlin")  # a new object: no memo
                assert fresh.next_after(u) == gap_end, (expr, u - gap_end)
                assert shared.next_after(u) == gap_end, (expr, u - gap_end)
        assert shared.next_after(gap_end) != gap_end


# --- which jobs are wildcard: cronie's rule (issue 11, item 8c) ---------------------------------

@pytest.mark.parametrize(
    ("expr", "fixed"),
    [("30 2 * * *", True), ("0 9-17 * * *", True), ("0,30 1,2 * * *", True), ("@daily", True),
     ("0 30 2 * * *", True), ("* 30 2 * * *", True),  # seconds do not count (cronie has none)
     ("* 1-6 * * *", False), ("*/15 2 * * *", False), ("0 * * * *", False), ("@hourly", False),
     ("*/20 */2 * * *", False), ("0 */15 2 * * *", False)],
)
def test_a_job_is_wildcard_when_its_minute_or_hour_starts_with_a_star(
    expr: str, fixed: bool
) -> None:
    sched = parse_schedule(expr, "Europe/Berlin")
    assert isinstance(sched, CronSchedule)
    assert sched.fixed_time is fixed


def test_wildcard_minute_runs_in_both_fall_back_passes_as_cronie_does() -> None:
    # `* 1-6 * * *`: every minute of 01:00-06:59, and 02:xx happens twice on 2026-10-25
    got = ours("* 1-6 * * *", "Europe/Berlin", utc("2026-10-24T22:00Z"), utc("2026-10-25T06:00Z"))
    assert len(got) == 6 * 60 + 60  # 360 wall minutes, and the repeated hour's 60 again
    assert got == list(range(utc("2026-10-24T23:00Z"), utc("2026-10-25T06:00Z"), 60))
    # `*/20 2 * * *`: both passes of 02:00-02:59
    assert run("*/20 2 * * *", "Europe/Berlin", at("Europe/Berlin", "2026-10-25T00:00"), 7) == [
        "2026-10-25T02:00:00+02:00", "2026-10-25T02:20:00+02:00", "2026-10-25T02:40:00+02:00",
        "2026-10-25T02:00:00+01:00", "2026-10-25T02:20:00+01:00", "2026-10-25T02:40:00+01:00",
        "2026-10-26T02:00:00+01:00"]
    # and in a spring gap a wildcard job simply has no 02:xx that day (cronie, cronsim)
    assert run("* 2 * * *", "Europe/Berlin", at("Europe/Berlin", "2026-03-29T01:58"), 2) == [
        "2026-03-30T02:00:00+02:00", "2026-03-30T02:01:00+02:00"]
