"""What the live TUI costs: ``run --tui`` beside the attached ``python -m kernel tui``.

Starts real kernel processes on a generated config (``--tasks`` ``log`` tasks ``@every 1s``
at debug level, about ``--tasks`` runs/s, plus a slow ``exec`` task that overlaps itself and
one that always fails), each in an 80x24 pseudo-terminal where the scenario needs a terminal,
and reads the CPU time of each process from ``/proc/<pid>/stat`` over a window after a warm-up.
The run rate comes from the kernel's ``GET /snapshot`` counters over the same window.

Scenarios (``--only``, comma separated):

* ``alone``    the kernel as a service: no terminal, logs (JSON) to a file
* ``inproc``   ``python -m kernel run --tui`` in an 80x24 pty
* ``attached`` the kernel as in ``alone``, plus ``python -m kernel tui`` in an 80x24 pty

At ``--log-level debug`` (the default, as in the issue) each run logs three lines: ``alone``
formats them as JSON into a file, ``inproc`` keeps them in the dashboard's log pane unformatted,
so compare ``alone`` and ``inproc`` at ``--log-level warning`` for the cost of the TUI alone.

``--pythonpath DIR`` runs another checkout of the kernel (a before/after comparison).
Linux only (``/proc``, ``pty``). One JSON line per scenario on stdout, then a table.

    .venv/bin/python scripts/bench_tui.py --tasks 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(folder: Path, d: Path, tasks: int, port: int, concurrency: int,
                 log_level: str = "debug") -> Path:
    lines = [
        "[kernel]", f'log_level = "{log_level}"', 'log_format = "json"', f'data_dir = "{d}"',
        "[server]", 'host = "127.0.0.1"', f"port = {port}",
        "[scheduler]", f"max_concurrency = {concurrency}", "queue_depth = 100000",
        "[[tasks]]", 'id = "slow"', 'schedule = "@every 2s"', 'action = "exec"',
        'payload = { argv = ["sleep", "3"] }', 'timeout = "10s"',
        "[[tasks]]", 'id = "broken"', 'schedule = "@every 5s"', 'action = "exec"',
        'payload = { argv = ["false"] }',
    ]
    for i in range(tasks):
        lines += ["[[tasks]]", f'id = "t{i:04d}"', 'schedule = "@every 1s"', 'action = "log"',
                  f'payload = {{ message = "tick {i}", level = "debug" }}']
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def counters(port: int, token: str | None) -> dict[str, int]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/snapshot")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=60) as resp:  # a starved kernel answers late
        doc = json.loads(resp.read())
    c: dict[str, int] = doc["snapshot"]["counters"]
    return c


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    master: int | None = None
    written: list[int] = field(default_factory=lambda: [0])  # bytes drawn to the terminal

    def drain(self) -> None:
        assert self.master is not None
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.written[0] += len(data)


@contextlib.contextmanager
def started(name: str, argv: list[str], env: dict[str, str], *, terminal: bool,
            log: Path) -> Iterator[Proc]:
    """Start ``argv`` in ``log``'s folder (so ``python -m kernel`` imports the checkout on
    PYTHONPATH, not the one in the working directory)."""
    if terminal:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        popen = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                 cwd=log.parent, start_new_session=True)
        os.close(slave)
        proc = Proc(name, popen, master)
        threading.Thread(target=proc.drain, daemon=True).start()
    else:
        with log.open("wb") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     env=env, cwd=log.parent, start_new_session=True)
        proc = Proc(name, popen)
    try:
        yield proc
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        if proc.master is not None:
            with contextlib.suppress(OSError):
                os.close(proc.master)


def wait_for_api(port: int, kernel: Proc, data_dir: Path, limit: float = 60.0) -> str | None:
    """Wait until ``GET /snapshot`` answers; returns the API token (a file in the data dir
    when the kernel made one)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if kernel.popen.poll() is not None:
            raise SystemExit(f"the kernel exited with {kernel.popen.returncode}")
        token_file = data_dir / "api.token"
        token = token_file.read_text().strip() if token_file.exists() else None
        with contextlib.suppress(OSError, ValueError):
            counters(port, token)
            return token
        time.sleep(0.2)
    raise SystemExit("the kernel's API did not answer")


def scenario(name: str, a: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-tui-") as tmp:
        d = Path(tmp) / "data"   # apart from the config: the config watcher watches its folder
        d.mkdir()
        port = free_port()
        cfg = write_config(Path(tmp), d, a.tasks, port, a.concurrency, a.log_level)
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env.update(TERM="xterm-256color", PYTHONPATH=a.pythonpath or str(ROOT),
                   KERNEL_DATA_DIR=str(d))
        run = [sys.executable, "-m", "kernel", "run", "--config", str(cfg)]
        with contextlib.ExitStack() as stack:
            kernel = stack.enter_context(started(
                "kernel", [*run, "--tui"] if name == "inproc" else run, env,
                terminal=name == "inproc", log=d / "kernel.log"))
            procs = [kernel]
            token = wait_for_api(port, kernel, d)
            if token:
                env["KERNEL_API_TOKEN"] = token
            if name == "attached":
                procs.append(stack.enter_context(started(
                    "tui", [sys.executable, "-m", "kernel", "tui", "--url",
                            f"http://127.0.0.1:{port}"], env, terminal=True,
                    log=d / "tui.log")))
            time.sleep(a.warmup)
            c0, cpu0 = counters(port, token), [cpu_seconds(p.popen.pid) for p in procs]
            w0, t0 = [p.written[0] for p in procs], time.monotonic()
            time.sleep(a.seconds)
            c1, cpu1 = counters(port, token), [cpu_seconds(p.popen.pid) for p in procs]
            w1, t1 = [p.written[0] for p in procs], time.monotonic()
        wall = t1 - t0
        done = sum(c1[k] - c0[k] for k in ("succeeded", "failed", "timed_out"))
        out: dict[str, object] = {
            "scenario": name, "tasks": a.tasks, "log_level": a.log_level,
            "window_s": round(wall, 2),
            "runs_per_s": round(done / wall, 1),
            "skipped_per_s": round((c1["skipped"] - c0["skipped"]) / wall, 1),
            "loadavg_1m": os.getloadavg()[0],
        }
        for p, x0, x1, b0, b1 in zip(procs, cpu0, cpu1, w0, w1, strict=True):
            out[f"{p.name}_cpu_pct"] = round(100 * (x1 - x0) / wall, 1)
            if p.master is not None:
                out[f"{p.name}_terminal_kib_per_s"] = round((b1 - b0) / 1024 / wall, 1)
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=1000, help="log tasks @every 1s (runs/s)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds before the window")
    p.add_argument("--concurrency", type=int, default=64, help="[scheduler] max_concurrency")
    p.add_argument("--only", default="alone,inproc,attached", help="scenarios, comma separated")
    p.add_argument("--pythonpath", default=None, help="run the kernel from this checkout")
    p.add_argument("--log-level", default="debug",
                   help="[kernel] log_level (debug: three log lines per run)")
    a = p.parse_args(argv)
    rows = []
    for name in a.only.split(","):
        row = scenario(name.strip(), a)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'scenario':<10} {'runs/s':>7} {'skip/s':>7} {'kernel %':>9} {'tui %':>6}")
    for r in rows:
        print(f"{r['scenario']!s:<10} {r['runs_per_s']!s:>7} {r['skipped_per_s']!s:>7} "
              f"{r['kernel_cpu_pct']!s:>9} {r.get('tui_cpu_pct', '-')!s:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
