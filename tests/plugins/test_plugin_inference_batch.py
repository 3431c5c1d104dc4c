"""inference.batch: bounded concurrency, atomic output, and resuming after a failure or a
SIGKILL without sending answered requests again (checked in the fake server's request log)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest
from autoglm_inference import batch as batch_mod
from autoglm_inference.plugin import InferencePlugin
from autoglm_inference.settings import BatchPayload, Settings

from kernel.errors import ActionError, ErrorCode

from .conftest import ProgressLog, make_ctx
from .fake_openai import FakeOpenAI


def make_plugin(server: FakeOpenAI, **settings: Any) -> InferencePlugin:
    return InferencePlugin(Settings.load({"base_url": server.base_url, "model": "fake-model",
                                          "api_key_env": "", **settings}))


def payload(**kw: Any) -> BatchPayload:
    return msgspec.convert(kw, BatchPayload)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


def asked(server: FakeOpenAI) -> list[str]:
    """The user prompts the server received, in order."""
    return [r.body["messages"][-1]["content"] for r in server.posts()]


async def test_batch_answers_every_form_in_input_order(fake_openai: FakeOpenAI,
                                                       tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "alpha"},
        {"id": 2, "messages": [{"role": "user", "content": "beta"}], "max_tokens": 3},
        {"id": "c", "prompt": "gamma"},
    ])
    plugin = make_plugin(fake_openai)
    out = tmp_path / "out.jsonl"
    report = await plugin.batch(make_ctx(), payload(
        input=str(src), output=str(out), system="be brief", concurrency=3, max_tokens=50))
    assert "3 answered now, 0 from the checkpoint" in report
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["a", 2, "c"]
    assert [r["text"] for r in rows] == ["echo: alpha", "echo: beta", "echo: gamma"]
    assert all(r["finish_reason"] == "stop" for r in rows)
    bodies = {b["messages"][-1]["content"]: b for b in (p.body for p in fake_openai.posts())}
    assert bodies["beta"]["max_tokens"] == 3 and bodies["alpha"]["max_tokens"] == 50
    assert bodies["alpha"]["messages"][0] == {"role": "system", "content": "be brief"}
    assert not (tmp_path / "out.jsonl.partial").exists()
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temp files left


async def test_batch_over_preprocess_records_with_a_template(fake_openai: FakeOpenAI,
                                                             tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "prepared.jsonl", [
        {"id": "d1:0", "source": "a.log", "chunk": 0, "text": "line one"},
        {"id": "d1:1", "source": "a.log", "chunk": 1, "text": "line two"},
    ])
    out = tmp_path / "summaries.jsonl"
    await make_plugin(fake_openai).batch(make_ctx(), payload(
        input=str(src), output=str(out), template="Summarise {source}#{chunk}: {text}"))
    rows = read_jsonl(out)
    assert rows[0] == {"id": "d1:0", "source": "a.log", "chunk": 0,
                       "text": "echo: Summarise a.log#0: line one", "finish_reason": "stop",
                       "usage": rows[0]["usage"]}
    assert asked(fake_openai) == ["Summarise a.log#0: line one", "Summarise a.log#1: line two"]


async def test_batch_embeddings(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "a b c"}, {"id": 2, "text": "x"}])
    out = tmp_path / "emb.jsonl"
    await make_plugin(fake_openai).batch(make_ctx(), payload(
        input=str(src), output=str(out), endpoint="embeddings"))
    assert read_jsonl(out) == [{"id": 1, "embedding": [5.0, 3.0, 0.0]},
                               {"id": 2, "embedding": [1.0, 1.0, 0.0]}]


async def test_resume_after_the_server_fails_half_way(fake_openai: FakeOpenAI,
                                                      tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"q{i}"} for i in range(10)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    plugin = make_plugin(fake_openai)
    p = payload(input=str(src), output=str(out), concurrency=1)
    fake_openai.fail_after = 4
    with pytest.raises(ActionError) as ei:
        await plugin.batch(make_ctx(), p)
    assert ei.value.code is ErrorCode.ERR_OVERLOADED and ei.value.retryable
    assert not out.exists()
    partial = read_jsonl(tmp_path / "out.jsonl.partial")
    assert [r["id"] for r in partial] == ["r0", "r1", "r2", "r3"]
    assert asked(fake_openai) == ["q0", "q1", "q2", "q3", "q4"]  # q4 got the 503

    fake_openai.fail_after = None
    fake_openai.requests.clear()
    report = await plugin.batch(make_ctx(attempt=2), p)
    assert asked(fake_openai) == [f"q{i}" for i in range(4, 10)]  # only the rest
    assert "6 answered now, 4 from the checkpoint" in report
    assert [r["text"] for r in read_jsonl(out)] == [f"echo: q{i}" for i in range(10)]
    assert not (tmp_path / "out.jsonl.partial").exists()


async def test_a_changed_prompt_is_asked_again_and_a_torn_line_dropped(
        fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(3)])
    out = tmp_path / "out.jsonl"
    plugin = make_plugin(fake_openai)
    p = payload(input=str(src), output=str(out), concurrency=1)
    fake_openai.fail_after = 2
    with pytest.raises(ActionError):
        await plugin.batch(make_ctx(), p)
    ckpt = tmp_path / "out.jsonl.partial"
    ckpt.write_bytes(ckpt.read_bytes() + b'{"id": 2, "req": "tor')  # died mid-line
    write_jsonl(src, [{"id": 0, "prompt": "q0"}, {"id": 1, "prompt": "CHANGED"},
                      {"id": 2, "prompt": "q2"}])
    fake_openai.fail_after = None
    fake_openai.requests.clear()
    await plugin.batch(make_ctx(), p)
    assert asked(fake_openai) == ["CHANGED", "q2"]
    assert [r["text"] for r in read_jsonl(out)] == ["echo: q0", "echo: CHANGED", "echo: q2"]


async def test_one_bad_item_is_recorded_or_fails_the_batch(fake_openai: FakeOpenAI,
                                                           tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(3)])
    out = tmp_path / "out.jsonl"
    plugin = make_plugin(fake_openai)
    fake_openai.errors = ["context"]
    await plugin.batch(make_ctx(), payload(input=str(src), output=str(out), concurrency=1))
    rows = read_jsonl(out)
    assert rows[0]["error"]["code"] == "ERR_CONTEXT_TOO_LONG"
    assert [r.get("text") for r in rows[1:]] == ["echo: q1", "echo: q2"]

    fake_openai.errors = ["context"]
    with pytest.raises(ActionError) as ei:
        await plugin.batch(make_ctx(), payload(input=str(src), output=str(tmp_path / "o2"),
                                               concurrency=1, on_item_error="fail"))
    assert ei.value.code is ErrorCode.ERR_CONTEXT_TOO_LONG


async def test_bad_input_names_the_line(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    plugin = make_plugin(fake_openai)
    src = tmp_path / "in.jsonl"
    for content, needle in [('{"id": 1, "prompt": "a"}\nnot json\n', "in.jsonl:2"),
                            ('{"prompt": "a"}\n', "in.jsonl:1: `id`"),
                            ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n',
                             "duplicate id"),
                            ('{"id": 1, "text": "a"}\n', "needs `prompt` or `messages`")]:
        src.write_text(content, "utf-8")
        with pytest.raises(ActionError, match=needle) as ei:
            await plugin.batch(make_ctx(), payload(input=str(src), output=str(tmp_path / "o")))
        assert ei.value.code is ErrorCode.ERR_BAD_PAYLOAD
    assert fake_openai.posts() == []


async def test_requests_in_flight_are_bounded_per_endpoint(fake_openai: FakeOpenAI,
                                                           tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(8)])
    plugin = make_plugin(fake_openai, endpoint_concurrency=2)
    fake_openai.hold = asyncio.Event()
    run = asyncio.create_task(plugin.batch(make_ctx(), payload(
        input=str(src), output=str(tmp_path / "out.jsonl"), concurrency=8)))
    for _ in range(500):
        if fake_openai.in_flight == 2:
            break
        await asyncio.sleep(0.01)
    for _ in range(20):  # give a third request every chance to show up
        await asyncio.sleep(0.005)
    assert fake_openai.in_flight == 2
    fake_openai.hold.set()
    await run
    assert fake_openai.max_in_flight == 2
    assert len(fake_openai.posts()) == 8


_CHILD = textwrap.dedent("""
    import asyncio, logging, sys
    import msgspec
    from autoglm_inference.plugin import InferencePlugin
    from autoglm_inference.settings import BatchPayload, Settings
    from kernel.hookspecs import RunContext

    base_url, src, out = sys.argv[1:4]
    plugin = InferencePlugin(Settings.load(
        {"base_url": base_url, "model": "fake-model", "api_key_env": ""}))
    ctx = RunContext(job_id="j", task_id="t", action="inference.batch",
                     trace_id="1" * 32, span_id="2" * 16, attempt=1, scheduled_at=None,
                     timeout=None, log=logging.LoggerAdapter(logging.getLogger("x"), {}))
    p = msgspec.convert({"input": src, "output": out, "concurrency": 1}, BatchPayload)
    asyncio.run(plugin.batch(ctx, p))
