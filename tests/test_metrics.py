"""KernelMetrics: typed events and a snapshot in, Prometheus exposition text out."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import msgspec
import prometheus_client
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kernel.app import Counters, GpuView, RunningView, Snapshot, SubmitRequest, TaskView
from kernel.events import (
    ConfigReloaded,
    EventBus,
    JobSubmitted,
    KernelStarted,
    LoopStalled,
    MisfireDecided,
    RunCancelled,
    RunFailed,
    RunSkipped,
    RunStarted,
    RunSucceeded,
    RunTimedOut,
    StoreFailed,
)
from kernel.metrics import CONTENT_TYPE, LATENESS_BUCKETS, KernelMetrics
from kernel.records import JobKind, MisfireRecord, Outcome, RunRecord

from .harness import make_harness

T0 = 1_767_225_600.0
ROOT = Path(__file__).resolve().parent.parent
P = "autoglm_kernel_"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(m: KernelMetrics, snapshot: Snapshot | None = None) -> Samples:
    body, ctype = m.render(snapshot)
    assert ctype == CONTENT_TYPE
    assert ctype.startswith("text/plain")
    out: Samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((P + name, frozenset(labels.items())))


def run(outcome: Outcome, *, task: str | None = "t1", code: str | None = None,
        started: float | None = T0, job: str = "j1") -> RunRecord:
    return RunRecord(job_id=job, task_id=task, action="log", trace_id="ab" * 16,
                     span_id="cd" * 8, scheduled_at=T0, started_at=started,
                     finished_at=T0 + 2, attempt=1, outcome=outcome, error_code=code)


def started(task: str | None, lateness: float, *, recovered: bool = False) -> RunStarted:
    return RunStarted(at=T0, job_id="j", task_id=task, action="log", trace_id="ab" * 16,
                      span_id="cd" * 8, attempt=1, scheduled_at=T0, lateness=lateness,
                      recovered=recovered)


def snapshot(*, queued: int = 3, running: int = 2, timers: int = 7, pending: int = 5,
             tasks: int = 4) -> Snapshot:
    tv = tuple(TaskView(id=f"t{i}", action="log", schedule="@every 5s", tz="UTC", enabled=True,
                        paused=False, next_due=T0 + 5, last_outcome=None, last_error_code=None,
                        last_finished_at=None, after=(), running=0) for i in range(tasks))
    rv = tuple(RunningView(job_id=f"j{i}", task_id=None, action="log", trace_id="ab" * 16,
                           attempt=1, elapsed=1.0, timeout=None) for i in range(running))
    return Snapshot(at=T0, tasks=tv, running=rv, queued=queued, timers=timers,
                    pending_jobs=pending, counters=Counters(), max_concurrency=8,
                    queue_depth=1024)


def test_run_events_become_counters_with_task_and_error_code_labels() -> None:
    m = KernelMetrics()
    for ev in [
        JobSubmitted(at=T0, job_id="a", task_id=None, action="log", kind=JobKind.SUBMIT,
                     due_at=T0, trace_id="x"),
        JobSubmitted(at=T0, job_id="b", task_id=None, action="log", kind=JobKind.SUBMIT,
                     due_at=T0, trace_id="x"),
        JobSubmitted(at=T0, job_id="c", task_id="t1", action="log", kind=JobKind.CRON,
                     due_at=T0, trace_id="x"),
        started("t1", 0.002),
        started("t1", 0.3, recovered=True),
        started(None, 0.0),
        RunSucceeded(at=T0, run=run(Outcome.SUCCEEDED), duration=1.5),
        RunFailed(at=T0, run=run(Outcome.FAILED, code="ERR_EXEC_FAILED"), duration=0.2,
                  will_retry=True, retry_at=T0 + 10),
        RunFailed(at=T0, run=run(Outcome.FAILED, task=None, code="ERR_CONN_TIMEOUT"),
                  duration=0.1),
        RunTimedOut(at=T0, run=run(Outcome.TIMED_OUT, code="ERR_TIMEOUT"), duration=30.0),
        # skipped and cancelled before they started: counted, but not a duration
        RunSkipped(at=T0, run=run(Outcome.SKIPPED, code="ERR_SKIPPED_OVERLAP", started=None),
                   duration=0.0),
        RunCancelled(at=T0, run=run(Outcome.CANCELLED, task=None, started=None), duration=0.0),
    ]:
        m(ev)
    s = scrape(m)
    assert val(s, "jobs_submitted_total", kind="submit") == 2
    assert val(s, "jobs_submitted_total", kind="cron") == 1
    assert val(s, "runs_started_total", task="t1") == 2
    assert val(s, "runs_started_total", task="") == 1
    assert val(s, "runs_recovered_total", task="t1") == 1
    assert val(s, "runs_succeeded_total", task="t1") == 1
    assert val(s, "runs_failed_total", task="t1", error_code="ERR_EXEC_FAILED") == 1
    assert val(s, "runs_failed_total", task="", error_code="ERR_CONN_TIMEOUT") == 1
    assert val(s, "retries_scheduled_total", task="t1") == 1
    assert val(s, "runs_timed_out_total", task="t1") == 1
    assert val(s, "runs_skipped_total", task="t1") == 1
    assert val(s, "runs_cancelled_total", task="") == 1
    # lateness: 0, 2 ms, 300 ms
    assert val(s, "fire_lateness_seconds_count") == 3
    assert val(s, "fire_lateness_seconds_bucket", le="0.001") == 1
    assert val(s, "fire_lateness_seconds_bucket", le="0.0025") == 2
    assert val(s, "fire_lateness_seconds_bucket", le="0.25") == 2
    assert val(s, "fire_lateness_seconds_bucket", le="0.5") == 3
    assert val(s, "fire_lateness_seconds_sum") == pytest.approx(0.302)
    # durations only for runs that started
    assert val(s, "run_duration_seconds_count", outcome="succeeded") == 1
    assert val(s, "run_duration_seconds_count", outcome="failed") == 2
    assert val(s, "run_duration_seconds_sum", outcome="timed_out") == 30.0
    assert val(s, "run_duration_seconds_count", outcome="skipped") is None
    assert val(s, "run_duration_seconds_count", outcome="cancelled") is None


def test_lateness_buckets_span_one_millisecond_to_a_minute() -> None:
    assert LATENESS_BUCKETS[0] == 0.001
    assert LATENESS_BUCKETS[-1] == 60.0
    assert list(LATENESS_BUCKETS) == sorted(LATENESS_BUCKETS)


def test_misfires_reloads_store_failures_and_start_time() -> None:
    m = KernelMetrics()
    m(MisfireDecided(at=T0, record=MisfireRecord(
        task_id="nightly", decided_at=T0, policy="run_once", missed=4, first_missed=T0 - 400,
        last_missed=T0 - 100, ran=1)))
    m(ConfigReloaded(at=T0, source="SIGHUP", added=["a"], removed=[], changed=[]))
    m(ConfigReloaded(at=T0, source="SIGHUP", added=[], removed=[], changed=[], error="bad"))
    m(ConfigReloaded(at=T0, source="api", added=[], removed=["a"], changed=[]))
    m(StoreFailed(at=T0, error_code="ERR_STORE_FULL", message="disk full"))
    m(KernelStarted(at=T0, data_dir="/tmp", store="memory", api_url=None, tasks=1,
                    recovered_jobs=0))
    s = scrape(m)
    assert val(s, "misfires_total", task="nightly", policy="run_once") == 4
    assert val(s, "misfire_runs_total", task="nightly") == 1
    assert val(s, "config_reloads_total", result="ok") == 2
    assert val(s, "config_reloads_total", result="error") == 1
    assert val(s, "store_failures_total", error_code="ERR_STORE_FULL") == 1
    assert val(s, "start_time_seconds") == T0


def test_snapshot_gauges_are_read_at_scrape_time() -> None:
    m = KernelMetrics()
    s = scrape(m, snapshot())
    assert val(s, "queue_depth") == 3
    assert val(s, "queue_capacity") == 1024
    assert val(s, "running_jobs") == 2
    assert val(s, "max_concurrency") == 8
    assert val(s, "timers") == 7
    assert val(s, "pending_jobs") == 5
    assert val(s, "tasks") == 4
    s = scrape(m, snapshot(queued=0, running=0))
    assert val(s, "queue_depth") == 0
    assert val(s, "running_jobs") == 0


def test_gpu_gauges_in_bytes_and_store_commit_latency() -> None:
    m = KernelMetrics()
    m.set_gpu(0, reserved_mb=1024, free_mb=2048.5, total_mb=81920)
    m.set_gpu(1, reserved_mb=0, free_mb=100, total_mb=100)
    m.observe_commit(0.0004)
    m.observe_commit(0.02)
    s = scrape(m)
    mib = 1024 * 1024
    assert val(s, "gpu_memory_reserved_bytes", gpu="0") == 1024 * mib
    assert val(s, "gpu_memory_free_bytes", gpu="0") == 2048.5 * mib
    assert val(s, "gpu_memory_total_bytes", gpu="0") == 81920 * mib
    assert val(s, "gpu_memory_free_bytes", gpu="1") == 100 * mib
    assert val(s, "store_commit_seconds_count") == 2
    assert val(s, "store_commit_seconds_bucket", le="0.0005") == 1
    assert val(s, "store_commit_seconds_bucket", le="0.025") == 2


def test_gpu_gauges_come_from_the_snapshot() -> None:
    m = KernelMetrics()
    snap = dataclasses.replace(snapshot(), gpus=(
        GpuView(index=0, name="H100", total_mb=81920, free_mb=60000, reserved_mb=20000,
                utilization_pct=40),
        GpuView(index=1, name="H100", total_mb=81920, free_mb=81920, reserved_mb=0,
                utilization_pct=None)))
    s = scrape(m, snap)
    mib = 1024 * 1024
    assert val(s, "gpu_memory_reserved_bytes", gpu="0") == 20000 * mib
    assert val(s, "gpu_memory_free_bytes", gpu="0") == 60000 * mib
    assert val(s, "gpu_memory_total_bytes", gpu="1") == 81920 * mib
    assert val(s, "gpu_utilization_ratio", gpu="0") == pytest.approx(0.4)
    assert val(s, "gpu_utilization_ratio", gpu="1") is None


def test_task_label_cardinality_is_capped() -> None:
    m = KernelMetrics(max_task_labels=2)
    for task in ["a", "b", "c", "d", "a", None]:
        m(started(task, 0.0))
    s = scrape(m)
    assert val(s, "runs_started_total", task="a") == 2
    assert val(s, "runs_started_total", task="b") == 1
    assert val(s, "runs_started_total", task="c") is None
    assert val(s, "runs_started_total", task="other") == 2
    assert val(s, "runs_started_total", task="") == 1  # ad-hoc jobs never use up the cap
    assert val(s, "task_label_overflow_total") == 2
    with pytest.raises(ValueError, match="max_task_labels"):
        KernelMetrics(max_task_labels=0)


def test_each_instance_has_its_own_registry() -> None:
    a, b = KernelMetrics(), KernelMetrics()  # no "Duplicated timeseries" error
    a(started("t", 0.0))
    assert val(scrape(a), "runs_started_total", task="t") == 1
    assert val(scrape(b), "runs_started_total", task="t") is None
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert P not in global_text


async def test_subscribed_to_a_real_kernel_counts_its_runs() -> None:
    h = make_harness("""
        [[tasks]]
        id = "tick"
        schedule = "@every 5s"
        action = "rec"
        [[tasks]]
        id = "broken"
        schedule = "@every 10s"
        action = "rec"
        payload = { mode = "fail", code = "ERR_EXEC_FAILED" }
        """)
    m = KernelMetrics()
    h.kernel.bus.subscribe(m)
    await h.start()
    await h.advance(21)
    await h.kernel.submit(SubmitRequest(action="rec", delay=100))
    s = scrape(m, h.kernel.snapshot())
    assert val(s, "runs_succeeded_total", task="tick") == 4
    assert val(s, "runs_failed_total", task="broken", error_code="ERR_EXEC_FAILED") == 2
    assert val(s, "runs_started_total", task="tick") == 4
    assert val(s, "jobs_submitted_total", kind="submit") == 1
    assert val(s, "fire_lateness_seconds_count") == 6
    assert val(s, "tasks") == 2
    assert val(s, "pending_jobs") == 1
    assert val(s, "running_jobs") == 0
    assert (val(s, "start_time_seconds") or 0) > 0
    await h.stop()


def _exported_names() -> set[str]:
    m = KernelMetrics()
    m.set_gpu(0, 1, 1, 1)
    return {fam.name for fam in m.registry.collect()}


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression, with ``{__name__=~"a_(b|c)_total"}`` expanded."""
    out: set[str] = set()
    for prefix, alts, suffix in re.findall(r'__name__=~"([a-z_]+)\(([a-z_|]+)\)([a-z_]*)"', expr):
        out |= {prefix + alt + suffix for alt in alts.split("|")}
    plain = re.sub(r'__name__=~"[^"]*"', "", expr)
    out |= set(re.findall(r"\bautoglm_kernel_[a-z_]+", plain))
    return out


