"""The seed's daily_summary_report chain, end to end, from docs/default_config_chain.toml:
02:00 on a fake clock -> preprocess yesterday's log -> summary from the (fake) model server ->
mail through a real SMTP server; three runs, one trace id."""

from __future__ import annotations

import asyncio
import datetime as dt
import tomllib
from pathlib import Path
from typing import Any

from autoglm_alerts import plugin as alerts_plugin
from autoglm_inference import plugin as inference_plugin
from autoglm_preprocess import plugin as preprocess_plugin

from kernel import config as config_mod
from kernel.clock import FakeClock
from kernel.hookspecs import PluginContext
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import Outcome, RunQuery, RunRecord
from kernel.store.memory import MemoryStore
from kernel.validate import validate

from .conftest import SmtpServer
from .fake_openai import FakeOpenAI

SNIPPET = Path(__file__).resolve().parents[2] / "docs" / "default_config_chain.toml"
CHAIN = ("daily_summary_report", "daily_summary_report.summarise", "daily_summary_report.send")
SUMMARY = "## Daily report\n- 2 distinct errors: disk full on /data, one OOM restart."


def rehome(value: Any, moves: dict[str, str]) -> Any:
    """The snippet with its example paths moved under tmp_path."""
    if isinstance(value, str):
        for old, new in moves.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [rehome(v, moves) for v in value]
    if isinstance(value, dict):
        return {k: rehome(v, moves) for k, v in value.items()}
    return value


async def wait_for_runs(store: MemoryStore, count: int) -> list[RunRecord]:
    """Poll (real I/O is happening: threads, HTTP, SMTP), bounded to ~10 s."""
    runs: list[RunRecord] = []
    for _ in range(1000):
        runs = await store.query_runs(RunQuery(limit=100))
        if len(runs) >= count:
            return list(reversed(runs))
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} runs, got {[(r.task_id, r.outcome) for r in runs]}")


async def test_daily_summary_chain(tmp_path: Path, fake_openai: FakeOpenAI,
                                   smtp_server: SmtpServer) -> None:
    logs, state = tmp_path / "logs", tmp_path / "state"
    logs.mkdir()
    (logs / "app-20260309.log").write_text(
        "2026-03-09 ERROR disk full on /data\n"
        "2026-03-09 ERROR disk full on /data\n"      # duplicate: dropped by preprocess
        "2026-03-09 WARN  oom-killer restarted worker-3\n", "utf-8")
    (logs / "app-20260310.log").write_text("today: not part of yesterday's report\n", "utf-8")
    fake_openai.reply = lambda body: SUMMARY

    raw = rehome(tomllib.loads(SNIPPET.read_text("utf-8")),
                 {"/var/log/myapp": str(logs), "/var/lib/autoglm": str(state)})
    assert [t["id"] for t in raw["tasks"]] == list(CHAIN)
    assert raw["tasks"][0]["enabled"] is False  # off by default
    raw["tasks"][0]["enabled"] = True
    raw["plugins"]["inference"].update(base_url=fake_openai.base_url, api_key_env="")
    raw["plugins"]["alerts"]["email"].update(host=smtp_server.host, port=smtp_server.port)
    raw.update(store={"backend": "memory"}, server={"enabled": False})
    cfg, issues = config_mod.decode(raw, str(SNIPPET))
    assert not issues, issues
    plugins = load_plugins(PluginContext(settings=cfg.plugins, data_dir=tmp_path),
                           extra=[("preprocess", preprocess_plugin),
                                  ("inference", inference_plugin), ("alerts", alerts_plugin)],
                           use_entry_points=False)
    assert not plugins.problems, plugins.problems
    assert validate(cfg, plugins) == []

    t0 = dt.datetime(2026, 3, 10, 1, 59, tzinfo=dt.UTC).timestamp()
    clock = FakeClock(wall=t0)
    store = MemoryStore()
    kernel = build(cfg, clock=clock, plugins=plugins, store=store)
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))
    await started.wait()
    try:
        await clock.advance(30)
        assert await store.query_runs(RunQuery()) == []  # not before 02:00
        await clock.advance(60)  # 02:00:30
        runs = await wait_for_runs(store, 3)
        by_trace = await store.query_runs(RunQuery(trace_id=runs[0].trace_id))
        [mail] = await smtp_server.wait_for(1)
    finally:
        kernel.stop("test")
        while not task.done():
            await clock.advance(1)
            await asyncio.sleep(0)
        await task

    assert [(r.task_id, r.outcome) for r in runs] == [(t, Outcome.SUCCEEDED) for t in CHAIN]
    assert len({r.trace_id for r in runs}) == 1
    trace = runs[0].trace_id
    assert {r.task_id for r in by_trace} == set(CHAIN)
    scheduled = dt.datetime(2026, 3, 10, 2, 0, tzinfo=dt.UTC).timestamp()
    assert {r.scheduled_at for r in runs} == {scheduled}

    # what the model was asked: yesterday's lines, deduplicated, with the trace header
    [post] = fake_openai.posts()
    prompt = post.body["messages"][-1]["content"]
    assert "application log of 2026-03-09" in prompt
    assert prompt.count("disk full on /data") == 1 and "oom-killer" in prompt
    assert "today" not in prompt
    assert post.headers["traceparent"].split("-")[1] == trace

    # what was mailed: the model's summary
    assert mail.message["Subject"] == "Daily summary for 2026-03-09"
    body = mail.message.get_content().replace("\r\n", "\n")
    assert body.startswith(SUMMARY)
    assert f"trace {trace}" in body
    assert mail.rcpt_tos == raw["plugins"]["alerts"]["email"]["to"]
    assert (state / "daily_summary" / "summary.md").read_text("utf-8") == SUMMARY
