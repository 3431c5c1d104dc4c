"""Command line: ``python -m kernel [run|validate|cron|plugins|explain|...]``.

Exit status: 0 success, 1 a failed check (``validate`` found problems, a run could not start),
2 invalid input (a bad expression, unknown code, bad arguments). Errors are one readable line
(or one line per config issue) on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, KernelError


def _iso_instant(text: str) -> float:
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 instant (e.g. 2026-10-25T00:00:00+02:00)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return d.timestamp()


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="config.toml to use (default: the embedded default config)")
    p.add_argument("--tasks", type=Path, default=None,
                   help="extra tasks in the seed's YAML format (tasks: - id/schedule/action)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m kernel",
        description="Open-AutoGLM Kernel: a scheduler for LLM work on one GPU box.")
    sub = ap.add_subparsers(dest="cmd")

    run = sub.add_parser("run", help="start the kernel (the default command)")
    _add_config_args(run)
    run.add_argument("--log-format", choices=["auto", "json", "text"], default=None)
    run.add_argument("--tui", action="store_true", help="show the live terminal UI")
    run.add_argument("--port", type=int, default=None,
                     help="override [server] port (0 picks a free port)")
    run.add_argument("--no-server", action="store_true", help="do not start the HTTP API")

    val = sub.add_parser("validate", help="check a config and report every problem")
    _add_config_args(val)

    cron = sub.add_parser("cron", help="preview the next fire instants of a schedule")
    cron.add_argument("expr")
    cron.add_argument("--tz", default="UTC")
    cron.add_argument("--after", type=_iso_instant, default=None,
                      help="ISO-8601 instant to start after (default: now)")
    cron.add_argument("--count", type=int, default=5)

    plug = sub.add_parser("plugins", help="list plugins and their actions")
    plug.add_argument("--json", action="store_true")
    _add_config_args(plug)

    exp = sub.add_parser("explain", help="explain an error code, e.g. ERR_TIMEOUT")
    exp.add_argument("code", nargs="?", help="omit to list every code")

    from .client import add_client_commands
    from .tui import add_tui_command

    add_client_commands(sub)
    add_tui_command(sub)
    return ap


def _err(text: str) -> int:
    print(f"error: {text}", file=sys.stderr)
    return 2


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def cmd_run(a: argparse.Namespace) -> int:
    from .main import serve

    try:
        try:
            return _run_async(serve(a.config, a.tasks, log_format=a.log_format, tui=a.tui,
                                    port=a.port, server=not a.no_server))
        except BaseExceptionGroup as group:  # a service (the API server) failed to start
            first = _first_kernel_error(group)
            if first is None:
                raise
            raise first from None
    except ConfigError as exc:
        print("the kernel did not start: the configuration has problems:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 1
    except KernelError as exc:
        from .errors import CATALOGUE

        print(f"the kernel stopped: [{exc.code}] {exc}", file=sys.stderr)
        print(f"  what to do: {CATALOGUE[exc.code].remedy}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _first_kernel_error(group: BaseExceptionGroup[BaseException]) -> KernelError | None:
    for exc in group.exceptions:
        if isinstance(exc, KernelError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_kernel_error(exc)
            if found is not None:
                return found
    return None


def cmd_validate(a: argparse.Namespace) -> int:
    from . import config as config_mod
    from .gpu import GpuGate, NvmlProbe
    from .main import plugin_set
    from .validate import validate

    try:
        cfg = config_mod.load(a.config, tasks_file=a.tasks)
        issues = validate(cfg, plugin_set(cfg), GpuGate(NvmlProbe()))
    except ConfigError as exc:
        issues = exc.issues
        cfg = None
    for issue in issues:
        print(str(issue), file=sys.stderr)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        print(f"{len(errors)} problem(s) found", file=sys.stderr)
        return 1
    assert cfg is not None
    enabled = sum(1 for t in cfg.tasks if t.enabled)
    warned = f", {len(issues)} warning(s)" if issues else ""
    print(f"{cfg.source}: valid ({len(cfg.tasks)} task(s), {enabled} enabled{warned})")
    return 0


def cmd_cron(a: argparse.Namespace) -> int:
    import time

    from .triggers import preview

    if a.count < 1:
        return _err("--count must be at least 1")
    after = a.after if a.after is not None else time.time()
    try:
        instants = preview(a.expr, a.tz, after, a.count)
    except KernelError as exc:
        return _err(str(exc))
    if not instants:
        return _err(f"schedule {a.expr!r} never fires after the given instant")
    for d in instants:
        print(d.isoformat())
    return 0


def cmd_plugins(a: argparse.Namespace) -> int:
    from . import config as config_mod
    from .main import plugin_set
    from .plugins import payload_schema

    try:
        cfg = config_mod.load(a.config, tasks_file=a.tasks)
    except ConfigError:
        cfg = config_mod.Config()
    ps = plugin_set(cfg)
    if a.json:
        print(json.dumps({
            "plugins": ps.plugins,
            "actions": [{"name": x.name, "plugin": x.plugin, "description": x.description,
                         "payload_schema": payload_schema(x)}
                        for x in sorted(ps.actions.values(), key=lambda x: x.name)],
            "problems": [{"plugin": p.plugin, "message": p.message} for p in ps.problems],
        }, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Actions")
        for col in ("action", "plugin", "description"):
            table.add_column(col)
        for x in sorted(ps.actions.values(), key=lambda x: x.name):
            table.add_row(x.name, x.plugin, x.description)
        con = Console()
        con.print(table)
        for p in ps.problems:
            con.print(f"[red]plugin {p.plugin} failed:[/red] {p.message}")
    return 1 if ps.problems else 0


def cmd_explain(a: argparse.Namespace) -> int:
    from .errors import CATALOGUE, explain

    if not a.code:
        for e in CATALOGUE.values():
            print(f"{e.code.value:24} {e.meaning.split('.')[0]}.")
        return 0
    try:
        e = explain(a.code)
    except KernelError as exc:
        return _err(str(exc))
    print(e.code.value)
    print(f"  meaning:   {e.meaning}")
    print(f"  remedy:    {e.remedy}")
    print(f"  retryable: {'yes' if e.retryable else 'no'}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "validate": cmd_validate, "cron": cmd_cron, "plugins": cmd_plugins,
    "explain": cmd_explain,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
        args = ["run", *args]
    a = ap.parse_args(args)
    handler = COMMANDS.get(a.cmd) or getattr(a, "handler", None)
    if handler is None:
        ap.print_help()
        return 2
    return handler(a)
