"""Deciding what to send: the rule engine and the rate limiter. Pure: no I/O, no clock.

``Engine.observe(event)`` is called for every kernel event and returns the alerts to send now.
Time comes from the events themselves (``event.at``), so the rate limiter needs no clock and is
tested by feeding it events.

Rate limiting is per task, in fixed windows: the first message for a task opens a window of
``window`` seconds in which at most ``max_messages`` go out; the others are counted. The first
event seen after the window has passed (for any task) sends one summary per task with a count
and opens the next window, so a task failing every second sends at most ``max_messages`` + 1
messages per window instead of thousands.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from kernel.events import Event, RunFailed, RunSucceeded, RunTimedOut
from kernel.records import RunRecord

from .settings import RateLimit, Rule


@dataclass(frozen=True, slots=True)
class Alert:
    """One message to send: what happened, where to, and the structured facts for webhooks."""

    kind: str                      # failure | consecutive_failures | recovery | success | summary
    task_id: str
    subject: str
    body: str
    channels: tuple[str, ...]
    at: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Window:
    start: float
    sent: int = 0
    suppressed: int = 0
    channels: set[str] = field(default_factory=set)


class RateLimiter:
    def __init__(self, max_messages: int, window: float) -> None:
        self.max_messages = max_messages
        self.window = window
        self._windows: dict[str, _Window] = {}
        self.suppressed_total = 0

    def admit(self, key: str, now: float, channels: tuple[str, ...] = ()) -> bool:
        """Whether a message for ``key`` may go out at ``now`` (call ``expired`` first, so
        that a passed window's count is reported before it is replaced)."""
        w = self._windows.get(key)
        if w is None or now >= w.start + self.window:
            w = self._windows[key] = _Window(start=now)
        if w.sent < self.max_messages:
            w.sent += 1
            return True
        w.suppressed += 1
        w.channels.update(channels)
        self.suppressed_total += 1
        return False

    def expired(self, now: float) -> list[tuple[str, int, float, tuple[str, ...]]]:
        """Windows that have passed with suppressed messages: ``(key, count, window start,
        channels)``. Each opens a new window, in which the summary counts as one message."""
        out = []
        for key, w in self._windows.items():
            if w.suppressed and now >= w.start + self.window:
                out.append((key, w.suppressed, w.start, tuple(sorted(w.channels))))
                self._windows[key] = _Window(start=now, sent=1)
        return out


@dataclass(slots=True)
class _TaskState:
    failures: int = 0


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


class Engine:
    def __init__(self, rules: list[Rule], limit: RateLimit, channels: list[str],
                 prefix: str = "") -> None:
        self.rules = rules
        self.limiter = RateLimiter(limit.max_messages, float(limit.window))
        self.all_channels = tuple(channels)
        self.prefix = prefix
        self._state: dict[str, _TaskState] = {}

    def _matching(self, task_id: str) -> list[Rule]:
        return [r for r in self.rules
                if any(fnmatch.fnmatchcase(task_id, pat) for pat in r.tasks)]

    def observe(self, event: Event) -> list[Alert]:
        out: list[Alert] = []
        for key, count, start, channels in self.limiter.expired(event.at):
            out.append(self._summary(key, count, start, event.at, channels))
        if isinstance(event, RunFailed | RunTimedOut):
            if event.will_retry:
                return out
            failed = True
        elif isinstance(event, RunSucceeded):
            failed = False
        else:
            return out
        run = event.run
        if run.task_id is None:
            return out  # ad-hoc submissions have no task to alert about
        rules = self._matching(run.task_id)
        if not rules:
            return out
        st = self._state.setdefault(run.task_id, _TaskState())
        previous = st.failures
        st.failures = st.failures + 1 if failed else 0
        kinds: dict[str, set[str]] = {}
        for rule in rules:
            chans = set(rule.channels or self.all_channels)
            wanted = []
            if failed and "failure" in rule.on:
                wanted.append("failure")
            if failed and "consecutive_failures" in rule.on and st.failures == rule.consecutive:
                wanted.append("consecutive_failures")
            if not failed and "recovery" in rule.on and previous > 0:
                wanted.append("recovery")
            if not failed and "success" in rule.on:
                wanted.append("success")
            for kind in wanted:
                kinds.setdefault(kind, set()).update(chans)
        for kind in ("consecutive_failures", "failure", "recovery", "success"):
            if kind not in kinds:
                continue
            channels = tuple(sorted(kinds[kind]))
            if self.limiter.admit(run.task_id, event.at, channels):
                out.append(self._alert(kind, run, event.at, channels, st.failures, previous))
        return out

    def _alert(self, kind: str, run: RunRecord, at: float, channels: tuple[str, ...],
               streak: int, previous: int) -> Alert:
        task = run.task_id or ""
        what = {
            "failure": f"task {task} failed" + (f" ({run.error_code})" if run.error_code else ""),
            "consecutive_failures": f"task {task} failed {streak} times in a row",
            "recovery": f"task {task} recovered after {previous} failure(s)",
            "success": f"task {task} succeeded",
        }[kind]
        lines = [
            what[0].upper() + what[1:] + ".", "",
            f"task:       {task}",
            f"action:     {run.action}",
            f"outcome:    {run.outcome.value}",
            f"error code: {run.error_code or '-'}",
            f"attempt:    {run.attempt}",
            f"scheduled:  {_iso(run.scheduled_at) if run.scheduled_at else '-'}",
            f"finished:   {_iso(run.finished_at)}",
            f"trace id:   {run.trace_id}",
            f"job id:     {run.job_id}",
        ]
        if run.detail:
            lines += ["", "detail:", run.detail]
        if run.error_code:
            lines += ["", f"Explain the code with: python -m kernel explain {run.error_code}"]
        data = {"kind": kind, "task_id": task, "action": run.action,
                "outcome": run.outcome.value, "error_code": run.error_code,
                "attempt": run.attempt, "trace_id": run.trace_id, "job_id": run.job_id,
                "scheduled_at": run.scheduled_at, "finished_at": run.finished_at,
                "consecutive_failures": streak, "detail": run.detail}
        return Alert(kind, task, self.prefix + what, "\n".join(lines), channels, at, data)

    def _summary(self, task: str, count: int, start: float, now: float,
                 channels: tuple[str, ...]) -> Alert:
        lim = self.limiter
        subject = f"{self.prefix}{count} alert(s) for task {task} were suppressed"
        body = (f"{count} alert(s) for task {task} were not sent between {_iso(start)} and "
                f"{_iso(now)}: the rate limit allows {lim.max_messages} per "
                f"{lim.window:g} s per task ([plugins.alerts.rate_limit]); the runs are in "
                "the kernel's run history.")
        return Alert("summary", task, subject, body, channels or self.all_channels, now,
                     {"kind": "summary", "task_id": task, "suppressed": count,
                      "window_start": start, "window_end": now})