def test_alert_rules_only_use_metrics_that_exist() -> None:
    rules = yaml.safe_load((ROOT / "scripts/prometheus/alert_rules.yml").read_text())
    names = _exported_names()
    used: set[str] = set()
    alerts = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            alerts.append(rule["alert"])
            assert {"expr", "labels", "annotations"} <= rule.keys(), rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            used |= _metric_names(rule["expr"])
    for metric in used:
        base = re.sub(r"_(total|bucket|sum|count)$", "", metric)
        assert base in names, f"alert rules use {metric}, which KernelMetrics does not export"
    assert {"KernelDown", "KernelHighFailureRate", "KernelRunTimeouts",
            "KernelQueueNearlyFull", "KernelMisfires"} <= set(alerts)


def test_prometheus_example_scrapes_the_default_api_address() -> None:
    cfg = yaml.safe_load((ROOT / "scripts/prometheus/prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8765"]
    assert job["metrics_path"] == "/metrics"
    assert cfg["rule_files"] == ["alert_rules.yml"]
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "localhost:9093"]


# ============================================================================ dead-man's switch
def task_view(tid: str, schedule: str | None, *, tz: str = "UTC", enabled: bool = True,
              paused: bool = False) -> TaskView:
    return TaskView(id=tid, action="log", schedule=schedule, tz=tz, enabled=enabled,
                    paused=paused, next_due=None, last_outcome=None, last_error_code=None,
                    last_finished_at=None, after=(), running=0)


