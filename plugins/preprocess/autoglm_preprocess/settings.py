"""``[plugins.preprocess]`` settings and the ``preprocess.prepare`` payload."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from kernel.settings import check_tz, load_settings

Unit = Literal["chars", "whitespace"]


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Defaults for every ``preprocess.prepare`` run."""

    base_dir: str = ""          # relative paths are taken from here ("" = working directory)
    chunk_tokens: int = 512
    overlap_tokens: int = 64
    tokens: Unit = "chars"

    def __post_init__(self) -> None:
        _check_chunking(self.chunk_tokens, self.overlap_tokens)

    @classmethod
    def load(cls, table: Mapping[str, Any]) -> Settings:
        return load_settings(cls, table, "[plugins.preprocess]")


def _check_chunking(size: int | None, overlap: int | None) -> None:
    if size is not None and size < 1:
        raise ValueError("chunk_tokens: must be at least 1")
    if overlap is not None and overlap < 0:
        raise ValueError("overlap_tokens: must be 0 or more")
    if size is not None and overlap is not None and overlap >= size:
        raise ValueError("overlap_tokens: must be smaller than chunk_tokens")


class PreparePayload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``preprocess.prepare``: files in (globs), one JSONL file of chunks out.

    ``inputs`` and ``output`` are templates of the kernel's dialect (``kernel.templates``) with
    ``{date}`` and ``{yesterday}`` (the run's scheduled day in ``tz``), optionally with a
    strftime format: ``app-{yesterday:%Y%m%d}.log``; ``{{x}}`` is a literal ``{x}``.
    """

    inputs: list[str]
    output: str
    format: Literal["auto", "text", "jsonl", "csv"] = "auto"  # auto: by file extension
    field: str = "text"         # JSONL: the field holding the text ("a.b" for nested)
    column: str = "text"        # CSV: the column holding the text
    split: Literal["file", "paragraph", "line"] = "file"  # text files: what one document is
    chunk_tokens: int | None = None
    overlap_tokens: int | None = None
    tokens: Unit | None = None
    dedup: bool = True
    min_chars: int = 1          # shorter documents (after normalising) are dropped
    if_missing: Literal["fail", "empty"] = "fail"  # no file matches: fail, or write nothing
    encoding: str = "utf-8"
    tz: str = "UTC"

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give at least one path or glob, e.g. [\"logs/*.log\"]")
        if not self.output:
            raise ValueError("output: name the JSONL file to write")
        _check_chunking(self.chunk_tokens, self.overlap_tokens)
        check_tz(self.tz)
