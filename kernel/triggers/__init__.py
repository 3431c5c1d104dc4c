"""Schedule triggers: cron expressions, macros and ``@every``, in IANA time zones.

Pure code: no clock reads, no asyncio. Instants in and out are UTC seconds since the Unix epoch
(floats holding whole seconds); zones are IANA names resolved with :mod:`zoneinfo`.

Layering (each module imports only those above it)::

    base       the Schedule contract
    _fields    one field's text -> bitmask; DayRule built from the four day fields
    _zone      a zone as constant-offset segments (transitions found by probing zoneinfo)
    cron       CronSchedule: field walking in wall time + the DST policy (read it there)
    every      EverySchedule: multiples of an interval since the epoch
    _parse     Compiler (memoised parsing), parse_schedule, ScheduleCache, preview

Dialect
-------
* 5 fields ``minute hour day-of-month month day-of-week`` (Unix); 6 fields put **seconds
  first** (``0 0 1 * * ?`` = 01:00:00 daily, Quartz/Spring); 7 fields add a year last
  (1970-2099, Quartz). Fields are separated by any whitespace.
* Each field is a comma list of ``*``, ``v``, ``a-b``, ``*/n``, ``a-b/n``, ``a/n`` (= a to the
  field's end, step n). In the cyclic fields (second, minute, hour, day-of-month, month,
  day-of-week) ``a-b`` with ``a > b`` wraps round the field's end (``FRI-MON``, ``22-2``,
  ``50-10/10`` = 50, 0, 10), as Quartz does; cronie refuses these, but they are unambiguous on a
  cycle. Years are not a cycle: a reversed year range (``2009-2008``) is refused, as APScheduler
  and Quartz do. ``a-a`` is just ``a``. A step must be 1 to the field's size.
* Names JAN-DEC and SUN-SAT, any case, also in ranges. Day-of-week uses **Unix numbering
  everywhere: 0-7 with 0 and 7 both Sunday**, 1 = Monday ... 6 = Saturday, also in 6- and
  7-field (Quartz-style) expressions, where Quartz itself would read 1 as Sunday: so ``2#1`` is
  the first *Tuesday*. Names avoid the question.
* Day-of-month: ``L`` (last day), ``L-n`` (n days before the last, n 0-30), ``LW`` (last
  weekday), ``nW`` (the weekday nearest day n, never crossing into another month; in a month
  shorter than n, the weekday nearest its last day, as croniter does). Day-of-week: ``nL`` /
  ``FRIL`` / croniter's ``L5`` (last Friday), ``n#k`` / ``MON#2`` (k-th, 1-5). These may
  stand in lists (``1,15,L``). ``L`` alone in day-of-week is refused as ambiguous.
* ``?`` (day-of-month or day-of-week only) means "no specific value", exactly like ``*``.
* When day-of-month and day-of-week are both restricted a day matches if **either** matches
  (Vixie cron, croniter's default); a field written ``*`` or ``?`` leaves the other alone to
  decide. (croniter additionally reads a day field whose list covers its whole range as ``*``
  when the other field contains a ``*``; this evaluator does not: ``1-31`` is a restriction.)
* Macros ``@yearly`` ``@annually`` ``@monthly`` ``@weekly`` ``@daily`` ``@midnight``
  ``@hourly``; ``@every 90s`` / ``5m`` / ``1h30m`` / ``2h`` / ``1d`` (units d h m s, in that
  order), firing at multiples of the interval since the Unix epoch so restarts do not shift it.
* Refused at parse time, with a :class:`~kernel.errors.CronError` naming the field, the value
  and the valid range: wrong field count, out-of-range values, unknown names, zero or oversized
  steps, ``?`` outside the day fields, reversed year ranges, unknown zones (field ``tz``), and
  calendars that can never fire (``0 0 30 2 *``, ``0 0 31 4 *``, a 7-field expression whose
  years hold no matching date). A year field entirely in the past parses, and its ``next_after`` is None.
* Not supported: ``H``/``R`` hashed values, ``@reboot``, seconds-last 6-field croniter style.
"""

from kernel.triggers._parse import Compiler, ScheduleCache, parse_schedule, preview
from kernel.triggers.base import Schedule
from kernel.triggers.cron import CronSchedule
from kernel.triggers.every import EverySchedule

__all__ = [
    "Compiler",
    "CronSchedule",
    "EverySchedule",
    "Schedule",
    "ScheduleCache",
    "parse_schedule",
    "preview",
]