def test_last_success_timestamp_per_task_comes_from_succeeded_runs() -> None:
    m = KernelMetrics(max_task_labels=2)
    m(RunSucceeded(at=T0, run=run(Outcome.SUCCEEDED, task="a"), duration=1.0))
    ok_later = msgspec.structs.replace(run(Outcome.SUCCEEDED, task="a"), finished_at=T0 + 60)
    m(RunSucceeded(at=T0 + 60, run=ok_later, duration=1.0))
    # a failure, a timeout or a skip is not a success: the timestamp stays
    m(RunFailed(at=T0 + 90, run=run(Outcome.FAILED, task="a", code="ERR_EXEC_FAILED"),
                duration=0.1))
    m(RunTimedOut(at=T0 + 90, run=run(Outcome.TIMED_OUT, task="b", code="ERR_TIMEOUT"),
                  duration=0.1))
    m(RunSucceeded(at=T0, run=run(Outcome.SUCCEEDED, task=None), duration=1.0))  # ad hoc
    s = scrape(m)
    assert val(s, "task_last_success_timestamp_seconds", task="a") == T0 + 60
    assert val(s, "task_last_success_timestamp_seconds", task="b") is None
    assert val(s, "task_last_success_timestamp_seconds", task="") is None
    # an older success reported late never moves the timestamp back
    m(RunSucceeded(at=T0 + 99, run=run(Outcome.SUCCEEDED, task="a"), duration=1.0))
    assert val(scrape(m), "task_last_success_timestamp_seconds", task="a") == T0 + 60


