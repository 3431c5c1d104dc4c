"""Logs: one JSON object per line with the run's fields; secrets never appear."""

from __future__ import annotations

import io
import json
import logging

import pytest

from kernel import logs
from kernel.app import SubmitRequest

from .harness import make_harness


@pytest.fixture
def json_lines(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-abcdefghijklmnop")
    monkeypatch.setenv("KERNEL_SMTP_PASSWORD", "hunter2hunter2")
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.setup("debug", "json", buf)
    yield buf
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


async def test_runs_are_logged_as_json_with_trace_fields(json_lines: io.StringIO) -> None:
    h = make_harness("""
        [[tasks]]
        id = "t"
        schedule = "@every 10s"
        action = "rec"
        payload = { mode = "fail", code = "ERR_AUTH_FAILED" }
        """)
    await h.start()
    await h.advance(10)
    await h.stop()
    records = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    failed = [r for r in records if r.get("outcome") == "failed"]
    assert failed, records
    r = failed[0]
    assert r["task_id"] == "t" and r["error_code"] == "ERR_AUTH_FAILED" and r["attempt"] == 1
    assert len(r["trace_id"]) == 32 and len(r["span_id"]) == 16 and "duration" in r
    assert r["level"] == "warning" and r["logger"] == "kernel.runs"


async def test_secrets_never_reach_the_log(json_lines: io.StringIO) -> None:
    h = make_harness("")
    await h.start()
    await h.kernel.submit(SubmitRequest(action="log", payload={
        "message": "calling with key sk-live-abcdefghijklmnop and password hunter2hunter2"}))
    await h.idle()
    logging.getLogger("x").error("request failed: Authorization: Bearer abc.def.ghi-jkl")
    logging.getLogger("x").info('config {"api_key": "plainsecretvalue"}')
    await h.stop()
    text = json_lines.getvalue()
    for secret in ("sk-live-abcdefghijklmnop", "hunter2hunter2", "abc.def.ghi-jkl",
                   "plainsecretvalue"):
        assert secret not in text
    assert "***" in text


def test_text_format_is_readable() -> None:
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup("info", "text", buf)
        logging.getLogger("kernel.runs").warning("run failed: t", extra={
            "task_id": "t", "trace_id": "abc", "error_code": "ERR_TIMEOUT"})
    finally:
        for hd in list(root.handlers):
            root.removeHandler(hd)
        for hd in saved[0]:
            root.addHandler(hd)
        root.setLevel(saved[1])
    line = buf.getvalue().strip()
    assert "WARNING" in line and "run failed: t" in line
    assert "[task_id=t trace_id=abc error_code=ERR_TIMEOUT]" in line
