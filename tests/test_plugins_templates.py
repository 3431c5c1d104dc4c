"""The kernel's one template dialect (kernel.templates) and settings loader (kernel.settings)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import msgspec
import pytest

from kernel.hookspecs import PluginContext
from kernel.settings import SettingsError, check_tz, duration, plugin_settings
from kernel.templates import TemplateError, file_reader, render, time_variables

DAY = dt.date(2026, 3, 10)


def test_variables_dates_formats_files_and_escapes(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("disk full", "utf-8")
    v = {"host": "gpu-1", "date": DAY, "yesterday": DAY - dt.timedelta(days=1)}
    text = ("{host} {date} {yesterday:%Y%m%d} {file:notes.txt} {{host}} {{file:x}} "
            '{{date:%d}} {"json": 1} {a: 1} {host:x}')
    assert render(text, v, file_reader(str(tmp_path))) == (
        'gpu-1 2026-03-10 20260309 disk full {host} {file:x} {date:%d} {"json": 1} {a: 1} '
        "{host:x}")


def test_mistakes_name_what_is_valid(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"unknown variable \{who\} \(known: date, host"):
        render("{who}", {"host": "h", "date": DAY})
    with pytest.raises(TemplateError, match=r"only a date variable takes a format \(dates "
                                            r"here: date\)"):
        render("{host:%Y}", {"host": "h", "date": DAY})
    with pytest.raises(TemplateError, match="scheduled instant"):
        render("{yesterday:%Y%m%d}", time_variables(None, "UTC"))
    with pytest.raises(TemplateError, match="cannot be inserted here"):
        render("{file:/etc/hostname}", {})
    with pytest.raises(TemplateError, match="file not found: .*missing.txt"):
        render("{file:missing.txt}", {}, file_reader(str(tmp_path)))


def test_time_variables_are_the_scheduled_day_in_the_zone() -> None:
    at = dt.datetime(2026, 3, 9, 23, 30, tzinfo=dt.UTC).timestamp()
    assert render("{date} {yesterday}", time_variables(at, "UTC")) == "2026-03-09 2026-03-08"
    assert render("{date} {yesterday}", time_variables(at, "Europe/Berlin")) == (
        "2026-03-10 2026-03-09")


class _Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    timeout: float | str = 10.0
    tz: str = "UTC"
    workers: int = 1

    def __post_init__(self) -> None:
        self.timeout = duration("timeout", self.timeout)
        check_tz(self.tz)


def test_plugin_settings_decode_and_name_the_table_and_field() -> None:
    ctx = PluginContext(settings={"demo": {"timeout": "2m", "workers": "3"}})
    s = plugin_settings(ctx, "demo", _Settings)
    assert (s.timeout, s.workers) == (120.0, 3)
    assert plugin_settings(PluginContext(), "demo", _Settings).timeout == 10.0
    for table, words in [({"timout": 1}, ["[plugins.demo]", "unknown field", "timout"]),
                         ({"timeout": "soon"}, ["[plugins.demo]", "timeout", "'30s'"]),
                         ({"tz": "Mars/Base"}, ["[plugins.demo]", "tz", "Europe/Berlin"]),
                         ({"workers": "many"}, ["[plugins.demo]", "workers", "int"])]:
        with pytest.raises(SettingsError) as ei:
            plugin_settings(PluginContext(settings={"demo": table}), "demo", _Settings)
        for w in words:
            assert w in str(ei.value), (table, str(ei.value))