def test_interval_gauge_for_each_task_that_runs_on_a_schedule() -> None:
    m = KernelMetrics()
    tasks = (
        task_view("every", "@every 90s"),
        task_view("nightly", "30 2 * * *", tz="Europe/Berlin"),
        task_view("weekdays", "0 9 * * 1-5"),   # Friday to Monday: 72 h is its longest gap
        task_view("hourly", "@hourly"),
        task_view("after", None),               # runs after another task: no interval
        task_view("paused", "@every 5s", paused=True),
        task_view("off", "@every 5s", enabled=False),
    )
    snap = dataclasses.replace(snapshot(), tasks=tasks)
    s = scrape(m, snap)
    assert val(s, "task_interval_seconds", task="every") == 90
    assert val(s, "task_interval_seconds", task="nightly") == 86400
    assert val(s, "task_interval_seconds", task="weekdays") == 3 * 86400
    assert val(s, "task_interval_seconds", task="hourly") == 3600
    for quiet in ("after", "paused", "off"):  # nothing is expected of them: never alert
        assert val(s, "task_interval_seconds", task=quiet) is None
    # a task paused or removed later loses its series (a reload, the API's pause)
    snap = dataclasses.replace(snapshot(), tasks=(task_view("every", "@every 90s", paused=True),
                                                  task_view("hourly", "@hourly")))
    s = scrape(m, snap)
    assert val(s, "task_interval_seconds", task="every") is None
    assert val(s, "task_interval_seconds", task="nightly") is None
    assert val(s, "task_interval_seconds", task="hourly") == 3600


