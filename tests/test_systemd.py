"""systemd integration against a real AF_UNIX datagram socket the test binds: the sd_notify
protocol (path and abstract addresses), the watchdog fed only on healthy ticks (fake clock), and
a real kernel process that says READY=1 once armed and listening, feeds WATCHDOG=1, reports
STATUS= counts and says STOPPING=1 on SIGTERM, with every log line JSON (no banner)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.clock import FakeClock, settle
from kernel.systemd import Notifier, feed, watchdog_seconds


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket at a short path (AF_UNIX paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sd") as d:
        path = os.path.join(d, "notify")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
        s.settimeout(20)
        try:
            yield s, path
        finally:
            s.close()


def _recv(s: socket.socket) -> list[str]:
    return s.recv(4096).decode().split("\n")


def test_notifier_sends_one_datagram_to_a_path(notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.send("READY=1", "STATUS=ready: running 0/64")
    assert _recv(s) == ["READY=1", "STATUS=ready: running 0/64"]
    n.close()


def test_notifier_abstract_namespace() -> None:
    name = f"autoglm-kernel-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(20)
        n = Notifier(f"@{name}")
        assert n.send("WATCHDOG=1")
        assert _recv(s) == ["WATCHDOG=1"]
        n.close()


def test_notifier_without_socket_or_with_a_dead_one_never_raises(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert not Notifier.from_env({}).enabled
    assert Notifier.from_env({}).send("READY=1") is False
    dead = Notifier(str(tmp_path / "gone"))
    assert dead.send("READY=1") is False and dead.send("WATCHDOG=1") is False
    assert dead.failed == 2
    dead.close()
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="newline"):
        Notifier(str(tmp_path / "x")).send("STATUS=a\nb")


def test_watchdog_seconds() -> None:
    assert watchdog_seconds({}) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, pid=42) == 2.0
    assert watchdog_seconds({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, pid=43) is None


async def test_watchdog_is_fed_only_on_healthy_ticks(
        notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    s.setblocking(False)
    clock = FakeClock()
    n = Notifier(path)
    count = iter(range(100))
    task = asyncio.ensure_future(feed(n, clock, watchdog=8.0, status=lambda: f"tick {next(count)}",
                                      ticks=4))
    await settle()

    def drain() -> list[list[str]]:
        out = []
        while True:
            try:
                out.append(s.recv(4096).decode().split("\n"))
            except BlockingIOError:
                return out

    await clock.advance(2.0)            # on time: fed
    assert drain() == [["WATCHDOG=1", "STATUS=tick 0"]]
    await clock.jump(5.0)               # the loop stalled 3 s past the 2 s tick: not fed
    assert drain() == [["STATUS=tick 1"]]
    await clock.advance(2.0)            # healthy again
    assert drain() == [["WATCHDOG=1", "STATUS=tick 2"]]
    await clock.advance(2.0)
    assert drain() == [["WATCHDOG=1", "STATUS=tick 3"]]
    await task
    n.close()


async def test_a_failing_status_is_not_fed_and_does_not_stop_the_loop(
        notify_socket: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture) -> None:
    s, path = notify_socket
    clock = FakeClock()
    n = Notifier(path)
    calls = iter([RuntimeError("snapshot broke"), "ok"])

    def status() -> str:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    task = asyncio.ensure_future(feed(n, clock, watchdog=4.0, status=status, ticks=2))
    await settle()
    await clock.advance(2.0)
    await task
    assert _recv(s) == ["WATCHDOG=1", "STATUS=ok"]  # only the second tick sent anything
    assert any("watchdog not fed" in r.message for r in caplog.records)
    n.close()


async def test_without_watchdog_only_status(notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    clock = FakeClock()
    n = Notifier(path)
    task = asyncio.ensure_future(feed(n, clock, watchdog=None, status=lambda: "ok", ticks=1))
    await settle()
    await clock.advance(5.0)
    await task
    assert _recv(s) == ["STATUS=ok"]
    n.close()


@pytest.mark.slow
def test_a_real_kernel_notifies_ready_watchdog_status_and_stopping(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    cfg = tmp_path / "config.toml"
    cfg.write_text("""
[scheduler]
max_concurrency = 4
[[tasks]]
id = "t1"
schedule = "@every 1h"
action = "log"
payload = { message = "hi" }
[[tasks]]
id = "t2"
schedule = "0 3 * * *"
action = "log"
payload = { message = "night" }
""")
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000",
           "KERNEL_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    env.pop("WATCHDOG_PID", None)
    env.pop("JOURNAL_STREAM", None)
    p = subprocess.Popen([sys.executable, "-m", "kernel", "run", "--config", str(cfg),
                          "--port", "0", "--log-format", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    messages: list[list[str]] = []
    try:
        first = _recv(s)
        messages.append(first)
        assert first[0] == "READY=1", first
        assert first[1] == "STATUS=ready: running 0/4, queued 0, timers 2, tasks 2", first
        deadline = time.monotonic() + 20
        while sum(m[0] == "WATCHDOG=1" for m in messages) < 2 and time.monotonic() < deadline:
            messages.append(_recv(s))
        fed = [m for m in messages if m[0] == "WATCHDOG=1"]
        assert len(fed) >= 2 and fed[0][1].startswith("STATUS=running 0/4"), messages
        p.terminate()  # SIGTERM, as systemctl stop
        while not any(m[0] == "STOPPING=1" for m in messages):
            messages.append(_recv(s))
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    stop = next(m for m in messages if m[0] == "STOPPING=1")
    assert stop[1] == "STATUS=stopping (SIGTERM)"
    # the JSON log stream holds only JSON: the banner became one structured record
    lines = err.splitlines()
    docs = [json.loads(line) for line in lines]
    assert any("data dir:" in d["msg"] and str(cfg) in d["msg"] for d in docs)
    assert any("ready" in d["msg"] and d["logger"] == "kernel.systemd" for d in docs)
    assert out == ""
