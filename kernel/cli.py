"""Command line: ``autoglm-kernel`` (or ``python -m kernel``) ``[run|validate|cron|plugins|...]``.

Exit status (the same for every command):

====  =====================================================================================
0     done
1     a runtime failure: the kernel stopped on an error, a client command could not reach
      the kernel or it refused the request, a plugin failed to load
2     usage: unknown option, bad argument, invalid expression, unknown error code
78    the configuration is invalid (``EX_CONFIG`` from sysexits.h): ``validate`` found an
      error, or ``run`` refused to start; systemd's ``RestartPreventExitStatus=78`` stops a
      restart loop on a broken file
130   interrupted (Ctrl-C) before the kernel was up
====  =====================================================================================

Errors are one readable line (or one line per config issue) on stderr, never a traceback. With
``--json`` every command prints one JSON document on stdout, errors included:
``{"error": {"code": "ERR_...", "message": "...", "exit_status": N}}`` (config errors add
``"issues"``).

Without ``--config`` the file comes from the discovery chain in :mod:`kernel.discovery`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import io
import json
import os
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from .errors import ConfigError, ConfigIssue, ErrorCode, KernelError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit status:
  0   done
  1   runtime failure (the kernel stopped on an error, a client command failed)
  2   usage error (bad option or argument, invalid expression)
  78  configuration invalid (EX_CONFIG; for systemd's RestartPreventExitStatus=78)"""

CONFIG_HELP = """config file (first found): --config FILE, $KERNEL_CONFIG,
  $XDG_CONFIG_HOME/open-autoglm-kernel/config.toml (~/.config/...),
  /etc/open-autoglm-kernel/config.toml, else the embedded demo config (with a warning)"""

EXAMPLES: dict[str, str] = {
    "run": """examples:
  autoglm-kernel                                   # discover the config, start the kernel
  autoglm-kernel run --config config.toml --tui    # a given file, with the live dashboard
  autoglm-kernel run --json --port 0               # JSON logs, any free API port""",
    "validate": """examples:
  autoglm-kernel validate --config config.toml
  autoglm-kernel validate --json | jq '.issues[] | .message'""",
    "cron": """examples:
  autoglm-kernel cron "0 2 * * *" --tz Europe/Berlin --count 3
  autoglm-kernel cron "@every 90s" --after 2026-01-01T00:00:00Z --json""",
    "plugins": """examples:
  autoglm-kernel plugins
  autoglm-kernel plugins --json | jq '.actions[].name'""",
    "explain": """examples:
  autoglm-kernel explain ERR_TIMEOUT
  autoglm-kernel explain timeout --json
  autoglm-kernel explain                           # every code""",
    "submit": """examples:
  autoglm-kernel submit log --payload '{"message": "hello"}' --delay 10s
  autoglm-kernel submit exec --payload '{"argv": ["uptime"]}' --dedup-key uptime-1 --json""",
    "jobs": """examples:
  autoglm-kernel jobs --state running
  autoglm-kernel jobs --task heartbeat --json""",
    "runs": """examples:
  autoglm-kernel runs --limit 5
  autoglm-kernel runs --outcome failed --since 2026-11-30T00:00:00Z --json""",
    "tasks": """examples:
  autoglm-kernel tasks
  autoglm-kernel tasks --url http://10.0.0.5:8765 --json""",
    "pause": "example:\n  autoglm-kernel pause heartbeat",
    "resume": "example:\n  autoglm-kernel resume heartbeat",
    "trigger": """examples:
  autoglm-kernel trigger uptime_probe
  autoglm-kernel trigger report --payload '{"day": "2026-11-29"}'""",
    "cancel": "example:\n  autoglm-kernel cancel 01JD3K9Q0000000000000001",
    "backfill": """example:
  autoglm-kernel backfill report --start 2026-11-01T00:00:00Z --end 2026-11-07T00:00:00Z""",
    "tui": """examples:
  autoglm-kernel tui
  autoglm-kernel tui --url http://127.0.0.1:8765 --refresh 2""",
}

