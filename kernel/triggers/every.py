"""``@every DURATION``: fires at whole multiples of the interval since the Unix epoch.

Anchoring on the epoch (not on the moment the schedule was armed) makes the fire instants the
same across restarts and across kernels: ``@every 5m`` fires at :00, :05, :10 ... of every hour
in UTC, ``@every 1d`` at 00:00 UTC (not local midnight: use ``@daily`` for that), and
``@every 7m`` at instants divisible by 420 s. The time zone plays no part in the instants.
"""

from __future__ import annotations

import math
import re

from kernel.triggers._zone import MAX_INSTANT, MIN_INSTANT

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
VALID = "a duration such as 90s, 5m, 1h30m, 2h, 1d (units d, h, m, s in that order)"


def parse_duration(text: str) -> int | None:
    """Seconds in ``1h30m``-style text, or None if it is not one or is zero."""
    m = _DURATION.fullmatch(text.lower())
    if m is None or not any(m.groups()):
        return None
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    total = ((d * 24 + h) * 60 + mi) * 60 + s
    return total or None


class EverySchedule:
    """Fires at every instant ``k * period`` (``k`` an integer), in UTC seconds."""

    __slots__ = ("expr", "period", "tz")

    def __init__(self, expr: str, tz: str, period: int) -> None:
        self.expr = expr
        self.tz = tz
        self.period = period

    def __repr__(self) -> str:
        return f"EverySchedule({self.expr!r}, tz={self.tz!r}, period={self.period})"

    def next_after(self, instant: float) -> float | None:
        s = math.floor(instant)
        if not MIN_INSTANT <= s <= MAX_INSTANT:
            if s > MAX_INSTANT:
                return None
            raise ValueError(f"instant {instant!r} is before 1900")
        nxt = (s // self.period + 1) * self.period
        return float(nxt) if nxt <= MAX_INSTANT else None
