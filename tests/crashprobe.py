"""The action used by the crash test (imported by the kernel *subprocess* via ``python``).

Each run appends ``S``/``E`` lines (start, end) with its job id, task, scheduled instant and
attempt to the file named by ``out``. Appends of one short line with O_APPEND are atomic, so a
SIGKILL at any moment leaves whole lines only.
"""

from __future__ import annotations

import os
import time
from typing import Any


def _line(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def record(out: str, work: float = 0.0, ctx: Any = None) -> str:
    key = f"{ctx.job_id} {ctx.task_id or '-'} {ctx.scheduled_at or 0:.3f} {ctx.attempt}"
    _line(out, f"S {key}")
    if work:
        time.sleep(work)  # a run that takes a little while, so some are in flight at the kill
    _line(out, f"E {key}")
    return "ok"
