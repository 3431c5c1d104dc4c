"""A real Prometheus scrapes a real kernel's GET /metrics; and the deployment files check out.

Needs the ``prometheus`` binary: taken from PATH, else installed with ``apt-get install
prometheus`` when running as root on a Debian-like system, else the test is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from kernel import config as config_mod
from kernel.api.server import api_service
from kernel.app import KernelParts
from kernel.clock import FakeClock
from kernel.metrics import KernelMetrics

from .harness import Harness, make_harness

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "scripts/prometheus/alert_rules.yml"
UNIT = ROOT / "deploy/open-autoglm-kernel.service"
TOKEN = "prom-test-token-0123456789"
INSTALL_TIMEOUT = 240


def _apt_install(package: str) -> str:
    """Try ``apt-get install``; returns what went wrong ("" if it worked)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT, check=False)
        if done.returncode != 0:  # maybe the package lists are missing or stale
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                           timeout=INSTALL_TIMEOUT, check=False)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return "" if done.returncode == 0 else (done.stderr or done.stdout).strip()[-500:]


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no `prometheus` binary on PATH, and it cannot be installed here "
                    "(installing needs root and apt-get): apt-get install prometheus")
    problem = _apt_install("prometheus")
    found = shutil.which("prometheus")
    if not found:
        pytest.skip(f"`apt-get install prometheus` did not provide a prometheus binary: "
                    f"{problem or 'no binary on PATH afterwards'}")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _query(session: aiohttp.ClientSession, base: str, expr: str) -> list[Any]:
    async with session.get(f"{base}/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    result: list[Any] = body["data"]["result"]
    return result


@contextlib.asynccontextmanager
async def _running(proc: asyncio.subprocess.Process) -> AsyncIterator[None]:
    """Always kill the process at the end."""
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.kill()
        async with asyncio.timeout(10):
            await proc.wait()


async def _api_target(h: Harness) -> str:
    """host:port of the harness kernel's API, once it has bound its socket."""
    for _ in range(1000):  # the API binds its socket in the background
        if h.kernel.api_url is not None:
            break
        await asyncio.sleep(0.01)
    assert h.kernel.api_url is not None, "the API did not start"
    return h.kernel.api_url.removeprefix("http://")


@contextlib.asynccontextmanager
async def _prometheus(prometheus_bin: str, tmp_path: Path, target: str
                      ) -> AsyncIterator[tuple[str, aiohttp.ClientSession, Callable[[], None]]]:
    """A real Prometheus scraping ``target`` every second with the shipped rules; yields its
    base URL, a client session and a check that it is still running."""
    port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: open-autoglm-kernel
    metrics_path: /metrics
    authorization:
      type: Bearer
      credentials: {TOKEN}
    static_configs:
      - targets: ["{target}"]
""")
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            prometheus_bin, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)

        def alive() -> None:
            assert proc.returncode is None, log_path.read_text()

        async with _running(proc):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
                yield f"http://127.0.0.1:{port}", s, alive


async def _poll_until(alive: Callable[[], None], step: Callable[[], Awaitable[bool]],
                      limit: float = 30.0) -> None:
    """Call ``step`` until it returns True; Prometheus scrapes and evaluates every second."""
    async with asyncio.timeout(limit):
        while True:
            alive()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                if await step():
                    return
            await asyncio.sleep(0.05)


async def _collect(session: aiohttp.ClientSession, base: str, want: dict[str, float],
                   got: dict[str, float]) -> bool:
    """Query each expression of ``want`` not yet in ``got``; True once all have a value."""
    for expr in want.keys() - got.keys():
        result = await _query(session, base, expr)
        if result:
            got[expr] = float(result[0]["value"][1])
    return got.keys() == want.keys()


async def _rules(session: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with session.get(f"{base}/api/v1/rules") as resp:
        groups = (await resp.json())["data"]["groups"]
    return [r for g in groups for r in g["rules"]]


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_TIMEOUT * 2 + 90)
async def test_prometheus_scrapes_the_kernel_and_loads_the_alert_rules(
        prometheus_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a real kernel (fake clock, memory store) serving the real API with a bearer token
    monkeypatch.setenv("KERNEL_API_TOKEN", TOKEN)
    metrics = KernelMetrics()
    metrics.set_gpu(0, reserved_mb=1536, free_mb=2048, total_mb=4096)
    h = make_harness("""
        [server]
        host = "127.0.0.1"
        port = 0
        [[tasks]]
        id = "tick"
        schedule = "@every 5s"
        action = "rec"
        [[tasks]]
        id = "broken"
        schedule = "@every 10s"
        action = "rec"
        payload = { mode = "fail", code = "ERR_EXEC_FAILED" }
        """, parts=KernelParts(services=[functools.partial(
            api_service, metrics=metrics.render, require_token=True)]))
    h.kernel.bus.subscribe(metrics)
    await h.start()
    await h.advance(21)   # tick: 4 successes, broken: 2 failures
    want = {
        'up{job="open-autoglm-kernel"}': 1.0,
        'autoglm_kernel_runs_succeeded_total{task="tick"}': 4.0,
        'autoglm_kernel_runs_failed_total{task="broken",error_code="ERR_EXEC_FAILED"}': 2.0,
        "autoglm_kernel_tasks": 2.0,
        "autoglm_kernel_fire_lateness_seconds_count": 6.0,
        'autoglm_kernel_gpu_memory_reserved_bytes{gpu="0"}': 1536 * 1024 * 1024.0,
    }
    got: dict[str, float] = {}
    rules: list[dict[str, Any]] = []
    try:
        async with _prometheus(prometheus_bin, tmp_path, await _api_target(h)) as (base, s,
                                                                                   alive):
            async def step() -> bool:
                nonlocal rules
                complete = await _collect(s, base, want, got)
                rules = await _rules(s, base)
                return complete and bool(rules) and all(r["health"] == "ok" for r in rules)

            await _poll_until(alive, step)
    finally:
        h.rec.release.set()
        await h.stop()
    assert got == want
    names = {r["name"] for r in rules}
    assert {"KernelDown", "KernelHighFailureRate", "KernelQueueNearlyFull"} <= names
    assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_TIMEOUT * 2 + 90)
async def test_prometheus_alerts_on_a_task_that_never_succeeds(
        prometheus_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dead-man's switch end to end: the kernel's real gauges, the shipped rule, the real
    Prometheus. The fake clock's wall time ends at the real time, so the rule's ``time()``
    and the kernel's timestamps agree."""
    monkeypatch.setenv("KERNEL_API_TOKEN", TOKEN)
    history = 1200.0  # fake seconds the kernel has run before Prometheus looks
    metrics = KernelMetrics()
    h = make_harness("""
        [server]
        host = "127.0.0.1"
        port = 0
        [[tasks]]
        id = "tick"
        schedule = "@every 60s"
        action = "rec"
        [[tasks]]
        id = "broken"
        schedule = "@every 60s"
        action = "rec"
        payload = { mode = "fail", code = "ERR_EXEC_FAILED" }
        [[tasks]]
        id = "held"
        schedule = "@every 60s"
        action = "rec"
        payload = { mode = "fail", code = "ERR_EXEC_FAILED" }
        """, clock=FakeClock(wall=time.time() - history), parts=KernelParts(services=[
            functools.partial(api_service, metrics=metrics.render, require_token=True)]))
    h.kernel.bus.subscribe(metrics)
    await h.start()
    await h.kernel.pause("held")  # paused: nothing is expected of it
    await h.advance(history, step=10.0)
    want = {
        'autoglm_kernel_task_interval_seconds{task="tick"}': 60.0,
        'autoglm_kernel_task_interval_seconds{task="broken"}': 60.0,
        'count(autoglm_kernel_build_info{version!="",python!=""})': 1.0,
        'count(process_cpu_seconds_total{job="open-autoglm-kernel"})': 1.0,
        'count(autoglm_kernel_task_last_success_timestamp_seconds{task="tick"})': 1.0,
    }
    got: dict[str, float] = {}
    created: list[Any] = []
    alerts: list[dict[str, Any]] = []
    try:
        async with _prometheus(prometheus_bin, tmp_path, await _api_target(h)) as (base, s,
                                                                                   alive):
            async def step() -> bool:
                nonlocal created, alerts
                complete = await _collect(s, base, want, got)
                created = await _query(s, base, '{__name__=~".+_created"}')
                async with s.get(f"{base}/api/v1/alerts") as resp:
                    alerts = (await resp.json())["data"]["alerts"]
                return complete and any(
                    a["labels"]["alertname"] == "KernelTaskNotSucceeding" for a in alerts)

            await _poll_until(alive, step)
    finally:
        await h.stop()
    assert got == want
    assert created == []
    silent = {a["labels"]["task"] for a in alerts
              if a["labels"]["alertname"] == "KernelTaskNotSucceeding"}
    assert silent == {"broken"}, alerts   # not tick (succeeds), not held (paused)


@pytest.mark.slow
def test_promtool_accepts_the_shipped_config_and_rules(prometheus_bin: str) -> None:
    promtool = shutil.which("promtool") or str(Path(prometheus_bin).with_name("promtool"))
    if not Path(promtool).exists():
        pytest.skip("promtool is not installed next to prometheus")
    for args in (["check", "rules", str(RULES)],
                 ["check", "config", str(ROOT / "scripts/prometheus/prometheus.yml")]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0, done.stdout + done.stderr


# ============================================================================ dead-man's switch
@pytest.fixture(scope="session")
def promtool_bin(prometheus_bin: str) -> str:
    promtool = shutil.which("promtool") or str(Path(prometheus_bin).with_name("promtool"))
    if not Path(promtool).exists():
        pytest.skip("promtool is not installed next to prometheus")
    return promtool


def _series(name: str, task: str | None, values: str) -> dict[str, str]:
    labels = 'instance="k:1",job="open-autoglm-kernel"' + (f',task="{task}"' if task else "")
    return {"series": f"autoglm_kernel_{name}{{{labels}}}", "values": values}


def _not_succeeding(task: str, age: str, every: str) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "warning", "instance": "k:1", "job": "open-autoglm-kernel",
                       "task": task},
        "exp_annotations": {
            "summary": f"Task {task} has not succeeded for {age} on k:1",
            "description": (
                f"The task should run every {every} but has not succeeded for three of its "
                f"intervals: it fails (see KernelTaskFailingRepeatedly and GET /runs?task="
                f"{task}), is skipped, or no longer comes due. `python -m kernel explain "
                f"<ERR_CODE>` explains each error code."),
        },
    }