OPTION_HELP: dict[str, str] = {
    "--state": "only jobs in this state",
    "--task": "only this task's entries",
    "--limit": "at most this many rows",
    "--outcome": "only runs with this outcome",
}
"""Help for options registered elsewhere without one (a fallback; theirs wins)."""


class UsageError(Exception):
    """Bad arguments: exit status 2, the message as argparse words it."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are exceptions, so ``--json`` can print them as JSON."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def version() -> str:
    try:
        return importlib.metadata.version("open-autoglm-kernel")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _iso_instant(text: str) -> float:
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 instant (e.g. 2026-10-25T00:00:00+02:00)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return d.timestamp()


def _port(text: str) -> int:
    """A TCP port for ``--port``: the range ``[server] port`` accepts (the OS would take
    70000 as 70000 % 65536 = 4464 without a word)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port (valid: 0-65535; 0 picks a free port)")
    return port


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="config.toml to use (default: discovered, see below)")
    p.add_argument("--tasks", type=Path, default=None, metavar="FILE",
                   help="extra tasks in the seed's YAML format (tasks: - id/schedule/action)")


def _add_json(p: argparse.ArgumentParser, text: str = "print one JSON document on stdout "
              "(errors too)") -> None:
    p.add_argument("--json", action="store_true", help=text)


def _prog() -> str:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m kernel" if argv0 in ("", "__main__.py", "-c") else argv0


def _plugin_context(args: argparse.Namespace) -> Any:
    """The context of a plugin's CLI command: the ``[plugins]`` settings of the discovered (or
    ``--config``) file."""
    from . import config as config_mod
    from .discovery import discover
    from .hookspecs import PluginContext

    explicit = getattr(args, "config", None)
    found = discover(Path(explicit) if explicit else None)
    cfg = config_mod.load(found.path, tasks_file=getattr(args, "tasks", None))
    return PluginContext(settings=cfg.plugins, data_dir=cfg.data_dir())


def _parser(prog: str | None = None, *, plugin_commands: bool = False) -> argparse.ArgumentParser:
    """The whole command line; ``plugin_commands`` also loads the plugins' own commands
    (``autoglm-kernel <plugin> <command>``), which costs importing every plugin."""
    fmt = argparse.RawDescriptionHelpFormatter
    ap = Parser(
        prog=prog or _prog(), formatter_class=fmt,
        description="Open-AutoGLM Kernel: a scheduler for LLM work on one GPU box. "
                    "With no command, `run`.",
        epilog=f"{CONFIG_HELP}\n\n{EXIT_CODES_HELP}\n\nexamples:\n"
               "  autoglm-kernel                        # start the kernel\n"
               "  autoglm-kernel validate               # check the config it would use\n"
               "  autoglm-kernel COMMAND --help         # one command's options and examples")
    ap.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
        return p

    run = add("run", "start the kernel (the default command)")
    _add_config_args(run)
    run.add_argument("--log-format", choices=["auto", "json", "text"], default=None,
                     help="log lines on stderr: auto (text on a terminal, else JSON), json or "
                          "text (default: [kernel] log_format)")
    _add_json(run, "JSON logs (as --log-format json), and a start-up error as JSON on stdout")
    run.add_argument("--tui", action="store_true", help="show the live terminal UI")
    run.add_argument("--port", type=_port, default=None,
                     help="override [server] port (0 picks a free port)")
    run.add_argument("--no-server", action="store_true", help="do not start the HTTP API")

    val = add("validate", "check a config and report every problem (exit 78 if any)")
    _add_config_args(val)
    _add_json(val)

    cron = add("cron", "preview the next fire instants of a schedule")
    cron.add_argument("expr", help="a cron expression (5 or 6 fields), @daily, @every 5m, ...")
    cron.add_argument("--tz", default="UTC", help="IANA time zone of the schedule (default UTC)")
    cron.add_argument("--after", type=_iso_instant, default=None,
                      help="ISO-8601 instant to start after (default: now)")
    cron.add_argument("--count", type=int, default=5, help="how many instants (default 5)")
    _add_json(cron)

    plug = add("plugins", "list plugins and their actions")
    _add_json(plug)
    _add_config_args(plug)

    exp = add("explain", "explain an error code, e.g. ERR_TIMEOUT")
    exp.add_argument("code", nargs="?", help="an error code (ERR_ optional); omit to list every code")
    _add_json(exp)

    from .client import add_client_commands
    from .tui import add_tui_command

    add_client_commands(sub)
    add_tui_command(cast("argparse._SubParsersAction[argparse.ArgumentParser]", sub))
    if plugin_commands:
        from .plugins import add_plugin_commands

        add_plugin_commands(sub, context=_plugin_context)
    for name, p in sub.choices.items():
        p.formatter_class = fmt
        extra = EXAMPLES.get(name, f"example:\n  {ap.prog} {name} COMMAND --help")
        if name in ("run", "validate", "plugins"):
            extra = f"{extra}\n\n{CONFIG_HELP}" if extra else CONFIG_HELP
        if extra and not p.epilog:
            p.epilog = extra
        for action in p._actions:
            if action.help is None and isinstance(action, argparse._SubParsersAction):
                action.help = "one of these commands"
            if action.help is None:
                for flag in action.option_strings:
                    if flag in OPTION_HELP:
                        action.help = OPTION_HELP[flag]
    return ap


