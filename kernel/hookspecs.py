"""The plugin contract: typed pluggy hook specs and the objects plugins hand to the kernel.

A plugin is a module (or object) with ``@hookimpl`` functions, published through the entry-point
group ``open_autoglm_kernel.plugins``. pluggy hooks are synchronous: they *return* actions,
subscribers, CLI commands and lifespans whose async methods the kernel awaits. Built-in actions
use the same hooks. A hook implementation whose name is not one of :class:`KernelHooks` is
reported at load time (ERR_PLUGIN_LOAD), unless marked ``@hookimpl(optionalhook=True)``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import msgspec
import pluggy

from .events import Event

PROJECT = "open_autoglm_kernel"
ENTRY_POINT_GROUP = "open_autoglm_kernel.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RunContext(msgspec.Struct, frozen=True):
    """What an action knows about the run it is doing (immutable; built once per run, so it is
    a ``msgspec.Struct``: ten times cheaper to make than a frozen dataclass)."""

    job_id: str
    task_id: str | None
    action: str
    trace_id: str
    span_id: str
    attempt: int
    scheduled_at: float | None
    timeout: float | None
    log: logging.LoggerAdapter[logging.Logger]
    gpu_index: int | None = None
    parent_span_id: str | None = None
    on_progress: Callable[[float, float | None, str], None] | None = None

    def progress(self, done: float, total: float | None = None, note: str = "") -> None:
        """Report how far the run is (``done`` of ``total`` units, e.g. requests of a batch):
        shown in ``/snapshot``, the TUI's progress bars and the ``run_progress`` gauge."""
        if self.on_progress is not None:
            self.on_progress(float(done), None if total is None else float(total), note[:200])

    @property
    def traceparent(self) -> str:
        """W3C trace context header for outgoing calls."""
        return f"00-{self.trace_id}-{self.span_id}-01"

    def env(self) -> dict[str, str]:
        """The KERNEL_* variables given to child processes."""
        env = {
            "KERNEL_JOB_ID": self.job_id,
            "KERNEL_TASK_ID": self.task_id or "",
            "KERNEL_TRACE_ID": self.trace_id,
            "KERNEL_SPAN_ID": self.span_id,
            "KERNEL_ATTEMPT": str(self.attempt),
            "KERNEL_SCHEDULED_AT": "" if self.scheduled_at is None else repr(self.scheduled_at),
            "TRACEPARENT": self.traceparent,
        }
        if self.gpu_index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu_index)
        return env


ActionFn = Callable[[RunContext, Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Action:
    """An action a task or submission can name.

    ``payload_type`` (a msgspec Struct or any type msgspec can convert into) is used to check a
    payload when it is submitted and to decode it before ``run`` is called; ``None`` passes the
    payload dict through. ``concurrency_key`` maps a decoded payload to a key such as a model
    endpoint, limited by ``[scheduler] concurrency_limits``.
    """

    name: str
    run: ActionFn
    description: str = ""
    payload_type: Any = None
    concurrency_key: Callable[[Any], str | None] | None = None
    plugin: str = ""


class Subscriber(Protocol):
    """An observer of run events contributed by a plugin (alerts, for example)."""

    def handle(self, event: Event) -> None:
        """Called synchronously for every event: be quick, queue slow work for ``run``."""
        ...

    async def run(self) -> None:
        """Background work, owned by the kernel's task group and cancelled at shutdown."""
        ...


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a plugin is told at start-up: its settings from ``[plugins.<name>]``, the data dir."""

    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    data_dir: Path = Path(".")
    _shared: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def section(self, name: str) -> Mapping[str, Any]:
        return self.settings.get(name, {})

    def shared(self, key: str, factory: Callable[[], T]) -> T:
        """One object per load for ``key``: the first call makes it with ``factory``, later
        calls (from the plugin's other hooks) get the same object. This is how
        ``register_actions`` and ``register_lifespan`` share the plugin's state without a
        module-global; use your plugin's name as the key."""
        if key not in self._shared:
            self._shared[key] = factory()
        return cast(T, self._shared[key])


Lifespan = Callable[[], AbstractAsyncContextManager[object]]
"""A factory of an async context manager: entered when the kernel starts (before any run) and
exited when it stops (after the last run), e.g. a function decorated with
``contextlib.asynccontextmanager``. Hold sessions, pools, warm caches there."""

CommandFn = Callable[[argparse.Namespace, PluginContext], int | Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Command:
    """A CLI command a plugin contributes: ``python -m kernel <plugin> <name> [options]``.

    ``run(args, context)`` returns the exit status (a coroutine function is run in a fresh
    event loop); ``context`` holds the settings of the config named on the command line.
    ``add_arguments(parser)`` adds the command's options to its ``argparse`` parser; every
    option should have ``help``. ``example`` is shown at the end of ``--help``.
    """

    name: str
    run: CommandFn
    help: str = ""
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    example: str = ""
    plugin: str = ""


class KernelHooks:
    """The hook specifications (the class only namespaces them for pluggy)."""

    @hookspec
    def register_actions(self, context: PluginContext) -> list[Action]:  # type: ignore[empty-body]
        """Return the actions this plugin provides."""

    @hookspec
    def register_subscribers(self, context: PluginContext) -> list[Subscriber]:  # type: ignore[empty-body]
        """Return observers of the kernel's events (run started/finished, reloads...)."""

    @hookspec
    def register_commands(self) -> list[Command]:  # type: ignore[empty-body]
        """Return CLI commands, added as ``python -m kernel <plugin> <command>``."""

    @hookspec
    def register_lifespan(self, context: PluginContext) -> Lifespan | None:
        """Return a factory of an async context manager held open while the kernel runs."""


HOOK_NAMES = tuple(sorted(n for n in vars(KernelHooks) if n.startswith("register_")))
