"""The smallest useful Open-AutoGLM Kernel plugin: one action, ``tiny.greet``.

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

import msgspec

from kernel.errors import ActionError, ErrorCode
from kernel.hookspecs import Action, PluginContext, RunContext, hookimpl


class GreetPayload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Checked by the kernel when a task or submission names ``tiny.greet``."""

    name: str = "world"
    shout: bool = False


class Greeter:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    async def greet(self, ctx: RunContext, p: GreetPayload) -> str:
        if not p.name.strip():
            # a classified failure: the code says what went wrong, `retryable` whether to retry
            raise ActionError("name: must not be blank", code=ErrorCode.ERR_BAD_PAYLOAD)
        text = f"{self.greeting}, {p.name}"
        ctx.log.info("greeting %s (trace %s, attempt %d)", p.name, ctx.trace_id, ctx.attempt)
        return text.upper() if p.shout else text  # becomes the run's `detail`


@hookimpl
def register_actions(context: PluginContext) -> list[Action]:
    settings = context.section("tiny")  # the [plugins.tiny] table, {} if absent
    greeter = Greeter(str(settings.get("greeting", "hello")))
    return [Action("tiny.greet", greeter.greet, "Say hello (the plugin guide's example).",
                   GreetPayload)]
