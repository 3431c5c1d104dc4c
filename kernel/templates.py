"""The one template dialect of every plugin: prompts, message subjects and bodies, file paths.

=========================  ==========================================================
``{name}``                 a variable: a string as it is, a date as ``2026-03-09``
``{name:%Y%m%d}``          a date variable with a ``strftime`` format (``%`` first)
``{file:path}``            a whole file's text (where the caller allows files)
``{{name}}``               a literal ``{name}`` (also ``{{file:x}}``, ``{{name:%d}}``)
=========================  ==========================================================

Only ``{identifier}``, ``{identifier:%...}`` and ``{file:...}`` are placeholders, so JSON, code
or ``{a: 1}`` in a text needs no escaping. A name that is not a variable fails with a
:class:`TemplateError` listing the variables there are.

:func:`time_variables` gives ``date`` and ``yesterday``: the run's *scheduled* day in a zone,
never the clock's, so a rerun of an occurrence renders the same text and reads the same files.
Rendering is synchronous and may read files: plugins call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["TemplateError", "Variables", "file_reader", "render", "resolve", "text",
           "time_variables"]

Variables = Mapping[str, "str | dt.date"]

_PLACEHOLDER = re.compile(
    r"\{\{(?P<esc>file:[^{}\n]+|[A-Za-z_]\w*(?::%[^{}\n]*)?)\}\}"
    r"|\{(?:file:(?P<file>[^{}\n]+)|(?P<name>[A-Za-z_]\w*)(?::(?P<fmt>%[^{}\n]*))?)\}")
_TIME_NAMES = ("date", "yesterday")


class TemplateError(ValueError):
    """A template names a variable that does not exist, formats one that is not a date, or
    names a file that cannot be read. Plugins report it as ERR_BAD_PAYLOAD."""


def render(template: str, variables: Variables,
           read_file: Callable[[str], str] | None = None) -> str:
    """``template`` with every placeholder replaced. ``read_file(path)`` gives the text of
    ``{file:path}``; without it, ``{file:...}`` is an error (e.g. in a file path)."""

    def substitute(m: re.Match[str]) -> str:
        if m.group("esc") is not None:
            return "{" + m.group("esc") + "}"
        path = m.group("file")
        if path is not None:
            if read_file is None:
                raise TemplateError(f"{{file:{path}}}: a file cannot be inserted here")
            return read_file(path.strip())
        name, fmt = m.group("name"), m.group("fmt")
        try:
            value = variables[name]
        except KeyError:
            raise TemplateError(_unknown(name, variables)) from None
        if isinstance(value, dt.date):
            return value.strftime(fmt) if fmt else value.isoformat()
        if fmt:
            raise TemplateError(f"{{{name}:{fmt}}}: only a date variable takes a format "
                                f"(dates here: {_dates(variables)}); {{{name}}} is text")
        return value

    return _PLACEHOLDER.sub(substitute, template)


def _dates(variables: Variables) -> str:
    return ", ".join(sorted(k for k, v in variables.items() if isinstance(v, dt.date))) or "none"


def _unknown(name: str, variables: Variables) -> str:
    known = ", ".join(sorted(variables)) or "none"
    text = f"unknown variable {{{name}}} (known: {known}"
    if name in _TIME_NAMES:
        text += f"; {{{name}}} needs the run's scheduled instant, and this run has none"
    return text + "; a whole file is {file:path}; write {{name}} for a literal {name})"


def resolve(path: str, base_dir: str) -> Path:
    """``path`` with ``~`` expanded, taken from ``base_dir`` when relative ("" = working dir)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir:
        p = Path(base_dir).expanduser() / p
    return p


def file_reader(base_dir: str) -> Callable[[str], str]:
    """A ``read_file`` for :func:`render`: UTF-8 text (bad bytes replaced) of a path taken from
    ``base_dir``; a missing or unreadable file is a :class:`TemplateError` naming it."""

    def read(path: str) -> str:
        p = resolve(path, base_dir)
        try:
            return p.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            raise TemplateError(f"file not found: {p}") from None
        except OSError as exc:
            raise TemplateError(f"cannot read {p}: {exc.strerror or exc}") from None

    return read


def text(value: str | int | float | bool) -> str:
    """A payload's ``vars`` value as template text (booleans as TOML writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def time_variables(scheduled_at: float | None, tz: str) -> dict[str, str | dt.date]:
    """``date`` and ``yesterday``: the day of the run's scheduled instant in zone ``tz`` and the
    day before ({} when the run has no scheduled instant)."""
    if scheduled_at is None:
        return {}
    day = dt.datetime.fromtimestamp(scheduled_at, zoneinfo.ZoneInfo(tz)).date()
    return {"date": day, "yesterday": day - dt.timedelta(days=1)}
