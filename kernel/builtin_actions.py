"""Built-in actions, registered through the same hook as any plugin: ``exec``, ``python``, ``log``.

``exec`` runs an argv list (no shell) in its own process group with a clean environment by
default plus the ``KERNEL_*`` variables; on timeout or cancellation the whole group gets
SIGTERM, then SIGKILL after ``grace`` seconds. Optional rlimits (memory, CPU time) and nice.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
import threading
from typing import Any

import msgspec

from .errors import ActionError, BadPayload, ErrorCode
from .hookspecs import Action, PluginContext, RunContext, hookimpl

_TAIL = 1900  # the run history keeps 2 KiB of detail: the end of the output
_SAFE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME", "VIRTUAL_ENV")


class ExecLimits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    memory_mb: int | None = None
    cpu_sec: int | None = None
    nice: int | None = None


class ExecPayload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    argv: list[str]
    env: dict[str, str] = msgspec.field(default_factory=dict)
    inherit_env: bool = False
    cwd: str | None = None
    grace: float = 5.0
    limits: ExecLimits = msgspec.field(default_factory=ExecLimits)
    stdin: str | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("argv: must name a program, e.g. [\"echo\", \"hello\"]")


class PythonPayload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    target: str  # "package.module:function"
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    pass_context: bool = False

    def __post_init__(self) -> None:
        if ":" not in self.target:
            raise ValueError("target: must look like 'package.module:function'")


class LogPayload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    message: str = "tick"
    level: str = "info"


def _child_env(p: ExecPayload, ctx: RunContext) -> dict[str, str]:
    base = dict(os.environ) if p.inherit_env else {
        k: os.environ[k] for k in _SAFE_ENV if k in os.environ}
    base.setdefault("PATH", os.defpath)
    base.update(p.env)
    base.update(ctx.env())
    return base


def _preexec(limits: ExecLimits) -> Any:
    if limits.memory_mb is None and limits.cpu_sec is None and limits.nice is None:
        return None

    def apply() -> None:  # runs in the child between fork and exec
        import resource

        if limits.memory_mb is not None:
            b = limits.memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (b, b))
        if limits.cpu_sec is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_sec, limits.cpu_sec + 1))
        if limits.nice is not None:
            os.nice(limits.nice)

    return apply


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _stop_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the child's process group, then SIGKILL it after ``grace`` seconds."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await proc.wait()
    except TimeoutError:
        pass
    # the group may outlive its leader (children that ignore SIGTERM): kill it whole
    _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


def _tail(b: bytes) -> str:
    return b[-_TAIL:].decode("utf-8", "replace")


async def _read_tail(stream: asyncio.StreamReader | None) -> bytes:
    """Read a pipe to its end keeping only the last ``_TAIL`` bytes (a child may write GBs)."""
    if stream is None:
        return b""
    buf = bytearray()
    while chunk := await stream.read(65536):
        buf += chunk
        if len(buf) > 2 * _TAIL:
            del buf[:-_TAIL]
    return bytes(buf[-_TAIL:])


async def _feed(proc: asyncio.subprocess.Process, data: str | None) -> None:
    if data is None or proc.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data.encode())
        await proc.stdin.drain()
    proc.stdin.close()


async def run_exec(ctx: RunContext, p: ExecPayload) -> str:
    if p.cwd is not None and not os.path.isdir(p.cwd):  # noqa: ASYNC240 - one stat, before fork
        raise ActionError(f"cwd {p.cwd!r} is not a directory", code=ErrorCode.ERR_EXEC_FAILED)
    try:
        proc = await asyncio.create_subprocess_exec(
            *p.argv,
            stdin=asyncio.subprocess.PIPE if p.stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_child_env(p, ctx),
            cwd=p.cwd,
            start_new_session=True,
            preexec_fn=_preexec(p.limits),
        )
    except OSError as exc:
        raise ActionError(f"cannot start {p.argv[0]!r}: {exc.strerror or exc}",
                          code=ErrorCode.ERR_EXEC_FAILED) from None
    try:
        out, err, _, _ = await asyncio.gather(
            _read_tail(proc.stdout), _read_tail(proc.stderr), _feed(proc, p.stdin), proc.wait())
    except BaseException:
        await asyncio.shield(_stop_group(proc, p.grace))
        raise
    finally:
        # children left behind in the group by a leader that exited
        if proc.returncode is not None:
            _signal_group(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        how = (f"killed by signal {-proc.returncode}" if proc.returncode and proc.returncode < 0
               else f"exit status {proc.returncode}")
        raise ActionError(f"{p.argv[0]} failed ({how}): {_tail(err).strip() or _tail(out).strip()}",
                          code=ErrorCode.ERR_EXEC_FAILED)
    return _tail(out)


def _resolve(target: str) -> Any:
    mod_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise BadPayload(f"python target {target!r} cannot be imported: {exc}") from None
    if not callable(obj):
        raise BadPayload(f"python target {target!r} is not callable")
    return obj


async def run_python(ctx: RunContext, p: PythonPayload) -> Any:
    fn = _resolve(p.target)
    kwargs = dict(p.kwargs)
    if p.pass_context:
        kwargs["ctx"] = ctx
    try:
        if inspect.iscoroutinefunction(fn):
            return await fn(*p.args, **kwargs)
        return await _in_daemon_thread(fn, *p.args, **kwargs)
    except SystemExit as exc:  # a script's main() calling sys.exit() must not stop the kernel
        if exc.code in (None, 0):
            return None
        raise ActionError(f"python target {p.target!r} called sys.exit({exc.code!r})",
                          code=ErrorCode.ERR_ACTION_FAILED) from None


async def _in_daemon_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a sync function in a daemon thread of its own. On timeout a thread cannot be stopped,
    only abandoned: a daemon thread never keeps the process from exiting, and an abandoned one
    does not occupy the loop's default executor (which name resolution shares)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def work() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # delivered to the awaiting coroutine
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(settle, False, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=work, name=f"python-action:{getattr(fn, '__name__', 'fn')}",
                     daemon=True).start()
    return await fut


async def run_log(ctx: RunContext, p: LogPayload) -> str:
    level = logging.getLevelName(p.level.upper())
    ctx.log.log(level if isinstance(level, int) else logging.INFO, p.message)
    return p.message


async def _exec(ctx: RunContext, payload: Any) -> Any:
    return await run_exec(ctx, payload)


async def _python(ctx: RunContext, payload: Any) -> Any:
    return await run_python(ctx, payload)


async def _log(ctx: RunContext, payload: Any) -> Any:
    return await run_log(ctx, payload)


@hookimpl
def register_actions(context: PluginContext) -> list[Action]:
    return [
        Action("exec", _exec, "Run a program (argv list, no shell) in its own process group.",
               ExecPayload),
        Action("python", _python, "Call module:function (async, or sync in a thread).",
               PythonPayload),
        Action("log", _log, "Write a message to the kernel log.", LogPayload),
    ]