@pytest.mark.slow
def test_dead_mans_switch_rule_fires_for_tasks_that_stopped_succeeding(
        promtool_bin: str, tmp_path: Path) -> None:
    """promtool's rule unit tests: synthetic series, minute by minute, time() from 0."""
    series = [
        _series("start_time_seconds", None, "0x180"),   # the kernel started at 0
        # succeeds every minute, runs every 5 min: never fires
        _series("task_interval_seconds", "healthy", "300x180"),
        _series("task_last_success_timestamp_seconds", "healthy", "0+60x180"),
        # last success at 600 s, runs every 5 min: fires once 3 x 5 min have passed
        _series("task_interval_seconds", "stale", "300x180"),
        _series("task_last_success_timestamp_seconds", "stale", "600x180"),
        # no success since the kernel started: counted from the start
        _series("task_interval_seconds", "never", "300x180"),
        # every 5 s, last success always 5 min old (scrape lag, a slow run): the 10 min floor
        _series("task_interval_seconds", "fast", "5x180"),
        _series("task_last_success_timestamp_seconds", "fast", "-300+60x180"),
        # daily: an hour without a success is normal
        _series("task_interval_seconds", "daily", "86400x180"),
        # paused, disabled or manual tasks export no interval: never fires
        _series("task_last_success_timestamp_seconds", "paused", "0x180"),
    ]
    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "KernelTaskNotSucceeding", "exp_alerts": []},
                # never: 15 min > 3 x 5 min since 0, but only pending for its `for: 1m`
                {"eval_time": "16m", "alertname": "KernelTaskNotSucceeding", "exp_alerts": []},
                {"eval_time": "17m", "alertname": "KernelTaskNotSucceeding",
                 "exp_alerts": [_not_succeeding("never", "17m 0s", "5m 0s")]},
                {"eval_time": "60m", "alertname": "KernelTaskNotSucceeding",
                 "exp_alerts": [_not_succeeding("never", "1h 0m 0s", "5m 0s"),
                                _not_succeeding("stale", "50m 0s", "5m 0s")]},
            ],
        }],
    }
    test_file = tmp_path / "dead_mans_switch_test.yml"
    test_file.write_text(yaml.safe_dump(spec))
    done = subprocess.run([promtool_bin, "test", "rules", str(test_file)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ============================================================================ loop stalls
def _stall_alert(instance: str) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "warning", "instance": instance,
                       "job": "open-autoglm-kernel"},
        "exp_annotations": {
            "summary": f"The event loop of the kernel on {instance} keeps stalling "
                       "(more than 3 stalls in 10 min)",
            "description": (
                "Something blocked the kernel's event loop for longer than [kernel] "
                "loop_stall_warn more than 3 times in 10 minutes: timers fire late and the API "
                "answers slowly. Each stall is logged as a warning (\"the event loop stalled "
                "...\") naming the runs in flight; autoglm_kernel_loop_last_stall_seconds is "
                "the last one's lag. Run blocking code as a `python` action (a worker process) "
                "or in a thread, never directly in a coroutine."),
        },
    }


