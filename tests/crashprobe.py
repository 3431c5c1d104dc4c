"""The action used by the crash tests (imported by the kernel's *worker processes* via ``python``:
a worker gets the kernel's ``sys.path``, so the ``PYTHONPATH`` the test gives the kernel reaches
it).

Each run (given its context with ``pass_context``, else reading the ``KERNEL_*`` variables)
appends an ``S`` line when it starts and an ``E`` line when it ends::

    S <job id> <task id or -> <scheduled instant> <attempt> <tag or -> <pid>

Appends of one short line with ``O_APPEND`` are atomic, so a SIGKILL at any moment leaves whole
lines only. ``hold`` names a file: the run waits (bounded) until that file exists, so a test can
keep runs in flight for as long as it wants and release them by creating the file.
"""

from __future__ import annotations

import os
import time
from typing import Any

HOLD_LIMIT = 120.0
"""Seconds a held run waits for its release file before it fails (a test that forgot it)."""


def _line(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def record(out: str, work: float = 0.0, ctx: Any = None, tag: str = "",
           hold: str | None = None) -> str:
    if ctx is not None:
        job, task, sched, attempt = ctx.job_id, ctx.task_id, ctx.scheduled_at, ctx.attempt
    else:  # the run's KERNEL_* variables, which the kernel sets in the worker for each call
        env = os.environ
        job, task, attempt = env["KERNEL_JOB_ID"], env["KERNEL_TASK_ID"], env["KERNEL_ATTEMPT"]
        sched = float(env["KERNEL_SCHEDULED_AT"] or 0)
    key = f"{job} {task or '-'} {sched or 0:.3f} {attempt} {tag or '-'} {os.getpid()}"
    _line(out, f"S {key}")
    if hold is not None:
        end = time.monotonic() + HOLD_LIMIT
        while not os.path.exists(hold):  # a condition the test controls, polled with a bound
            if time.monotonic() > end:
                raise TimeoutError(f"crashprobe: {hold} was never created")
            time.sleep(0.01)
    if work:
        time.sleep(work)  # a run that takes a little while
    _line(out, f"E {key}")
    return "ok"
