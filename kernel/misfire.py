"""Misfire decisions: what to run for occurrences missed while the kernel was down (pure).

Occurrences in ``(last, now]`` late by at most ``grace`` seconds are *late*; older ones are
*missed*. One late occurrence alone simply runs. Otherwise the task's policy decides:

* ``coalesce`` (default): run once, for the most recent occurrence;
* ``catch_up``: run each, at most ``max_catch_up`` of them (the most recent);
* ``skip``: run none of the missed ones; only the most recent occurrence runs, and only if it
  is late by no more than ``grace``.

Every decision with missed occurrences returns a :class:`MisfireRecord` for the store and log.
Counting stops at ``scan_limit`` occurrences (a per-second task down for a week has 604,800); the
record then says ``missed >= scan_limit``, and only the most recent ones are kept in memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .config import Misfire
from .records import MisfireRecord
from .triggers import Schedule


@dataclass(frozen=True, slots=True)
class MisfirePlan:
    run: tuple[float, ...]          # scheduled instants to run now, oldest first
    record: MisfireRecord | None    # None when nothing was missed
    last_considered: float | None   # the newest occurrence <= now (becomes last_scheduled_at)


def plan_misfires(
    task_id: str,
    schedule: Schedule,
    last: float,
    now: float,
    *,
    policy: Misfire,
    grace: float,
    max_catch_up: int,
    scan_limit: int = 100_000,
    until: float | None = None,
) -> MisfirePlan:
    """Decide the occurrences in ``(last, until]`` (``until`` defaults to ``now``; a fleet
    deciding the occurrences a database failure kept from firing stops at the last of them:
    the ones after it were fired as usual), late or missed as seen from ``now``."""
    end = now if until is None else min(until, now)
    late: list[float] = []
    keep = max(1, max_catch_up)
    missed_tail: deque[float] = deque(maxlen=keep)
    first_missed: float | None = None
    missed = 0
    newest: float | None = None
    t = schedule.next_after(last)
    scanned = 0
    while t is not None and t <= end:
        newest = t
        if now - t <= grace:
            late.append(t)
        else:
            missed += 1
            if first_missed is None:
                first_missed = t
            missed_tail.append(t)
        scanned += 1
        if scanned >= scan_limit:
            # jump ahead: count no further, but keep the newest occurrences <= now exact
            nxt = schedule.next_after(max(t, now - grace))
            if nxt is not None and nxt <= end:
                late = []
                t = nxt
                while t is not None and t <= end:
                    newest = t
                    late.append(t)
                    t = schedule.next_after(t)
            break
        t = schedule.next_after(t)
    if len(late) <= 1 and missed == 0:
        return MisfirePlan(tuple(late), None, newest)
    due = [*missed_tail, *late]
    if policy is Misfire.COALESCE:
        chosen = due[-1:]
    elif policy is Misfire.CATCH_UP:
        chosen = due[-max(1, max_catch_up):] if max_catch_up > 0 else late[-1:]
    else:
        chosen = late[-1:]
    total = missed + len(late)
    first = first_missed if first_missed is not None else late[0]
    record = MisfireRecord(
        task_id=task_id, decided_at=now, policy=policy.value, missed=total - len(chosen),
        first_missed=first, last_missed=due[-1], ran=len(chosen))
    return MisfirePlan(tuple(chosen), record, newest)
