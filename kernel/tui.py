"""The live terminal UI: a pure ``render`` of a snapshot, and two loops that feed it.

* ``TuiView`` mirrors the JSON of ``GET /snapshot`` (``{"snapshot": ..., "recent_runs": [...],
  "api_version": 1}``, plus an optional ``reloads`` list); ``decode_view`` reads it,
  ``view_from_snapshot`` builds one from an in-process ``Kernel.snapshot()``.
* ``TuiState`` is what the loop keeps between frames: the latest view, a short rolling history of
  counter samples (for throughput and failure rate), the connection status and recent reloads.
  ``observe``/``observe_error``/``observe_reload`` return a new state; nothing here mutates.
* ``render(view, width, height, state=...)`` is pure: same inputs, same picture. It never reads
  the clock ("now" is the snapshot's ``at``) and fits the size it is given: 80x24 gets fewer
  columns and truncated rows, 160x48 gets every column.
* Running jobs show what their action reported with ``ctx.progress``: a rich progress bar and
  "45% 9/20" when the total is known, a pulse that moves with the snapshot's instant and a count
  when it is not, and the note; elapsed/timeout stays in its own column. The last loop stall
  (``LoopStalled``: when, how long, the runs in flight) is on the status line for 15 minutes.
* ``run_attached`` polls a kernel's HTTP API; ``run_inprocess`` watches a kernel in the same
  process (``python -m kernel run --tui``); ``add_tui_command`` adds ``python -m kernel tui``.

Cost (the in-process TUI shares the kernel's one core): both loops draw on a fixed cadence
(``refresh`` seconds) from a snapshot, never per event or per log line. ``frame_view`` converts
only the rows a frame can show (the rest is one pass of attribute reads to pick and count them).
While ``run_inprocess`` draws, log records and stray prints to a terminal go to a ``LogPane``
(the newest lines, formatted only when drawn) and, when given, a log file, never over the
picture; the terminal's log handlers and ``sys.stdout``/``sys.stderr`` come back afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import heapq
import itertools
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TextIO, TypeVar, cast

import aiohttp
import msgspec
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import logs
from .client import default_token
from .clock import Clock, SystemClock
from .errors import KernelError
from .events import ConfigReloaded, Event, EventBus, LoopStalled
from .records import RunQuery, RunRecord

__all__ = [
    "DEFAULT_URL",
    "GpuRow",
    "LogPane",
    "ReloadRow",
    "RunRow",
    "RunningRow",
    "SnapshotView",
    "StallRow",
    "TaskRow",
    "TuiState",
    "TuiView",
    "add_tui_command",
    "decode_view",
    "frame_view",
    "main",
    "observe",
    "observe_error",
    "observe_reload",
    "observe_stall",
    "rates",
    "render",
    "render_state",
    "run_attached",
    "run_inprocess",
    "stall_row",
    "view_from_snapshot",
    "with_logs",
]

log = logging.getLogger("kernel.tui")
_T = TypeVar("_T")

DEFAULT_URL = "http://127.0.0.1:8765"
HISTORY_SECONDS = 15 * 60.0
HISTORY_MAX = 1000
RECENT_RELOADS = 5
WIDE = 120  # at least this many columns: every column, blank lines between sections
LOG_CAPACITY = 200  # log lines the in-process pane keeps (it shows the newest that fit)
SPARK = "▁▂▃▄▅▆▇█"
STALL_SHOWN = 15 * 60.0  # seconds a loop stall stays on the status line
BAR_WIDE, BAR_COMPACT = 16, 8  # cells of a running job's progress bar

_OUTCOME_STYLE = {"succeeded": "green", "failed": "bold red", "timed_out": "yellow",
                  "cancelled": "dim", "skipped": "dim"}
_OUTCOME_SHORT = {"succeeded": "ok", "failed": "FAILED", "timed_out": "TIMEOUT",
                  "cancelled": "cancel", "skipped": "skip"}


# ====================================================================== the view (wire shape)
# Unknown fields are ignored, so a newer kernel can add fields without breaking the TUI.
class TaskRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    action: str = ""
    schedule: str | None = None
    tz: str = "UTC"
    enabled: bool = True
    paused: bool = False
    next_due: float | None = None
    last_outcome: str | None = None
    last_error_code: str | None = None
    last_finished_at: float | None = None
    after: tuple[str, ...] = ()
    running: int = 0


class RunningRow(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    task_id: str | None = None
    action: str = ""
    trace_id: str = ""
    attempt: int = 1
    elapsed: float = 0.0
    timeout: float | None = None
    done: float | None = None   # what the action reported with ctx.progress (None: nothing)
    total: float | None = None  # None: unknown (a count and a pulse, no bar)
    note: str = ""


class CountersView(msgspec.Struct, frozen=True, kw_only=True):
    submitted: int = 0
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    skipped: int = 0
    recovered: int = 0
    misfired: int = 0


class GpuRow(msgspec.Struct, frozen=True, kw_only=True):
    """One card of ``snapshot.gpus``: memory in MiB, reserved by the kernel's running jobs."""

    index: int
    name: str = ""
    total_mb: float = 0.0
    free_mb: float = 0.0
    reserved_mb: float = 0.0
    utilization_pct: int | None = None


class SnapshotView(msgspec.Struct, frozen=True, kw_only=True):
    at: float
    tasks: tuple[TaskRow, ...] = ()
    running: tuple[RunningRow, ...] = ()
    queued: int = 0
    timers: int = 0
    pending_jobs: int = 0
    counters: CountersView = msgspec.field(default_factory=CountersView)
    max_concurrency: int = 0
    queue_depth: int = 0
    gpus: tuple[GpuRow, ...] = ()
    gpu_note: str | None = None  # why no GPU is used, when none is
    # set by frame_view, which keeps only the rows a frame can show (None: len of the tuple)
    tasks_total: int | None = None
    tasks_paused: int | None = None
    running_total: int | None = None

    @property
    def n_tasks(self) -> int:
        return len(self.tasks) if self.tasks_total is None else self.tasks_total

    @property
    def n_running(self) -> int:
        return len(self.running) if self.running_total is None else self.running_total

    @property
    def n_paused(self) -> int:
        if self.tasks_paused is not None:
            return self.tasks_paused
        return sum(1 for x in self.tasks if x.paused)


