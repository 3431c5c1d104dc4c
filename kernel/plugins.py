"""Plugin loading: a plugin manager made by a factory, entry points loaded one at a time.

A broken plugin (import error, a hook that raises, an invalid action) is reported with its name
and the reason; the other plugins still load. Nothing happens at import time.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, cast

import msgspec
import pluggy

from . import builtin_actions
from .errors import ActionNotFound, BadPayload
from .hookspecs import ENTRY_POINT_GROUP, PROJECT, Action, KernelHooks, PluginContext, Subscriber

log = logging.getLogger("kernel.plugins")


@dataclass(frozen=True, slots=True)
class PluginProblem:
    plugin: str
    message: str
    detail: str = ""


@dataclass(slots=True)
class PluginSet:
    """The loaded plugins: their actions, subscribers and any problems met while loading."""

    manager: pluggy.PluginManager
    actions: dict[str, Action] = field(default_factory=dict)
    subscribers: list[Subscriber] = field(default_factory=list)
    problems: list[PluginProblem] = field(default_factory=list)
    plugins: dict[str, str] = field(default_factory=dict)  # name -> distribution/version or module

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
                ps.problems.append(PluginProblem(ep.name, f"failed to load {ep.value!r}: {exc}",
                                                 traceback.format_exc()))
                log.error("plugin %s failed to load: %s", ep.name, exc)
                continue
            dist = getattr(ep, "dist", None)
            ps.plugins[ep.name] = f"{dist.name} {dist.version}" if dist is not None else ep.value
    for name, obj in extra:
        try:
            pm.register(obj, name=name)
            ps.plugins[name] = getattr(obj, "__name__", type(obj).__name__)
        except Exception as exc:
            ps.problems.append(PluginProblem(name, f"failed to register: {exc}"))
    _collect(ps, context)
    return ps


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


def payload_schema(action: Action) -> dict[str, Any] | None:
    """JSON schema of an action's payload, for `plugins --json` and the OpenAPI document."""
    if action.payload_type is None:
        return None
    try:
        return msgspec.json.schema(action.payload_type)
    except (TypeError, ValueError):
        return None
