"""The inference plugin over the kernel's plugin lifecycle, against the fake model server
(a real HTTP server on 127.0.0.1): one ClientSession per endpoint for the plugin's lifespan,
``GET /models`` once per endpoint instead of once per run, a health check refused with HTTP
400 reported as a server-side ERR_AUTH_FAILED (not ERR_BAD_PAYLOAD), one template dialect
with the preprocess plugin, and the ``inference models`` CLI command."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import msgspec
import pytest
from autoglm_inference import plugin as inference_plugin
from autoglm_inference.plugin import InferencePlugin
from autoglm_inference.settings import ChatPayload, Settings

from kernel.errors import ActionError, ErrorCode
from kernel.hookspecs import PluginContext
from kernel.plugins import add_plugin_commands, load

from .conftest import make_ctx
from .fake_openai import FakeOpenAI

KEY_ENV = "AUTOGLM_TEST_INFERENCE_KEY"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-key")


def _chat(**kw: Any) -> ChatPayload:
    return msgspec.convert(kw, ChatPayload)


def _loaded(server: FakeOpenAI, **settings: Any) -> Any:
    table = {"base_url": server.base_url, "api_key_env": KEY_ENV, **settings}
    ps = load(PluginContext(settings={"inference": table}),
              extra=[("inference", inference_plugin)], use_entry_points=False)
    assert ps.problems == []
    return ps


async def test_one_session_and_one_models_check_for_many_runs(fake_openai: FakeOpenAI) -> None:
    ps = _loaded(fake_openai, model="fake-model")
    chat = ps.action("inference.chat")
    [(name, _)] = ps.lifespans
    assert name == "inference"
    async with ps.lifecycle():
        for i in range(3):
            text = await chat.run(make_ctx(), ps.decode_payload(chat, {"prompt": f"q{i}"}))
            assert text == f"echo: q{i}"
    assert len(fake_openai.gets()) == 1          # checked once, not per run
    assert len(fake_openai.posts()) == 3
    peers = {r.peer for r in fake_openai.requests}
    assert len(peers) == 1, peers                # one kept-alive connection: one session


async def test_the_first_served_model_is_remembered_too(fake_openai: FakeOpenAI) -> None:
    fake_openai.models = ("served-a", "served-b")
    plugin = InferencePlugin(Settings.load({"base_url": fake_openai.base_url, "model": ""}))
    async with plugin.lifespan():
        for _ in range(2):
            await plugin.chat(make_ctx(), _chat(prompt="x"))
    assert [r.body["model"] for r in fake_openai.posts()] == ["served-a", "served-a"]
    assert len(fake_openai.gets()) == 1


async def test_a_model_missing_from_the_remembered_list_is_checked_again(
        fake_openai: FakeOpenAI) -> None:
    plugin = InferencePlugin(Settings.load({"base_url": fake_openai.base_url,
                                            "model": "fake-model"}))
    async with plugin.lifespan():
        await plugin.chat(make_ctx(), _chat(prompt="x"))
        fake_openai.models = ("fake-model", "new-model")   # the server loaded another model
        assert await plugin.chat(make_ctx(), _chat(prompt="y", model="new-model")) == "echo: y"
        with pytest.raises(ActionError) as ei:
            await plugin.chat(make_ctx(), _chat(prompt="z", model="nope"))
    assert ei.value.code is ErrorCode.ERR_MODEL_NOT_FOUND
    assert len(fake_openai.gets()) == 3  # the first run, then once for each model not listed


async def test_a_failed_check_is_not_remembered(fake_openai: FakeOpenAI) -> None:
    fake_openai.models_error = (503, "loading", "unavailable")
    plugin = InferencePlugin(Settings.load({"base_url": fake_openai.base_url,
                                            "model": "fake-model"}))
    async with plugin.lifespan():
        with pytest.raises(ActionError) as ei:
            await plugin.chat(make_ctx(), _chat(prompt="x"))
        assert ei.value.code is ErrorCode.ERR_OVERLOADED
        fake_openai.models_error = None
        assert await plugin.chat(make_ctx(), _chat(prompt="x")) == "echo: x"
        assert await plugin.chat(make_ctx(), _chat(prompt="x")) == "echo: x"
    assert len(fake_openai.gets()) == 2


async def test_sessions_are_closed_when_the_lifespan_ends(fake_openai: FakeOpenAI) -> None:
    plugin = InferencePlugin(Settings.load({"base_url": fake_openai.base_url,
                                            "model": "fake-model"}))
    async with plugin.lifespan():
        await plugin.chat(make_ctx(), _chat(prompt="x"))
        [session] = plugin.sessions()
        assert not session.closed
    assert session.closed
    assert plugin.sessions() == []
    # outside a lifespan (scripts, tests) each run has its own session, closed after it
    await plugin.chat(make_ctx(), _chat(prompt="x"))
    assert plugin.sessions() == []


async def test_litellm_400_on_the_models_check_is_a_server_side_auth_failure(
        fake_openai: FakeOpenAI) -> None:
    # what a LiteLLM proxy without a database answers for a key that is not its master key
    fake_openai.models_error = (400, "No connected db.", "no_db_connection")
    plugin = InferencePlugin(Settings.load({"base_url": fake_openai.base_url,
                                            "api_key_env": KEY_ENV, "model": "fake-model"}))
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), _chat(prompt="x"))
    err = ei.value
    assert err.code is ErrorCode.ERR_AUTH_FAILED
    assert not err.retryable
    assert f"GET {fake_openai.base_url}/models: HTTP 400" in err.message
    assert "No connected db." in err.message and "api_key_env" in err.message
    assert fake_openai.posts() == []


async def test_another_4xx_on_the_models_check_is_not_blamed_on_the_payload(
        fake_openai: FakeOpenAI) -> None:
    fake_openai.models_error = (422, "unprocessable", "weird")
    plugin = InferencePlugin(Settings.load({"base_url": fake_openai.base_url,
                                            "model": "fake-model"}))
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), _chat(prompt="x"))
    assert ei.value.code is not ErrorCode.ERR_BAD_PAYLOAD
    assert "HTTP 422" in ei.value.message and "health_check = false" in ei.value.message


async def test_prompts_take_the_same_date_formats_as_preprocess_paths(
        fake_openai: FakeOpenAI) -> None:
    plugin = InferencePlugin(Settings.load({"base_url": fake_openai.base_url,
                                            "model": "fake-model"}))
    ctx = make_ctx(scheduled_at=1_773_108_000.0)  # 2026-03-10T02:00:00Z
    text = await plugin.chat(ctx, _chat(prompt="logs of {yesterday:%Y%m%d} ({date:%d.%m.})"))
    assert text == "echo: logs of 20260309 (10.03.)"


async def test_the_models_command_lists_what_the_server_serves(
        fake_openai: FakeOpenAI, capsys: pytest.CaptureFixture[str]) -> None:
    fake_openai.models = ("m-1", "m-2")
    ctx = PluginContext(settings={"inference": {"base_url": fake_openai.base_url}})
    ap = argparse.ArgumentParser(prog="kernel")
    ps = add_plugin_commands(ap.add_subparsers(dest="cmd"), context=lambda a: ctx,
                             extra=[("inference", inference_plugin)], use_entry_points=False)
    assert ps.problems == []
    a = ap.parse_args(["inference", "models"])
    # the fake server runs in this test's loop: the command's own loop runs in a thread
    assert await asyncio.to_thread(a.handler, a) == 0
    assert capsys.readouterr().out.split() == ["m-1", "m-2"]