@pytest.mark.slow
def test_loop_stall_rule_fires_on_more_than_3_stalls_in_10_minutes(
        promtool_bin: str, tmp_path: Path) -> None:
    """A minute per sample; increase() extrapolates over the window, which the rule allows for
    (3 stalls never fire, 5 in a burst do, a restart's counter reset is not a stall)."""
    def stalls(instance: str, values: str) -> dict[str, str]:
        return {"series": f'autoglm_kernel_loop_stalls_total{{instance="{instance}",'
                          f'job="open-autoglm-kernel"}}', "values": values}

    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                stalls("steady:1", "0x40"),
                stalls("three:1", "0 0 1 1 2 2 3x34"),             # 3 within 10 min: no
                stalls("burst:1", "0x10 1 2 3 4 5 5x25"),          # 5 in 5 min: yes, then no
                stalls("restart:1", "50x5 0 1 1x33"),              # counter reset + 1 stall
            ],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "KernelLoopStalls", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "KernelLoopStalls",
                 "exp_alerts": [_stall_alert("burst:1")]},
                {"eval_time": "30m", "alertname": "KernelLoopStalls", "exp_alerts": []},
            ],
        }, {
            # 45 s scrapes, a counter already past 0: increase() reads 3 stalls as up to 3.35
            "interval": "45s",
            "input_series": [stalls("three:1", "7x5 8 9 10 10x30")],
            "alert_rule_test": [
                {"eval_time": t, "alertname": "KernelLoopStalls", "exp_alerts": []}
                for t in ("6m", "8m", "10m", "12m")],
        }],
    }
    test_file = tmp_path / "loop_stalls_test.yml"
    test_file.write_text(yaml.safe_dump(spec))
    done = subprocess.run([promtool_bin, "test", "rules", str(test_file)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ============================================================================ systemd unit
def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value)
    return values


def test_systemd_unit_runs_the_kernel_as_the_brief_says() -> None:
    u = _unit()
    assert u["Type"] == ["notify"]  # READY after arming, WATCHDOG while healthy (issue 13)
    start = u["ExecStart"][0]
    # the console command or python -m, and /etc's config: given, or found by discovery
    assert re.search(r"/\.venv/bin/(autoglm-kernel|python -m kernel) run\b", start), start
    config = "/etc/open-autoglm-kernel/config.toml"
    assert f"--config {config}" in start or f"KERNEL_CONFIG={config}" in u["Environment"]
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert u["KillSignal"] == ["SIGTERM"]
    assert u["Restart"] == ["on-failure"]
    assert u["User"] and u["User"][0] not in ("root", "")
    assert u["StateDirectory"] == ["open-autoglm-kernel"]
    assert "KERNEL_DATA_DIR=/var/lib/open-autoglm-kernel" in u["Environment"]
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert key in u, key
    # the stop timeout leaves room for the kernel's shutdown grace
    grace = config_mod.secs(config_mod.Config().kernel.shutdown_grace) or 0.0
    assert float(u["TimeoutStopSec"][0]) > grace + 10


def test_systemd_analyze_verify_finds_no_syntax_problem() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run([analyze, "verify", "--man=no", str(UNIT)], capture_output=True,
                          text=True, timeout=60, check=False)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if line.strip() and "is not executable" not in line  # /opt/... not here
                and "No such file or directory" not in line]
    assert not problems, problems
