"""Reloading the config file safely (issue 11, item 7).

* A reload of a blank file (nothing but whitespace and comments: an editor mid-write) is
  refused; so is a file with no tasks while tasks are running, unless it says ``tasks = []``.
* A file that is not UTF-8 is refused with ERR_CONFIG_INVALID, also on SIGHUP in a real
  ``python -m kernel run`` process, with no "Task exception was never retrieved".
* The watcher reacts to the config file only, and watchfiles' own INFO lines stay quiet even
  when the log file or the data dir shares the config's directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from watchfiles import Change

from kernel import config as config_mod
from kernel.errors import ConfigError, ErrorCode
from kernel.events import ConfigReloaded
from kernel.reload import ConfigReloader, check_reload, watch_filter

from .harness import edit_until_reloaded, make_harness
from .test_reload import BASE  # tasks a and b, @every 10s, action rec


def parsed(text: str, file: str = "config.toml") -> config_mod.Config:
    cfg, issues = config_mod.parse_text(text, file)
    assert not issues
    return cfg


# --- the rule -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n\n  \n", "# config, being written\n"])
def test_a_blank_file_is_never_applied(text: str) -> None:
    for running in (parsed(BASE), parsed("")):
        with pytest.raises(ConfigError) as info:
            check_reload(running, parsed(text))
        assert info.value.code is ErrorCode.ERR_CONFIG_INVALID
        (issue,) = info.value.issues
        assert issue.file == "config.toml"
        assert "blank" in issue.message and "not applied" in issue.message


def test_no_tasks_while_tasks_run_needs_an_explicit_empty_list() -> None:
    running = parsed(BASE)
    with pytest.raises(ConfigError) as info:
        check_reload(running, parsed('[kernel]\ntimezone = "UTC"\n'))
    (issue,) = info.value.issues
    assert issue.where == "tasks"
    assert "2 tasks are running" in issue.message and "tasks = []" in issue.message
    check_reload(running, parsed('tasks = []\n[kernel]\ntimezone = "UTC"\n'))  # said so
    check_reload(parsed('[kernel]\ntimezone = "UTC"\n'), parsed('[store]\nbackend = "memory"\n'))
    check_reload(running, parsed(BASE.replace('id = "b"', 'id = "c"')))


def test_an_explicit_empty_yaml_task_list_counts_too(tmp_path: Path) -> None:
    toml = tmp_path / "config.toml"
    toml.write_text('[kernel]\ntimezone = "UTC"\n')
    yml = tmp_path / "tasks.yaml"
    yml.write_text("tasks: []\n")
    check_reload(parsed(BASE), config_mod.load(toml, tasks_file=yml))
    with pytest.raises(ConfigError):
        check_reload(parsed(BASE), config_mod.load(toml))


# --- through the reloader and a running kernel --------------------------------------------------

async def test_no_prefix_of_the_file_removes_every_task(tmp_path: Path) -> None:
    """An editor that truncates and rewrites: whichever prefix is read, tasks keep running."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(BASE)
    h = make_harness(BASE)
    reloader = ConfigReloader(cfg, None, h.kernel.plugins, h.kernel)
    await h.start()
    data = BASE.encode()
    refused = 0
    for n in range(len(data) + 1):
        cfg.write_bytes(data[:n])
        if not await reloader.reload("test"):
            refused += 1
        assert h.kernel.snapshot().tasks, f"a {n}-byte prefix removed every task"
    assert refused > 0
    cfg.write_text(BASE.replace('id = "a"', 'id = "c"'))
    assert await reloader.reload("test")  # a whole file still applies
    assert sorted(t.id for t in h.kernel.snapshot().tasks) == ["b", "c"]
    cfg.write_text("")
    assert not await reloader.reload("test")
    ev = [e for e in h.events if isinstance(e, ConfigReloaded)][-1]
    assert ev.error is not None and "blank" in ev.error
    assert sorted(t.id for t in h.kernel.snapshot().tasks) == ["b", "c"]
    cfg.write_text("tasks = []\n[store]\nbackend = \"memory\"\n[server]\nenabled = false\n")
    assert await reloader.reload("test")  # said explicitly: every task goes
    assert h.kernel.snapshot().tasks == ()
    await h.stop()


