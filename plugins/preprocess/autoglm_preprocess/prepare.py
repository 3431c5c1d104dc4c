"""The ``preprocess.prepare`` pipeline: expand globs, read, normalise, drop duplicates, chunk,
write JSONL atomically.

Deterministic by construction: files are taken in sorted path order, documents in file order,
the first copy of a duplicate wins, ids are content hashes (``<sha256 of the normalised
document, 16 hex>-<chunk number>``), and records are encoded with a fixed key order. The same
inputs therefore give the same output bytes; when they are already on disk the file is not
rewritten at all.

Progress is counted in files: ``progress(i, n, "reading <name>")`` before the i-th of ``n``
files is read (every file when there are up to ``PROGRESS_STEPS``, else every
``n / PROGRESS_STEPS``-th (rounded up)), then ``progress(n, n, "writing <output name>")``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from kernel.errors import ActionError, ErrorCode
from kernel.files import atomic_write
from kernel.templates import TemplateError, render, time_variables

from .readers import Document, ReadStats, format_of, read_csv, read_jsonl, read_text
from .settings import PreparePayload, Settings
from .text import chunk, content_hash, normalise


class Record(msgspec.Struct, frozen=True):
    """One output line; field order is the JSON key order."""

    id: str
    source: str
    chunk: int
    text: str


_encoder = msgspec.json.Encoder()
PROGRESS_STEPS = 100  # reports of progress in one run, about
Progress = Callable[[float, float | None, str], None]


@dataclass(slots=True)
class Report:
    files: int = 0
    documents: int = 0
    duplicates: int = 0
    empty: int = 0
    chunks: int = 0
    changed: bool = True
    output: str = ""
    read: ReadStats = field(default_factory=ReadStats)

    def __str__(self) -> str:
        text = (f"{self.files} file(s), {self.documents} document(s) kept "
                f"({self.duplicates} duplicate(s), {self.empty} empty dropped), "
                f"{self.chunks} chunk(s) -> {self.output}")
        if self.read.skipped:
            text += f"; {self.read.skipped} line(s) skipped (e.g. {self.read.examples[0]})"
        if not self.changed:
            text += " (unchanged)"
        return text


def expand_dates(pattern: str, scheduled_at: float | None, tz: str, where: str = "") -> str:
    """The path ``pattern`` rendered in the kernel's template dialect (``kernel.templates``):
    ``{date}`` / ``{yesterday}`` are the run's scheduled day in ``tz`` (never the clock's: a
    rerun of an occurrence reads the same files), ``{yesterday:%Y%m%d}`` takes a strftime
    format, ``{{x}}`` is a literal ``{x}``; ``where`` names the payload field in errors."""
    try:
        return render(pattern, time_variables(scheduled_at, tz))
    except TemplateError as exc:
        field_name = f"{where}: " if where else ""
        raise ActionError(f"{field_name}{pattern!r}: {exc}",
                          code=ErrorCode.ERR_BAD_PAYLOAD) from None


def resolve(path: str, base_dir: str) -> str:
    p = os.path.expanduser(path)
    if base_dir and not os.path.isabs(p):
        p = os.path.join(os.path.expanduser(base_dir), p)
    return p


def find_files(patterns: list[str], exclude: Path) -> list[Path]:
    found: set[str] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            found.update(glob.glob(pattern, recursive=True))
        elif os.path.exists(pattern):
            found.add(pattern)
    out = []
    for name in sorted(found):
        p = Path(name)
        if p.is_file() and os.path.abspath(p) != os.path.abspath(exclude):
            out.append(p)
    return out


def _documents(files: list[Path], p: PreparePayload, stats: ReadStats,
               progress: Progress | None = None) -> Iterator[Document]:
    step = max(1, -(-len(files) // PROGRESS_STEPS))  # rounded up
    for i, path in enumerate(files):
        if progress is not None and i % step == 0:
            progress(i, len(files), f"reading {path.name}")
        kind = format_of(path, p.format)
        if kind == "jsonl":
            yield from read_jsonl(path, p.field, p.encoding, stats)
        elif kind == "csv":
            yield from read_csv(path, p.column, p.encoding)
        else:
            yield from read_text(path, p.split, p.encoding)


def build(files: list[Path], p: PreparePayload, s: Settings, report: Report,
          progress: Progress | None = None) -> bytes:
    """The output file's bytes (pure apart from reading ``files`` and telling ``progress``)."""
    size = p.chunk_tokens if p.chunk_tokens is not None else s.chunk_tokens
    overlap = p.overlap_tokens if p.overlap_tokens is not None else s.overlap_tokens
    if overlap >= size:
        raise ActionError(f"overlap_tokens ({overlap}) must be smaller than chunk_tokens "
                          f"({size})", code=ErrorCode.ERR_BAD_PAYLOAD)
    unit = p.tokens or s.tokens
    seen: set[str] = set()
    out = bytearray()
    for doc in _documents(files, p, report.read, progress):
        text = normalise(doc.text)
        if len(text) < max(1, p.min_chars):
            report.empty += 1
            continue
        digest = content_hash(text)
        if p.dedup:
            if digest in seen:
                report.duplicates += 1
                continue
            seen.add(digest)
        report.documents += 1
        for n, piece in enumerate(chunk(text, size, overlap, unit)):
            out += _encoder.encode(Record(f"{digest[:16]}-{n}", doc.source, n, piece))
            out += b"\n"
            report.chunks += 1
    return bytes(out)


def prepare(p: PreparePayload, s: Settings, scheduled_at: float | None,
            progress: Progress | None = None) -> Report:
    """Run the whole pipeline (synchronous: call it through a thread; ``progress`` is called
    in that thread)."""
    output = Path(resolve(expand_dates(p.output, scheduled_at, p.tz, "output"), s.base_dir))
    patterns = [resolve(expand_dates(x, scheduled_at, p.tz, f"inputs[{i}]"), s.base_dir)
                for i, x in enumerate(p.inputs)]
    files = find_files(patterns, exclude=output)
    if not files and p.if_missing == "fail":
        raise ActionError(f"no file matches {', '.join(patterns)} (set if_missing = \"empty\" "
                          "to write an empty output instead)", code=ErrorCode.ERR_ACTION_FAILED,
                          retryable=False)
    report = Report(files=len(files), output=str(output))
    data = build(files, p, s, report, progress)
    if progress is not None:
        progress(len(files), len(files), f"writing {output.name}")
    try:
        report.changed = output.read_bytes() != data
    except OSError:
        report.changed = True
    if report.changed:
        atomic_write(output, data)
    return report
