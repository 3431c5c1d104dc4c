"""Prompt templates: ``{name}`` variables, ``{file:path}`` contents, ``{{name}}`` escapes.

Only ``{identifier}`` and ``{file:...}`` are placeholders, so JSON or code in a prompt needs no
escaping. Everything here is synchronous and may read files: call it through
``asyncio.to_thread``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import zoneinfo
from collections.abc import Callable, Mapping
from pathlib import Path

from .settings import FileRef

_PLACEHOLDER = re.compile(
    r"\{\{(?P<esc>file:[^{}\n]+|[A-Za-z_]\w*)\}\}|\{(?P<name>file:[^{}\n]+|[A-Za-z_]\w*)\}")


class TemplateError(ValueError):
    """A template names a variable that does not exist, or a file that cannot be read."""


def render(template: str, variables: Mapping[str, str],
           read_file: Callable[[str], str]) -> str:
    def substitute(m: re.Match[str]) -> str:
        if m.group("esc") is not None:
            return "{" + m.group("esc") + "}"
        name = m.group("name")
        if name.startswith("file:"):
            return read_file(name[5:].strip())
        try:
            return variables[name]
        except KeyError:
            known = ", ".join(sorted(variables)) or "none"
            raise TemplateError(f"unknown variable {{{name}}} (known: {known}; a whole file is "
                                "{file:path}; write {{name}} for a literal {name})") from None

    return _PLACEHOLDER.sub(substitute, template)


def resolve(path: str, base_dir: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir:
        p = Path(base_dir).expanduser() / p
    return p


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


def time_variables(scheduled_at: float | None, tz: str) -> dict[str, str]:
    """``date`` and ``yesterday`` (ISO dates) of the run's scheduled instant in zone ``tz``.

    The instant comes from the run (a cron occurrence, or the submission's due time), never
    from reading the clock, so a rerun of the same occurrence renders the same text.
    """
    if scheduled_at is None:
        return {}
    day = dt.datetime.fromtimestamp(scheduled_at, zoneinfo.ZoneInfo(tz)).date()
    return {"date": day.isoformat(), "yesterday": (day - dt.timedelta(days=1)).isoformat()}
