"""Hot reload from a real config file: add / remove / change, an invalid file keeps the old
configuration running, and the file watcher picks up an edit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kernel.events import ConfigReloaded
from kernel.main import ConfigReloader

from .harness import edit_until_reloaded, make_harness

T0 = 1_767_225_600.0

BASE = """
[store]
backend = "memory"
[server]
enabled = false
[[tasks]]
id = "a"
schedule = "@every 10s"
action = "rec"
[[tasks]]
id = "b"
schedule = "@every 10s"
action = "rec"
"""


async def test_reload_from_file_applies_changes_and_rejects_invalid_files(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(BASE)
    h = make_harness(BASE)
    reloader = ConfigReloader(cfg, None, h.kernel.plugins, h.kernel)
    await h.start()
    await h.advance(10)
    cfg.write_text(BASE.replace('id = "b"', 'id = "c"').replace("@every 10s\"\naction = \"rec\"\n"
                                                                "[[tasks]]", "@every 20s\"\n"
                                                                "action = \"rec\"\n[[tasks]]"))
    assert await reloader.reload("test")
    ev = [e for e in h.events if isinstance(e, ConfigReloaded)][-1]
    assert (ev.added, ev.removed, ev.changed, ev.error) == (["c"], ["b"], ["a"], None)
    # an invalid file: reported, nothing changes
    cfg.write_text(BASE + '\n[[tasks]]\nid = "bad"\nschedule = "99 * * * *"\naction = "rec"\n')
    assert not await reloader.reload("test")
    ev = [e for e in h.events if isinstance(e, ConfigReloaded)][-1]
    assert ev.error is not None and "task 'bad'.schedule" in ev.error and "minute" in ev.error
    assert sorted(t.id for t in h.kernel.snapshot().tasks) == ["a", "c"]
    h.rec.calls.clear()
    await h.advance(20)
    assert sorted({c.task_id or "" for c in h.rec.calls}) == ["a", "c"]
    await h.stop()


@pytest.mark.slow
async def test_file_watcher_reloads_on_edit(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(BASE)
    h = make_harness(BASE)
    reloader = ConfigReloader(cfg, None, h.kernel.plugins, h.kernel)
    await h.start()
    watcher = asyncio.create_task(reloader.watch(h.kernel))
    try:
        ev = await edit_until_reloaded(h, lambda n: cfg.write_text(
            BASE + f'\n[[tasks]]\nid = "d"\nschedule = "@every {n}s"\naction = "rec"\n'))
        assert ev.added == ["d"] and ev.source == "file change"
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    await h.stop()


def test_a_reload_names_the_sections_it_does_not_apply() -> None:
    """A reload applies the tasks and ``[kernel] timezone``; a changed ``[server]`` port (or
    store, scheduler...) used to be ignored without a word. ``not_applied`` names them for the
    reload's warning."""
    from kernel.config import parse_text
    from kernel.reload import not_applied

    old, _ = parse_text('[server]\nport = 8765\n[kernel]\ntimezone = "UTC"\n', "c.toml")
    same, _ = parse_text('[server]\nport = 8765\n[kernel]\ntimezone = "Asia/Tokyo"\n'
                         '[[tasks]]\nid = "t"\nschedule = "@hourly"\naction = "log"\n', "c.toml")
    assert not_applied(old, same) == []  # tasks and the time zone are applied
    moved, _ = parse_text('[server]\nport = 8766\n[scheduler]\nmax_concurrency = 2\n', "c.toml")
    assert not_applied(old, moved) == ["[server]", "[scheduler]"]
