"""Long SSE lines from a streamed chat answer, against the real fake server on 127.0.0.1.

A server that does not stream incrementally sends the whole completion in one ``data:`` line.
aiohttp's own line reader gives up at 128 KiB with ``LineTooLong`` (not a ``ClientError``), which
used to escape the plugin without an error code. The plugin reads SSE lines itself, up to
``sse_max_line_bytes`` (8 MiB by default); a longer line is ERR_BAD_RESPONSE naming the endpoint
and the limit.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from autoglm_inference.plugin import InferencePlugin
from autoglm_inference.settings import ChatPayload, Settings

from kernel.errors import ActionError, ErrorCode

from .conftest import make_ctx
from .fake_openai import FakeOpenAI

MiB = 1024 * 1024
DEFAULT_SSE_MAX_LINE = 8 * MiB


def make_plugin(server: FakeOpenAI, **settings: Any) -> InferencePlugin:
    return InferencePlugin(Settings.load({
        "base_url": server.base_url, "model": "fake-model", "api_key_env": "",
        "stream": True, **settings}))


def chat(prompt: str) -> ChatPayload:
    return msgspec.convert({"prompt": prompt}, ChatPayload)


def test_the_default_limit_is_8_mib() -> None:
    assert DEFAULT_SSE_MAX_LINE == 8 * MiB
    assert Settings().sse_max_line_bytes == DEFAULT_SSE_MAX_LINE


async def test_a_3_mb_sse_line_is_read_whole(fake_openai: FakeOpenAI) -> None:
    fake_openai.sse_line_bytes = 3 * MiB
    text = await make_plugin(fake_openai).chat(make_ctx(), chat("big"))
    assert text.startswith("echo: bigxxx")
    assert set(text[len("echo: big"):]) == {"x"}
    assert 3 * MiB - 300 < len(text) < 3 * MiB


async def test_a_line_over_the_default_limit_is_a_coded_failure(
        fake_openai: FakeOpenAI) -> None:
    fake_openai.sse_line_bytes = DEFAULT_SSE_MAX_LINE + 1
    with pytest.raises(ActionError) as ei:
        await make_plugin(fake_openai).chat(make_ctx(), chat("big"))
    err = ei.value
    assert err.code is ErrorCode.ERR_BAD_RESPONSE
    assert not err.retryable  # the same request would get the same line
    assert f"{fake_openai.base_url}/chat/completions" in err.message
    assert f"{DEFAULT_SSE_MAX_LINE} bytes" in err.message
    assert "sse_max_line_bytes" in err.message  # the setting that would let it through


@pytest.mark.parametrize(("line", "ok"), [(4096, True), (4097, False)])
async def test_the_limit_is_a_setting_and_exact(fake_openai: FakeOpenAI, line: int,
                                                ok: bool) -> None:
    fake_openai.sse_line_bytes = line
    plugin = make_plugin(fake_openai, sse_max_line_bytes=4096)
    if ok:
        assert (await plugin.chat(make_ctx(), chat("x"))).startswith("echo: xxx")
        return
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), chat("x"))
    assert ei.value.code is ErrorCode.ERR_BAD_RESPONSE
    assert "4096 bytes" in ei.value.message


async def test_ordinary_streams_still_work_with_a_tiny_limit(fake_openai: FakeOpenAI) -> None:
    plugin = make_plugin(fake_openai, sse_max_line_bytes=1024)
    assert await plugin.chat(make_ctx(), chat("one two three")) == "echo: one two three"


def test_a_limit_below_1_kib_is_refused() -> None:
    with pytest.raises(Exception, match="sse_max_line_bytes: must be at least 1024"):
        Settings.load({"sse_max_line_bytes": 100})


async def test_a_reply_that_is_not_json_is_bad_response_and_retried(
        fake_openai: FakeOpenAI) -> None:
    fake_openai.errors = ["not_json"]
    plugin = make_plugin(fake_openai, stream=False)
    with pytest.raises(ActionError) as ei:
        await plugin.chat(make_ctx(), chat("x"))
    assert ei.value.code is ErrorCode.ERR_BAD_RESPONSE
    assert ei.value.retryable
    assert f"{fake_openai.base_url}/chat/completions" in ei.value.message