def test_no_created_series_but_build_info_and_process_metrics() -> None:
    import platform

    import kernel

    m = KernelMetrics()
    m(RunSucceeded(at=T0, run=run(Outcome.SUCCEEDED), duration=1.5))
    m(started("t1", 0.1))
    body = m.render(snapshot())[0].decode()
    assert "_created" not in body
    s = scrape(m)
    assert val(s, "build_info", version=kernel.__version__,
               python=platform.python_version()) == 1
    if Path("/proc/self/stat").exists():   # the process collector reads /proc (Linux)
        assert (s.get(("process_resident_memory_bytes", frozenset())) or 0) > 0
        assert ("process_cpu_seconds_total", frozenset()) in s
        assert ("process_start_time_seconds", frozenset()) in s
    # still nothing on the process-global registry, and other registries keep _created
    other = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("other_things", "x", registry=other).inc()
    assert "other_things_created" in prometheus_client.generate_latest(other).decode()


# ============================================================================ progress, stalls
def progress_view(job: str, done: float | None, total: float | None,
                  action: str = "inference.batch") -> RunningView:
    return RunningView(job_id=job, task_id="t", action=action, trace_id="ab" * 16, attempt=1,
                       elapsed=1.0, timeout=None, done=done, total=total,
                       note="" if done is None else "requests")


def test_progress_ratio_of_running_jobs_that_reported_a_total() -> None:
    m = KernelMetrics()
    running = (progress_view("j0", 3, 4), progress_view("j1", 5, None),
               progress_view("j2", None, None, action="log"),
               progress_view("j3", 30, 20, action="preprocess.prepare"),  # over-reported
               progress_view("j4", 0, 0))                                  # nothing to do
    s = scrape(m, dataclasses.replace(snapshot(), running=running))
    assert val(s, "run_progress_ratio", job_id="j0", action="inference.batch") == 0.75
    assert val(s, "run_progress_ratio", job_id="j3", action="preprocess.prepare") == 1.0
    assert val(s, "run_progress_ratio", job_id="j4", action="inference.batch") == 1.0
    series = {k for k in s if k[0] == P + "run_progress_ratio"}
    assert len(series) == 3  # no total (j1) or no report (j2): no series
    # a run that ended loses its series; one that learnt its total gets one
    running = (progress_view("j1", 6, 12), progress_view("j3", 20, 20, "preprocess.prepare"))
    s = scrape(m, dataclasses.replace(snapshot(), running=running))
    assert {dict(k[1])["job_id"]: v for k, v in s.items()
            if k[0] == P + "run_progress_ratio"} == {"j1": 0.5, "j3": 1.0}
    s = scrape(m, snapshot(running=0))
    assert not any(k[0] == P + "run_progress_ratio" for k in s)


def test_loop_stalls_are_counted_from_the_bus() -> None:
    m = KernelMetrics()
    bus = EventBus()
    bus.subscribe(m)
    s = scrape(m)
    assert val(s, "loop_stalls_total") == 0 and val(s, "loop_stall_seconds_total") == 0
    bus.publish(LoopStalled(at=T0, lag=1.5, job_ids=("j1",), task_ids=("t",)))
    bus.publish(LoopStalled(at=T0 + 30, lag=0.75))
    s = scrape(m)
    assert val(s, "loop_stalls_total") == 2
    assert val(s, "loop_stall_seconds_total") == 2.25
    assert val(s, "loop_last_stall_seconds") == 0.75
    assert val(s, "loop_last_stall_timestamp_seconds") == T0 + 30


async def test_progress_gauge_of_a_real_running_action() -> None:
    from .progress_plugin import progress_harness

    h, prog = progress_harness()
    m = KernelMetrics()
    h.kernel.bus.subscribe(m)
    await h.start()
    res = await h.kernel.submit(SubmitRequest(action="prog", payload={"done": 1, "total": 4}))
    await h.idle()
    job_id = res.job.id
    s = scrape(m, h.kernel.snapshot())
    assert val(s, "run_progress_ratio", job_id=job_id, action="prog") == 0.25
    prog.release.set()
    await h.idle()
    s = scrape(m, h.kernel.snapshot())
    assert not any(k[0] == P + "run_progress_ratio" for k in s)   # the run ended
    await h.stop()
