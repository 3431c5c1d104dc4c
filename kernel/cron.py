"""Cron schedules for the kernel: the public face of :mod:`kernel.triggers`.

``from kernel.cron import parse_schedule, preview, ScheduleCache, Schedule`` is the API the rest
of the kernel uses. Pure code: no clock reads, no asyncio; instants are UTC seconds since the
Unix epoch, zones are IANA names. The dialect is documented in :mod:`kernel.triggers`, the DST
policy in full in :mod:`kernel.triggers.cron`; in short:

* A *fixed-time* job (neither minute nor hour written with a leading ``*``: ``30 2 * * *``)
  whose wall time occurs twice on a fall-back day runs once, at the first occurrence; one whose
  wall time falls in a spring-forward gap runs once, at the end of the gap (``30 2 * * *`` in
  Berlin on 2026-03-29: 03:00 CEST).
* A *wildcard* job (minute or hour starting with ``*``: ``*/15 * * * *``, ``0 * * * *``,
  ``* 1-6 * * *``; cronie's rule) follows real elapsed time: it runs in both passes of a
  repeated hour (``30 * * * *``: 02:30 CEST and 02:30 CET) and simply skips wall times that do
  not exist.
* ``@every`` fires at multiples of its interval since the Unix epoch and ignores zones.
"""

from kernel.triggers import (
    CronSchedule,
    EverySchedule,
    Schedule,
    ScheduleCache,
    parse_schedule,
    preview,
)

__all__ = [
    "CronSchedule",
    "EverySchedule",
    "Schedule",
    "ScheduleCache",
    "parse_schedule",
    "preview",
]
