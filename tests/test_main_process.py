"""What ``kernel.main.serve`` and ``python -m kernel run`` own as the process, tested on a real
kernel subprocess: exiting although a run ignores its cancellation, the garbage-collector
tuning once the timers are armed, and the loop-lag watcher with ``[kernel] loop_stall_warn``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kernel.gcpolicy import GC_GEN0_THRESHOLD

ROOT = Path(__file__).resolve().parent.parent


def poll(cond: Callable[[], bool], what: str, limit: float) -> float:
    """Wait for ``cond`` with a bound; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"timed out after {limit:g} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


@contextmanager
def kernel_process(tmp_path: Path, config: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``python -m kernel run`` on ``config`` (JSON logs to a file); killed if still alive."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(config)
    log = tmp_path / "kernel.log"
    env = {**os.environ, "KERNEL_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    with log.open("wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "kernel", "run", "--config", str(cfg),
                              "--no-server", "--log-format", "json"],
                             stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        yield p, log
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_run_exits_although_a_run_ignores_its_cancellation(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    grace = 1.0
    with kernel_process(tmp_path, f"""
[kernel]
shutdown_grace = "{grace:g}s"
[[tasks]]
id = "stubborn"
schedule = "@every 1s"
action = "python"
timeout = "1s"
[tasks.payload]
target = "tests.python_action_targets:ignore_cancellation"
in_process = true
args = ["{marker}"]
""") as (p, log):
        poll(lambda: marker.exists() or p.poll() is not None, "the run to start", 60)
        assert p.poll() is None, log.read_text()
        p.send_signal(signal.SIGTERM)
        # the shutdown grace, the runner's 5 s cancel grace, then a margin for a loaded machine
        took = poll(lambda: p.poll() is not None, "the kernel to exit", grace + 5 + 10)
    text = log.read_text()
    assert p.returncode == 0, text
    assert "exiting without waiting for them" in text, text  # kernel.cli names what it left
    assert took < grace + 5 + 10


@pytest.mark.slow
def test_serve_tunes_the_garbage_collector_once_the_kernel_has_started(tmp_path: Path) -> None:
    marker = tmp_path / "gc"
    with kernel_process(tmp_path, f"""
[[tasks]]
id = "gc"
schedule = "@every 1s"
action = "python"
[tasks.payload]
target = "tests.python_action_targets:gc_state"
in_process = true
args = ["{marker}"]
""") as (p, log):
        poll(lambda: marker.exists() or p.poll() is not None, "the gc probe to run", 60)
        assert p.poll() is None, log.read_text()
        p.send_signal(signal.SIGTERM)
        poll(lambda: p.poll() is not None, "the kernel to exit", 30)
    gen0, _gen1, _gen2, frozen = map(int, marker.read_text().split())
    assert gen0 == GC_GEN0_THRESHOLD
    assert frozen == 0  # one task armed: far below GC_FREEZE_MIN, nothing frozen
    assert p.returncode == 0, log.read_text()


@pytest.mark.slow
def test_a_stall_over_loop_stall_warn_is_logged(tmp_path: Path) -> None:
    marker = tmp_path / "blocking"
    with kernel_process(tmp_path, f"""
[kernel]
loop_stall_warn = "200ms"
[[tasks]]
id = "blocker"
after = ["kick"]
action = "python"
[tasks.payload]
target = "tests.python_action_targets:blocking_async"
in_process = true
args = ["{marker}", 0.6]
[[tasks]]
id = "kick"
schedule = "@every 1s"
action = "log"
payload = {{ message = "tick" }}
""") as (p, log):
        poll(lambda: "the event loop stalled" in log.read_text() or p.poll() is not None,
             "the stall warning", 60)
        assert p.poll() is None, log.read_text()
        p.send_signal(signal.SIGTERM)
        poll(lambda: p.poll() is not None, "the kernel to exit", 30)
    assert "blocker" in log.read_text()
