"""Prometheus metrics: an event-bus observer plus gauges read from a snapshot at scrape time.

``KernelMetrics`` owns its own ``CollectorRegistry`` (never the process-global one), so several
kernels (or tests) in one process do not collide. Wire it as a subscriber and hand its
``render`` to the HTTP API::

    metrics = KernelMetrics()
    bus.subscribe(metrics)                      # counters and histograms from typed events
    body, content_type = metrics.render(kernel.snapshot())   # GET /metrics

Every name starts with ``autoglm_kernel_``. Counters that carry a ``task`` label use ``""`` for
ad-hoc jobs; at most ``max_task_labels`` distinct task ids get their own series, later ones are
counted under ``task="other"`` (and ``autoglm_kernel_task_label_overflow_total`` grows), so a
flood of generated task ids cannot blow up the series count. ``error_code`` values come from the
closed ``ErrorCode`` catalogue. GPU memory (``snapshot.gpus``, in MiB) is exported in bytes.

Dead-man's switch (the Prometheus guidance for batch jobs): ``task_last_success_timestamp_seconds``
is set from ``RunSucceeded`` events, and ``task_interval_seconds`` (read from the snapshot at
scrape time) is the longest gap between a scheduled task's next few occurrences, exported only
for enabled, unpaused tasks with a schedule. The rule ``KernelTaskNotSucceeding`` in
``scripts/prometheus/alert_rules.yml`` compares the two.

The registry also carries ``autoglm_kernel_build_info{version,python}`` and the standard
``process_*`` series (CPU, memory, file descriptors, start time; Linux ``/proc``). ``_created``
series are left out of the exposition: they double the series count of every counter and
histogram and no rule reads them. They are filtered per registry at render time rather than
with ``prometheus_client.disable_created_metrics()``, a process-wide switch that would also
change the registries of a program that embeds the kernel.

Progress (``ctx.progress``): ``run_progress_ratio{job_id,action}`` is ``done / total`` (0-1) of
each running job that reported a total, read from ``snapshot.running`` at scrape time; a run that
ended (or never reported a total) has no series, so the series are at most the running jobs.

Loop stalls (``kernel.looplag`` publishes ``LoopStalled``): ``loop_stalls_total``,
``loop_stall_seconds_total`` (the sum of their lags), and the last one's lag and instant
(``loop_last_stall_seconds``, ``loop_last_stall_timestamp_seconds``).

Observers know nothing of the dispatcher: this module reads events and a snapshot, nothing else.
"""

from __future__ import annotations

import itertools
import platform
from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import __version__
from .errors import KernelError
from .events import (
    ConfigReloaded,
    Event,
    JobSubmitted,
    KernelStarted,
    LoopStalled,
    MisfireDecided,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunSkipped,
    RunStarted,
    RunSucceeded,
    RunTimedOut,
    StoreFailed,
)
from .triggers import parse_schedule

__all__ = [
    "COMMIT_BUCKETS",
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "LATENESS_BUCKETS",
    "NAMESPACE",
    "OVERFLOW_TASK",
    "GpuLike",
    "KernelMetrics",
    "RunningLike",
    "SnapshotLike",
    "TaskLike",
    "schedule_interval",
]

NAMESPACE = "autoglm_kernel"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
OVERFLOW_TASK = "other"
MIB = 1024 * 1024
INTERVAL_PROBES = 8          # occurrences looked at to find a schedule's longest gap
INTERVAL_CACHE_LIMIT = 4096  # distinct (schedule, zone) pairs remembered

# fire lateness: 1 ms .. 60 s
LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
# run duration: 10 ms .. 1 h (LLM calls and batch jobs are long)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                    600.0, 1800.0, 3600.0)
# store group commit: 100 µs .. 5 s
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5, 5.0)


