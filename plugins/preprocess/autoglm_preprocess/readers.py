"""Documents out of files: plain text (whole file, paragraphs or lines), JSONL (a field) and
CSV (a column). Synchronous: the plugin calls these through a thread.

Each document carries its source: ``path`` for a whole file, ``path:N`` otherwise, where N is
the line number (text, JSONL; the first line of a paragraph) or the CSV record number (1 =
the first record after the header).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel.errors import ActionError, ErrorCode


@dataclass(frozen=True, slots=True)
class Document:
    source: str
    text: str


@dataclass(slots=True)
class ReadStats:
    skipped: int = 0             # JSONL lines that are not JSON or lack the field
    examples: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")


def format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv",):
        return "csv"
    return "text"


def _read(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding, errors="replace")
    except OSError as exc:
        raise ActionError(f"cannot read {path}: {exc.strerror or exc}",
                          code=ErrorCode.ERR_ACTION_FAILED) from None
    except LookupError:
        raise ActionError(f"encoding: unknown encoding {encoding!r}",
                          code=ErrorCode.ERR_BAD_PAYLOAD) from None


def read_text(path: Path, split: str, encoding: str) -> Iterator[Document]:
    text = _read(path, encoding)
    if split == "file":
        yield Document(str(path), text)
        return
    lines = text.splitlines()
    if split == "line":
        for n, line in enumerate(lines, 1):
            yield Document(f"{path}:{n}", line)
        return
    para: list[str] = []
    first = 0
    for n, line in enumerate(lines, 1):
        if line.strip():
            if not para:
                first = n
            para.append(line)
        elif para:
            yield Document(f"{path}:{first}", "\n".join(para))
            para = []
    if para:
        yield Document(f"{path}:{first}", "\n".join(para))


def _dig(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def read_jsonl(path: Path, field_name: str, encoding: str, stats: ReadStats) -> Iterator[Document]:
    for n, line in enumerate(_read(path, encoding).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            stats.skip(where, "not a JSON line")
            continue
        value = _dig(rec, field_name)
        if value is None:
            stats.skip(where, f"no field {field_name!r}")
            continue
        yield Document(where, value if isinstance(value, str) else json.dumps(value))


def read_csv(path: Path, column: str, encoding: str) -> Iterator[Document]:
    text = _read(path, encoding)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return
    if column not in reader.fieldnames:
        raise ActionError(f"{path}: no column {column!r} (columns: "
                          f"{', '.join(reader.fieldnames)}); set `column`",
                          code=ErrorCode.ERR_BAD_PAYLOAD)
    for n, row in enumerate(reader, 1):
        value = row.get(column)
        if value:
            yield Document(f"{path}:{n}", value)
