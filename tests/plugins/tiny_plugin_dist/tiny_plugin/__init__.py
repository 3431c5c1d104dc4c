"""The smallest useful Open-AutoGLM Kernel plugin: an action, a lifespan and a CLI command.

* ``tiny.greet`` (action): greets ``name`` with the configured greeting.
* lifespan: while the kernel runs, greetings are counted; when it stops, the count is written
  to ``<data dir>/tiny-greetings.txt``.
* ``python -m kernel tiny hello --name box`` (CLI command): greets from the command line.

Config (optional)::

    [plugins.tiny]
    greeting = "hello"

Task::

    [[tasks]]
    id = "greet"
    schedule = "@every 1m"
    action = "tiny.greet"
    payload = { name = "GPU box" }
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from kernel.errors import ActionError, ErrorCode
from kernel.files import atomic_write
from kernel.hookspecs import Action, Command, Lifespan, PluginContext, RunContext, hookimpl
from kernel.settings import plugin_settings


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[plugins.tiny]``; a mistake is reported as ``[plugins.tiny]: ...`` naming the field."""

    greeting: str = "hello"


class GreetPayload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Checked by the kernel when a task or submission names ``tiny.greet``."""

    name: str = "world"
    shout: bool = False


class Greeter:
    def __init__(self, settings: Settings, data_dir: Path) -> None:
        self.greeting = settings.greeting
        self.data_dir = data_dir
        self.count = 0

    def text(self, p: GreetPayload) -> str:
        if not p.name.strip():
            # a classified failure: the code says what went wrong, `retryable` whether to retry
            raise ActionError("name: must not be blank", code=ErrorCode.ERR_BAD_PAYLOAD)
        text = f"{self.greeting}, {p.name}"
        return text.upper() if p.shout else text

    async def greet(self, ctx: RunContext, p: GreetPayload) -> str:
        text = self.text(p)
        self.count += 1
        ctx.log.info("greeting %s (trace %s, attempt %d)", p.name, ctx.trace_id, ctx.attempt)
        return text  # becomes the run's `detail`

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Entered when the kernel starts, exited when it stops (after the last run)."""
        self.count = 0
        try:
            yield
        finally:
            report = f"{self.count} greeting(s)\n".encode()
            await asyncio.to_thread(atomic_write, self.data_dir / "tiny-greetings.txt", report)


def _greeter(context: PluginContext) -> Greeter:
    # one Greeter per load, shared by register_actions and register_lifespan
    return context.shared("tiny", lambda: Greeter(plugin_settings(context, "tiny", Settings),
                                                  context.data_dir))


@hookimpl
def register_actions(context: PluginContext) -> list[Action]:
    greeter = _greeter(context)
    return [Action("tiny.greet", greeter.greet, "Say hello (the plugin guide's example).",
                   GreetPayload)]


@hookimpl
def register_lifespan(context: PluginContext) -> Lifespan | None:
    return _greeter(context).lifespan


def _hello_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="world", help="who to greet")
    p.add_argument("--shout", action="store_true", help="in capitals")


def _hello(args: argparse.Namespace, context: PluginContext) -> int:
    print(_greeter(context).text(GreetPayload(name=args.name, shout=args.shout)))
    return 0


@hookimpl
def register_commands() -> list[Command]:
    return [Command("hello", _hello, "greet from the command line",
                    add_arguments=_hello_arguments,
                    example="python -m kernel tiny hello --name box --shout")]