class GpuLike(Protocol):
    """One card in a snapshot (``kernel.app.GpuView``); memory in MiB."""

    @property
    def index(self) -> int: ...
    @property
    def total_mb(self) -> float: ...
    @property
    def free_mb(self) -> float: ...
    @property
    def reserved_mb(self) -> float: ...
    @property
    def utilization_pct(self) -> int | None: ...


class TaskLike(Protocol):
    """One task of a snapshot (``kernel.app.TaskView``), as far as the gauges read it."""

    @property
    def id(self) -> str: ...
    @property
    def schedule(self) -> str | None: ...
    @property
    def tz(self) -> str: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def paused(self) -> bool: ...


class RunningLike(Protocol):
    """One running job of a snapshot (``kernel.snapshot.RunningView``), as the progress gauge
    reads it: ``done``/``total`` are what the action reported with ``ctx.progress``."""

    @property
    def job_id(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def done(self) -> float | None: ...
    @property
    def total(self) -> float | None: ...


class SnapshotLike(Protocol):
    """What the scrape-time gauges read (``kernel.app.Snapshot`` satisfies it)."""

    @property
    def queued(self) -> int: ...
    @property
    def timers(self) -> int: ...
    @property
    def pending_jobs(self) -> int: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def running(self) -> Sequence[RunningLike]: ...
    @property
    def tasks(self) -> Sequence[TaskLike]: ...
    @property
    def gpus(self) -> Sequence[GpuLike]: ...
    @property
    def at(self) -> float: ...


def schedule_interval(expr: str, tz: str, after: float) -> float | None:
    """The longest gap between the next ``INTERVAL_PROBES`` occurrences of ``expr`` after
    ``after`` (seconds): ``@every 90s`` gives 90, ``0 9 * * 1-5`` gives 3 days (Friday to
    Monday). None when the schedule does not parse or fires fewer than twice more."""
    try:
        sched = parse_schedule(expr, tz)
        instants: list[float] = []
        t: float | None = after
        while t is not None and len(instants) < INTERVAL_PROBES:
            t = sched.next_after(t)
            if t is not None:
                instants.append(t)
    except (KernelError, ValueError):
        return None
    gaps = [b - a for a, b in itertools.pairwise(instants)]
    return max(gaps) if gaps else None


class _WithoutCreated(Collector):
    """A view of a registry whose counters and histograms have no ``_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():  # fresh Metric objects on every collect
            created = metric.name + "_created"
            if any(x.name == created for x in metric.samples):
                metric.samples = [x for x in metric.samples if x.name != created]
            yield metric


class KernelMetrics:
    """Event subscriber (``bus.subscribe(metrics)``) and ``/metrics`` renderer."""

    def __init__(self, *, max_task_labels: int = 1000,
                 registry: CollectorRegistry | None = None) -> None:
        if max_task_labels < 1:
            raise ValueError("max_task_labels must be at least 1")
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.max_task_labels = max_task_labels
        self._tasks_seen: set[str] = set()
        r, ns = self.registry, NAMESPACE

        self.jobs_submitted = Counter("jobs_submitted", "Jobs accepted (after commit), by kind",
                                      ["kind"], namespace=ns, registry=r)
        self.runs_started = Counter("runs_started", "Run attempts started", ["task"],
                                    namespace=ns, registry=r)
        self.runs_recovered = Counter(
            "runs_recovered", "Run attempts started again after a crash (at-least-once)",
            ["task"], namespace=ns, registry=r)
        self.runs_succeeded = Counter("runs_succeeded", "Runs that succeeded", ["task"],
                                      namespace=ns, registry=r)
        self.runs_failed = Counter("runs_failed", "Runs that failed, by error code",
                                   ["task", "error_code"], namespace=ns, registry=r)
        self.runs_timed_out = Counter("runs_timed_out", "Runs stopped by their timeout",
                                      ["task"], namespace=ns, registry=r)
        self.runs_skipped = Counter("runs_skipped", "Runs skipped (overlap policy, dependency)",
                                    ["task"], namespace=ns, registry=r)
        self.runs_cancelled = Counter("runs_cancelled", "Runs or jobs cancelled", ["task"],
                                      namespace=ns, registry=r)
        self.retries_scheduled = Counter("retries_scheduled",
                                         "Failed or timed-out runs that will be retried",
                                         ["task"], namespace=ns, registry=r)
        self.fire_lateness = Histogram(
            "fire_lateness_seconds", "Delay between a job's due instant and its start",
            namespace=ns, registry=r, buckets=LATENESS_BUCKETS)
        self.run_duration = Histogram(
            "run_duration_seconds", "Duration of run attempts that started, by outcome",
            ["outcome"], namespace=ns, registry=r, buckets=DURATION_BUCKETS)
        self.misfires = Counter(
            "misfires", "Occurrences missed while the kernel was down, by misfire policy",
            ["task", "policy"], namespace=ns, registry=r)
        self.misfire_runs = Counter(
            "misfire_runs", "Missed occurrences that the misfire policy chose to run",
            ["task"], namespace=ns, registry=r)
        self.reloads = Counter("config_reloads", "Configuration reloads, by result (ok|error)",
                               ["result"], namespace=ns, registry=r)
        self.store_failures = Counter("store_failures", "Store errors, by error code",
                                      ["error_code"], namespace=ns, registry=r)
        self.store_commit = Histogram(
            "store_commit_seconds", "Latency of one store (group) commit",
            namespace=ns, registry=r, buckets=COMMIT_BUCKETS)
        self.label_overflow = Counter(
            "task_label_overflow", "Events counted under task=\"other\" (label cap reached)",
            namespace=ns, registry=r)
        self.start_time = Gauge("start_time_seconds",
                                "Wall instant the kernel started (Unix seconds)",
                                namespace=ns, registry=r)
        self.last_success = Gauge(
            "task_last_success_timestamp_seconds",
            "Wall instant the task's last successful run finished (Unix seconds)",
            ["task"], namespace=ns, registry=r)
        self._last_success: dict[str, float] = {}
        self.build_info = Info("build", "Version of the kernel and of Python",
                               namespace=ns, registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        self.process = ProcessCollector(registry=r)  # process_* (the standard names)
        self.loop_stalls = Counter(
            "loop_stalls", "Times the event loop was blocked beyond the stall threshold",
            namespace=ns, registry=r)
        self.loop_stall_seconds = Counter(
            "loop_stall_seconds", "Seconds the event loop was late, summed over the stalls",
            namespace=ns, registry=r)
        self.loop_last_stall = Gauge(
            "loop_last_stall_seconds", "How late the event loop was in its last stall",
            namespace=ns, registry=r)
        self.loop_last_stall_at = Gauge(
            "loop_last_stall_timestamp_seconds",
            "Wall instant the last loop stall was seen (Unix seconds)", namespace=ns, registry=r)

        # scrape-time gauges, filled from a Snapshot by render()
        self.queue_depth = Gauge("queue_depth", "Jobs waiting in the ready queue",
                                 namespace=ns, registry=r)
        self.queue_capacity = Gauge("queue_capacity", "Capacity of the ready queue",
                                    namespace=ns, registry=r)
        self.running_jobs = Gauge("running_jobs", "Jobs running now", namespace=ns, registry=r)
        self.max_concurrency = Gauge("max_concurrency", "Configured maximum concurrent runs",
                                     namespace=ns, registry=r)
        self.timers = Gauge("timers", "Timers armed in the timing wheel",
                            namespace=ns, registry=r)
        self.pending_jobs = Gauge("pending_jobs", "Jobs waiting for their due instant",
                                  namespace=ns, registry=r)
        self.tasks = Gauge("tasks", "Configured tasks", namespace=ns, registry=r)
        self.task_interval = Gauge(
            "task_interval_seconds",
            "Longest gap between a scheduled task's next occurrences (enabled, unpaused "
            "tasks with a schedule only)", ["task"], namespace=ns, registry=r)
        self._intervals: dict[tuple[str, str], float | None] = {}
        self._interval_labels: set[str] = set()
        self.run_progress = Gauge(
            "run_progress_ratio",
            "Done / total (0-1) that a running job reported (ctx.progress); only runs that "
            "reported a total, removed when the run ends", ["job_id", "action"],
            namespace=ns, registry=r)
        self._progress_labels: set[tuple[str, str]] = set()

        gpu = ["gpu"]
        self.gpu_reserved = Gauge("gpu_memory_reserved_bytes",
                                  "GPU memory reserved by admitted jobs", gpu,
                                  namespace=ns, registry=r)
        self.gpu_free = Gauge("gpu_memory_free_bytes", "GPU memory free (as NVML reports it)",
                              gpu, namespace=ns, registry=r)
        self.gpu_total = Gauge("gpu_memory_total_bytes", "GPU memory in total", gpu,
                               namespace=ns, registry=r)
        self.gpu_utilization = Gauge("gpu_utilization_ratio",
                                     "GPU utilisation (0-1) as NVML reports it", gpu,
                                     namespace=ns, registry=r)

    # ------------------------------------------------------------------ labels
    def task_label(self, task_id: str | None) -> str:
        """The ``task`` label for ``task_id``: ``""`` for ad-hoc jobs, capped cardinality."""
        if not task_id:
            return ""
        if task_id in self._tasks_seen:
            return task_id
        if len(self._tasks_seen) < self.max_task_labels:
            self._tasks_seen.add(task_id)
            return task_id
        self.label_overflow.inc()
        return OVERFLOW_TASK

    def _scrape_label(self, task_id: str) -> str | None:
        """The label of a configured task at scrape time; None past the cap (an aggregate
        ``other`` series has no interval). Counts nothing as overflow."""
        if task_id in self._tasks_seen:
            return task_id
        if len(self._tasks_seen) < self.max_task_labels:
            self._tasks_seen.add(task_id)
            return task_id
        return None

    # ------------------------------------------------------------------ events
    def __call__(self, event: Event) -> None:
        self.handle(event)

    def handle(self, event: Event) -> None:
        """Update counters and histograms from one event (synchronous and quick)."""
        if isinstance(event, RunStarted):
            task = self.task_label(event.task_id)
            self.runs_started.labels(task).inc()
            if event.recovered:
                self.runs_recovered.labels(task).inc()
            self.fire_lateness.observe(max(0.0, event.lateness))
        elif isinstance(event, RunFinished):
            self._finished(event)
        elif isinstance(event, JobSubmitted):
            self.jobs_submitted.labels(event.kind.value).inc()
        elif isinstance(event, MisfireDecided):
            rec = event.record
            task = self.task_label(rec.task_id)
            self.misfires.labels(task, rec.policy).inc(max(0, rec.missed))
            if rec.ran > 0:
                self.misfire_runs.labels(task).inc(rec.ran)
        elif isinstance(event, ConfigReloaded):
            self.reloads.labels("error" if event.error else "ok").inc()
        elif isinstance(event, StoreFailed):
            self.store_failures.labels(event.error_code).inc()
        elif isinstance(event, KernelStarted):
            self.start_time.set(event.at)
        elif isinstance(event, LoopStalled):
            lag = max(0.0, event.lag)
            self.loop_stalls.inc()
            self.loop_stall_seconds.inc(lag)
            self.loop_last_stall.set(lag)
            self.loop_last_stall_at.set(event.at)

    def _finished(self, event: RunFinished) -> None:
        run = event.run
        task = self.task_label(run.task_id)
        if isinstance(event, RunSucceeded):
            self.runs_succeeded.labels(task).inc()
            if task and task != OVERFLOW_TASK:
                at = run.finished_at
                if at > self._last_success.get(task, float("-inf")):
                    self._last_success[task] = at
                    self.last_success.labels(task).set(at)
        elif isinstance(event, RunFailed):
            self.runs_failed.labels(task, run.error_code or "").inc()
            if event.will_retry:
                self.retries_scheduled.labels(task).inc()
        elif isinstance(event, RunTimedOut):
            self.runs_timed_out.labels(task).inc()
            if event.will_retry:
                self.retries_scheduled.labels(task).inc()
        elif isinstance(event, RunSkipped):
            self.runs_skipped.labels(task).inc()
        elif isinstance(event, RunCancelled):
            self.runs_cancelled.labels(task).inc()
        if run.started_at is not None:  # jobs cancelled or skipped before starting took no time
            self.run_duration.labels(run.outcome.value).observe(max(0.0, event.duration))

    # ------------------------------------------------------------------ other sources
    def observe_commit(self, seconds: float) -> None:
        """Record the latency of one store commit (the store or its wrapper calls this)."""
        self.store_commit.observe(max(0.0, seconds))

    def set_gpu(self, index: int, reserved_mb: float, free_mb: float, total_mb: float) -> None:
        """Set GPU ``index``'s memory gauges; arguments in MiB, exported in bytes.

        ``render(snapshot)`` calls it for every card in ``snapshot.gpus``; call it directly
        only to export cards the snapshot does not carry."""
        label = str(index)
        self.gpu_reserved.labels(label).set(reserved_mb * MIB)
        self.gpu_free.labels(label).set(free_mb * MIB)
        self.gpu_total.labels(label).set(total_mb * MIB)

    # ------------------------------------------------------------------ scrape
    def update_snapshot(self, snapshot: SnapshotLike) -> None:
        """Fill the scrape-time gauges from a kernel snapshot."""
        self.queue_depth.set(snapshot.queued)
        self.queue_capacity.set(snapshot.queue_depth)
        self.running_jobs.set(len(snapshot.running))
        self.max_concurrency.set(snapshot.max_concurrency)
        self.timers.set(snapshot.timers)
        self.pending_jobs.set(snapshot.pending_jobs)
        self.tasks.set(len(snapshot.tasks))
        self._update_intervals(snapshot)
        self._update_progress(snapshot.running)
        for g in snapshot.gpus:
            self.set_gpu(g.index, g.reserved_mb, g.free_mb, g.total_mb)
            if g.utilization_pct is not None:
                self.gpu_utilization.labels(str(g.index)).set(g.utilization_pct / 100.0)

    def _update_intervals(self, snapshot: SnapshotLike) -> None:
        labels: set[str] = set()
        for t in snapshot.tasks:
            if t.schedule is None or t.paused or not t.enabled:
                continue
            key = (t.schedule, t.tz)
            if key in self._intervals:
                interval = self._intervals[key]
            else:
                if len(self._intervals) >= INTERVAL_CACHE_LIMIT:
                    self._intervals.clear()
                interval = self._intervals[key] = schedule_interval(*key, snapshot.at)
            label = self._scrape_label(t.id) if interval is not None else None
            if label is not None and interval is not None:
                self.task_interval.labels(label).set(interval)
                labels.add(label)
        for gone in self._interval_labels - labels:
            self.task_interval.remove(gone)
        self._interval_labels = labels

    def _update_progress(self, running: Sequence[RunningLike]) -> None:
        labels: set[tuple[str, str]] = set()
        for r in running:
            total = r.total
            if total is None:
                continue
            done = r.done or 0.0
            ratio = 1.0 if total <= 0 else max(0.0, min(1.0, done / total))
            key = (r.job_id, r.action)
            self.run_progress.labels(*key).set(ratio)
            labels.add(key)
        for gone in self._progress_labels - labels:
            self.run_progress.remove(*gone)
        self._progress_labels = labels

    def render(self, snapshot: SnapshotLike | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type (for ``GET /metrics``)."""
        if snapshot is not None:
            self.update_snapshot(snapshot)
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE
