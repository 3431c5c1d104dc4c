"""Prompt templates: the kernel's one dialect (:mod:`kernel.templates`: ``{name}``,
``{date:%Y%m%d}``, ``{file:path}``, ``{{name}}``) plus this plugin's ``files`` entries, a file
read into a variable (a JSONL field joined, a length cap).

Everything here is synchronous and may read files: call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
from pathlib import Path

from kernel.templates import TemplateError, render, resolve, time_variables

from .settings import FileRef

__all__ = ["TemplateError", "read_file", "render", "resolve", "time_variables"]


def read_file(path: Path, ref: FileRef | None = None) -> str:
    """A file's text; with ``ref.field``, that field of every JSONL record joined."""
    try:
        text = path.read_text("utf-8", errors="replace")
    except FileNotFoundError:
        raise TemplateError(f"file not found: {path}") from None
    except OSError as exc:
        raise TemplateError(f"cannot read {path}: {exc.strerror or exc}") from None
    if ref is None:
        return text
    if ref.field is not None:
        parts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise TemplateError(f"{path}:{n}: not a JSON line") from None
            value = rec.get(ref.field) if isinstance(rec, dict) else None
            if value is not None:
                parts.append(value if isinstance(value, str) else json.dumps(value))
        text = ref.joiner.join(parts)
    if ref.max_chars is not None and len(text) > ref.max_chars:
        cut = len(text) - ref.max_chars
        text = text[: ref.max_chars] + f"\n[... {cut} more characters cut]"
    return text
