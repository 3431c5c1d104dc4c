"""A kernel on a fake clock for deterministic tests, and a recording test action.

``RecordingPlugin`` registers the action ``rec``: it appends one ``Call`` per run and behaves as
its payload says (``mode``: ok | fail | sleep | retry | conn). ``sleep`` waits on the *fake*
clock, so a test controls exactly when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kernel import config as config_mod
from kernel.app import Kernel, KernelParts
from kernel.clock import FakeClock, settle
from kernel.errors import ActionError, ErrorCode, Retry
from kernel.events import ConfigReloaded, Event
from kernel.hookspecs import Action, PluginContext, RunContext, hookimpl
from kernel.main import build
from kernel.plugins import PluginSet
from kernel.plugins import load as load_plugins
from kernel.records import RunQuery, RunRecord
from kernel.store.base import Store
from kernel.store.memory import MemoryStore


@dataclass
class Call:
    job_id: str
    task_id: str | None
    trace_id: str
    parent_span_id: str | None
    scheduled_at: float | None
    attempt: int
    at: float
    payload: dict[str, Any]
    gpu_index: int | None = None


class RecordingPlugin:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[Call] = []
        self.finished: list[str] = []
        self.release = asyncio.Event()

    async def run(self, ctx: RunContext, payload: Any) -> Any:
        self.calls.append(Call(ctx.job_id, ctx.task_id, ctx.trace_id, ctx.parent_span_id,
                               ctx.scheduled_at, ctx.attempt, self.clock.wall(), dict(payload),
                               ctx.gpu_index))
        mode = payload.get("mode", "ok")
        if mode == "sleep":
            await self.clock.sleep(float(payload.get("seconds", 1.0)))
        elif mode == "block":
            await self.release.wait()
        elif mode == "fail":
            raise ActionError(payload.get("message", "boom"),
                              code=ErrorCode(payload.get("code", "ERR_ACTION_FAILED")),
                              retryable=payload.get("retryable"))
        elif mode == "retry":
            raise Retry(delay=payload.get("delay"))
        elif mode == "conn":
            raise ConnectionRefusedError("connection refused")
        elif mode == "bug":
            raise ZeroDivisionError("division by zero")
        self.finished.append(ctx.job_id)
        return payload.get("result", "done")

    @hookimpl
    def register_actions(self, context: PluginContext) -> list[Action]:
        return [Action("rec", self.run, "test action that records its calls")]


@dataclass
class Harness:
    kernel: Kernel
    clock: FakeClock
    rec: RecordingPlugin
    store: Store
    events: list[Event] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        started = asyncio.Event()
        self.task = asyncio.create_task(self.kernel.run(started=started))
        waiter = asyncio.create_task(started.wait())
        done, _ = await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            waiter.cancel()
            self.task.result()  # raises the start-up error
        await settle()

    async def stop(self) -> None:
        self.kernel.stop("test")
        assert self.task is not None
        for _ in range(10_000):  # fake seconds: a kernel that never stops fails the test
            if self.task.done():
                break
            await self.clock.advance(1.0)
            await asyncio.sleep(0)
        assert self.task.done(), "the kernel did not stop"
        await self.task

    async def advance(self, seconds: float, step: float | None = None) -> None:
        await self.clock.advance(seconds, step=step)
        await self.idle()

    async def idle(self) -> None:
        """Let the kernel finish every piece of work it can do without time moving."""
        for _ in range(20):
            await settle()

    async def runs(self, **kw: Any) -> list[RunRecord]:
        return list(reversed(await self.store.query_runs(RunQuery(limit=10_000, **kw))))


def make_config(text: str) -> config_mod.Config:
    cfg, issues = config_mod.parse_text(text, "test.toml")
    assert not issues, issues
    cfg.server.enabled = False
    cfg.store.backend = "memory"
    return cfg


def make_harness(text: str, *, store: Store | None = None, clock: FakeClock | None = None,
                 parts: KernelParts | None = None) -> Harness:
    clock = clock or FakeClock()
    rec = RecordingPlugin(clock)
    cfg = make_config(text)
    plugins: PluginSet = load_plugins(PluginContext(), extra=[("rec", rec)],
                                      use_entry_points=False)
    store = store or MemoryStore()
    kernel = build(cfg, clock=clock, plugins=plugins, store=store, parts=parts)
    h = Harness(kernel, clock, rec, store)
    kernel.bus.subscribe(h.events.append)
    return h


async def edit_until_reloaded(h: Harness, edit: Callable[[int], None],
                              limit: float = 15.0) -> ConfigReloaded:
    """Call ``edit(n)`` (n = 1, 2, ...) until the kernel published a ``ConfigReloaded``: a file
    watcher may still be subscribing when the first edit lands, so the edit is made again,
    after waiting up to 0.1 s for the event each time (woken by it at once), until it has
    been seen (bounded by ``limit``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    seen = asyncio.Event()
    unsubscribe = h.kernel.bus.subscribe(
        lambda e: seen.set() if isinstance(e, ConfigReloaded) else None)
    try:
        n = 0
        while not any(isinstance(e, ConfigReloaded) for e in h.events):
            assert loop.time() < end, f"the watcher did not reload within {limit:g} s"
            n += 1
            edit(n)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(seen.wait(), 0.1)
    finally:
        unsubscribe()
    return next(e for e in h.events if isinstance(e, ConfigReloaded))
