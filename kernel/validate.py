"""Semantic checks of a decoded config: schedules, time zones, actions, payloads, dependencies.

Returns every issue found (``ConfigIssue``: file, task, what is wrong and what would be valid);
``python -m kernel validate`` prints them all and exits 78 (``EX_CONFIG``), the kernel refuses to
start with them, and a hot reload keeps the old configuration. Problems met while loading the
plugins (``PluginSet.problems``) are reported as issues of ``[plugins.<name>]``.
"""

from __future__ import annotations

import logging
import re
import zoneinfo
from collections.abc import Collection
from pathlib import Path

import msgspec

from . import config as config_mod
from .config import Config, TaskConfig
from .errors import ConfigError, ConfigIssue, CronError, KernelError
from .gpu import GpuGate
from .plugins import PluginSet
from .triggers import parse_schedule

log = logging.getLogger("kernel.config")


def _tz_ok(tz: str) -> bool:
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def find_cycle(tasks: list[TaskConfig]) -> list[str] | None:
    """A dependency cycle as a path ``[a, b, ..., a]``, or None."""
    graph = {t.id: list(t.after) for t in tasks}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for up in graph.get(node, []):
            if up not in graph:
                continue
            if state.get(up) == 1:
                return [*stack[stack.index(up):], up]
            if state.get(up) is None and (cyc := visit(up)):
                return cyc
        stack.pop()
        state[node] = 2
        return None

    for tid in graph:
        if state.get(tid) is None and (cyc := visit(tid)):
            return cyc
    return None


def validate(cfg: Config, plugins: PluginSet | None,
             gpu: GpuGate | None = None, *,
             known_ids: Collection[str] = ()) -> list[ConfigIssue]:
    """Every semantic issue of ``cfg``. ``known_ids`` are more task ids that exist (tasks
    declared in the file but dropped by decoding problems already reported): ``after``
    naming them is not an error of its own."""
    file = cfg.source
    issues: list[ConfigIssue] = []
    default_tz = cfg.kernel.timezone
    if not _tz_ok(default_tz):
        issues.append(ConfigIssue(file, "[kernel].timezone",
                                  f"unknown time zone {default_tz!r} (valid: an IANA "
                                  "name such as 'UTC', 'Europe/Berlin', 'Asia/Shanghai')"))
        # reported once, above; the schedules are checked in UTC, so that their own
        # mistakes show and valid ones are not called invalid
        default_tz = "UTC"
    ids = {t.id for t in cfg.tasks} | set(known_ids)
    for t in cfg.tasks:
        where = f"task {t.id!r}"
        tfile = cfg.task_files.get(t.id, file)  # the YAML tasks file's tasks name it
        tz = t.tz or default_tz
        if t.tz is not None and not _tz_ok(t.tz):
            issues.append(ConfigIssue(tfile, f"{where}.tz", f"unknown time zone {t.tz!r} (valid: "
                                      "an IANA name such as 'UTC', 'Europe/Berlin')"))
        elif t.schedule is not None:
            try:
                parse_schedule(t.schedule, tz)
            except CronError as exc:
                issues.append(ConfigIssue(tfile, f"{where}.schedule", str(exc)))
        for up in t.after:
            if up not in ids:
                issues.append(ConfigIssue(tfile, f"{where}.after",
                                          f"unknown task {up!r} (tasks: {', '.join(sorted(ids))})"))
            if up == t.id:
                issues.append(ConfigIssue(tfile, f"{where}.after", "a task cannot depend on itself"))
        if gpu is not None and t.gpu_memory_mb > 0:
            why = gpu.never_fits(t.gpu_memory_mb, t.gpu if isinstance(t.gpu, int) else None)
            if why is not None:
                issues.append(ConfigIssue(tfile, f"{where}.gpu_memory_mb", f"[ERR_GPU_UNAVAILABLE] {why}"))
        try:  # each job of the task stores its payload as msgpack (kernel.store.schema)
            msgspec.msgpack.encode(t.payload)
        except (TypeError, OverflowError, ValueError) as exc:
            # else its first occurrence could not be stored, which stopped the kernel
            issues.append(ConfigIssue(tfile, f"{where}.payload",
                                      f"[ERR_BAD_PAYLOAD] cannot be stored: {exc} (valid: "
                                      "integers from -2**63 to 2**64-1)"))
            continue
        if plugins is not None:
            try:
                action = plugins.action(t.action)
                plugins.decode_payload(action, t.payload)
            except KernelError as exc:
                missing = exc.code.value == "ERR_ACTION_NOT_FOUND"
                field = "action" if missing else "payload"
                # a disabled task may name a plugin that is not installed yet: warn, do not stop
                sev = "warning" if missing and not t.enabled else "error"
                issues.append(ConfigIssue(tfile, f"{where}.{field}", f"[{exc.code}] {exc}", sev))
    if plugins is not None:
        # a broken plugin does not stop the others (or the kernel): a task that needs one of
        # its actions is an error of its own (unknown action), above
        for p in plugins.problems:
            issues.append(ConfigIssue(file, f"[plugins.{p.plugin}]", str(p), "warning"))
        # a table for no installed plugin (a typo: [plugins.inferense]) would be ignored
        # without a word while the real plugin runs on its defaults
        known = set(plugins.plugins) | {p.plugin for p in plugins.problems}
        for name in cfg.plugins:
            if name not in known and name != "python":
                issues.append(ConfigIssue(
                    file, f"[plugins.{name}]",
                    f"no installed plugin is named {name!r}, so these settings are ignored "
                    f"(valid: {', '.join(sorted(known - {'builtin'})) or 'no plugin installed'}"
                    "; `python -m kernel plugins` lists them)", "warning"))
    if "python" in cfg.plugins:
        issues.append(ConfigIssue(
            file, "[plugins.python]", "ignored: the python action's settings are the top-level "
            "[python] table (valid: move these keys to [python])", "warning"))
    cycle = find_cycle(cfg.tasks)
    if cycle and len(cycle) > 2:
        issues.append(ConfigIssue(file, "tasks.after",
                                  "dependency cycle (each task waits for the next): "
                                  + " -> ".join(cycle)))
    return issues


def check_all(cfg: Config, decoding: list[ConfigIssue], plugins: PluginSet | None,
              gpu: GpuGate | None = None) -> list[ConfigIssue]:
    """The decoding problems of a file and the semantic ones of what did decode, at once.

    ``cfg`` is what :func:`kernel.config.load_partial` returns (bad parts dropped); a semantic
    issue about a field whose decoding was already reported is not repeated."""
    if not decoding:
        return validate(cfg, plugins, gpu)
    reported = {i.where for i in decoding}
    dropped = {m.group(1) for i in decoding if (m := _TASK_WHERE.match(i.where))}
    dropped -= {t.id for t in cfg.tasks}
    more = [i for i in validate(cfg, plugins, gpu, known_ids=dropped)
            if i.where not in reported]
    return [*decoding, *more]


_TASK_WHERE = re.compile(r"task '([^']*)'")


def load_checked(config_path: Path | None, tasks_file: Path | None,
                 plugins: PluginSet | None) -> Config:
    """Load, decode and validate; raises ConfigError listing every problem (warnings logged):
    those of decoding and those of the parts that did decode, together."""
    cfg, decoding = config_mod.load_partial(config_path, tasks_file=tasks_file)
    issues = check_all(cfg, decoding, plugins)
    for w in issues:
        if w.severity != "error":
            log.warning("%s", w)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        raise ConfigError(errors)
    return cfg
