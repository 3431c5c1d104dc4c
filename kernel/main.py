"""The composition root: build a kernel from a typed config and run it as a process.

This is the only module that picks implementations: the store backend, the real clock, the
plugin set, the observers (logs, metrics, TUI), the API server and the config watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec

from . import config as config_mod
from . import logs
from .api.server import api_service, api_token
from .app import Kernel, KernelParts
from .clock import Clock, SystemClock
from .config import Config, secs
from .discovery import Discovered
from .events import EventBus
from .gcpolicy import Saved as GcSaved
from .gcpolicy import restore_gc, tune_gc
from .hookspecs import PluginContext
from .looplag import LoopLagSettings, LoopLagWatcher
from .metrics import KernelMetrics
from .plugins import PluginSet
from .plugins import load as load_plugins
from .reload import ConfigReloader as ConfigReloader  # re-exported (kernel.main.ConfigReloader)
from .store import describe as describe_store
from .store.base import Store
from .store.memory import MemoryStore
from .store.sqlite import SqliteStore
from .systemd import Notifier, SystemdNotify, watchdog_seconds
from .tui import run_inprocess
from .validate import load_checked

Service = Callable[[Kernel], Coroutine[Any, Any, None]]

log = logging.getLogger("kernel.main")


def make_store(cfg: Config) -> Store:
    if cfg.store.backend == "memory":
        return MemoryStore()
    if cfg.store.backend == "postgres":
        from .store.postgres import PostgresStore  # asyncpg is imported only for this backend

        return PostgresStore(cfg.store.dsn, schema=cfg.store.schema)
    path = cfg.store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteStore(path, synchronous=cfg.store.synchronous.upper())


def plugin_set(cfg: Config) -> PluginSet:
    """The plugins, each given its ``[plugins.<name>]`` table; the built-in ``python`` action
    gets the top-level ``[python]`` table as ``settings["python"]``."""
    settings = {**cfg.plugins, "python": msgspec.structs.asdict(cfg.python)}
    return load_plugins(PluginContext(settings=settings, data_dir=cfg.data_dir()))


def build(
    cfg: Config,
    *,
    clock: Clock | None = None,
    plugins: PluginSet | None = None,
    store: Store | None = None,
    parts: KernelParts | None = None,
    metrics: KernelMetrics | None = None,
) -> Kernel:
    plugins = plugins or plugin_set(cfg)
    bus = EventBus()
    bus.subscribe(logs.EventLogger())
    if metrics is not None:
        bus.subscribe(metrics)
    return Kernel(cfg, clock=clock or SystemClock(), store=store or make_store(cfg),
                  plugins=plugins, bus=bus, parts=parts)


async def serve(config_path: Path | None, tasks_file: Path | None, *,
                log_format: str | None = None, tui: bool = False, port: int | None = None,
                server: bool = True, discovered: Discovered | None = None,
                notifier: Notifier | None = None) -> int:
    """Run the kernel until SIGINT/SIGTERM. ``config_path`` None is the embedded demo config;
    ``discovered`` says how the file was chosen (for the banner and the demo warning).

    The process is this function's: it installs the signal handlers, enables faulthandler
    (SIGSEGV/SIGABRT/... dump every thread's stack) and tunes the garbage collector once the
    kernel has armed its timers (:mod:`kernel.gcpolicy`), restoring it when the kernel stops."""
    faulthandler.enable()
    # plugins from what decoded, so that load_checked reports every problem at once
    plugins = plugin_set(config_mod.load_partial(config_path, tasks_file=tasks_file)[0])
    cfg = load_checked(config_path, tasks_file, plugins)
    as_loaded = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server))
    if port is not None:
        cfg.server.port = port
    if not server:
        cfg.server.enabled = False
    fmt = logs.setup(cfg.kernel.log_level, log_format or cfg.kernel.log_format)
    if discovered is not None and discovered.is_demo:
        log.warning("%s", discovered.demo_warning())
    metrics = KernelMetrics()
    services: list[Service] = []
    if cfg.server.enabled:
        api_token(cfg)  # refuse to start on a non-loopback address without a token
        services.append(functools.partial(api_service, metrics=metrics.render))
    reloader = ConfigReloader(config_path, tasks_file, plugins, loaded=as_loaded)
    if config_path is not None:
        services.append(reloader.watch)
    if tui:
        services.append(run_inprocess)
    lag = LoopLagWatcher(LoopLagSettings(threshold=secs(cfg.kernel.loop_stall_warn) or 0.5))
    services.append(lag.run)
    started = asyncio.Event()
    gc_saved: list[GcSaved] = []

    async def tune_gc_once_armed(k: Kernel) -> None:
        await started.wait()  # set once the start-up timers are armed
        gc_saved.append(tune_gc(len(k.timers)))

    services.append(tune_gc_once_armed)
    notifier = notifier if notifier is not None else Notifier.from_env()
    sd = SystemdNotify(notifier, started, watchdog=watchdog_seconds(),
                       wait_api=cfg.server.enabled)
    services.append(sd)
    kernel = build(cfg, plugins=plugins, parts=KernelParts(services=services), metrics=metrics)
    kernel.bus.subscribe(sd.observe)
    reloader.kernel = kernel

    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        t = loop.create_task(reloader.reload("SIGHUP"))
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    for sig, fn in ((signal.SIGINT, lambda: kernel.stop("SIGINT")),
                    (signal.SIGTERM, lambda: kernel.stop("SIGTERM")),
                    (signal.SIGHUP, on_hup)):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, fn)
    banner(cfg, discovered, fmt)
    try:
        await kernel.run(started=started)
    finally:
        for saved in gc_saved:
            restore_gc(*saved)
        notifier.close()
    return 0


def banner(cfg: Config, discovered: Discovered | None, fmt: str) -> None:
    """Where the config, data and store are: four plain lines on stderr in text mode; in JSON
    mode one structured log record instead, so the JSON log stream stays one object a line."""
    config = discovered.describe() if discovered is not None else cfg.source
    store = describe_store(cfg.store.backend, cfg.store_path(), cfg.store.dsn,
                           cfg.store.schema)
    if fmt == "json":
        log.info("Open-AutoGLM Kernel: config %s; data dir: %s; store: %s", config, cfg.data_dir(),
                 store)
        return
    print(f"Open-AutoGLM Kernel: config {config}", file=sys.stderr)
    print(f"  data dir: {cfg.data_dir()}", file=sys.stderr)
    print(f"  store:    {store}", file=sys.stderr)
    print("  stop with Ctrl-C (SIGINT) or SIGTERM; reload the config with SIGHUP", file=sys.stderr)

