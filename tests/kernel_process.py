"""A real kernel process for CLI and service tests: start it, read its output until a line says
what the test waits for, stop it with a signal and collect the rest."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Mapping


def run_until(args: list[str], env: Mapping[str, str], until: Callable[[str], bool], *,
              stop: signal.Signals = signal.SIGINT, timeout: float = 30) -> tuple[int, str]:
    """Run ``python -m kernel ARGS`` until a line of its output satisfies ``until`` (or it
    exits), then send ``stop``; returns the exit status and everything it printed."""
    p = subprocess.Popen([sys.executable, "-m", "kernel", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(env))
    lines: list[str] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            if until(line):
                break
        if p.poll() is None:
            p.send_signal(stop)
        rest, _ = p.communicate(timeout=timeout)
        lines.append(rest)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, "".join(lines)
