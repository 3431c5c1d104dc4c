"""The preprocess plugin: the ``preprocess.prepare`` action, from ``[plugins.preprocess]``."""

from __future__ import annotations

import asyncio

from kernel.hookspecs import Action, PluginContext, RunContext, hookimpl
from kernel.settings import plugin_settings

from .prepare import prepare
from .settings import PreparePayload, Settings


class PreprocessPlugin:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def prepare(self, ctx: RunContext, p: PreparePayload) -> str:
        loop = asyncio.get_running_loop()

        def progress(done: float, total: float | None, note: str) -> None:
            # called in the worker thread: the report is made on the kernel's loop
            loop.call_soon_threadsafe(ctx.progress, done, total, note)

        report = await asyncio.to_thread(prepare, p, self.settings, ctx.scheduled_at, progress)
        if report.read.skipped:
            ctx.log.warning("preprocess.prepare skipped %d line(s): %s", report.read.skipped,
                            "; ".join(report.read.examples))
        ctx.log.info("preprocess.prepare: %s", report)
        return str(report)


@hookimpl
def register_actions(context: PluginContext) -> list[Action]:
    plugin = PreprocessPlugin(plugin_settings(context, "preprocess", Settings))
    return [Action("preprocess.prepare", plugin.prepare,
                   "Read text/JSONL/CSV files, normalise, deduplicate and chunk them into "
                   "JSONL records {id, source, chunk, text}.", PreparePayload)]
