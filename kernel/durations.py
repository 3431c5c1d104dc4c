"""Durations written the way people write them: ``30``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``."""

from __future__ import annotations

import math
import re

_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: float | int | str) -> float:
    """Seconds as a float; raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds or a duration like '30s', '5m', '1h30m'")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError("a duration must be a finite number of seconds, 0 or more")
        return float(value)
    text = value.strip().lower().replace(" ", "")
    try:
        return parse_duration(float(text))
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(
            f"{value!r} is not a duration (valid: seconds as a number, or e.g. '500ms', '30s', "
            "'5m', '1h30m', '2d')"
        )
    return total
