"""Store failures seen from the kernel: submissions are refused (never acknowledged and lost),
the kernel keeps serving what it can, and a corrupt file stops start-up with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel.app import SubmitRequest
from kernel.errors import StoreFull
from kernel.events import StoreFailed

from .faults import FaultyStore
from .harness import make_harness


async def test_full_store_refuses_submissions_but_cron_tasks_keep_running() -> None:
    store = FaultyStore()
    h = make_harness("""
        [[tasks]]
        id = "alert"
        schedule = "@every 10s"
        action = "rec"
        """, store=store)
    await h.start()
    ok = await h.kernel.submit(SubmitRequest(action="rec", delay=30))
    store.full = True
    with pytest.raises(StoreFull):
        await h.kernel.submit(SubmitRequest(action="rec"))
    await h.advance(31)
    # the cron task still fired (from memory) and the job accepted before the fault ran
    assert [c.task_id for c in h.rec.calls].count("alert") == 3
    assert ok.job.id in {c.job_id for c in h.rec.calls}
    assert any(isinstance(e, StoreFailed) and e.error_code == "ERR_STORE_FULL" for e in h.events)
    store.full = False
    await h.kernel.submit(SubmitRequest(action="rec"))
    await h.idle()
    assert len(h.rec.calls) == 5
    await h.stop()


@pytest.mark.slow
def test_corrupt_database_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    db = tmp_path / "kernel.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    env = {**os.environ, "KERNEL_DATA_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "kernel", "--no-server"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "[ERR_STORE_CORRUPT]" in p.stderr and str(db) in p.stderr
    assert "what to do:" in p.stderr and "Traceback" not in p.stderr
    assert db.read_bytes() == b"this is not a database" * 100  # left untouched
