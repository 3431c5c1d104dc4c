"""Hot reload of the config file: when a new file may replace the running one, and the watcher.

::

    SIGHUP / file change ─► ConfigReloader.reload(source)
                               load + validate (kernel.validate.load_checked)
                               check_reload(running, new)   refuse what looks half-written
                               kernel.reload(new)           or report_reload_error: old config stays

The rule (:func:`check_reload`): a file is read while an editor may be writing it. An unparsable
file is refused anyway; a **blank** file (no key at all: empty, whitespace, comments) is never
applied; a file with **no tasks while tasks are running** is refused unless it says so with
``tasks = []`` (or ``tasks: []`` in the YAML tasks file). A prefix that happens to be valid TOML
and keeps some tasks cannot be told from an edit; the watcher's debounce (300 ms) covers the
usual truncate-and-write, and an editor that saves by rename is never seen half-written.

:meth:`ConfigReloader.reload` never raises (cancellation aside): every failure becomes a
``ConfigReloaded`` event with the error and a log line, so a SIGHUP task has nothing to leak.
The watcher watches the config's directory (an editor's save-by-rename replaces the file) and
keeps only changes to the config and tasks files, so a log file or data dir beside them does
not wake it; watchfiles' own per-batch INFO lines are silenced.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from .config import Config
from .errors import ConfigError, ConfigIssue, ErrorCode, KernelError
from .plugins import PluginSet
from .validate import load_checked

if TYPE_CHECKING:
    from watchfiles import Change

    from .app import Kernel

log = logging.getLogger("kernel.reload")

Loader = Callable[[Path | None, Path | None, PluginSet | None], Config]


def check_reload(running: Config, new: Config) -> None:
    """Raise :class:`ConfigError` when ``new`` must not replace ``running`` (see the module)."""
    if new.blank:
        raise ConfigError([ConfigIssue(
            new.source, "-", "the file is blank (no settings, no tasks): not applied, since an "
            "editor may be writing it; the running configuration stays (valid: a complete "
            "config; `tasks = []` above the first [table] removes every task)")])
    if running.tasks and not new.tasks and not new.tasks_declared:
        n = len(running.tasks)
        raise ConfigError([ConfigIssue(
            new.source, "tasks", f"the file has no tasks while {n} task{'s' if n != 1 else ''} "
            f"{'are' if n != 1 else 'is'} running: not applied, since a file cut short looks "
            "like this (valid: [[tasks]] tables, or `tasks = []` above the first [table] to "
            "remove every task)")])


#: Config fields a reload applies (the tasks) or that are not settings.
_APPLIED = frozenset({"tasks", "source", "blank", "tasks_declared", "task_files"})


def not_applied(old: Config, new: Config) -> list[str]:
    """The sections that differ between ``old`` and ``new`` and that a reload does not apply
    (it applies the tasks and ``[kernel] timezone``; the rest is read at start), e.g.
    ``["[server]"]``."""
    changed = []
    for name in old.__struct_fields__:
        if name in _APPLIED:
            continue
        a, b = getattr(old, name), getattr(new, name)
        if name == "kernel":
            a = msgspec.structs.replace(a, timezone=b.timezone)
        if a != b:
            changed.append(f"[{name}]")
    return changed


def watch_filter(paths: Iterable[Path | str]) -> Callable[[Change, str], bool]:
    """A watchfiles filter that keeps changes to exactly these files (by absolute path)."""
    wanted = frozenset(os.path.abspath(p) for p in paths)

    def keep(_change: Change, path: str) -> bool:
        return os.path.abspath(path) in wanted

    return keep


def quiet_watchfiles() -> None:
    """watchfiles logs every batch of changes at INFO ("1 change detected"): keep WARNING up."""
    logger = logging.getLogger("watchfiles")
    if logger.level == logging.NOTSET:  # unless someone chose a level for it on purpose
        logger.setLevel(logging.WARNING)


class ConfigReloader:
    """Hot reload on SIGHUP or a change of the config file (watchfiles): load and validate the
    files again, check them against the running config (:func:`check_reload`) and hand the new
    tasks to the kernel; anything wrong is reported and the old configuration keeps running."""

    def __init__(self, config_path: Path | None, tasks_file: Path | None,
                 plugins: PluginSet, kernel: Kernel | None = None, *,
                 load: Loader = load_checked, loaded: Config | None = None) -> None:
        self.config_path = config_path
        # what the files said at start (before command-line overrides such as --port): what
        # runs, and so what a reload compares the new files with, to name what it does not apply
        self._loaded = loaded
        self.tasks_file = tasks_file
        self.plugins = plugins
        self.kernel = kernel
        self._load = load
        self._lock = asyncio.Lock()
        self._watched = [os.path.abspath(p) for p in (config_path, tasks_file) if p is not None]

    async def reload(self, source: str) -> bool:
        """Apply the files if they are valid and whole; True when applied. Never raises."""
        kernel = self.kernel
        assert kernel is not None
        async with self._lock:
            try:
                new = self._load(self.config_path, self.tasks_file, self.plugins)
                check_reload(kernel.config, new)
                await kernel.reload(new, source)
                stale = not_applied(self._loaded or kernel.config, new)
                if stale:
                    log.warning("config reload from %s: %s changed; applied at the next start "
                                "(a reload applies the tasks and [kernel] timezone)", source,
                                ", ".join(stale))
            except KernelError as exc:  # an invalid or suspicious file, or the store failed
                kernel.report_reload_error(source, exc)
                return False
            except Exception as exc:  # a bug: report it, keep the kernel and the old config
                log.exception("config reload from %s failed", source)
                kernel.report_reload_error(source, KernelError(
                    f"[{ErrorCode.ERR_INTERNAL}] the reload failed unexpectedly: "
                    f"{type(exc).__name__}: {exc} (the traceback is in the log)"))
                return False
            return True

    async def watch(self, kernel: Kernel) -> None:
        """A kernel service: reload whenever the config (or the tasks file) changes on disk."""
        import watchfiles

        if not self._watched:
            return
        quiet_watchfiles()
        dirs = sorted({os.path.dirname(p) for p in self._watched})
        async for _changes in watchfiles.awatch(*dirs, watch_filter=watch_filter(self._watched),
                                                debounce=300, step=50, recursive=False):
            await self.reload("file change")  # only the watched files get here
