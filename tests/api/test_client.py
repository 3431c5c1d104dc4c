"""The CLI client (``python -m kernel submit|jobs|runs|tasks|...``) against a live API."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from kernel import cli

from .conftest import T0, Api, serve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: keep ids on one line
    monkeypatch.delenv("KERNEL_URL", raising=False)
    monkeypatch.delenv("KERNEL_API_TOKEN", raising=False)


async def kcli(api: Api | str, *argv: str) -> int:
    """Run ``python -m kernel ARGV --url URL`` in a thread (it runs its own event loop), with the
    kernel's token unless ARGV gives one (reading it from the data dir: test_security.py)."""
    url = api if isinstance(api, str) else api.url
    token = [] if isinstance(api, str) or api.token is None or "--token" in argv else [
        f"--token={api.token}"]
    return await asyncio.to_thread(cli.main, [*argv, "--url", url, *token])


async def test_submit_prints_the_job_and_stores_it(api: Api,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc = await kcli(api, "submit", "rec", "--payload", '{"n": 1}', "--delay", "30s",
                    "--priority", "3", "--timeout", "1m")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith("submitted job ") and "due 2026-01-01 00:00:30Z" in out
    [job] = await api.kernel.store.list_jobs()
    assert job.id in out
    assert (job.payload, job.priority, job.timeout, job.due_at) == ({"n": 1}, 3, 60.0, T0 + 30)

    rc = await kcli(api, "submit", "rec", "--at", "2026-01-01T00:05:00Z", "--dedup-key", "k",
                    "--json")
    first = json.loads(capsys.readouterr().out)
    assert rc == 0 and first["due_at"] == "2026-01-01T00:05:00+00:00"
    assert await kcli(api, "submit", "rec", "--dedup-key", "k") == 0
    assert f"already submitted: job {first['id']}" in capsys.readouterr().out


async def test_api_errors_are_one_line_and_exit_1(api: Api,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert await kcli(api, "submit", "nope") == 1
    err = capsys.readouterr().err
    assert err.startswith("error [ERR_ACTION_NOT_FOUND]: unknown action 'nope'")
    assert err.count("\n") == 1
    assert await kcli(api, "submit", "exec", "--payload", '{"argv": 5}') == 1
    assert capsys.readouterr().err.startswith("error [ERR_BAD_PAYLOAD]: payload.argv")
    assert await kcli(api, "pause", "ghost") == 1
    assert capsys.readouterr().err.startswith("error [ERR_NOT_FOUND]: no task 'ghost'")
    try:  # argparse exits 2, or cli.main returns it (either way the status is 2)
        rc = await kcli(api, "submit", "rec", "--payload", "{nope")
    except SystemExit as exit_:
        rc = exit_.code  # type: ignore[assignment]
    assert rc == 2
    assert "not valid JSON" in capsys.readouterr().err


async def test_unreachable_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    assert await kcli(url, "tasks") == 1
    assert capsys.readouterr().err == (
        f"cannot reach the kernel at {url}: is it running? (start it with ./scripts/run)\n")


async def test_tables_for_jobs_runs_and_tasks(api: Api,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    await api.call("POST", "/jobs", {"action": "rec", "delay": 90})
    await api.advance(60)
    capsys.readouterr()
    assert await kcli(api, "tasks") == 0
    out = capsys.readouterr().out
    assert "Tasks (2)" in out and "@every 60s" in out and "after tick" in out
    assert "succeeded" in out
    assert await kcli(api, "jobs", "--state", "pending") == 0
    out = capsys.readouterr().out
    assert "Jobs (1)" in out and "2026-01-01 00:01:30Z" in out
    assert await kcli(api, "runs", "--task", "tick") == 0
    out = capsys.readouterr().out
    assert "Runs (1" in out and "tick" in out and "succeeded" in out
    assert await kcli(api, "runs", "--outcome", "failed", "--since", "2026-01-01T00:00:00Z",
                      "--json") == 0
    assert json.loads(capsys.readouterr().out)["runs"] == []


async def test_task_commands(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    assert await kcli(api, "pause", "tick") == 0
    assert capsys.readouterr().out == "paused task tick\n"
    assert api.kernel.snapshot().tasks[0].paused
    assert await kcli(api, "resume", "tick") == 0
    assert "resumed task tick (next due 2026-01-01 00:01:00Z)" in capsys.readouterr().out
    assert await kcli(api, "trigger", "tick", "--payload", '{"n": 2}') == 0
    assert capsys.readouterr().out.startswith("triggered task tick: job ")
    await api.idle()
    assert [c.payload for c in api.h.rec.calls if c.task_id == "tick"] == [{"n": 2}]
    assert await kcli(api, "backfill", "tick", "--start", "2025-12-31T23:58:00Z",
                      "--end", "2025-12-31T23:59:00Z") == 0
    assert capsys.readouterr().out == "backfilled task tick: 2 job(s) submitted\n"
    job_id = (await api.call("POST", "/jobs", {"action": "rec", "delay": 5})).body["id"]
    assert await kcli(api, "cancel", job_id) == 0
    assert capsys.readouterr().out == f"cancelled job {job_id} (it was pending)\n"


async def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KERNEL_API_TOKEN", "tok")
    async with serve(require_token=True) as secured:
        assert await kcli(secured, "tasks", "--json") == 0
        assert await kcli(secured, "tasks", "--token", "wrong") == 1
    assert "error [ERR_UNAUTHORIZED]" in capsys.readouterr().err


@pytest.mark.slow
async def test_submit_as_a_real_subprocess(api: Api) -> None:
    env = {**os.environ, "KERNEL_URL": api.url, "KERNEL_DATA_DIR": str(api.data_dir)}
    env.pop("KERNEL_API_TOKEN", None)  # the client reads the token file in the data dir
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kernel", "submit", "rec", "--payload", '{"via": "subprocess"}',
        "--json", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    body = json.loads(out)
    await api.idle()
    assert [c.payload for c in api.h.rec.calls if c.job_id == body["id"]] == [
        {"via": "subprocess"}]
