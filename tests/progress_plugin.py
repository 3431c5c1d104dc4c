"""A test plugin whose action ``prog`` reports progress and then waits, and a harness with it.

``prog``'s payload: ``done``, ``total`` (None: unknown), ``note``; the run calls
``ctx.progress(done, total, note)`` once and waits for ``release`` (an ``asyncio.Event``), so a
test can look at the running job's snapshot, TUI frame and metrics while it is in flight.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kernel.hookspecs import Action, PluginContext, RunContext, hookimpl
from kernel.main import build
from kernel.plugins import load as load_plugins

from .harness import Harness, RecordingPlugin, make_config


class ProgressPlugin:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.reported = asyncio.Event()

    async def run(self, ctx: RunContext, payload: Any) -> str:
        ctx.progress(payload.get("done", 0), payload.get("total"), payload.get("note", ""))
        self.reported.set()
        await self.release.wait()
        return "done"

    @hookimpl
    def register_actions(self, context: PluginContext) -> list[Action]:
        return [Action("prog", self.run, "test action that reports progress, then waits")]


def progress_harness(text: str = "") -> tuple[Harness, ProgressPlugin]:
    from kernel.clock import FakeClock
    from kernel.store.memory import MemoryStore

    clock = FakeClock()
    rec, prog = RecordingPlugin(clock), ProgressPlugin()
    plugins = load_plugins(PluginContext(), extra=[("rec", rec), ("prog", prog)],
                           use_entry_points=False)
    store = MemoryStore()
    kernel = build(make_config(text), clock=clock, plugins=plugins, store=store)
    h = Harness(kernel, clock, rec, store)
    kernel.bus.subscribe(h.events.append)
    return h, prog