class RunRow(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    task_id: str | None = None
    action: str = ""
    trace_id: str = ""
    span_id: str = ""
    scheduled_at: float | None = None
    started_at: float | None = None
    finished_at: float
    attempt: int = 1
    outcome: str
    error_code: str | None = None
    detail: str = ""
    recovered: bool = False


class ReloadRow(msgspec.Struct, frozen=True, kw_only=True):
    """A config reload (the optional ``reloads`` list, newest first)."""

    at: float
    source: str = ""
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    error: str | None = None


class StallRow(msgspec.Struct, frozen=True, kw_only=True):
    """The last stall of the kernel's event loop (a ``LoopStalled`` event): when it was seen,
    how late the loop was, and the runs in flight then (the likely culprits)."""

    at: float
    lag: float
    job_ids: tuple[str, ...] = ()
    task_ids: tuple[str, ...] = ()


class TuiView(msgspec.Struct, frozen=True, kw_only=True):
    snapshot: SnapshotView
    recent_runs: tuple[RunRow, ...] = ()
    api_version: int = 1
    reloads: tuple[ReloadRow, ...] = ()
    last_stall: StallRow | None = None  # optional: a kernel that serves it


_decoder = msgspec.json.Decoder(TuiView)


def decode_view(body: bytes | str) -> TuiView:
    """Decode the JSON of ``GET /snapshot``; raises ``msgspec.DecodeError`` if it is not one."""
    return _decoder.decode(body)


def view_from_snapshot(snapshot: object, runs: Sequence[RunRecord] = (), *,
                       reloads: Sequence[ReloadRow] = ()) -> TuiView:
    """Build a view from an in-process ``Kernel.snapshot()`` and recent run records."""
    snap = msgspec.convert(msgspec.to_builtins(snapshot), SnapshotView)
    rows = msgspec.convert(msgspec.to_builtins(list(runs)), tuple[RunRow, ...])
    return TuiView(snapshot=snap, recent_runs=rows, reloads=tuple(reloads))


class _TaskLike(Protocol):
    @property
    def paused(self) -> bool: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def next_due(self) -> float | None: ...
    @property
    def id(self) -> str: ...


class _RunningLike(Protocol):
    @property
    def elapsed(self) -> float: ...


class _SnapshotLike(Protocol):
    """What ``frame_view`` reads of ``kernel.app.Snapshot``."""

    @property
    def at(self) -> float: ...
    @property
    def tasks(self) -> Sequence[_TaskLike]: ...
    @property
    def running(self) -> Sequence[_RunningLike]: ...
    @property
    def queued(self) -> int: ...
    @property
    def timers(self) -> int: ...
    @property
    def pending_jobs(self) -> int: ...
    @property
    def counters(self) -> object: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def gpus(self) -> Sequence[object]: ...
    @property
    def gpu_note(self) -> str | None: ...


def _running_order(r: _RunningLike) -> float:
    return -r.elapsed


def frame_view(snapshot: _SnapshotLike, runs: Sequence[RunRecord] = (), *, rows: int,
               reloads: Sequence[ReloadRow] = ()) -> TuiView:
    """A view of an in-process snapshot holding only what a frame ``rows`` lines high can
    show: the first ``rows`` tasks in the order ``render`` draws them, the ``rows`` longest
    running jobs, and the totals that ``render`` counts. It draws the same picture as
    ``view_from_snapshot`` at any size up to ``rows`` lines, but converts O(rows) objects
    instead of every task."""
    rows = max(1, rows)
    tasks = snapshot.tasks
    paused = sum(1 for t in tasks if t.paused)
    shown = heapq.nsmallest(rows, tasks, key=_task_order)  # = sorted(...)[:rows], stable
    running = heapq.nsmallest(rows, snapshot.running, key=_running_order)
    snap = SnapshotView(
        at=snapshot.at,
        tasks=msgspec.convert(shown, tuple[TaskRow, ...], from_attributes=True),
        running=msgspec.convert(running, tuple[RunningRow, ...], from_attributes=True),
        queued=snapshot.queued, timers=snapshot.timers, pending_jobs=snapshot.pending_jobs,
        counters=msgspec.convert(snapshot.counters, CountersView, from_attributes=True),
        max_concurrency=snapshot.max_concurrency, queue_depth=snapshot.queue_depth,
        gpus=msgspec.convert(list(snapshot.gpus), tuple[GpuRow, ...], from_attributes=True),
        gpu_note=snapshot.gpu_note, tasks_total=len(tasks), tasks_paused=paused,
        running_total=len(snapshot.running))
    rows_ = msgspec.convert(msgspec.to_builtins(list(runs)), tuple[RunRow, ...])
    return TuiView(snapshot=snap, recent_runs=rows_, reloads=tuple(reloads))


def reload_row(event: ConfigReloaded) -> ReloadRow:
    return ReloadRow(at=event.at, source=event.source, added=tuple(event.added),
                     removed=tuple(event.removed), changed=tuple(event.changed),
                     error=event.error)


def stall_row(event: LoopStalled) -> StallRow:
    return StallRow(at=event.at, lag=event.lag, job_ids=tuple(event.job_ids),
                    task_ids=tuple(event.task_ids))


# ====================================================================== state between frames
@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    finished: int  # succeeded + failed + timed_out
    failed: int    # failed + timed_out


@dataclass(frozen=True, slots=True)
class Rate:
    window: float
    per_minute: float
    failure_ratio: float | None  # None: nothing finished in the window


@dataclass(frozen=True, slots=True)
class TuiState:
    view: TuiView | None = None
    samples: tuple[Sample, ...] = ()
    error: str | None = None
    failures: int = 0               # consecutive failed polls
    last_ok_at: float | None = None  # snapshot instant of the last good poll
    reloads: tuple[ReloadRow, ...] = ()
    logs: tuple[str, ...] | None = None  # the in-process log pane's newest lines; None: no pane
    log_file: str | None = None          # where every line goes while the pane shows a few
    stall: StallRow | None = None        # the last loop stall seen in-process


def observe(state: TuiState, view: TuiView) -> TuiState:
    """Fold a fresh view into the state: keep it, and add a counter sample to the history."""
    c = view.snapshot.counters
    s = Sample(at=view.snapshot.at, finished=c.succeeded + c.failed + c.timed_out,
               failed=c.failed + c.timed_out)
    samples = state.samples
    if samples and (s.finished < samples[-1].finished or s.at < samples[-1].at):
        samples = ()  # the kernel restarted (counters went back): start a new history
    elif samples and s.at == samples[-1].at:
        samples = samples[:-1]
    horizon = s.at - HISTORY_SECONDS
    kept = tuple(x for x in samples if x.at >= horizon)[-(HISTORY_MAX - 1):]
    return replace(state, view=view, samples=(*kept, s), error=None, failures=0,
                   last_ok_at=view.snapshot.at)


def observe_error(state: TuiState, message: str) -> TuiState:
    """Record a failed poll: the last good view stays on screen with a status line."""
    return replace(state, error=message, failures=state.failures + 1)


def observe_reload(state: TuiState, row: ReloadRow) -> TuiState:
    return replace(state, reloads=(row, *state.reloads)[:RECENT_RELOADS])


def observe_stall(state: TuiState, row: StallRow) -> TuiState:
    """Keep the newest loop stall (an older one arriving late does not replace it)."""
    if state.stall is not None and state.stall.at > row.at:
        return state
    return replace(state, stall=row)


def with_logs(state: TuiState, lines: Sequence[str]) -> TuiState:
    """Show ``lines`` (oldest first) in a log pane below the tables."""
    return replace(state, logs=tuple(lines))


def rates(state: TuiState, window: float) -> Rate | None:
    """Runs finished per minute and the failure ratio over the last ``window`` seconds."""
    if len(state.samples) < 2:
        return None
    last = state.samples[-1]
    first = next((x for x in state.samples if x.at >= last.at - window), last)
    if first is last:
        first = state.samples[-2]
    span = last.at - first.at
    if span <= 0:
        return None
    done = last.finished - first.finished
    bad = last.failed - first.failed
    return Rate(window=window, per_minute=done * 60.0 / span,
                failure_ratio=(bad / done) if done > 0 else None)


def _spark(state: TuiState, points: int) -> str:
    xs = state.samples[-(points + 1):]
    deltas = [max(0, b.finished - a.finished) for a, b in itertools.pairwise(xs)]
    if not deltas:
        return ""
    top = max(deltas) or 1
    return "".join(SPARK[min(len(SPARK) - 1, d * (len(SPARK) - 1) // top)] for d in deltas)


# ====================================================================== formatting helpers
def _hms(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M:%S")


def _stamp(t: float | None, now: float) -> str:
    """HH:MM:SS within a day of ``now``, else the date too."""
    if t is None:
        return "-"
    d = dt.datetime.fromtimestamp(t, dt.UTC)
    return d.strftime("%H:%M:%S" if abs(t - now) < 86_400 else "%Y-%m-%d %H:%M")


def _span(seconds: float) -> str:
    s = abs(seconds)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _rel(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    delta = t - now
    if abs(delta) < 0.5:
        return "now"
    return f"in {_span(delta)}" if delta > 0 else f"{_span(delta)} ago"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def _gib(mb: float) -> str:
    return f"{mb / 1024:.1f}G"


def _outcome(outcome: str | None, compact: bool) -> Text:
    if outcome is None:
        return Text("-", style="dim")
    label = _OUTCOME_SHORT.get(outcome, outcome) if compact else outcome
    return Text(label, style=_OUTCOME_STYLE.get(outcome, ""))


def _line(text: Text | str, width: int) -> Text:
    t = Text(text) if isinstance(text, str) else text.copy()
    t.no_wrap = True
    t.overflow = "ellipsis"
    t.truncate(width, overflow="ellipsis")
    return t


def _table(width: int, wide: bool) -> Table:
    return Table(box=None, width=width, expand=True, show_edge=False, pad_edge=False,
                 padding=(0, 1), header_style="bold reverse" if wide else "bold",
                 show_header=True, collapse_padding=True)


def _col(t: Table, name: str, *, ratio: int | None = None, max_width: int | None = None,
         min_width: int | None = None, justify: str = "left") -> None:
    t.add_column(name, ratio=ratio, max_width=max_width, min_width=min_width, no_wrap=True,
                 overflow="ellipsis", justify="right" if justify == "right" else "left")


def _allot(needs: Sequence[int], budget: int) -> list[int]:
    """Share ``budget`` rows between sections fairly (water filling), never above a need."""
    alloc = [0] * len(needs)
    remaining = max(0, budget)
    active = [i for i, n in enumerate(needs) if n > 0]
    while remaining > 0 and active:
        share = max(1, remaining // len(active))
        for i in list(active):
            give = min(share, needs[i] - alloc[i], remaining)
            alloc[i] += give
            remaining -= give
            if alloc[i] >= needs[i]:
                active.remove(i)
            if remaining == 0:
                break
    return alloc


def _fit(items: Sequence[_T], rows: int, total: int | None = None) -> tuple[Sequence[_T], int]:
    """The items that fit in ``rows`` table rows, and how many are hidden behind a last
    "… N more" row (0: no such row). ``total``: how many there are when ``items`` holds only
    the first ones."""
    total = len(items) if total is None else total
    if total <= rows:
        return items, 0
    if rows <= 0:
        return (), 0
    return items[: rows - 1], total - rows + 1


def _more(t: Table, hidden: int) -> None:
    if hidden:
        t.add_row(Text(f"… {hidden} more", style="dim"))


# ====================================================================== sections
def _header(view: TuiView, width: int, wide: bool) -> Text:
    s = view.snapshot
    t = Text()
    t.append("Open-AutoGLM Kernel", style="bold cyan")
    t.append(f"  {_stamp(s.at, s.at)}Z")
    t.append("  queue ")
    full = s.queue_depth and s.queued >= 0.9 * s.queue_depth
    t.append(f"{s.queued}/{s.queue_depth}", style="bold red" if full else "bold")
    t.append("  running ")
    t.append(f"{s.n_running}/{s.max_concurrency}", style="bold")
    t.append(f"  timers {s.timers}  pending {s.pending_jobs}")
    if wide:
        paused = s.n_paused
        t.append(f"  tasks {s.n_tasks}" + (f" ({paused} paused)" if paused else ""))
        t.append(f"  api v{view.api_version}", style="dim")
        t.append("   Ctrl-C to quit", style="dim")
    return _line(t, width)


def _rates_line(view: TuiView, state: TuiState | None, width: int, wide: bool) -> Text:
    c = view.snapshot.counters
    t = Text()
    windows = (60.0, 300.0, 900.0) if wide else (60.0, 300.0)
    t.append("runs/min")
    for w in windows:
        r = rates(state, w) if state is not None else None
        t.append(f" {int(w // 60)}m ", style="dim")
        t.append("-" if r is None else f"{r.per_minute:.1f}")
    t.append("  fail")
    for w in windows:
        r = rates(state, w) if state is not None else None
        ratio = None if r is None else r.failure_ratio
        t.append(f" {int(w // 60)}m ", style="dim")
        t.append(_pct(ratio), style="bold red" if ratio else "")
    t.append("  total ok ")
    t.append(str(c.succeeded), style="green")
    t.append(" fail ")
    t.append(str(c.failed), style="red" if c.failed else "")
    t.append(" t/o ")
    t.append(str(c.timed_out), style="yellow" if c.timed_out else "")
    if wide:
        t.append(f" skip {c.skipped} cancel {c.cancelled} recovered {c.recovered}"
                 f" misfired {c.misfired} submitted {c.submitted}")
        if state is not None and (spark := _spark(state, 30)):
            t.append("  ")
            t.append(spark, style="cyan")
    return _line(t, width)


def _status_lines(state: TuiState, width: int, max_lines: int) -> list[Text]:
    """The failed poll, wrapped over at most ``max_lines`` lines (a hint such as where the
    token is must be readable at 80 columns)."""
    if state.error is None:
        return []
    t = Text(f"⚠ {state.error} — retrying", style="bold red")
    if state.failures > 1:
        t.append(f" ({state.failures} tries)")
    if state.last_ok_at is not None:
        t.append(f"; data from {_hms(state.last_ok_at)}Z", style="yellow")
    out: list[Text] = []
    rest = t
    while len(rest) > width and len(out) < max_lines - 1:
        cut = rest.plain.rfind(" ", 0, width + 1)
        cut = cut if cut > width // 2 else width
        out.append(rest[:cut])
        rest = rest[cut:]
        rest = rest[len(rest.plain) - len(rest.plain.lstrip(" ")):]
    out.append(_line(rest, width))
    return out


def _stall_line(stall: StallRow | None, now: float, width: int, wide: bool) -> Text | None:
    """The last loop stall, for ``STALL_SHOWN`` seconds after it: when, how long, which runs
    were in flight (tasks first: they name what to fix)."""
    if stall is None or not (-60.0 <= now - stall.at <= STALL_SHOWN):
        return None
    fresh = now - stall.at <= 60.0
    t = Text(f"⚠ loop stalled {stall.lag:.2f}s", style="bold yellow" if fresh else "yellow")
    t.append(f" at {_hms(stall.at)}Z ({_rel(stall.at, now)})" if wide
             else f" {_rel(stall.at, now)}")
    if stall.task_ids:
        t.append(f"  tasks {', '.join(stall.task_ids)}")
    if stall.job_ids and (wide or not stall.task_ids):
        t.append(f"  jobs {', '.join(stall.job_ids)}", style="dim")
    if not stall.job_ids and not stall.task_ids:
        t.append("  no run in flight", style="dim")
    return _line(t, width)


def _last_stall(view: TuiView, state: TuiState | None) -> StallRow | None:
    mine = state.stall if state is not None else None
    theirs = view.last_stall
    if mine is None or theirs is None:
        return mine or theirs
    return mine if mine.at >= theirs.at else theirs


def _gpu_lines(gpus: Sequence[GpuRow], note: str | None, width: int,
               wide: bool) -> list[Text]:
    if not gpus:
        if wide and note:
            return [_line(Text(f"GPU: {note}", style="dim"), width)]
        return []
    parts = []
    for g in gpus:
        t = Text()
        t.append(f"GPU{g.index}", style="bold")
        if wide and g.name:
            t.append(f" {g.name}")
        t.append(" reserved ")
        t.append(_gib(g.reserved_mb), style="bold")
        t.append(" free ")
        t.append(_gib(g.free_mb), style="bold red" if g.free_mb < 0.1 * g.total_mb else "green")
        t.append(f" of {_gib(g.total_mb)}")
        if wide and g.utilization_pct is not None:
            t.append(f" util {g.utilization_pct}%")
        parts.append(t)
    if wide:
        return [_line(p, width) for p in parts[:4]]
    return [_line(Text("  ").join(parts), width)]


def _reload_lines(reloads: Sequence[ReloadRow], now: float, width: int,
                  wide: bool) -> list[Text]:
    out = []
    for r in reloads[: 3 if wide else 1]:
        t = Text()
        t.append("reload ", style="bold")
        t.append(f"{_stamp(r.at, now)} {r.source} ")
        if r.error:
            t.append("rejected: ", style="bold red")
            t.append(r.error.splitlines()[0] if r.error else "")
        else:
            t.append("ok", style="green")
            t.append(f" +{len(r.added)} -{len(r.removed)} ~{len(r.changed)}")
            names = [*(f"+{x}" for x in r.added), *(f"-{x}" for x in r.removed),
                     *(f"~{x}" for x in r.changed)]
            if wide and names:
                t.append("  " + " ".join(names), style="dim")
        out.append(_line(t, width))
    return out


def _task_order(t: _TaskLike) -> tuple[int, float, str]:
    idle = 1 if (t.paused or not t.enabled or t.next_due is None) else 0
    return (idle, t.next_due if t.next_due is not None else 0.0, t.id)


def _tasks(view: TuiView, rows: int, width: int, wide: bool) -> RenderableType:
    s = view.snapshot
    if not s.n_tasks:
        return _line(Text("TASKS: none configured", style="dim"), width)
    t = _table(width, wide)
    _col(t, "TASK", ratio=2, min_width=8)
    if wide:
        _col(t, "ACTION", max_width=16)
    _col(t, "SCHEDULE", max_width=22 if wide else 13)
    if wide:
        _col(t, "TZ", max_width=16)
        _col(t, "NEXT FIRE", max_width=24)
    else:
        _col(t, "NEXT", max_width=9)
    _col(t, "LAST", max_width=9 if wide else 7)
    _col(t, "ERROR", max_width=24 if wide else 20, min_width=10)
    if wide:
        _col(t, "FINISHED", max_width=16)
        _col(t, "RUN", max_width=3, justify="right")
        _col(t, "AFTER", ratio=1)
    _col(t, "STATE", max_width=7)
    tasks = sorted(s.tasks, key=_task_order)
    shown, hidden = _fit(tasks, rows, s.n_tasks)
    for x in shown:
        state = ("paused" if x.paused else "off" if not x.enabled
                 else f"run {x.running}" if x.running and not wide else "")
        state_t = Text(state, style="yellow" if x.paused else "dim")
        err = Text(x.last_error_code or "", style="red")
        cells: list[RenderableType] = [Text(x.id, style="bold")]
        if wide:
            cells.append(x.action)
        cells.append(x.schedule or Text(f"after {', '.join(x.after)}" if x.after else "(manual)",
                                        style="dim"))
        if wide:
            nxt = "-" if x.next_due is None else (
                f"{_stamp(x.next_due, s.at)} ({_rel(x.next_due, s.at)})")
            cells += [x.tz, nxt]
        else:
            cells.append(_rel(x.next_due, s.at).removeprefix("in "))
        cells += [_outcome(x.last_outcome, not wide), err]
        if wide:
            cells += [_stamp(x.last_finished_at, s.at), str(x.running or ""),
                      ", ".join(x.after)]
        cells.append(state_t)
        t.add_row(*cells)
    _more(t, hidden)
    return t


def _running(view: TuiView, rows: int, width: int, wide: bool) -> RenderableType:
    s = view.snapshot
    if not s.n_running:
        return _line(Text("RUNNING: nothing", style="dim"), width)
    t = _table(width, wide)
    _col(t, "RUNNING", ratio=2, min_width=8)
    if wide:
        _col(t, "JOB", max_width=26)
    _col(t, "ACTION", max_width=16 if wide else 12)
    if wide:
        _col(t, "TRACE", max_width=32)
    _col(t, "ATT", max_width=3, justify="right")
    _col(t, "ELAPSED/TIMEOUT", max_width=20 if wide else 15, justify="right")
    cells_ = BAR_WIDE if wide else BAR_COMPACT
    _col(t, "PROGRESS", min_width=cells_, max_width=cells_)
    _col(t, "DONE", ratio=3 if wide else 2, min_width=4)
    jobs = sorted(s.running, key=_running_order)
    shown, hidden = _fit(jobs, rows, s.n_running)
    for r in shown:
        limit = "∞" if r.timeout is None else _span(r.timeout)
        late = r.timeout is not None and r.elapsed > 0.8 * r.timeout
        el = Text(f"{_span(r.elapsed)}/{limit}", style="bold yellow" if late else "")
        cells: list[RenderableType] = [Text(r.task_id or f"(job {r.job_id})", style="bold")]
        if wide:
            cells.append(r.job_id)
        cells.append(r.action)
        if wide:
            cells.append(r.trace_id)
        cells += [str(r.attempt), el, *_progress(r, s.at, cells_)]
        t.add_row(*cells)
    _more(t, hidden)
    return t


def _qty(x: float) -> str:
    """A count for a narrow cell: 1234, 12.3k, 4.56M; fractions with 3 digits."""
    if x.is_integer():
        n = int(x)
        if abs(n) < 10_000:
            return str(n)
        for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(n) >= div:
                return f"{n / div:.3g}{unit}"
    return f"{x:.3g}"


def _pulse(at: float, cells: int) -> Text:
    """A short block going back and forth, two cells per second of ``at`` (a frame at the
    default cadence): alive, but no fraction. Drawn in plain characters so that it reads on a
    terminal without colours too (rich's pulse is a full bar there)."""
    span = min(3, cells)
    travel = max(1, cells - span)
    k = int(at * 2) % (2 * travel)
    pos = k if k <= travel else 2 * travel - k
    pos = min(pos, cells - span)
    return (Text("─" * pos, style="dim") + Text("━" * span, style="cyan")
            + Text("─" * (cells - span - pos), style="dim"))


def _progress(r: RunningRow, at: float, cells: int) -> tuple[RenderableType, Text]:
    """The bar and the text of what ``r``'s action reported with ``ctx.progress``: a rich
    progress bar and "45% 9/20" when the total is known, a pulse (moved by the snapshot's
    instant, so rendering stays pure) and a count when it is not, then the note."""
    if r.done is None and r.total is None:
        return Text(""), Text("")
    done = r.done or 0.0
    bar: RenderableType
    if r.total is not None:
        frac = 1.0 if r.total <= 0 else max(0.0, min(1.0, done / r.total))
        bar = ProgressBar(total=max(r.total, 0.0), completed=min(max(done, 0.0), r.total),
                          width=cells)
        text = Text(f"{int(frac * 100)}%", style="bold")
        text.append(f" {_qty(done)}/{_qty(r.total)}")
    else:
        bar = _pulse(at, cells)
        text = Text(_qty(done), style="bold")
    if r.note:
        text.append(f" {r.note}", style="dim")
    return bar, text


def _runs(view: TuiView, rows: int, width: int, wide: bool) -> RenderableType:
    runs = view.recent_runs
    if not runs:
        return _line(Text("RECENT RUNS: none yet", style="dim"), width)
    now = view.snapshot.at
    t = _table(width, wide)
    _col(t, "FINISHED", max_width=16)
    _col(t, "RECENT RUN", ratio=2, min_width=8)
    if wide:
        _col(t, "ACTION", max_width=16)
        _col(t, "JOB", max_width=26)
    _col(t, "TRACE", max_width=16 if wide else 8)
    if wide:
        _col(t, "ATT", max_width=3, justify="right")
    _col(t, "DUR", max_width=7, justify="right")
    _col(t, "OUTCOME", max_width=9 if wide else 7)
    _col(t, "ERROR", max_width=24 if wide else 20, min_width=10)
    if wide:
        _col(t, "DETAIL", ratio=3)
    shown, hidden = _fit(runs, rows)
    for r in shown:
        dur = "-" if r.started_at is None else _span(r.finished_at - r.started_at)
        name = Text(r.task_id or r.action, style="bold" if r.task_id else "")
        if r.recovered:
            name.append(" (recovered)" if wide else " ↻", style="yellow")
        cells: list[RenderableType] = [_stamp(r.finished_at, now), name]
        if wide:
            cells += [r.action, r.job_id]
        cells.append(Text(r.trace_id[: 16 if wide else 8], style="dim"))
        if wide:
            cells.append(str(r.attempt))
        cells += [dur, _outcome(r.outcome, not wide), Text(r.error_code or "", style="red")]
        if wide:
            cells.append(Text(r.detail.splitlines()[0] if r.detail else "", style="dim"))
        t.add_row(*cells)
    _more(t, hidden)
    return t


# ====================================================================== render
def render(view: TuiView, width: int, height: int | None = None, *,
           state: TuiState | None = None) -> RenderableType:
    """Draw ``view`` to fit ``width`` columns and ``height`` lines (default: 24 below
    ``WIDE`` columns, else 48). ``state`` adds throughput, failure rate, the connection status
    and reloads seen in-process. Pure: reads neither the clock nor the terminal."""
    width = max(20, width)
    wide = width >= WIDE
    height = max(8, height if height is not None else (48 if wide else 24))
    lines: list[RenderableType] = [_header(view, width, wide),
                                   _rates_line(view, state, width, wide)]
    if state is not None:
        lines += _status_lines(state, width, 3 if height >= 24 else 1)
    if (stalled := _stall_line(_last_stall(view, state), view.snapshot.at, width,
                               wide)) is not None:
        lines.append(stalled)
    lines += _gpu_lines(view.snapshot.gpus, view.snapshot.gpu_note, width, wide)
    reloads = view.reloads or (state.reloads if state is not None else ())
    lines += _reload_lines(reloads, view.snapshot.at, width, wide)
    gaps = 3 if wide else 0            # blank lines before each section when wide
    budget = height - len(lines) - 3 - gaps   # 3: a header line per section
    pane = _log_pane(state, budget, width, wide)
    budget -= len(pane)
    s = view.snapshot
    want = [s.n_tasks, s.n_running, len(view.recent_runs)]
    # every section keeps at least one row when it has any, then the rest is shared
    alloc = _allot(want, budget)
    sections = (_tasks(view, alloc[0], width, wide), _running(view, alloc[1], width, wide),
                _runs(view, alloc[2], width, wide))
    for sec in sections:
        if wide:
            lines.append(Text(""))
        lines.append(sec)
    lines += pane
    return Group(*lines)


def _log_pane(state: TuiState | None, budget: int, width: int, wide: bool) -> list[Text]:
    """The newest log lines under a title line; at most a quarter of the frame's table rows
    (a sixth when compact), never the rows the three tables need for their first lines."""
    logs = state.logs if state is not None else None
    if state is None or logs is None:
        return []
    room = min(budget - 4, budget // (4 if wide else 6))  # 4: the title + a row per table
    if room < 1:
        return []
    shown = logs[-room:] if logs else ()
    title = Text("LOG", style="bold")
    title.append(f"  every line: {state.log_file}" if state.log_file
                 else "  the newest lines only (no log file while the TUI is on)", style="dim")
    if not shown:
        title.append("; nothing yet", style="dim")
    out = [_line(title, width)]
    for text in shown:
        level = text.split(" ", 2)[1] if text.count(" ") >= 2 else ""
        style = ("red" if level in ("ERROR", "CRITICAL") else "yellow" if level == "WARNING"
                 else "dim")
        out.append(_line(Text(text, style=style), width))
    return out


def render_state(state: TuiState, width: int, height: int | None = None,
                 *, source: str = "") -> RenderableType:
    """Draw the loop's state: the latest view, or a waiting screen before the first one."""
    if state.view is None:
        t = Text("Open-AutoGLM Kernel", style="bold cyan")
        t.append(f"  connecting to {source}…" if source else "  waiting for the first snapshot…")
        lines: list[RenderableType] = [_line(t, max(20, width))]
        lines += _status_lines(state, max(20, width), 3)
        lines.append(_line(Text("Ctrl-C to quit", style="dim"), max(20, width)))
        return Group(*lines)
    return render(state.view, width, height, state=state)


# ====================================================================== loops
def snapshot_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/snapshot") else base + "/snapshot"


class _FetchError(Exception):
    pass


async def _fetch(session: aiohttp.ClientSession, url: str, token: str | None) -> TuiView:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status in (401, 403):
                raise _FetchError(
                    f"HTTP {resp.status} from {url}: "
                    f"{'the token was refused' if token else 'no token sent'}; pass --token or "
                    "set KERNEL_API_TOKEN (for a loopback URL the token file <data dir>/"
                    "api.token is read; data dir: $KERNEL_DATA_DIR or the default)")
            if resp.status != 200:
                raise _FetchError(f"HTTP {resp.status} from {url}")
            body = await resp.read()
    except aiohttp.ClientError as exc:
        raise _FetchError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    except TimeoutError:
        raise _FetchError(f"no answer from {url} (timed out)") from None
    try:
        return decode_view(body)
    except msgspec.DecodeError as exc:
        raise _FetchError(f"{url} did not return a snapshot: {exc}") from None


def _frame_size(console: Console, screen: bool) -> tuple[int, int]:
    width, height = console.size
    # inline (not full-screen), leave the last line free so the terminal never scrolls
    return width, height if screen else height - 1


async def run_attached(url: str, token: str | None, *, refresh: float = 1.0,
                       screen: bool = True, console: Console | None = None,
                       clock: Clock | None = None, max_frames: int | None = None) -> None:
    """Poll ``url``'s ``GET /snapshot`` every ``refresh`` seconds and draw it until cancelled
    (Ctrl-C). Connection errors keep the last picture, show a status line and retry."""
    clock = clock or SystemClock()
    console = console or Console()
    target = snapshot_url(url)
    state = TuiState()
    timeout = aiohttp.ClientTimeout(total=max(2.0, 3 * refresh))
    frames = 0
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with Live(console=console, screen=screen, auto_refresh=False, transient=False,
                  redirect_stdout=False, redirect_stderr=False) as live:
            live.update(render_state(state, *_frame_size(console, screen), source=target),
                        refresh=True)
            while max_frames is None or frames < max_frames:
                try:
                    state = observe(state, await _fetch(session, target, token))
                except _FetchError as exc:
                    state = observe_error(state, str(exc))
                frames += 1
                live.update(render_state(state, *_frame_size(console, screen), source=target),
                            refresh=True)
                if max_frames is not None and frames >= max_frames:
                    break
                await clock.sleep(refresh)


class _RunSource(Protocol):
    async def query_runs(self, q: RunQuery) -> list[RunRecord]: ...


class KernelLike(Protocol):
    """What ``run_inprocess`` uses of a ``kernel.app.Kernel``."""

    @property
    def store(self) -> _RunSource: ...
    @property
    def bus(self) -> EventBus: ...
    @property
    def clock(self) -> Clock: ...
    def snapshot(self) -> _SnapshotLike: ...


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


class LogPane(logging.Handler):
    """A logging handler (and a text stream) that keeps the newest ``capacity`` entries for
    the dashboard's log pane. Emitting appends the record to a ring: nothing is formatted
    until ``lines`` asks for the few that are shown, once per frame. Secrets are masked as
    the kernel's log handlers mask them (``logs.Redactor``)."""

    def __init__(self, capacity: int = LOG_CAPACITY) -> None:
        super().__init__()
        self._ring: collections.deque[logging.LogRecord | str] = collections.deque(
            maxlen=max(1, capacity))
        self._partial = ""
        self._redactor = logs.Redactor()

    def __len__(self) -> int:
        return len(self._ring)

    def emit(self, record: logging.LogRecord) -> None:
        self._ring.append(record)

    def write(self, text: str) -> int:
        """Stream side (``sys.stderr`` while the TUI draws): whole lines become entries."""
        with self.lock if self.lock is not None else contextlib.nullcontext():
            pending = self._partial + text
            *done, self._partial = pending.split("\n")
            self._ring.extend(line for line in done if line.strip())
        return len(text)

    def lines(self, n: int, width: int) -> list[str]:
        """The newest ``n`` entries, oldest first, each one line of at most ``width``."""
        newest = list(itertools.islice(reversed(self._ring), max(0, n)))
        out = []
        for entry in reversed(newest):
            text = entry if isinstance(entry, str) else self._format(entry)
            text = _ANSI.sub("", self._redactor.redact(text))
            out.append(text if len(text) <= width else text[: max(0, width - 1)] + "…")
        return out

    @staticmethod
    def _format(r: logging.LogRecord) -> str:
        try:
            msg = r.getMessage()
        except Exception:  # a bad format string in someone's log call: show it raw
            msg = str(r.msg)
        if r.exc_info and r.exc_info[0] is not None:
            msg += f" ({r.exc_info[0].__name__})"
        when = dt.datetime.fromtimestamp(r.created, dt.UTC).strftime("%H:%M:%S")
        return f"{when} {r.levelname} {r.name}: {' | '.join(msg.splitlines())}"


class _PaneStream:
    """Stands in for ``sys.stdout``/``sys.stderr`` while the TUI draws: text goes to the
    pane. ``rich_proxied_file`` lets a ``Console`` without its own file find the terminal;
    anything else (``fileno``, ``encoding``, ``buffer``) is the real stream's."""

    def __init__(self, pane: LogPane, real: TextIO) -> None:
        self._pane = pane
        self.rich_proxied_file = real

    def write(self, text: str) -> int:
        return self._pane.write(text)

    def writelines(self, lines: Sequence[str]) -> None:
        for line in lines:
            self._pane.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> object:
        return getattr(self.rich_proxied_file, name)


def _isatty(stream: object) -> bool:
    try:
        return bool(getattr(stream, "isatty", lambda: False)())
    except (OSError, ValueError):  # closed
        return False


@contextlib.contextmanager
def _logs_to_pane(pane: LogPane, console: Console,
                  log_file: str | os.PathLike[str] | None) -> Iterator[None]:
    """While the TUI draws: log handlers of the root logger that write to a terminal (or to
    the console's file) are taken off, the pane (and ``log_file``, formatted like them) put
    on; ``sys.stdout``/``sys.stderr``, when they are a terminal, write into the pane. All of
    it is undone on exit."""
    root = logging.getLogger()
    screen = console.file
    moved: list[logging.StreamHandler[TextIO]] = [
        h for h in root.handlers
        if isinstance(h, logging.StreamHandler) and (h.stream is screen or _isatty(h.stream))]
    added: list[logging.Handler] = [pane]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        if moved:
            fh.setFormatter(moved[0].formatter)
            for f in moved[0].filters:
                fh.addFilter(f)
        else:
            redactor = logs.Redactor()
            fh.setFormatter(logs.JsonFormatter(redactor))
            fh.addFilter(redactor)
        added.append(fh)
    streams = {name: getattr(sys, name) for name in ("stdout", "stderr")}
    swapped = {name: real for name, real in streams.items()
               if real is not None and (real is screen or _isatty(real))}
    for old in moved:
        root.removeHandler(old)
    for new in added:
        root.addHandler(new)
    for name, real in swapped.items():
        setattr(sys, name, cast(TextIO, _PaneStream(pane, real)))
    try:
        yield
    finally:
        for name, real in swapped.items():
            setattr(sys, name, real)
        for new in added:
            root.removeHandler(new)
            if new is not pane:
                new.close()
        for old in moved:
            root.addHandler(old)


async def run_inprocess(kernel: KernelLike, *, refresh: float = 1.0,
                        console: Console | None = None, runs: int = 20,
                        max_frames: int | None = None,
                        log_file: str | os.PathLike[str] | None = None,
                        log_capacity: int = LOG_CAPACITY) -> None:
    """Draw a kernel running in this process until cancelled (a kernel service).

    One frame every ``refresh`` seconds of the kernel's clock, from a snapshot: events and log
    lines never draw. While it draws, log lines go to the dashboard's log pane (and to
    ``log_file`` when given), never over the picture. Does nothing when stdout is not a
    terminal."""
    console = console or Console(file=sys.stdout)  # the terminal, before stdout is swapped
    if not console.is_terminal and max_frames is None:
        log.warning("--tui needs a terminal on stdout; not showing the TUI")
        return
    state = TuiState(logs=(), log_file=None if log_file is None else os.fspath(log_file))
    pending: list[ReloadRow] = []
    stalls: list[StallRow] = []

    def on_event(ev: Event) -> None:  # the only per-event work: keep reloads for the frame
        if isinstance(ev, ConfigReloaded):
            pending.append(reload_row(ev))
            del pending[:-RECENT_RELOADS]
        elif isinstance(ev, LoopStalled):
            stalls[:] = [stall_row(ev)]

    pane = LogPane(log_capacity)
    unsubscribe = kernel.bus.subscribe(on_event)
    frames = 0
    try:
        with _logs_to_pane(pane, console, log_file), Live(
                console=console, screen=False, auto_refresh=False, transient=False,
                redirect_stdout=False, redirect_stderr=False) as live:
            while max_frames is None or frames < max_frames:
                for row in pending:
                    state = observe_reload(state, row)
                pending.clear()
                for stall in stalls:
                    state = observe_stall(state, stall)
                stalls.clear()
                width, height = _frame_size(console, False)
                try:
                    records = await kernel.store.query_runs(RunQuery(limit=runs))
                    state = observe(state, frame_view(kernel.snapshot(), records, rows=height))
                except KernelError as exc:
                    state = observe_error(state, f"[{exc.code}] {exc}")
                state = with_logs(state, pane.lines(max(1, height // 4), max(20, width)))
                frames += 1
                live.update(render_state(state, width, height), refresh=True)
                if max_frames is not None and frames >= max_frames:
                    break
                await kernel.clock.sleep(refresh)
    finally:
        unsubscribe()


# ====================================================================== command line
def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None,
                   help=f"the kernel's API (default: $KERNEL_URL or {DEFAULT_URL})")
    p.add_argument("--token", default=None,
                   help="API bearer token (default: $KERNEL_API_TOKEN, else for a loopback "
                        "URL the kernel's <data dir>/api.token; data dir: $KERNEL_DATA_DIR "
                        "or ~/.local/share/open-autoglm-kernel)")
    p.add_argument("--refresh", type=float, default=1.0, help="seconds between polls")
    p.add_argument("--inline", action="store_true",
                   help="draw below the prompt instead of using the full screen")
    p.set_defaults(handler=cmd_tui)


def add_tui_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``tui`` to a subcommand parser; its ``handler(args) -> int`` runs the TUI."""
    _configure(sub.add_parser(
        "tui", help="watch a running kernel in a live terminal UI",
        description="Poll a kernel's GET /snapshot and show tasks, running jobs and recent "
                    "runs. Ctrl-C quits."))


def cmd_tui(a: argparse.Namespace) -> int:
    url = a.url or os.environ.get("KERNEL_URL") or DEFAULT_URL
    token = a.token or default_token(url)
    if not a.refresh > 0:
        print("error: --refresh must be a positive number of seconds", file=sys.stderr)
        return 2
    if not url.startswith(("http://", "https://")):
        print(f"error: --url {url!r} must start with http:// or https://", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_attached(url, token, refresh=a.refresh, screen=not a.inline))
    except KeyboardInterrupt:  # Ctrl-C is how one leaves the TUI
        return 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kernel.tui [--url ...]`` (the same as ``python -m kernel tui``)."""
    p = argparse.ArgumentParser(prog="python -m kernel tui")
    _configure(p)
    a = p.parse_args(argv)
    return cmd_tui(a)


if __name__ == "__main__":
    sys.exit(main())