# ====================================================================================== output


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _error_doc(code: str | None, message: str, status: int, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "exit_status": status, **extra}}


def _fail(a: argparse.Namespace | None, code: ErrorCode | str | None, message: str,
          status: int, **extra: Any) -> int:
    """Report an error the way the mode asks: JSON on stdout, or ``error: ...`` on stderr."""
    if a is not None and getattr(a, "json", False):
        _print_json(_error_doc(None if code is None else str(code), message, status, **extra))
    else:
        print(f"error: {message}", file=sys.stderr)
    return status


def _issue_doc(i: ConfigIssue) -> dict[str, str]:
    return {"file": i.file, "where": i.where, "message": i.message, "severity": i.severity}


def _err(text: str) -> int:
    print(f"error: {text}", file=sys.stderr)
    return EXIT_USAGE


STUCK_GRACE = 1.0  # seconds the tasks left after `run` get to end once cancelled again


async def _cancel_rest(grace: float) -> int:
    """Cancel every other task of the loop; how many are still pending after ``grace``."""
    rest = asyncio.all_tasks() - {asyncio.current_task()}
    for t in rest:
        t.cancel()
    if not rest:
        return 0
    _, pending = await asyncio.wait(rest, timeout=grace)
    return len(pending)


def _run_async(coro: Coroutine[Any, Any, int], *, exit_if_stuck: bool = False) -> int:
    """Run ``coro`` on a fresh loop (uvloop when installed) and close it.

    ``exit_if_stuck`` (``run`` only): a run that ignores its cancellation is abandoned by the
    kernel, but ``asyncio.Runner.close()`` cancels every remaining task and waits for it forever.
    So when ``coro`` has returned and tasks are still pending after one more cancel and
    :data:`STUCK_GRACE`, log one line naming how many, flush the logs and the standard streams,
    and end the process with ``os._exit`` and ``coro``'s exit status.
    """
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        rc = runner.run(coro)
        if exit_if_stuck and (stuck := runner.run(_cancel_rest(STUCK_GRACE))):
            import logging

            logging.getLogger("kernel.cli").error(
                "%d task(s) still running after the kernel stopped ignored their cancellation "
                "(runs the kernel abandoned); exiting without waiting for them", stuck)
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(rc)
        return rc


# ===================================================================================== commands


