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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kernel import config as config_mod
from kernel.api.server import api_service
from kernel.app import KernelParts
from kernel.metrics import KernelMetrics

from .harness import make_harness

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
    for _ in range(1000):  # the API binds its socket in the background
        if h.kernel.api_url is not None:
            break
        await asyncio.sleep(0.01)
    assert h.kernel.api_url is not None, "the API did not start"
    target = h.kernel.api_url.removeprefix("http://")

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
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        prometheus_bin, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
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
        async with _running(proc):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
                async with asyncio.timeout(30):
                    while True:
                        assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()
                        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                            for expr in want.keys() - got.keys():
                                result = await _query(s, base, expr)
                                if result:
                                    got[expr] = float(result[0]["value"][1])
                            async with s.get(f"{base}/api/v1/rules") as resp:
                                groups = (await resp.json())["data"]["groups"]
                            rules = [r for g in groups for r in g["rules"]]
                        if (got.keys() == want.keys()
                                and rules and all(r["health"] == "ok" for r in rules)):
                            break
                        await asyncio.sleep(0.05)
    finally:
        log.close()
        h.rec.release.set()
        await h.stop()
    assert got == want
    names = {r["name"] for r in rules}
    assert {"KernelDown", "KernelHighFailureRate", "KernelQueueNearlyFull"} <= names
    assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules


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
    assert u["Type"] == ["exec"]
    start = u["ExecStart"][0]
    assert re.search(r"/\.venv/bin/python -m kernel run --config "
                     r"/etc/open-autoglm-kernel/config\.toml", start)
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
