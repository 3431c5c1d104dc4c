"""preprocess.prepare with real files in tmp_path: formats, normalisation, dedup, chunking,
atomic and idempotent output."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
from autoglm_preprocess import plugin as preprocess_plugin
from autoglm_preprocess.plugin import PreprocessPlugin
from autoglm_preprocess.settings import PreparePayload, Settings
from autoglm_preprocess.text import CHARS_PER_TOKEN, chunk, count_tokens, normalise

from kernel.errors import ActionError, BadPayload, ErrorCode
from kernel.hookspecs import PluginContext
from kernel.plugins import load as load_plugins

from .conftest import ProgressLog, make_ctx


def payload(**kw: Any) -> PreparePayload:
    return msgspec.convert(kw, PreparePayload)


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


async def run(tmp_path: Path, **kw: Any) -> tuple[str, list[dict[str, Any]]]:
    kw.setdefault("output", str(tmp_path / "out.jsonl"))
    report = await PreprocessPlugin(Settings()).prepare(make_ctx(), payload(**kw))
    return report, rows(Path(kw["output"]))


def test_normalise() -> None:
    raw = ("\ufeffＨｅｌｌｏ\u200b,\tworld!\r\n\r\n\r\n\n  second\x00 line\x07  here \u2028"
           "ﬁne\x0c  ")
    assert normalise(raw) == "Hello, world!\n\nsecond line here\nfine"
    assert normalise("  \n\t ") == ""
    assert normalise("a\u00a0\u00a0b") == "a b"


def test_chunking_by_chars_and_words() -> None:
    words = " ".join(f"w{i:03d}" for i in range(100))  # 100 words of 4 chars + spaces
    pieces = chunk(words, 10, 2)  # ~40 chars each, ~8 chars of overlap
    assert all(len(p) <= 10 * CHARS_PER_TOKEN for p in pieces)
    assert all(not p.startswith(" ") and not p.endswith(" ") for p in pieces)
    assert all(p.split()[0].startswith("w") and len(p.split()[0]) == 4 for p in pieces)
    for a, b in itertools.pairwise(pieces):
        assert a.split()[-1] == b.split()[0]  # one shared word of overlap
    assert {w for p in pieces for w in p.split()} == set(words.split())

    by_words = chunk("a b\nc d e f g", 3, 1, unit="whitespace")
    assert by_words == ["a b\nc", "c d e", "e f g"]
    assert chunk("short", 10, 2) == ["short"]
    assert count_tokens("abcdefghi") == 3 and count_tokens("a b  c", "whitespace") == 3
    with pytest.raises(ValueError, match="overlap"):
        chunk("x", 4, 4)


def test_chunking_never_loops_on_one_long_word() -> None:
    pieces = chunk("x" * 1000, 10, 9)
    assert "".join(pieces[:1]) == "x" * 40
    assert len(pieces) < 1000 // 4 + 2


async def test_text_jsonl_and_csv_sources(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("Hello   world\n", "utf-8")
    (tmp_path / "b.jsonl").write_text(
        '{"body": {"text": "from jsonl"}}\nnot json\n{"other": 1}\n\n'
        '{"body": {"text": "second"}}\n', "utf-8")
    (tmp_path / "c.csv").write_text('id,text\n1,"multi\nline cell"\n2,\n3,plain\n', "utf-8")
    report, out = await run(tmp_path, inputs=[str(tmp_path / "*.txt"),
                                              str(tmp_path / "b.jsonl"),
                                              str(tmp_path / "*.csv")],
                            field="body.text")
    assert [(r["source"], r["text"]) for r in out] == [
        (f"{tmp_path}/a.txt", "Hello world"),
        (f"{tmp_path}/b.jsonl:1", "from jsonl"),
        (f"{tmp_path}/b.jsonl:5", "second"),
        (f"{tmp_path}/c.csv:1", "multi\nline cell"),
        (f"{tmp_path}/c.csv:3", "plain"),
    ]
    assert all(list(r) == ["id", "source", "chunk", "text"] for r in out)
    assert "2 line(s) skipped" in report


async def test_duplicates_dropped_and_ids_are_content_hashes(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("disk full\nDisk  full\ndisk full \nok\n\n", "utf-8")
    (logs / "other.log").write_text("ok\nnew line\n", "utf-8")
    report, out = await run(tmp_path, inputs=[str(logs / "*.log")], split="line")
    assert [r["text"] for r in out] == ["disk full", "Disk full", "ok", "new line"]
    assert "2 duplicate(s), 1 empty dropped" in report
    import hashlib

    assert out[0]["id"] == hashlib.sha256(b"disk full").hexdigest()[:16] + "-0"
    assert out[2]["source"] == f"{logs}/app.log:4"


async def test_long_documents_are_chunked_with_overlap(tmp_path: Path) -> None:
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 60 for i in range(3))
    (tmp_path / "doc.md").write_text(text, "utf-8")
    _, whole = await run(tmp_path, inputs=[str(tmp_path / "doc.md")], chunk_tokens=50,
                         overlap_tokens=10)
    assert len(whole) > 3
    assert [r["chunk"] for r in whole] == list(range(len(whole)))
    assert len({r["id"].rsplit("-", 1)[0] for r in whole}) == 1
    assert all(len(r["text"]) <= 50 * 4 for r in whole)
    _, paras = await run(tmp_path, inputs=[str(tmp_path / "doc.md")], split="paragraph",
                         chunk_tokens=1000, output=str(tmp_path / "p.jsonl"))
    assert [r["source"] for r in paras] == [f"{tmp_path}/doc.md:{n}" for n in (1, 3, 5)]


async def test_rerun_gives_identical_bytes_and_does_not_rewrite(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text(f"document {i} " * 200, "utf-8")
    out = tmp_path / "out" / "prepared.jsonl"
    first, _ = await run(tmp_path, inputs=[str(tmp_path / "*.txt")], output=str(out))
    before = out.read_bytes()
    os.utime(out, (1, 1))
    second, _ = await run(tmp_path, inputs=[str(tmp_path / "*.txt")], output=str(out))
    assert out.read_bytes() == before
    assert out.stat().st_mtime == 1  # not rewritten
    assert "(unchanged)" in second and "(unchanged)" not in first
    (tmp_path / "f1.txt").write_text("changed", "utf-8")
    third, _ = await run(tmp_path, inputs=[str(tmp_path / "*.txt")], output=str(out))
    assert out.read_bytes() != before and "(unchanged)" not in third
    assert sorted(os.listdir(out.parent)) == ["prepared.jsonl"]  # no temp file left behind


async def test_output_is_not_read_as_input(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n', "utf-8")
    for _ in range(2):
        _, out = await run(tmp_path, inputs=[str(tmp_path / "*.jsonl")],
                           output=str(tmp_path / "out.jsonl"))
    assert [r["text"] for r in out] == ["x"]


async def test_yesterday_in_globs(tmp_path: Path) -> None:
    (tmp_path / "app-20260309.log").write_text("yesterday's line\n", "utf-8")
    (tmp_path / "app-20260310.log").write_text("today's line\n", "utf-8")
    plugin = PreprocessPlugin(Settings(base_dir=str(tmp_path)))
    ctx = make_ctx(scheduled_at=1_773_108_000.0)  # 2026-03-10T02:00:00Z
    await plugin.prepare(ctx, payload(inputs=["app-{yesterday:%Y%m%d}.log"],
                                      output="out-{yesterday}.jsonl"))
    assert [r["text"] for r in rows(tmp_path / "out-2026-03-09.jsonl")] == ["yesterday's line"]


async def test_missing_inputs_and_bad_csv_column(tmp_path: Path) -> None:
    with pytest.raises(ActionError, match="no file matches") as ei:
        await run(tmp_path, inputs=[str(tmp_path / "nothing-*.log")])
    assert not ei.value.retryable
    _, out = await run(tmp_path, inputs=[str(tmp_path / "nothing-*.log")], if_missing="empty")
    assert out == []
    (tmp_path / "c.csv").write_text("a,b\n1,2\n", "utf-8")
    with pytest.raises(ActionError, match="no column 'text'.*columns: a, b") as ei:
        await run(tmp_path, inputs=[str(tmp_path / "c.csv")])
    assert ei.value.code is ErrorCode.ERR_BAD_PAYLOAD


def test_registered_through_the_hook_with_a_checked_payload() -> None:
    ps = load_plugins(PluginContext(settings={"preprocess": {"chunk_tokens": 256}}),
                      extra=[("preprocess", preprocess_plugin)], use_entry_points=False)
    act = ps.action("preprocess.prepare")
    with pytest.raises(BadPayload, match="inputs"):
        ps.decode_payload(act, {"inputs": [], "output": "x"})
    with pytest.raises(BadPayload, match="overlap_tokens"):
        ps.decode_payload(act, {"inputs": ["a"], "output": "x", "chunk_tokens": 8,
                                "overlap_tokens": 8})
    bad = load_plugins(PluginContext(settings={"preprocess": {"tokens": "bpe"}}),
                       extra=[("preprocess", preprocess_plugin)], use_entry_points=False)
    assert any("[plugins.preprocess]" in p.message for p in bad.problems)


async def test_progress_is_reported_per_file(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text(f"text of {name}\n", "utf-8")
    seen = ProgressLog()
    out = tmp_path / "out" / "prepared.jsonl"
    await PreprocessPlugin(Settings()).prepare(seen.ctx(), payload(
        inputs=[str(tmp_path / "*.txt")], output=str(out)))
    assert seen.calls == [(0, 3, "reading a.txt"), (1, 3, "reading b.txt"),
                          (2, 3, "reading c.txt"), (3, 3, "writing prepared.jsonl")]


async def test_progress_over_many_files_is_throttled(tmp_path: Path) -> None:
    for i in range(450):
        (tmp_path / f"f{i:03d}.txt").write_text(f"document {i}", "utf-8")
    seen = ProgressLog()
    await PreprocessPlugin(Settings()).prepare(seen.ctx(), payload(
        inputs=[str(tmp_path / "*.txt")], output=str(tmp_path / "out.jsonl")))
    assert seen.calls[0] == (0, 450, "reading f000.txt")
    assert seen.calls[-1] == (450, 450, "writing out.jsonl")
    assert len(seen.calls) <= 102 and seen.done == sorted(seen.done)
