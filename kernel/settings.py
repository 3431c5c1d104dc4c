"""One settings loader for plugins: a ``[plugins.<name>]`` table decoded once into a typed
``msgspec.Struct``, and the small field checks every plugin needs.

::

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        timeout: float | str = 30.0
        def __post_init__(self) -> None:
            self.timeout = duration("timeout", self.timeout)

    settings = plugin_settings(context, "myplugin", Settings)

A mistake (an unknown key, a wrong type, a ``ValueError`` from ``__post_init__``) raises
:class:`SettingsError` whose message starts with the table, ``[plugins.myplugin]``, and names
the field and what is valid; the plugin loader reports it as that plugin's ERR_PLUGIN_LOAD
problem and the other plugins still load.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from .durations import parse_duration
from .hookspecs import PluginContext

__all__ = ["SettingsError", "check_tz", "duration", "load_settings", "plugin_settings"]

S = TypeVar("S")


class SettingsError(ValueError):
    """A plugin's settings table is not valid; the message names the table and the field."""


def load_settings(cls: type[S], table: Mapping[str, Any], where: str) -> S:
    """Decode ``table`` into ``cls`` (durations and numbers may be strings: ``strict=False``).
    ``where`` names the table in the error, e.g. ``"[plugins.inference]"``; the error lists
    every field in the table that is wrong, not only the first."""
    data = dict(table)
    problems: list[str] = []
    dropped: set[str] = set()
    for _ in range(len(data) + 1):
        try:
            value = msgspec.convert(data, cls, strict=False)
        except msgspec.ValidationError as exc:
            text = str(exc)
            missing = re.search(r"missing required field `([^`]+)`", text)
            if missing and missing.group(1) in dropped:
                break  # dropped below for a wrong value, already noted
            field = _bad_field(text)
            valid = getattr(cls, "__struct_fields__", ())
            if field is not None and text.startswith("Object contains unknown") and valid:
                text = f"{text} (valid: {', '.join(valid)})"
            problems.append(text)
            if field is None or field not in data:
                break
            del data[field]  # note it, then look for the next one
            dropped.add(field)
        else:
            if not problems:
                return value
            break
    raise SettingsError(f"{where}: {'; '.join(problems)}")


def _bad_field(message: str) -> str | None:
    """The top-level field a msgspec error is about: ``unknown field `x``` or ``- at `$.x```."""
    for pattern in (r"unknown field `([^`]+)`", r" - at `\$\.([A-Za-z0-9_]+)"):
        if m := re.search(pattern, message):
            return m.group(1)
    return None


def plugin_settings(context: PluginContext, name: str, cls: type[S]) -> S:
    """The ``[plugins.<name>]`` table of the kernel's config as a ``cls`` ({} when absent)."""
    return load_settings(cls, context.section(name), f"[plugins.{name}]")


def duration(name: str, value: float | str) -> float:
    """Seconds from ``30``, ``"30s"``, ``"5m"``...; ``ValueError`` naming the field otherwise."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def check_tz(tz: str, name: str = "tz") -> None:
    """``ValueError`` naming the field unless ``tz`` is an IANA time zone."""
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name}: unknown time zone {tz!r} (valid: an IANA name such as "
                         "'UTC', 'Europe/Berlin')") from None
