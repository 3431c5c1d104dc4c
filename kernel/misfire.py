"""Misfire decisions: what to run for occurrences missed while the kernel was down (pure).

Occurrences in ``(last, now]`` late by at most ``grace`` seconds are simply late: they run.
Older ones are *missed*, and the task's policy decides:

* ``coalesce`` (default): run once, for the most recent missed occurrence;
* ``catch_up``: run each missed occurrence, at most ``max_catch_up`` of them (the most recent);
* ``skip``: run none.

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
) -> MisfirePlan:
    late: list[float] = []
    keep = max(1, max_catch_up)
    missed_tail: deque[float] = deque(maxlen=keep)
    first_missed: float | None = None
    missed = 0
    newest: float | None = None
    t = schedule.next_after(last)
    scanned = 0
    while t is not None and t <= now:
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
            if nxt is not None and nxt <= now:
                late = []
                t = nxt
                while t is not None and t <= now:
                    newest = t
                    late.append(t)
                    t = schedule.next_after(t)
            break
        t = schedule.next_after(t)
    if missed == 0 or first_missed is None:
        return MisfirePlan(tuple(late), None, newest)
    if policy is Misfire.COALESCE:
        chosen: list[float] = [missed_tail[-1]] if not late else []
    elif policy is Misfire.CATCH_UP:
        chosen = list(missed_tail)[-max_catch_up:] if max_catch_up > 0 else []
    else:
        chosen = []
    record = MisfireRecord(
        task_id=task_id, decided_at=now, policy=policy.value, missed=missed,
        first_missed=first_missed, last_missed=missed_tail[-1], ran=len(chosen))
    return MisfirePlan(tuple(chosen + late), record, newest)
