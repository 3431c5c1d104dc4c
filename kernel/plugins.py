"""Plugin loading: a plugin manager made by a factory, entry points loaded one at a time.

A broken plugin (import error, a hook that raises, an invalid action, a hook implementation
whose name is not a hook, a lifespan that fails to start) is reported with its name and the
reason as ERR_PLUGIN_LOAD; the other plugins still load. Nothing happens at import time.

Three entry points for the rest of the kernel:

* :func:`load` → :class:`PluginSet` (actions, subscribers, lifespans, problems);
* :meth:`PluginSet.lifecycle`, the async context manager the kernel holds open around its run;
* :func:`add_plugin_commands`, which adds each plugin's CLI commands to an ``argparse`` parser.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import inspect
import logging
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, cast

import msgspec
import pluggy

from . import builtin_actions
from .errors import ActionNotFound, BadPayload, ErrorCode
from .hookspecs import (
    ENTRY_POINT_GROUP,
    HOOK_NAMES,
    PROJECT,
    Action,
    Command,
    KernelHooks,
    Lifespan,
    PluginContext,
    Subscriber,
)

log = logging.getLogger("kernel.plugins")


@dataclass(frozen=True, slots=True)
class PluginProblem:
    plugin: str
    message: str
    detail: str = ""
    code: ErrorCode = ErrorCode.ERR_PLUGIN_LOAD

    def __str__(self) -> str:
        return f"[{self.code}] plugin {self.plugin}: {self.message}"


@dataclass(slots=True)
class PluginSet:
    """The loaded plugins: their actions, subscribers, lifespans and any problems met while
    loading."""

    manager: pluggy.PluginManager
    actions: dict[str, Action] = field(default_factory=dict)
    subscribers: list[Subscriber] = field(default_factory=list)
    problems: list[PluginProblem] = field(default_factory=list)
    plugins: dict[str, str] = field(default_factory=dict)  # name -> distribution/version or module
    lifespans: list[tuple[str, Lifespan]] = field(default_factory=list)  # in registration order

    def problem(self, plugin: str, message: str, detail: str = "") -> PluginProblem:
        """Record a problem (the CLI and the kernel's start-up report the list)."""
        found = PluginProblem(plugin, message, detail)
        self.problems.append(found)
        return found

    @contextlib.asynccontextmanager
    async def lifecycle(self) -> AsyncIterator[None]:
        """Enter every plugin's lifespan (registration order), yield while the kernel runs,
        exit them in reverse order. A lifespan that fails to start is reported (a problem,
        ERR_PLUGIN_LOAD, logged) and the kernel runs without it; one that fails to stop is
        logged and the others still stop. An exception from the body reaches every
        lifespan's exit, then propagates."""
        async with contextlib.AsyncExitStack() as stack:
            for name, factory in self.lifespans:
                try:
                    await stack.enter_async_context(_Guarded(name, factory()))
                except Exception as exc:
                    found = self.problem(name, f"its lifespan failed to start: "
                                         f"{type(exc).__name__}: {exc}", traceback.format_exc())
                    log.error("%s; the kernel runs without it", found)  # no one else reports it
            yield

    def action(self, name: str) -> Action:
        try:
            return self.actions[name]
        except KeyError:
            known = ", ".join(sorted(self.actions)) or "none"
            raise ActionNotFound(f"unknown action {name!r} (installed actions: {known})") from None

    def decode_payload(self, action: Action, payload: Any) -> Any:
        """Check ``payload`` against the action's schema; raises BadPayload naming the field."""
        if action.payload_type is None:
            return payload
        try:
            return msgspec.convert(payload, action.payload_type, strict=False)
        except msgspec.ValidationError as exc:
            raise BadPayload(f"payload for action {action.name!r}: {exc}") from None


def make_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(KernelHooks)
    return pm


def _entry_points(group: str) -> Iterable[EntryPoint]:
    return sorted(entry_points(group=group), key=lambda ep: ep.name)


def load(
    context: PluginContext,
    *,
    extra: Iterable[tuple[str, object]] = (),
    use_entry_points: bool = True,
    group: str = ENTRY_POINT_GROUP,
) -> PluginSet:
    """Register the built-ins, every entry point of ``group``, and ``extra`` (name, plugin)
    pairs (tests register plugins directly), then collect actions and subscribers."""
    ps = _register(extra, use_entry_points, group)
    _collect(ps, context)
    return ps


def _register(extra: Iterable[tuple[str, object]], use_entry_points: bool,
              group: str) -> PluginSet:
    pm = make_manager()
    ps = PluginSet(manager=pm)
    pm.register(builtin_actions, name="builtin")
    ps.plugins["builtin"] = "kernel (built-in)"
    if use_entry_points:
        for ep in _entry_points(group):
            if ep.name in ps.plugins:
                continue
            try:
                obj = ep.load()
                pm.register(obj, name=ep.name)
            except Exception as exc:
                ps.problem(ep.name, f"failed to load {ep.value!r}: {exc}", traceback.format_exc())
                log.error("plugin %s failed to load: %s", ep.name, exc)
                continue
            dist = getattr(ep, "dist", None)
            ps.plugins[ep.name] = f"{dist.name} {dist.version}" if dist is not None else ep.value
    for name, obj in extra:
        try:
            pm.register(obj, name=name)
            ps.plugins[name] = getattr(obj, "__name__", type(obj).__name__)
        except Exception as exc:
            ps.problem(name, f"failed to register: {exc}")
    _check_hook_names(ps)
    return ps


def _check_hook_names(ps: PluginSet) -> None:
    """pluggy's ``check_pending()``: a hook implementation that matches no hook spec (a typo
    such as ``register_action``) would otherwise never be called, silently. Report each one,
    naming the plugin, the unknown hook, the closest valid name and all of them."""
    pm = ps.manager
    try:
        pm.check_pending()
        return
    except pluggy.PluginValidationError:
        pass  # it names only the first one: list them all below
    valid = ", ".join(HOOK_NAMES)
    for name in sorted(vars(pm.hook)):
        caller = getattr(pm.hook, name)
        if not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook or name.startswith("_"):
                continue
            close = difflib.get_close_matches(name, HOOK_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            ps.problem(impl.plugin_name,
                       f"unknown hook {name!r}: it is never called{hint} (valid hooks: "
                       f"{valid}; mark a hook of a newer kernel with "
                       "@hookimpl(optionalhook=True))")


def _collect(ps: PluginSet, context: PluginContext) -> None:
    pm = ps.manager
    for impl in reversed(pm.hook.register_actions.get_hookimpls()):
        try:
            actions = cast(list[Action], impl.function(context=context))
        except Exception as exc:
            ps.problems.append(PluginProblem(impl.plugin_name,
                                             f"register_actions raised: {exc}",
                                             traceback.format_exc()))
            continue
        for act in actions or []:
            if not isinstance(act, Action) or not act.name:
                ps.problems.append(PluginProblem(impl.plugin_name,
                                                 f"registered an invalid action: {act!r}"))
                continue
            if act.name in ps.actions:
                other = ps.actions[act.name].plugin
                ps.problems.append(PluginProblem(
                    impl.plugin_name, f"action {act.name!r} already provided by {other!r}; "
                    "the first one is kept"))
                continue
            ps.actions[act.name] = Action(
                name=act.name, run=act.run, description=act.description,
                payload_type=act.payload_type, concurrency_key=act.concurrency_key,
                plugin=impl.plugin_name)
    for impl in reversed(pm.hook.register_subscribers.get_hookimpls()):
        try:
            subs = cast(list[Subscriber], impl.function(context=context))
        except Exception as exc:
            ps.problems.append(PluginProblem(impl.plugin_name,
                                             f"register_subscribers raised: {exc}",
                                             traceback.format_exc()))
            continue
        ps.subscribers.extend(subs or [])
    for impl in pm.hook.register_lifespan.get_hookimpls():  # registration order
        try:
            factory = impl.function(context=context)
        except Exception as exc:
            ps.problem(impl.plugin_name, f"register_lifespan raised: {exc}",
                       traceback.format_exc())
            continue
        if factory is None:
            continue
        if not callable(factory):
            ps.problem(impl.plugin_name, f"register_lifespan returned {factory!r}; expected a "
                       "function returning an async context manager (or None)")
            continue
        ps.lifespans.append((impl.plugin_name, cast(Lifespan, factory)))


class _Guarded(contextlib.AbstractAsyncContextManager[None]):
    """One plugin's lifespan: its failure to stop is logged, never raised over the kernel's."""

    def __init__(self, name: str, cm: contextlib.AbstractAsyncContextManager[object]) -> None:
        self.name = name
        self.cm = cm

    async def __aenter__(self) -> None:
        await self.cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool:
        try:
            await self.cm.__aexit__(*exc_info)
        except Exception:
            log.exception("plugin %s: its lifespan failed to stop", self.name)
        return False


# ------------------------------------------------------------------------------ CLI commands
def _default_context(args: argparse.Namespace) -> PluginContext:
    from . import config as config_mod

    cfg = config_mod.load(getattr(args, "config", None), tasks_file=getattr(args, "tasks", None))
    return PluginContext(settings=cfg.plugins, data_dir=cfg.data_dir())


def _default_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="config.toml whose [plugins.<name>] table the command uses")


def add_plugin_commands(
    subparsers: Any,
    *,
    configure: Callable[[argparse.ArgumentParser], None] | None = _default_configure,
    context: Callable[[argparse.Namespace], PluginContext] = _default_context,
    extra: Iterable[tuple[str, object]] = (),
    use_entry_points: bool = True,
    group: str = ENTRY_POINT_GROUP,
) -> PluginSet:
    """Add ``<plugin> <command>`` subcommands for every plugin that has ``register_commands``.

    ``subparsers`` is what ``ArgumentParser.add_subparsers()`` returned; each plugin becomes
    one subcommand holding its commands. ``configure(parser)`` adds the options every plugin
    command shares (``--config``...); ``context(args)`` builds the plugin context from them
    when a command runs. Each command's parser gets ``handler`` as a default: call
    ``args.handler(args)`` for the exit status. A plugin whose name is already a command is
    skipped and reported. Returns the plugin set (its ``problems`` list what was skipped)."""
    ps = _register(extra, use_entry_points, group)
    taken = set(getattr(subparsers, "choices", {}) or {})
    by_plugin: dict[str, list[Command]] = {}
    for impl in reversed(ps.manager.hook.register_commands.get_hookimpls()):
        try:
            cmds = cast(list[Command], impl.function())
        except Exception as exc:
            ps.problem(impl.plugin_name, f"register_commands raised: {exc}",
                       traceback.format_exc())
            continue
        for cmd in cmds or []:
            if not isinstance(cmd, Command) or not cmd.name or not callable(cmd.run):
                ps.problem(impl.plugin_name, f"registered an invalid command: {cmd!r}")
                continue
            by_plugin.setdefault(impl.plugin_name, []).append(cmd)
    for plugin, cmds in by_plugin.items():
        if plugin in taken:
            ps.problem(plugin, f"{plugin!r} is already a command: its CLI commands "
                       f"({', '.join(c.name for c in cmds)}) are not added")
            continue
        group_parser = subparsers.add_parser(
            plugin, help=f"commands of the {plugin} plugin ({', '.join(c.name for c in cmds)})",
            description=f"Commands contributed by the {plugin} plugin.")
        inner = group_parser.add_subparsers(dest="plugin_cmd", metavar="COMMAND")
        group_parser.set_defaults(handler=_usage(group_parser))
        for cmd in cmds:
            p = inner.add_parser(
                cmd.name, help=cmd.help, description=cmd.help,
                epilog=f"example:\n  {cmd.example}" if cmd.example else None,
                formatter_class=argparse.RawDescriptionHelpFormatter)
            if configure is not None:
                configure(p)
            if cmd.add_arguments is not None:
                cmd.add_arguments(p)
            p.set_defaults(handler=_runner(plugin, cmd, context))
    return ps


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2
    return show


def _runner(plugin: str, cmd: Command,
            context: Callable[[argparse.Namespace], PluginContext]
            ) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            result = cmd.run(args, context(args))
            if inspect.isawaitable(result):
                result = asyncio.run(_awaited(result))
        except KeyboardInterrupt:
            return 130
        except Exception as exc:
            code = getattr(exc, "code", ErrorCode.ERR_ACTION_FAILED)
            print(f"error: {plugin} {cmd.name}: [{code}] {exc}", file=sys.stderr)
            return 1
        return int(result or 0)
    return run


async def _awaited(aw: Any) -> Any:
    return await aw


def payload_schema(action: Action) -> dict[str, Any] | None:
    """JSON schema of an action's payload, for `plugins --json` and the OpenAPI document."""
    if action.payload_type is None:
        return None
    try:
        return msgspec.json.schema(action.payload_type)
    except (TypeError, ValueError):
        return None
