"""The TUI: a pure render of a snapshot at 80x24 and 160x48, its state, and its two loops.

The pseudo-terminal test runs the real program (``python -m kernel tui`` once the CLI wires it,
``kernel.tui.main`` until then) against a tiny HTTP server, and quits it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import os
import struct
import sys
import termios
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from rich.console import Console

from kernel import tui
from kernel.app import SubmitRequest
from kernel.events import ConfigReloaded
from kernel.records import RunQuery

from .harness import make_harness

T0 = 1_767_225_600.0
ROOT = Path(__file__).resolve().parent.parent
TICK = """
    [[tasks]]
    id = "tick"
    schedule = "@every 5s"
    action = "rec"
    """
LONG_ID = "nightly-embedding-refresh-for-the-whole-document-corpus-" + "x" * 40


def task(i: int, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(
        id=f"task-{i:02d}", action="exec", schedule="*/5 * * * *", tz="UTC", enabled=True,
        paused=False, next_due=T0 + 60 * (i + 1), last_outcome="succeeded",
        last_error_code=None, last_finished_at=T0 - 30, after=[], running=0)
    d.update(kw)
    return d


def run_row(i: int, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(
        job_id=f"job-{i:04d}", task_id=f"task-{i % 3:02d}", action="exec",
        trace_id="fedcba98" + "0" * 24, span_id="1" * 16, scheduled_at=T0 - 100,
        started_at=T0 - 100 + i, finished_at=T0 - 97 + i, attempt=1, outcome="succeeded",
        error_code=None, detail="", recovered=False)
    d.update(kw)
    return d


def canned(*, tasks: int = 4, running: int = 2, runs: int = 5, extra: bool = False,
           counters: dict[str, int] | None = None, at: float = T0) -> dict[str, Any]:
    ts = [task(i) for i in range(tasks)]
    if tasks:
        ts[0] = task(0, id=LONG_ID, last_outcome="failed", last_error_code="ERR_CONN_TIMEOUT")
    if tasks > 1:
        ts[1] = task(1, paused=True, last_outcome="timed_out", last_error_code="ERR_TIMEOUT")
    rs = [run_row(i) for i in range(runs)]
    if runs > 1:
        rs[1] = run_row(1, outcome="failed", error_code="ERR_EXEC_FAILED",
                        detail="exit status 2")
    doc: dict[str, Any] = {
        "snapshot": {
            "at": at, "tasks": ts,
            "running": [dict(job_id=f"job-r{i}", task_id="task-02" if i else None,
                             action="llm.chat", trace_id="0123abcd" * 4, attempt=i + 1,
                             elapsed=10.0 * (i + 1), timeout=60.0) for i in range(running)],
            "queued": 37, "timers": 12, "pending_jobs": 9,
            "counters": counters or dict(submitted=50, started=40, succeeded=30, failed=4,
                                         timed_out=1, cancelled=0, skipped=2, recovered=0,
                                         misfired=0),
            "max_concurrency": 8, "queue_depth": 1024},
        "recent_runs": rs, "api_version": 1}
    if extra:
        doc["snapshot"]["gpus"] = [dict(index=0, name="H100", reserved_mb=20480, free_mb=40000,
                                        total_mb=81920, utilization_pct=57)]
        doc["reloads"] = [dict(at=T0 - 5, source="SIGHUP", added=["new-task"], removed=[],
                               changed=["task-02"], error=None)]
    return doc


def view_of(doc: dict[str, Any]) -> tui.TuiView:
    return tui.decode_view(json.dumps(doc).encode())


def draw(renderable: Any, width: int, height: int) -> list[str]:
    con = Console(width=width, height=height, color_system=None, record=True,
                  file=io.StringIO(), legacy_windows=False)
    con.print(renderable)
    return con.export_text().splitlines()


def fits(lines: list[str], width: int, height: int) -> None:
    assert lines, "nothing drawn"
    too_long = [line for line in lines if len(line) > width]
    assert not too_long, too_long
    assert len(lines) <= height, "\n".join(lines)


# ============================================================================ render
def test_compact_80x24_shows_the_essentials_and_fits() -> None:
    lines = draw(tui.render(view_of(canned()), 80, 24), 80, 24)
    fits(lines, 80, 24)
    text = "\n".join(lines)
    for needle in ("task-02", "task-03", "queue 37/1024", "running 2/8", "timers 12",
                   "pending 9", "ERR_CONN_TIMEOUT", "ERR_TIMEOUT", "ERR_EXEC_FAILED", "FAILED",
                   "ok", "paused", "fedcba98", "10s/1m00s"):
        assert needle in text, needle
    # the long id is cut with an ellipsis on its own line, never wrapped onto the next
    assert LONG_ID not in text
    row = next(line for line in lines if line.startswith(LONG_ID[:8]))
    assert "…" in row and "ERR_CONN_TIMEOUT" in row
    assert not any("x" * 10 in line and not line.startswith(LONG_ID[:8]) for line in lines)


def test_wide_160x48_uses_every_column() -> None:
    doc = canned(tasks=10, running=3, runs=15, extra=True)
    lines = draw(tui.render(view_of(doc), 160, 48), 160, 48)
    fits(lines, 160, 48)
    text = "\n".join(lines)
    for needle in ("ACTION", "TZ", "NEXT FIRE", "FINISHED", "AFTER", "PROGRESS", "DETAIL",
                   "timed_out", "failed", "succeeded", "exit status 2", "job-0014",
                   "fedcba9800000000", "0123abcd0123abcd0123abcd0123abcd", "GPU0 H100",
                   "reserved 20.0G", "util 57%", "reload", "SIGHUP", "+new-task", "Ctrl-C"):
        assert needle in text, needle
    assert "more" not in text  # 48 rows hold everything here
    assert "task-09" in text


def test_too_many_rows_are_truncated_with_a_count() -> None:
    doc = canned(tasks=40, running=15, runs=20, extra=True)
    lines = draw(tui.render(view_of(doc), 80, 24), 80, 24)
    fits(lines, 80, 24)
    text = "\n".join(lines)
    assert text.count("more") == 3, text
    lines = draw(tui.render(view_of(doc), 160, 48), 160, 48)
    fits(lines, 160, 48)


@pytest.mark.parametrize(("width", "height"), [(80, 24), (100, 30), (160, 48), (40, 12)])
def test_any_size_fits(width: int, height: int) -> None:
    for doc in (canned(tasks=0, running=0, runs=0), canned(tasks=30, running=9, runs=20,
                                                           extra=True)):
        fits(draw(tui.render(view_of(doc), width, height), width, height), width, height)
        # with every optional line: a connection error, GPUs, reloads
        st = tui.observe_error(tui.observe(tui.TuiState(), view_of(doc)), "cannot reach x")
        fits(draw(tui.render_state(st, width, height), width, height), width, height)


def test_empty_kernel() -> None:
    lines = draw(tui.render(view_of(canned(tasks=0, running=0, runs=0)), 80, 24), 80, 24)
    text = "\n".join(lines)
    assert "TASKS: none configured" in text
    assert "RUNNING: nothing" in text
    assert "RECENT RUNS: none yet" in text


# ============================================================================ state
def with_counters(at: float, succeeded: int, failed: int) -> tui.TuiView:
    return view_of(canned(at=at, counters=dict(succeeded=succeeded, failed=failed)))


def test_throughput_and_failure_rate_from_the_rolling_history() -> None:
    st = tui.TuiState()
    assert tui.rates(st, 60) is None
    for k in range(13):  # one sample every 10 s: 6 runs per 10 s, one of them failed
        st = tui.observe(st, with_counters(T0 + 10 * k, succeeded=5 * k, failed=k))
    one = tui.rates(st, 60)
    assert one is not None
    assert one.per_minute == pytest.approx(36.0)
    assert one.failure_ratio == pytest.approx(1 / 6)
    text = "\n".join(draw(tui.render(st.view or with_counters(T0, 0, 0), 80, 24, state=st),
                          80, 24))
    assert "runs/min 1m 36.0" in text
    assert "17%" in text


def test_history_is_bounded_and_resets_when_the_kernel_restarts() -> None:
    st = tui.TuiState()
    for k in range(200):
        st = tui.observe(st, with_counters(T0 + 10 * k, succeeded=k, failed=0))
    assert len(st.samples) == tui.HISTORY_SECONDS // 10 + 1
    st = tui.observe(st, with_counters(T0 + 2001, succeeded=0, failed=0))  # counters went back
    assert len(st.samples) == 1
    assert tui.rates(st, 60) is None


def test_connection_errors_keep_the_last_picture_with_a_status_line() -> None:
    st = tui.observe(tui.TuiState(), view_of(canned()))
    st = tui.observe_error(st, "cannot reach http://127.0.0.1:1/snapshot: refused")
    st = tui.observe_error(st, "cannot reach http://127.0.0.1:1/snapshot: refused")
    lines = draw(tui.render_state(st, 80, 24), 80, 24)
    fits(lines, 80, 24)
    text = "\n".join(lines)
    assert "cannot reach" in text and "retrying" in text and "task-02" in text
    st = tui.observe(st, view_of(canned()))
    assert st.error is None and st.failures == 0


def test_waiting_screen_before_the_first_snapshot() -> None:
    st = tui.observe_error(tui.TuiState(), "cannot reach x: refused")
    text = "\n".join(draw(tui.render_state(st, 80, 24, source="http://h/snapshot"), 80, 24))
    assert "connecting to http://h/snapshot" in text
    assert "cannot reach x" in text


def test_reloads_seen_in_process_are_shown() -> None:
    st = tui.observe(tui.TuiState(), view_of(canned()))
    ev = ConfigReloaded(at=T0, source="SIGHUP", added=[], removed=[], changed=[],
                        error="tasks.toml: task 'x'.schedule: bad")
    st = tui.observe_reload(st, tui.reload_row(ev))
    text = "\n".join(draw(tui.render_state(st, 80, 24), 80, 24))
    assert "reload" in text and "rejected" in text


# ============================================================================ the kernel's shape
async def test_decodes_what_the_api_serves_and_matches_the_in_process_view() -> None:
    from kernel.api.schemas import SnapshotOut

    h = make_harness("""
        [[tasks]]
        id = "tick"
        schedule = "@every 5s"
        action = "rec"
        [[tasks]]
        id = "broken"
        schedule = "@every 10s"
        action = "rec"
        payload = { mode = "fail", code = "ERR_EXEC_FAILED" }
        """)
    await h.start()
    await h.advance(11)
    await h.kernel.submit(SubmitRequest(action="rec", payload={"mode": "block"}))
    await h.idle()
    snap = h.kernel.snapshot()
    runs = await h.store.query_runs(RunQuery(limit=20))
    wire = msgspec.json.encode(SnapshotOut(snapshot=snap, recent_runs=runs))
    view = tui.decode_view(wire)
    assert view == tui.view_from_snapshot(snap, runs)
    assert {t.id for t in view.snapshot.tasks} == {"tick", "broken"}
    assert len(view.snapshot.running) == 1
    assert {r.outcome for r in view.recent_runs} == {"succeeded", "failed"}
    text = "\n".join(draw(tui.render(view, 80, 24), 80, 24))
    assert "ERR_EXEC_FAILED" in text and "broken" in text
    h.rec.release.set()
    await h.stop()


async def test_run_inprocess_draws_the_kernel() -> None:
    h = make_harness(TICK)
    await h.start()
    await h.advance(6)
    con = Console(width=80, height=24, color_system=None, record=True, file=io.StringIO())
    drawing = asyncio.create_task(tui.run_inprocess(h.kernel, console=con, max_frames=2))
    await h.idle()  # the first frame is drawn; the loop waits for the kernel's (fake) clock
    h.kernel.bus.publish(ConfigReloaded(at=T0 + 6, source="api", added=["b"], removed=[],
                                        changed=[]))
    await h.advance(1.0)
    await drawing
    text = con.export_text()
    assert "tick" in text and "reload" in text
    await h.stop()


# ============================================================================ attached loop
@contextlib.asynccontextmanager
async def snapshot_server(doc: dict[str, Any], token: str | None = None
                          ) -> AsyncIterator[str]:
    body = json.dumps(doc).encode()

    async def snapshot(request: web.Request) -> web.Response:
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return web.json_response({"error": {"code": "ERR_UNAUTHORIZED"}}, status=401)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/snapshot", snapshot)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_run_attached_polls_the_snapshot_endpoint() -> None:
    async with snapshot_server(canned(), token="s3cret") as url:
        con = Console(width=80, height=24, color_system=None, record=True, file=io.StringIO())
        await tui.run_attached(url, "s3cret", refresh=0, console=con, screen=False,
                               max_frames=2)
        assert "task-02" in con.export_text()
        con = Console(width=80, height=24, color_system=None, record=True, file=io.StringIO())
        await tui.run_attached(url + "/", "wrong", refresh=0, console=con, screen=False,
                               max_frames=1)
        assert "HTTP 401" in con.export_text()


async def test_run_attached_reports_an_unreachable_kernel() -> None:
    async with snapshot_server(canned()) as url:
        pass  # the port is free again
    con = Console(width=100, height=24, color_system=None, record=True, file=io.StringIO())
    await tui.run_attached(url, None, refresh=0, console=con, screen=False, max_frames=1)
    assert "cannot reach" in con.export_text()


def test_tui_command_arguments() -> None:
    ap = argparse.ArgumentParser()
    tui.add_tui_command(ap.add_subparsers(dest="cmd"))
    a = ap.parse_args(["tui", "--url", "http://h:1", "--token", "t", "--refresh", "2"])
    assert a.handler is tui.cmd_tui
    assert (a.url, a.token, a.refresh, a.inline) == ("http://h:1", "t", 2.0, False)
    assert a.handler(ap.parse_args(["tui", "--refresh", "0"])) == 2
    assert a.handler(ap.parse_args(["tui", "--url", "ftp://h"])) == 2


# ============================================================================ real terminal
def _cli_has_tui() -> bool:
    from kernel import cli

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            cli._parser().parse_args(["tui", "--url", "http://x"])
        except SystemExit:
            return False
    return True


@pytest.mark.slow
async def test_in_a_pseudo_terminal_ctrl_c_quits_cleanly() -> None:
    async with snapshot_server(canned()) as url:
        if _cli_has_tui():
            start = f"from kernel.cli import main; sys.exit(main(['tui', '--url', {url!r}]))"
        else:
            start = f"from kernel.tui import main; sys.exit(main(['--url', {url!r}]))"
        # become the session leader of the pty (so Ctrl-C there is our SIGINT), then start
        script = ("import fcntl, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                  + start)
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env.update(TERM="xterm-256color", PYTHONPATH=str(ROOT))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
            env=env, start_new_session=True)
        os.close(slave)
        loop = asyncio.get_running_loop()
        screen = bytearray()
        seen = asyncio.Event()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                loop.remove_reader(master)
                seen.set()
                return
            screen.extend(data)
            if b"task-02" in screen:
                seen.set()

        loop.add_reader(master, readable)
        try:
            async with asyncio.timeout(20):
                await seen.wait()
            assert b"task-02" in screen, screen.decode(errors="replace")[-2000:]
            os.write(master, b"\x03")  # Ctrl-C, through the terminal's line discipline
            async with asyncio.timeout(10):
                rc = await proc.wait()
            assert rc in (0, 130), screen.decode(errors="replace")[-2000:]
            with contextlib.suppress(OSError):
                while chunk := os.read(master, 65536):
                    screen.extend(chunk)
            out = bytes(screen)
            assert b"Traceback" not in out, out.decode(errors="replace")[-2000:]
            assert b"\x1b[?25h" in out      # the cursor is shown again
            assert b"\x1b[?1049l" in out    # and the alternate screen left
        finally:
            loop.remove_reader(master)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            os.close(master)


# ============================================================================ cost of a frame
class FakeTerminal(io.StringIO):
    """A fake terminal: what is written to it, and ``isatty()`` true (no pty needed)."""

    def isatty(self) -> bool:
        return True


def frames_in(term: FakeTerminal) -> int:
    return term.getvalue().count("Open-AutoGLM Kernel")  # once at the top of each frame


def big_snapshot(n: int, running: int = 0) -> Any:
    from kernel.app import Counters, RunningView, Snapshot, TaskView

    tasks = tuple(TaskView(id=f"task-{i:05d}", action="log", schedule="@every 5s", tz="UTC",
                           enabled=True, paused=i % 7 == 0, next_due=T0 + (i * 37) % 1000,
                           last_outcome="succeeded", last_error_code=None,
                           last_finished_at=T0 - 1, after=(), running=0) for i in range(n))
    rv = tuple(RunningView(job_id=f"j{i}", task_id=f"task-{i:05d}", action="log",
                           trace_id="ab" * 16, attempt=1, elapsed=float(i % 50), timeout=60.0)
               for i in range(running))
    return Snapshot(at=T0, tasks=tasks, running=rv, queued=0, timers=n, pending_jobs=n,
                    counters=Counters(), max_concurrency=64, queue_depth=1024)


@pytest.mark.parametrize(("width", "height"), [(80, 24), (160, 48)])
def test_a_frame_converts_only_the_rows_it_can_show(width: int, height: int) -> None:
    snap = big_snapshot(5000, running=300)
    view = tui.frame_view(snap, (), rows=height)
    assert len(view.snapshot.tasks) <= height and len(view.snapshot.running) <= height
    assert view.snapshot.tasks_total == 5000 and view.snapshot.running_total == 300
    assert view.snapshot.tasks_paused == sum(1 for t in snap.tasks if t.paused)
    # the same picture as converting everything: same rows, same "… N more", same header
    full = tui.view_from_snapshot(snap)
    assert (draw(tui.render(view, width, height), width, height)
            == draw(tui.render(full, width, height), width, height))


async def test_inprocess_tui_draws_on_its_cadence_never_per_event_or_log_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """300 events and 300 log lines between two ticks of the (fake) clock: no frame is
    drawn for them, and no log line is printed over the picture; the next tick draws one
    frame whose log pane holds the newest lines."""
    h = make_harness(TICK)
    await h.start()
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)     # stderr and stdout are the terminal...
    monkeypatch.setattr(sys, "stdout", term)
    handler = logging.StreamHandler(term)         # ...and the log goes there (logs.setup)
    root = logging.getLogger()
    root.addHandler(handler)
    con = Console(file=term, force_terminal=True, width=80, height=24, color_system=None,
                  legacy_windows=False)
    drawing = asyncio.create_task(tui.run_inprocess(h.kernel, console=con, refresh=1.0))
    noisy = logging.getLogger("kernel.noisy")
    try:
        await h.idle()
        assert frames_in(term) == 1
        for i in range(300):
            h.kernel.bus.publish(ConfigReloaded(at=T0, source="api", added=[f"t{i}"],
                                                removed=[], changed=[]))
            noisy.warning("noisy line %03d", i)
        print("a stray print", file=sys.stderr)
        await h.idle()
        assert frames_in(term) == 1, "a frame was drawn for events or log lines"
        assert "noisy line" not in term.getvalue()
        await h.advance(1.0)
        assert frames_in(term) == 2
        last_frame = term.getvalue().rsplit("Open-AutoGLM Kernel", 1)[1]
        assert "noisy line 299" in last_frame       # in the log pane
        assert "a stray print" in last_frame
        assert "noisy line 000" not in last_frame   # only the newest fit
        await h.advance(3.0)
        assert frames_in(term) == 5
        assert handler not in root.handlers       # no log line may reach the terminal
    finally:
        drawing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drawing
        root.removeHandler(handler)
    # afterwards the terminal's log handler and streams are back
    assert sys.stderr is term and sys.stdout is term
    await h.stop()


def test_log_pane_keeps_the_newest_lines_and_formats_only_what_is_shown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_API_KEY", "sk-verysecretvalue123")
    pane = tui.LogPane(capacity=5)
    log = logging.getLogger("kernel.pane-test")
    log.addHandler(pane)
    log.propagate = False
    try:
        for i in range(20):
            log.warning("line %02d", i)
        log.error("key is sk-verysecretvalue123")
    finally:
        log.removeHandler(pane)
        log.propagate = True
    assert len(pane) == 5
    lines = pane.lines(3, width=60)
    assert [x.split(" ", 1)[1] for x in lines[:2]] == [
        "WARNING kernel.pane-test: line 18", "WARNING kernel.pane-test: line 19"]
    assert "sk-verysecretvalue123" not in lines[2] and "***" in lines[2]
    assert all(len(x) <= 60 for x in lines)
    pane.write("half a li")
    pane.write("ne\nand more\n")
    assert pane.lines(2, width=60) == ["half a line", "and more"]


@pytest.mark.parametrize(("width", "height"), [(80, 24), (160, 48), (40, 12)])
def test_the_log_pane_fits_in_the_frame(width: int, height: int) -> None:
    doc = canned(tasks=30, running=9, runs=20, extra=True)
    st = tui.observe(tui.TuiState(), view_of(doc))
    st = tui.with_logs(st, tuple(f"12:00:{i:02d} WARNING kernel.runs: failed {i} " + "x" * 90
                                 for i in range(40)))
    lines = draw(tui.render_state(st, width, height), width, height)
    fits(lines, width, height)
    text = "\n".join(lines)
    assert "12:00:00" not in text
    if height >= 24:  # a tiny terminal keeps its rows for the tables
        assert "12:00:39" in text
        assert "failed 36" not in text if width < tui.WIDE else "failed 36" in text


async def test_inprocess_tui_can_keep_every_log_line_in_a_file(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    h = make_harness(TICK)
    await h.start()
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(term)
    handler.setFormatter(logging.Formatter("TERMINAL %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    con = Console(file=term, force_terminal=True, width=100, height=30, color_system=None,
                  legacy_windows=False)
    log_file = tmp_path / "logs" / "kernel.log"
    drawing = asyncio.create_task(tui.run_inprocess(h.kernel, console=con, refresh=1.0,
                                                    log_file=log_file))
    try:
        await h.idle()
        for i in range(300):
            logging.getLogger("kernel.noisy").warning("noisy line %03d", i)
        await h.advance(1.0)
    finally:
        drawing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drawing
        root.removeHandler(handler)
    kept = log_file.read_text().splitlines()
    noisy = [line for line in kept if "noisy line" in line]
    assert len(noisy) == 300 and noisy[0] == "TERMINAL noisy line 000"  # formatted alike
    assert "TERMINAL" not in term.getvalue()  # the terminal's handler wrote nothing
    assert f"every line: {log_file}" in term.getvalue()
    await h.stop()


# ============================================================================ progress (ctx.progress)
def with_progress(doc: dict[str, Any]) -> dict[str, Any]:
    """Three running jobs: one reported 9 of 20, one 1234 of an unknown total, one nothing."""
    running = doc["snapshot"]["running"]
    running[0].update(done=9, total=20, note="requests, 1 item error")
    running[1].update(done=1234, total=None, note="reading day-07.log")
    return doc


@pytest.mark.parametrize(("width", "height"), [(80, 24), (160, 48)])
def test_running_jobs_show_progress_bars(width: int, height: int) -> None:
    doc = with_progress(canned(tasks=4, running=3, runs=5, extra=True))
    lines = draw(tui.render(view_of(doc), width, height), width, height)
    fits(lines, width, height)
    text = "\n".join(lines)
    assert "PROGRESS" in text
    bar_row = next(line for line in lines if "45%" in line)      # 9/20, rounded down
    assert "━" in bar_row and "9/20" in bar_row                 # a rich progress bar
    count_row = next(line for line in lines if "1234" in line)
    assert "%" not in count_row                                 # no total: a count, no bar
    assert "10s/1m00s" in text                                  # the timeout stays shown
    if width >= tui.WIDE:
        assert "reading day-07.log" in count_row
        assert "requests, 1 item error" in bar_row
    quiet_row = next(line for line in lines if "30s/1m00s" in line)  # never reported
    assert "━" not in quiet_row and "%" not in quiet_row


def test_progress_render_is_pure_and_the_spinner_moves_with_the_snapshot() -> None:
    doc = with_progress(canned(tasks=1, running=2, runs=0))
    first = draw(tui.render(view_of(doc), 160, 48), 160, 48)
    assert first == draw(tui.render(view_of(doc), 160, 48), 160, 48)  # same in, same out
    doc["snapshot"]["at"] = T0 + 1.0   # the next frame
    later = draw(tui.render(view_of(doc), 160, 48), 160, 48)
    row = next(i for i, line in enumerate(first) if "1234" in line)
    assert first[row] != later[row]          # the pulse (no total) moves with snapshot.at
    assert first[row].replace("━", "─") == later[row].replace("━", "─")  # and nothing else
    done = next(i for i, line in enumerate(first) if "45%" in line)
    assert first[done] == later[done]        # a bar stands still while its count does


def test_progress_edges() -> None:
    doc = canned(tasks=1, running=3, runs=0)
    run = doc["snapshot"]["running"]
    run[0].update(done=25, total=20)                   # over-reported: capped at 100%
    run[1].update(done=0, total=0, note="nothing to do")  # an empty batch is complete
    run[2].update(done=0.5, total=None)
    text = "\n".join(draw(tui.render(view_of(doc), 160, 48), 160, 48))
    assert "100% 25/20" in text and "nothing to do" in text and "100% 0/0" in text
    assert "0.5" in text
    assert "%" not in next(line for line in text.splitlines() if "0.5" in line
                           and "job-r2" in line)


def test_a_frame_carries_the_reported_progress() -> None:
    from kernel.app import RunningView

    snap = big_snapshot(10, running=3)
    rv = list(snap.running)
    rv[0] = RunningView(job_id="j0", task_id="task-00000", action="inference.batch",
                        trace_id="ab" * 16, attempt=1, elapsed=49.0, timeout=600.0, done=3,
                        total=4, note="requests")
    snap = dataclasses.replace(snap, running=tuple(rv))
    view = tui.frame_view(snap, (), rows=24)
    row = next(r for r in view.snapshot.running if r.job_id == "j0")
    assert (row.done, row.total, row.note) == (3.0, 4.0, "requests")
    assert next(r for r in view.snapshot.running if r.job_id == "j1").done is None
    assert "75%" in "\n".join(draw(tui.render(view, 80, 24), 80, 24))


# ============================================================================ loop stalls
def stall(at: float = T0 - 15, lag: float = 1.25) -> tui.StallRow:
    return tui.StallRow(at=at, lag=lag, job_ids=("job-r1", "job-9"), task_ids=("task-02",))


def test_the_last_loop_stall_is_shown_in_the_status_line() -> None:
    st = tui.observe_stall(tui.observe(tui.TuiState(), view_of(canned())), stall())
    for width, height in ((80, 24), (160, 48)):
        lines = draw(tui.render_state(st, width, height), width, height)
        fits(lines, width, height)
        row = next(line for line in lines if "stalled" in line)
        assert "1.25s" in row and "15s ago" in row and "task-02" in row
        if width >= tui.WIDE:
            assert f"{tui._hms(T0 - 15)}Z" in row and "job-r1" in row and "job-9" in row
    # a newer stall replaces it; one older than the window is not shown any more
    st = tui.observe_stall(st, stall(at=T0 - 5, lag=3.0))
    assert "3.00s" in "\n".join(draw(tui.render_state(st, 80, 24), 80, 24))
    st = tui.observe_stall(tui.observe(tui.TuiState(), view_of(canned())),
                           stall(at=T0 - tui.STALL_SHOWN - 1))
    assert "stalled" not in "\n".join(draw(tui.render_state(st, 80, 24), 80, 24))


def test_a_stall_from_the_wire_is_shown() -> None:
    doc = canned()
    doc["last_stall"] = dict(at=T0 - 2, lag=0.8, job_ids=["job-r1"], task_ids=["task-02"])
    text = "\n".join(draw(tui.render(view_of(doc), 80, 24), 80, 24))
    assert "stalled 0.80s" in text and "task-02" in text


async def test_run_inprocess_shows_a_loop_stall_published_on_the_bus() -> None:
    from kernel.events import LoopStalled

    h = make_harness(TICK)
    await h.start()
    con = Console(width=120, height=30, color_system=None, record=True, file=io.StringIO())
    drawing = asyncio.create_task(tui.run_inprocess(h.kernel, console=con, max_frames=2))
    await h.idle()
    assert "stalled" not in con.export_text(clear=False)
    h.kernel.bus.publish(LoopStalled(at=h.clock.wall(), lag=2.5, job_ids=("j-77",),
                                     task_ids=("tick",)))
    await h.advance(1.0)
    await drawing
    row = next(line for line in con.export_text().splitlines() if "stalled" in line)
    assert "2.50s" in row and "tick" in row and "j-77" in row
    await h.stop()


# ============================================================================ the token
def test_tui_command_finds_the_local_token_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KERNEL_API_TOKEN", raising=False)
    monkeypatch.delenv("KERNEL_URL", raising=False)
    monkeypatch.setenv("KERNEL_DATA_DIR", str(tmp_path))
    (tmp_path / "api.token").write_text("from-the-file\n")
    seen: list[tuple[str, str | None]] = []

    async def fake_run_attached(url: str, token: str | None, **kw: Any) -> None:
        seen.append((url, token))

    monkeypatch.setattr(tui, "run_attached", fake_run_attached)
    ap = argparse.ArgumentParser()
    tui.add_tui_command(ap.add_subparsers(dest="cmd"))
    for argv, want in ((["tui"], (tui.DEFAULT_URL, "from-the-file")),
                       (["tui", "--token", "given"], (tui.DEFAULT_URL, "given")),
                       # the file's token never leaves the box
                       (["tui", "--url", "http://kernel.example:8765"],
                        ("http://kernel.example:8765", None))):
        a = ap.parse_args(argv)
        assert a.handler(a) == 0
        assert seen.pop() == want, argv
    monkeypatch.setenv("KERNEL_API_TOKEN", "from-env")
    a = ap.parse_args(["tui"])
    assert a.handler(a) == 0 and seen.pop() == (tui.DEFAULT_URL, "from-env")
    help_text = ap._subparsers._group_actions[0].choices["tui"].format_help()  # type: ignore[union-attr]
    assert "api.token" in help_text and "KERNEL_DATA_DIR" in help_text


async def test_a_refused_token_names_the_token_file() -> None:
    import aiohttp

    async with snapshot_server(canned(), token="s3cret") as url, aiohttp.ClientSession() as s:
        with pytest.raises(tui._FetchError) as err:
            await tui._fetch(s, tui.snapshot_url(url), "wrong")
    msg = str(err.value)
    assert "HTTP 401" in msg and "--token" in msg and "KERNEL_API_TOKEN" in msg
    assert "api.token" in msg and "KERNEL_DATA_DIR" in msg
    # the whole hint is on the screen at 80 columns (the status line wraps, up to 3 lines)
    for st in (tui.observe_error(tui.TuiState(), msg),
               tui.observe_error(tui.observe(tui.TuiState(), view_of(canned())), msg)):
        lines = draw(tui.render_state(st, 80, 24, source="http://h/snapshot"), 80, 24)
        fits(lines, 80, 24)
        text = " ".join(line.strip() for line in lines)
        assert "api.token" in text and "KERNEL_DATA_DIR" in text and "retrying" in text
    tiny = draw(tui.render_state(st, 40, 12), 40, 12)
    fits(tiny, 40, 12)


async def test_progress_reported_by_a_running_action_is_drawn_in_process() -> None:
    from .progress_plugin import progress_harness

    h, prog = progress_harness()
    await h.start()
    await h.kernel.submit(SubmitRequest(action="prog", payload={
        "done": 30, "total": 40, "note": "requests"}))
    await h.kernel.submit(SubmitRequest(action="prog", payload={"done": 7, "note": "files"}))
    await h.idle()
    assert prog.reported.is_set()
    con = Console(width=160, height=48, color_system=None, record=True, file=io.StringIO())
    await tui.run_inprocess(h.kernel, console=con, max_frames=1)
    lines = con.export_text().splitlines()
    assert "75% 30/40 requests" in next(line for line in lines if "30/40" in line)
    assert "━" in next(line for line in lines if "30/40" in line)
    assert "7 files" in next(line for line in lines if " files" in line)
    prog.release.set()
    await h.stop()
