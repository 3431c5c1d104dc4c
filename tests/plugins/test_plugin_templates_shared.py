"""One template dialect in every plugin (kernel.templates): the same text renders the same in a
preprocess path, an inference prompt and an alert's subject and body, and one settings loader
(kernel.settings) names the table and field of a mistake in each plugin."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from autoglm_alerts import plugin as alerts_plugin
from autoglm_alerts.plugin import AlertsPlugin
from autoglm_alerts.settings import SendPayload
from autoglm_alerts.settings import Settings as AlertSettings
from autoglm_inference import plugin as inference_plugin
from autoglm_preprocess import plugin as preprocess_plugin
from autoglm_preprocess.plugin import PreprocessPlugin
from autoglm_preprocess.settings import PreparePayload
from autoglm_preprocess.settings import Settings as PrepSettings

from kernel.errors import ActionError, ErrorCode
from kernel.hookspecs import PluginContext
from kernel.plugins import load

from .conftest import WebhookServer, make_ctx

AT = 1_773_108_000.0  # 2026-03-10T02:00:00Z: yesterday is 2026-03-09
TEXT = "{yesterday:%Y%m%d}-{date}-{{date}}"
RENDERED = "20260309-2026-03-10-{date}"


async def test_preprocess_paths_use_the_shared_dialect(tmp_path: Path) -> None:
    (tmp_path / "in-20260309.log").write_text("a line\n", "utf-8")
    plugin = PreprocessPlugin(PrepSettings(base_dir=str(tmp_path)))
    p = msgspec.convert({"inputs": ["in-{yesterday:%Y%m%d}.log"], "output": f"{TEXT}.jsonl"},
                        PreparePayload)
    await plugin.prepare(make_ctx(scheduled_at=AT), p)
    out = tmp_path / f"{RENDERED}.jsonl"
    assert [json.loads(x)["text"] for x in out.read_text("utf-8").splitlines()] == ["a line"]


async def test_preprocess_path_mistakes_name_the_variables(tmp_path: Path) -> None:
    plugin = PreprocessPlugin(PrepSettings(base_dir=str(tmp_path)))
    p = msgspec.convert({"inputs": ["{host}.log"], "output": "o.jsonl"}, PreparePayload)
    with pytest.raises(ActionError) as ei:
        await plugin.prepare(make_ctx(scheduled_at=AT), p)
    assert ei.value.code is ErrorCode.ERR_BAD_PAYLOAD
    assert "inputs[0]" in ei.value.message and "{host}" in ei.value.message
    assert "known: date, yesterday" in ei.value.message
    p = msgspec.convert({"inputs": ["{date}.log"], "output": "o.jsonl"}, PreparePayload)
    with pytest.raises(ActionError) as ei:
        await plugin.prepare(make_ctx(scheduled_at=None), p)
    assert "scheduled instant" in ei.value.message


async def test_alert_subjects_and_bodies_use_the_shared_dialect(
        webhook_server: WebhookServer) -> None:
    plugin = AlertsPlugin(AlertSettings.load({"webhook": {"url": webhook_server.url}}))
    p = SendPayload(subject=f"report {TEXT}", body="day {yesterday:%d.%m.%Y}")
    await plugin.send(make_ctx(scheduled_at=AT), p)
    [hook] = webhook_server.received
    doc = json.loads(hook.body)
    assert doc["subject"] == f"report {RENDERED}"
    assert doc["body"] == "day 09.03.2026"


@pytest.mark.parametrize(("name", "module", "table", "words"), [
    ("inference", inference_plugin, {"timeout": "soon"}, ["timeout", "'30s'"]),
    ("preprocess", preprocess_plugin, {"chunk_tokens": "many"}, ["chunk_tokens", "int"]),
    ("alerts", alerts_plugin, {"queue_sise": 3}, ["unknown field", "queue_sise"]),
])
def test_each_plugin_reports_its_settings_through_the_one_loader(
        name: str, module: object, table: dict[str, object], words: list[str]) -> None:
    ps = load(PluginContext(settings={name: table}), extra=[(name, module)],
              use_entry_points=False)
    [problem] = ps.problems
    assert problem.plugin == name and problem.code is ErrorCode.ERR_PLUGIN_LOAD
    assert f"[plugins.{name}]" in problem.message
    for w in words:
        assert w in problem.message, problem.message


async def test_alerts_send_keeps_one_session_while_the_kernel_runs(
        webhook_server: WebhookServer) -> None:
    ps = load(PluginContext(settings={"alerts": {"webhook": {"url": webhook_server.url}}}),
              extra=[("alerts", alerts_plugin)], use_entry_points=False)
    send = ps.action("alerts.send")
    async with ps.lifecycle():
        for i in range(3):
            await send.run(make_ctx(), ps.decode_payload(send, {"subject": f"s{i}"}))
    assert len(webhook_server.received) == 3
    assert len({h.peer for h in webhook_server.received}) == 1  # one kept-alive connection