""")


@pytest.mark.slow
async def test_resume_after_sigkill(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    """A real crash: the process running the batch is SIGKILLed after 5 answers."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(12)])
    out = tmp_path / "out.jsonl"
    fake_openai.hang_after = 5  # the 6th request never gets an answer: the child is stuck
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, fake_openai.base_url, str(src), str(out),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ckpt = tmp_path / "out.jsonl.partial"
        for _ in range(3000):  # real I/O in another process: poll, bounded (30 s)
            if len(fake_openai.posts()) == 6 and ckpt.exists() and \
                    ckpt.read_bytes().count(b"\n") == 5:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"child did not get to 5 answers: {len(fake_openai.posts())}")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        _, err = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert not out.exists()

    fake_openai.hang_after = None
    fake_openai.requests.clear()
    plugin = make_plugin(fake_openai)
    report = await plugin.batch(make_ctx(), payload(input=str(src), output=str(out)))
    assert sorted(asked(fake_openai), key=lambda q: int(q[1:])) == [
        f"q{i}" for i in range(5, 12)]
    assert "5 from the checkpoint" in report
    assert [r["id"] for r in read_jsonl(out)] == list(range(12))


# ---------------------------------------------------------------------------- progress
async def test_batch_reports_progress_per_request_and_resumes_from_the_checkpoint(
        fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(10)])
    out = tmp_path / "out.jsonl"
    plugin = make_plugin(fake_openai)
    p = payload(input=str(src), output=str(out), concurrency=1)
    fake_openai.errors = ["context"]      # the first request: an item error, recorded
    fake_openai.fail_after = 4            # the server goes down after 4 answers
    first = ProgressLog()
    with pytest.raises(ActionError):
        await plugin.batch(first.ctx(), p)
    assert first.done == [0, 1, 2, 3, 4, 5]   # one report per answered request (10 < 100)
    assert {c[1] for c in first.calls} == {10}
    assert first.calls[0][2] == "requests"
    assert first.calls[-1][2] == "requests, 1 item error(s)"

    fake_openai.fail_after = None
    again = ProgressLog()
    await plugin.batch(again.ctx(attempt=2), p)
    assert again.done == [5, 6, 7, 8, 9, 10]   # starts where the checkpoint left off
    assert again.calls[0] == (5, 10, "requests, 1 item error(s), 5 from the checkpoint")
    assert again.calls[-1][:2] == (10, 10)


async def test_batch_progress_is_throttled_to_about_a_hundred_reports(tmp_path: Path) -> None:
    items = [batch_mod.Item(i, str(i), {"n": i}, str(i), {}) for i in range(1000)]

    async def call(it: batch_mod.Item) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"id": it.id}

    seen = ProgressLog()
    report = await batch_mod.run_batch(
        items, call, output=tmp_path / "o.jsonl", checkpoint=tmp_path / "o.partial",
        concurrency=8, progress=seen)
    assert report.answered == 1000
    assert seen.calls[0] == (0, 1000, "requests") and seen.calls[-1][:2] == (1000, 1000)
    assert 100 <= len(seen.calls) <= batch_mod.PROGRESS_STEPS + 2
    assert seen.done == sorted(seen.done)       # never goes back
    assert max(b - a for a, b in zip(seen.done, seen.done[1:], strict=False)) <= 10 + 8