def cmd_run(a: argparse.Namespace) -> int:
    from .api.server import AddressInUse
    from .discovery import discover
    from .main import serve

    found = discover(a.config)
    log_format = "json" if a.json else a.log_format
    try:
        try:
            return _run_async(serve(found.path, a.tasks, log_format=log_format, tui=a.tui,
                                    port=a.port, server=not a.no_server, discovered=found),
                              exit_if_stuck=True)
        except BaseExceptionGroup as group:  # a service (the API server) failed to start
            first = _first_kernel_error(group)
            if first is None:
                raise
            raise first from None
    except ConfigError as exc:
        # a port another process holds is a runtime failure (exit 1: a service manager
        # tries again), not an invalid file (78: it would not)
        status = EXIT_FAILURE if isinstance(exc, AddressInUse) else EXIT_CONFIG
        if a.json:
            _print_json(_error_doc(exc.code.value, "the configuration has problems"
                                   if status == EXIT_CONFIG else str(exc), status,
                                   file=found.describe(),
                                   issues=[_issue_doc(i) for i in exc.issues]))
            return status
        print(f"the kernel did not start: the configuration ({found.describe()}) has problems:"
              if status == EXIT_CONFIG else "the kernel did not start:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return status
    except KernelError as exc:
        from .errors import CATALOGUE

        if a.json:
            _print_json(_error_doc(exc.code.value, str(exc), EXIT_FAILURE,
                                   remedy=CATALOGUE[exc.code].remedy))
            return EXIT_FAILURE
        print(f"the kernel stopped: [{exc.code}] {exc}", file=sys.stderr)
        print(f"  what to do: {CATALOGUE[exc.code].remedy}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


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
    from .discovery import discover
    from .gpu import GpuGate, NvmlProbe
    from .main import plugin_set
    from .validate import check_all

    found = discover(a.config)
    if found.is_demo and not a.json:
        print(f"warning: {found.demo_warning()}", file=sys.stderr)
    cfg: config_mod.Config | None
    try:
        # decoding problems and the checks of what did decode, reported together
        cfg, decoding = config_mod.load_partial(found.path, tasks_file=a.tasks)
        issues = check_all(cfg, decoding, plugin_set(cfg), GpuGate(NvmlProbe()))
    except ConfigError as exc:
        issues = exc.issues
        cfg = None
    errors = [i for i in issues if i.severity == "error"]
    if a.json:
        doc: dict[str, Any] = {
            "file": None if found.path is None else str(found.path), "origin": found.origin,
            "looked": list(found.looked), "valid": not errors,
            "errors": len(errors), "warnings": len(issues) - len(errors),
            "issues": [_issue_doc(i) for i in issues]}
        if cfg is not None and not errors:
            doc["tasks"] = len(cfg.tasks)
            doc["enabled"] = sum(1 for t in cfg.tasks if t.enabled)
        if errors:
            doc["error"] = {"code": ErrorCode.ERR_CONFIG_INVALID.value,
                            "message": f"{len(errors)} problem(s) found in {found.describe()}",
                            "exit_status": EXIT_CONFIG}
        _print_json(doc)
        return EXIT_CONFIG if errors else EXIT_OK
    for issue in issues:
        print(str(issue), file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s) found in {found.describe()}", file=sys.stderr)
        return EXIT_CONFIG
    assert cfg is not None
    enabled = sum(1 for t in cfg.tasks if t.enabled)
    warned = f", {len(issues)} warning(s)" if issues else ""
    print(f"{found.describe()}: valid ({len(cfg.tasks)} task(s), {enabled} enabled{warned})")
    return EXIT_OK


def cmd_cron(a: argparse.Namespace) -> int:
    import time

    from .triggers import preview

    if a.count < 1:
        return _fail(a, ErrorCode.ERR_USAGE, "--count must be at least 1", EXIT_USAGE)
    after = a.after if a.after is not None else time.time()
    try:
        instants = preview(a.expr, a.tz, after, a.count)
    except KernelError as exc:
        return _fail(a, exc.code, str(exc), EXIT_USAGE)
    if not instants:
        return _fail(a, ErrorCode.ERR_CRON_INVALID,
                     f"schedule {a.expr!r} never fires after the given instant", EXIT_USAGE)
    if a.json:
        _print_json({"expr": a.expr, "tz": a.tz,
                     "after": dt.datetime.fromtimestamp(after, dt.UTC).isoformat(),
                     "instants": [d.isoformat() for d in instants]})
        return EXIT_OK
    for d in instants:
        print(d.isoformat())
    return EXIT_OK


def cmd_plugins(a: argparse.Namespace) -> int:
    from . import config as config_mod
    from .discovery import discover
    from .main import plugin_set
    from .plugins import payload_schema

    try:
        cfg = config_mod.load(discover(a.config).path, tasks_file=a.tasks)
    except ConfigError:
        cfg = config_mod.Config()
    ps = plugin_set(cfg)
    if a.json:
        _print_json({
            "plugins": ps.plugins,
            "actions": [{"name": x.name, "plugin": x.plugin, "description": x.description,
                         "payload_schema": payload_schema(x)}
                        for x in sorted(ps.actions.values(), key=lambda x: x.name)],
            "problems": [{"plugin": p.plugin, "message": p.message} for p in ps.problems],
        })
    else:
        from rich.console import Console

        from .tables import print_table

        con = Console()
        print_table("Actions", ["action", "plugin", "description"],
                    [[x.name, x.plugin, x.description]
                     for x in sorted(ps.actions.values(), key=lambda x: x.name)], console=con)
        for p in ps.problems:
            con.print(f"[red]plugin {p.plugin} failed:[/red] {p.message}")
    return EXIT_FAILURE if ps.problems else EXIT_OK


def cmd_explain(a: argparse.Namespace) -> int:
    from .errors import CATALOGUE, explain

    def doc(e: Any) -> dict[str, Any]:
        return {"code": e.code.value, "meaning": e.meaning, "remedy": e.remedy,
                "retryable": e.retryable}

    if not a.code:
        if a.json:
            _print_json({"codes": [doc(e) for e in CATALOGUE.values()]})
            return EXIT_OK
        from .tables import print_table

        print_table("Error codes (explain CODE for the remedy)", ["code", "meaning"],
                    [[e.code.value, e.meaning.split(". ")[0].rstrip(".") + "."]
                     for e in CATALOGUE.values()])
        return EXIT_OK
    try:
        e = explain(a.code)
    except KernelError as exc:
        return _fail(a, exc.code, str(exc), EXIT_USAGE)
    if a.json:
        _print_json(doc(e))
        return EXIT_OK
    print(e.code.value)
    print(f"  meaning:   {e.meaning}")
    print(f"  remedy:    {e.remedy}")
    print(f"  retryable: {'yes' if e.retryable else 'no'}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "validate": cmd_validate, "cron": cmd_cron, "plugins": cmd_plugins,
    "explain": cmd_explain,
}

BUILTIN = {*COMMANDS, "submit", "jobs", "runs", "tasks", "pause", "resume", "trigger", "cancel",
           "backfill", "tui", "--version"}
"""Commands that need no plugin loaded to parse (anything else loads the plugins' commands)."""

_CODE_IN_LINE = re.compile(r"\[(ERR_[A-Z_]+)\]")


def _json_errors(handler: Callable[[argparse.Namespace], int], a: argparse.Namespace) -> int:
    """Run a command registered elsewhere (the API client's) in ``--json`` mode: what it writes
    to stderr on failure becomes the JSON error document on stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = handler(a)
    text = buf.getvalue().strip()
    if rc == EXIT_OK or not text:
        sys.stderr.write(buf.getvalue())
        return rc
    m = _CODE_IN_LINE.search(text)
    code = m.group(1) if m else (ErrorCode.ERR_UNREACHABLE.value if "cannot reach" in text
                                 or "no answer" in text else None)
    message = re.sub(r"^error(?: \[[^\]]*\])?: ", "", text.splitlines()[0])
    _print_json(_error_doc(code, message, rc))
    return rc


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in args
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help", "--version")):
        args = ["run", *args]
    try:
        ap = _parser(prog, plugin_commands=args[0] not in BUILTIN)
        a = ap.parse_args(args)
    except UsageError as exc:
        if json_mode:
            _print_json(_error_doc(ErrorCode.ERR_USAGE.value, str(exc), EXIT_USAGE))
        else:
            print(str(exc), file=sys.stderr)
            print("  (add --help for the options and examples)", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    handler = COMMANDS.get(a.cmd)
    if handler is not None:
        return handler(a)
    external = getattr(a, "handler", None)
    if external is None:
        ap.print_help()
        return EXIT_USAGE
    if getattr(a, "json", False):
        return _json_errors(external, a)
    rc: int = external(a)
    return rc
