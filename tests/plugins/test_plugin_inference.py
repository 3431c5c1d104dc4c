"""inference.chat / inference.embed against a real HTTP server on 127.0.0.1 (a fake model).

Each test reads what the plugin actually sent (``fake_openai.requests``): headers, including
``Authorization`` and ``traceparent``, and body fields.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from autoglm_inference import plugin as inference_plugin
from autoglm_inference.client import retry_after
from autoglm_inference.plugin import InferencePlugin
from autoglm_inference.settings import ChatPayload, EmbedPayload, Settings

from kernel.errors import ActionError, BadPayload, ErrorCode, Retry
from kernel.hookspecs import PluginContext
from kernel.plugins import load as load_plugins

from .conftest import free_port, make_ctx
from .fake_openai import FakeOpenAI

KEY_ENV = "AUTOGLM_TEST_INFERENCE_KEY"
KEY = "sk-test-0123456789abcdef"


def make_plugin(server: FakeOpenAI | None, **settings: Any) -> InferencePlugin:
    table: dict[str, Any] = {"api_key_env": KEY_ENV, "model": "fake-model"}
    if server is not None:
        table["base_url"] = server.base_url
    table.update(settings)
    return InferencePlugin(Settings.load(table))


def chat_payload(**kw: Any) -> ChatPayload:
    import msgspec

    return msgspec.convert(kw, ChatPayload)


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


async def test_chat_renders_template_and_sends_what_it_should(
        fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("disk 91% full", "utf-8")
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n', "utf-8")
    plugin = make_plugin(fake_openai, temperature=0.2, max_tokens=64,
                         extra_body={"top_k": 5}, base_dir=str(tmp_path))
    ctx = make_ctx(scheduled_at=1_773_108_000.0)  # 2026-03-10T02:00:00Z
    p = chat_payload(
        system="You are terse. Day: {yesterday}.",
        prompt='Host {host}: {file:notes.txt} | {rows} | keep {"json": 1} and {{literal}}',
        vars={"host": "gpu-1"}, files={"rows": {"path": "rows.jsonl", "field": "text"}},
        top_p=0.9, extra_body={"repetition_penalty": 1.1}, output="out/answer.txt")
    text = await plugin.chat(ctx, p)

    prompt = 'Host gpu-1: disk 91% full | a\nb | keep {"json": 1} and {literal}'
    assert text == f"echo: {prompt}"
    assert (tmp_path / "out/answer.txt").read_text("utf-8") == text
    health, post = fake_openai.requests
    assert (health.method, health.path) == ("GET", "/v1/models")
    assert (post.method, post.path) == ("POST", "/v1/chat/completions")
    for req in (health, post):
        assert req.headers["Authorization"] == f"Bearer {KEY}"
        assert req.headers["traceparent"] == ctx.traceparent
    assert post.body == {
        "model": "fake-model",
        "messages": [{"role": "system", "content": "You are terse. Day: 2026-03-09."},
                     {"role": "user", "content": prompt}],
        "temperature": 0.2, "max_tokens": 64, "top_p": 0.9, "stream": False,
        "top_k": 5, "repetition_penalty": 1.1}


async def test_streaming_assembles_sse_chunks(fake_openai: FakeOpenAI) -> None:
    plugin = make_plugin(fake_openai, stream=True)
    text = await plugin.chat(make_ctx(), chat_payload(prompt="one two three four"))
    assert text == "echo: one two three four"
    assert fake_openai.posts()[-1].body["stream"] is True


async def test_messages_payload_and_first_served_model(fake_openai: FakeOpenAI) -> None:
    fake_openai.models = ("served-a", "served-b")
    plugin = make_plugin(fake_openai, model="")
    p = chat_payload(messages=[{"role": "system", "content": "sys {task_id}"},
                               {"role": "user", "content": "hi"}])
    assert await plugin.chat(make_ctx(task_id="nightly"), p) == "echo: hi"
    body = fake_openai.posts()[-1].body
    assert body["model"] == "served-a"
    assert body["messages"][0] == {"role": "system", "content": "sys nightly"}


async def test_unknown_model_is_reported_by_the_health_check(fake_openai: FakeOpenAI) -> None:
    plugin = make_plugin(fake_openai, model="nope")
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), chat_payload(prompt="x"))
    assert ei.value.code is ErrorCode.ERR_MODEL_NOT_FOUND
    assert not ei.value.retryable
    assert "fake-model" in ei.value.message  # it lists what is served
    assert fake_openai.posts() == []          # nothing was sent to the model


async def test_health_falls_back_to_root_health(fake_openai: FakeOpenAI) -> None:
    fake_openai.has_models_route = False
    plugin = make_plugin(fake_openai)
    assert await plugin.chat(make_ctx(), chat_payload(prompt="x")) == "echo: x"
    assert [r.path for r in fake_openai.requests] == [
        "/v1/models", "/health", "/v1/chat/completions"]


@pytest.mark.parametrize(("mode", "code", "retryable", "delay"), [
    ("401", ErrorCode.ERR_AUTH_FAILED, False, None),
    ("404", ErrorCode.ERR_MODEL_NOT_FOUND, False, None),
    ("429", ErrorCode.ERR_OVERLOADED, True, 7.0),
    ("503", ErrorCode.ERR_OVERLOADED, True, None),
    ("context", ErrorCode.ERR_CONTEXT_TOO_LONG, False, None),
    ("500", ErrorCode.ERR_ACTION_FAILED, True, None),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_http_errors_map_to_codes(fake_openai: FakeOpenAI, mode: str, code: ErrorCode,
                                        retryable: bool, delay: float | None,
                                        stream: bool) -> None:
    fake_openai.errors = [mode]
    plugin = make_plugin(fake_openai, stream=stream)
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), chat_payload(prompt="x"))
    assert ei.value.code is code
    assert ei.value.retryable is retryable
    if delay is not None:
        assert isinstance(ei.value, Retry)
        assert ei.value.delay == delay
    else:
        assert not isinstance(ei.value, Retry)


async def test_error_event_inside_a_stream(fake_openai: FakeOpenAI) -> None:
    fake_openai.errors = ["stream_error"]
    plugin = make_plugin(fake_openai, stream=True)
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), chat_payload(prompt="x"))
    assert ei.value.code is ErrorCode.ERR_OVERLOADED
    assert "engine overloaded" in ei.value.message


async def test_connection_refused_is_a_retryable_conn_error() -> None:
    plugin = make_plugin(None, base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), chat_payload(prompt="x"))
    assert ei.value.code is ErrorCode.ERR_CONN_TIMEOUT
    assert ei.value.retryable


async def test_slow_server_times_out(fake_openai: FakeOpenAI) -> None:
    fake_openai.errors = ["hang"]
    plugin = make_plugin(fake_openai, timeout="200ms")
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), chat_payload(prompt="x"))
    assert ei.value.code is ErrorCode.ERR_CONN_TIMEOUT
    assert ei.value.retryable


async def test_wrong_key_is_auth_failed_and_the_key_never_leaks(
        fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    fake_openai.api_key = "sk-the-right-key-000000"
    plugin = make_plugin(fake_openai)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), chat_payload(prompt="x"))
    assert ei.value.code is ErrorCode.ERR_AUTH_FAILED
    assert KEY not in str(ei.value)
    assert KEY not in caplog.text
    assert KEY not in repr(plugin.endpoint(chat_payload(prompt="x")))


async def test_key_is_read_from_the_environment_at_run_time(
        fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_openai.api_key = "sk-rotated-key-1111111"
    plugin = make_plugin(fake_openai)
    monkeypatch.setenv(KEY_ENV, "sk-rotated-key-1111111")  # after the plugin was built
    assert await plugin.chat(make_ctx(), chat_payload(prompt="x")) == "echo: x"
    monkeypatch.delenv(KEY_ENV)
    fake_openai.api_key = None
    await plugin.chat(make_ctx(), chat_payload(prompt="y"))
    assert "Authorization" not in fake_openai.posts()[-1].headers


async def test_payload_overrides_endpoint_and_model(fake_openai: FakeOpenAI) -> None:
    fake_openai.models = ("fake-model", "other")
    plugin = make_plugin(None)  # plugin default points nowhere useful
    p = chat_payload(prompt="x", base_url=fake_openai.base_url, model="other")
    await plugin.chat(make_ctx(), p)
    assert fake_openai.posts()[-1].body["model"] == "other"
    assert plugin.concurrency_key(p) == fake_openai.base_url
    assert plugin.concurrency_key(chat_payload(prompt="x")) == "http://localhost:8000/v1"


async def test_template_mistakes_are_bad_payloads(fake_openai: FakeOpenAI,
                                                  tmp_path: Path) -> None:
    plugin = make_plugin(fake_openai, base_dir=str(tmp_path))
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), chat_payload(prompt="hello {who}"))
    assert ei.value.code is ErrorCode.ERR_BAD_PAYLOAD
    assert "{who}" in ei.value.message
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), chat_payload(prompt="{file:missing.txt}"))
    assert ei.value.code is ErrorCode.ERR_BAD_PAYLOAD
    assert "missing.txt" in ei.value.message
    assert fake_openai.requests == []


async def test_embed(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    plugin = make_plugin(fake_openai, base_dir=str(tmp_path))
    p = EmbedPayload(input=["a b", "hello {x}"], vars={"x": "you all"}, dimensions=3,
                     output="emb.json")
    vectors = await plugin.embed(make_ctx(), p)
    assert vectors == [[3.0, 2.0, 0.0], [13.0, 3.0, 1.0]]  # re-ordered by index
    body = fake_openai.posts("/v1/embeddings")[-1].body
    assert body == {"model": "fake-model", "input": ["a b", "hello you all"], "dimensions": 3}
    import json

    assert json.loads((tmp_path / "emb.json").read_text()) == {
        "model": "fake-model", "embeddings": vectors}


async def test_payload_schema_errors_name_the_field() -> None:
    ps = load_plugins(PluginContext(settings={"inference": {"model": "m"}}),
                      extra=[("inference", inference_plugin)], use_entry_points=False)
    assert {"inference.chat", "inference.embed", "inference.batch"} <= set(ps.actions)
    chat = ps.action("inference.chat")
    with pytest.raises(BadPayload, match="prompt"):
        ps.decode_payload(chat, {})
    with pytest.raises(BadPayload, match="unknown field"):
        ps.decode_payload(chat, {"prompt": "x", "temprature": 1})
    p = ps.decode_payload(chat, {"prompt": "x", "timeout": "90s"})
    assert p.timeout == 90.0
    assert chat.concurrency_key is not None
    assert chat.concurrency_key(p) == "http://localhost:8000/v1"


def test_bad_settings_are_a_plugin_problem_not_a_crash() -> None:
    ps = load_plugins(PluginContext(settings={"inference": {"base_url": "localhost:8000"}}),
                      extra=[("inference", inference_plugin)], use_entry_points=False)
    assert "inference.chat" not in ps.actions
    [problem] = [p for p in ps.problems if p.plugin == "inference"]
    assert "[plugins.inference]" in problem.message and "base_url" in problem.message


def test_retry_after_forms() -> None:
    assert retry_after({"Retry-After": "12"}) == 12.0
    assert retry_after({"Retry-After": "Wed, 21 Oct 2026 07:28:30 GMT",
                        "Date": "Wed, 21 Oct 2026 07:28:00 GMT"}) == 30.0
    assert retry_after({"Retry-After": "soon"}) is None
    assert retry_after({}) is None


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("KERNEL_TEST_MODEL_URL"),
                    reason="set KERNEL_TEST_MODEL_URL to a real OpenAI-compatible server "
                           "(e.g. http://127.0.0.1:8000/v1) to run this test")
async def test_real_model_server() -> None:
    base = os.environ["KERNEL_TEST_MODEL_URL"]
    plugin = InferencePlugin(Settings.load({
        "base_url": base, "model": os.environ.get("KERNEL_TEST_MODEL", ""),
        "api_key_env": "KERNEL_TEST_MODEL_KEY", "timeout": "5m"}))
    text = await plugin.chat(make_ctx(), chat_payload(
        prompt="Reply with the single word: pong", max_tokens=16, temperature=0.0))
    assert text.strip()
    streamed = await plugin.chat(make_ctx(), chat_payload(
        prompt="Count from 1 to 5.", max_tokens=32, stream=True))
    assert streamed.strip()