async def test_a_reload_never_raises(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(BASE)
    h = make_harness(BASE)
    reloader = ConfigReloader(cfg, None, h.kernel.plugins, h.kernel)
    await h.start()
    cfg.write_bytes(BASE.encode() + b"# \xff\n")
    assert not await reloader.reload("SIGHUP")
    ev = [e for e in h.events if isinstance(e, ConfigReloaded)][-1]
    assert ev.error is not None and "not UTF-8" in ev.error and str(cfg) in ev.error
    cfg.unlink()
    assert not await reloader.reload("SIGHUP")
    ev = [e for e in h.events if isinstance(e, ConfigReloaded)][-1]
    assert ev.error is not None and "cannot read" in ev.error

    def boom(*_: object) -> config_mod.Config:
        raise RuntimeError("a bug in a loader")

    cfg.write_text(BASE)
    buggy = ConfigReloader(cfg, None, h.kernel.plugins, h.kernel, load=boom)
    assert not await buggy.reload("SIGHUP")  # reported and logged, not raised
    ev = [e for e in h.events if isinstance(e, ConfigReloaded)][-1]
    assert ev.error is not None and "ERR_INTERNAL" in ev.error
    assert sorted(t.id for t in h.kernel.snapshot().tasks) == ["a", "b"]
    await h.stop()


# --- the watcher --------------------------------------------------------------------------------

def test_the_watch_filter_passes_only_the_watched_files(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    keep = watch_filter([cfg, tmp_path / "tasks.yaml"])
    assert keep(Change.modified, str(cfg))
    assert keep(Change.added, str(tmp_path / "tasks.yaml"))
    assert keep(Change.deleted, str(cfg))
    for other in ("kernel.log", "kernel.sqlite3-wal", ".config.toml.swp", "data/kernel.sqlite3",
                  "config.toml~"):
        assert not keep(Change.modified, str(tmp_path / other))


@pytest.mark.slow
async def test_the_watcher_ignores_its_neighbours_and_stays_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cfg = tmp_path / "config.toml"
    cfg.write_text(BASE)
    log_file = tmp_path / "kernel.log"
    data = tmp_path / "data"
    data.mkdir()
    h = make_harness(BASE)
    reloader = ConfigReloader(cfg, None, h.kernel.plugins, h.kernel)
    await h.start()
    watcher = asyncio.create_task(reloader.watch(h.kernel))
    try:
        # neighbours change all the time while the config file is edited
        def edit(n: int) -> None:
            with log_file.open("a") as f:
                f.write(f"line {n}\n")
            (data / "kernel.sqlite3-wal").write_bytes(os.urandom(64))
            cfg.write_text(BASE + f'\n[[tasks]]\nid = "d"\nschedule = "@every {n}s"\n'
                           'action = "rec"\n')

        ev = await edit_until_reloaded(h, edit)
        assert ev.added == ["d"] and ev.source == "file change"
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    await h.stop()
    noisy = [r for r in caplog.records
             if r.name.startswith("watchfiles") and r.levelno < logging.WARNING]
    assert noisy == []


# --- SIGHUP in a real process -------------------------------------------------------------------

@pytest.mark.slow
def test_sighup_with_a_file_that_is_not_utf8_is_reported_without_a_traceback(
    tmp_path: Path
) -> None:
    cfg = tmp_path / "config.toml"
    text = BASE.replace('action = "rec"', 'action = "log"\npayload = { message = "hi" }')
    text = text.replace('"@every 10s"', '"@every 1h"')
    cfg.write_text(text)
    env = {**os.environ, "KERNEL_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel", "run", "--config", str(cfg), "--no-server",
         "--log-format", "text"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
        cwd=Path(__file__).resolve().parents[1])
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60

        def read_until(*needles: str) -> str:
            while time.monotonic() < deadline:
                line = proc.stderr.readline() if proc.stderr else ""
                if not line:
                    break
                lines.append(line)
                for needle in needles:
                    if needle in line:
                        return needle
            raise AssertionError("no " + " / ".join(needles) + " in:\n" + "".join(lines))

        read_until("reload the config with SIGHUP")
        cfg.write_bytes(text.encode() + b"# caf\xe9\n")
        proc.send_signal(signal.SIGHUP)
        found = read_until("rejected", "never retrieved", "Traceback")
        assert found == "rejected"
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(lines)
    assert "not UTF-8" in err and "byte 0xe9 at offset" in err and str(cfg) in err
    assert "Traceback" not in err and "never retrieved" not in err
    assert proc.returncode == 0
