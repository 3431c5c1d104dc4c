"""Message templates: ``{name}`` variables, ``{file:path}`` contents, ``{{name}}`` escapes.

The same small syntax as the inference plugin's prompts (kept as a copy so that each plugin
installs alone). Only ``{identifier}`` and ``{file:...}`` are placeholders: other braces are
text. Reads files: call through ``asyncio.to_thread``.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Mapping
from pathlib import Path

_PLACEHOLDER = re.compile(
    r"\{\{(?P<esc>file:[^{}\n]+|[A-Za-z_]\w*)\}\}|\{(?P<name>file:[^{}\n]+|[A-Za-z_]\w*)\}")


class TemplateError(ValueError):
    """A template names an unknown variable or a file that cannot be read."""


def resolve(path: str, base_dir: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir:
        p = Path(base_dir).expanduser() / p
    return p


def render(template: str, variables: Mapping[str, str], base_dir: str = "") -> str:
    def substitute(m: re.Match[str]) -> str:
        if m.group("esc") is not None:
            return "{" + m.group("esc") + "}"
        name = m.group("name")
        if name.startswith("file:"):
            path = resolve(name[5:].strip(), base_dir)
            try:
                return path.read_text("utf-8", errors="replace")
            except OSError as exc:
                raise TemplateError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            return variables[name]
        except KeyError:
            known = ", ".join(sorted(variables)) or "none"
            raise TemplateError(f"unknown variable {{{name}}} (known: {known}; write "
                                "{{name}} for a literal {name})") from None

    return _PLACEHOLDER.sub(substitute, template)


def time_variables(scheduled_at: float | None, tz: str) -> dict[str, str]:
    """``date`` and ``yesterday`` of the run's scheduled instant (never the clock's)."""
    if scheduled_at is None:
        return {}
    day = dt.datetime.fromtimestamp(scheduled_at, zoneinfo.ZoneInfo(tz)).date()
    return {"date": day.isoformat(), "yesterday": (day - dt.timedelta(days=1)).isoformat()}
