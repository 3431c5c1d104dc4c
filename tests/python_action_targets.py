"""Targets of ``python`` actions used by the worker tests (imported by the worker processes).

Each writes what a test needs to observe (its pid, that it started) to a file named by the
test, so the test waits on a condition, never on a timed sleep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from kernel.errors import Retry

_KEEP: list[bytearray] = []


def _mark(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)  # the test never reads a half-written file


async def blocking_async(marker: str, seconds: float = 6.0) -> str:
    """The issue's case: an async target that blocks with time.sleep."""
    _mark(marker, str(os.getpid()))
    time.sleep(seconds)  # noqa: ASYNC251 - the point of the test
    _mark(marker + ".end", "finished")
    return "finished"


def swallow_signals(marker: str) -> None:
    """Ignores SIGTERM and SIGINT and never returns: only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _mark(marker, str(os.getpid()))
    while True:
        signal.pause()


def allocate(mb: int) -> int:
    return len(bytearray(mb * 1024 * 1024))


def keep(mb: int) -> int:
    """Allocates and keeps the memory (a leak): the worker's RSS stays high."""
    b = bytearray(mb * 1024 * 1024)
    b[::4096] = b"x" * len(b[::4096])  # touch every page
    _KEEP.append(b)
    return os.getpid()


def pid() -> int:
    return os.getpid()


async def loop_info() -> list[int]:
    return [os.getpid(), id(asyncio.get_running_loop())]


def returns_object() -> Any:
    return Path("/etc")  # not a plain value: crosses back as its repr


def raises(kind: str) -> None:
    if kind == "value":
        raise ValueError("bad value")
    if kind == "conn":
        raise ConnectionRefusedError("nobody listens")
    if kind == "custom":
        class Custom(Exception):
            pass
        raise Custom("custom failure")
    if kind == "retry":
        raise Retry(delay=7.5, message="not yet")
    if kind == "exit":
        raise SystemExit(4)
    if kind == "die":
        os._exit(3)


def with_context(ctx: Any = None) -> str:
    ctx.log.warning("hello from the worker")
    logging.getLogger("user.module").warning("a library logs too")
    return f"{ctx.job_id} {ctx.attempt} {os.getpid()}"


def env(name: str) -> str | None:
    return os.environ.get(name)


async def ignore_cancellation(marker: str) -> None:
    """Swallows every cancellation and never returns: the kernel can only abandon it."""
    _mark(marker, str(os.getpid()))
    while True:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            pass


def gc_state(marker: str) -> list[int]:
    """The collector's thresholds and frozen count as the process running the target sees them."""
    import gc

    state = [*gc.get_threshold(), gc.get_freeze_count()]
    _mark(marker, " ".join(map(str, state)))
    return state
