"""A real `python -m kernel run` subprocess for tests: start it, wait until it is healthy."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_kernel(cfg: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with log.open("ab") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "kernel", "run", "--config", str(cfg), "--port", str(port)],
            stdout=f, stderr=subprocess.STDOUT, env=env)


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], limit: float = 30.0) -> None:
    """Poll ``/healthz`` (no token needed) until 200, with a bound."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    async with aiohttp.ClientSession() as s:
        while loop.time() < end:
            assert proc.poll() is None, "the kernel exited during start-up"
            try:
                async with s.get(f"{url}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError("the kernel did not become healthy")
