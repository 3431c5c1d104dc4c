"""Logs: one JSON object per line with the run's fields; secrets never appear."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

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


def _log_to(stream: Any, fmt: str, environ: dict[str, str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup("debug", fmt, stream, environ=environ)
        log = logging.getLogger("kernel.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("x")
    finally:
        for hd in list(root.handlers):
            root.removeHandler(hd)
        for hd in saved[0]:
            root.addHandler(hd)
        root.setLevel(saved[1])


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_journal_stream_gets_syslog_priority_prefixes(tmp_path: Path, fmt: str) -> None:
    """Under systemd, $JOURNAL_STREAM names stderr's device:inode; each line then starts with
    <N> so that `journalctl -p err` finds the errors (a real file stands in for the socket)."""
    path = tmp_path / "journal"
    with path.open("w") as f:
        st = os.fstat(f.fileno())
        _log_to(f, fmt, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    lines = path.read_text().splitlines()
    prefixes = [line[:3] for line in lines]
    if fmt == "json":
        assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<3>"]
        assert [json.loads(line[3:])["level"] for line in lines] == [
            "debug", "info", "warning", "error", "error"]
    else:  # a traceback spans lines: each of them carries the record's priority
        assert prefixes[:4] == ["<7>", "<6>", "<4>", "<3>"] and len(lines) > 5
        assert set(prefixes[4:]) == {"<3>"}


def test_no_prefix_when_stderr_is_not_the_journal(tmp_path: Path) -> None:
    """A child that inherited $JOURNAL_STREAM but writes elsewhere, or no variable at all."""
    for environ in ({"JOURNAL_STREAM": "1:2"}, {}, {"JOURNAL_STREAM": "garbage"}):
        path = tmp_path / "plain"
        with path.open("w") as f:
            _log_to(f, "json", environ)
        assert all(line.startswith("{") for line in path.read_text().splitlines())
    buf = io.StringIO()  # no file descriptor at all
    _log_to(buf, "json", {"JOURNAL_STREAM": "1:2"})
    assert buf.getvalue().startswith("{")


def test_a_misfire_is_a_warning_only_when_occurrences_were_skipped() -> None:
    from kernel.events import MisfireDecided
    from kernel.records import MisfireRecord

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("kernel.runs")
    handler, old_level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        sink = logs.EventLogger()

        def decided(missed: int, ran: int) -> MisfireDecided:
            return MisfireDecided(at=10.0, record=MisfireRecord(
                task_id="t", decided_at=10.0, policy="catch_up", missed=missed,
                first_missed=1.0, last_missed=5.0, ran=ran))

        sink(decided(missed=0, ran=5))  # every late occurrence ran: nothing was missed
        sink(decided(missed=3, ran=1))  # three skipped by the policy
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    caught_up, skipped = [r for r in seen if "t" in r.getMessage()]
    assert caught_up.levelno == logging.INFO
    assert getattr(caught_up, "error_code", None) is None
    assert "5" in caught_up.getMessage() and "missed" not in caught_up.getMessage()
    assert skipped.levelno == logging.WARNING
    assert getattr(skipped, "error_code", None) == "ERR_MISFIRE_SKIPPED"
