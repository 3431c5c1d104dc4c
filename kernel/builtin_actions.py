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
from typing import Any

import msgspec

from .errors import ActionError, BadPayload, ErrorCode
from .hookspecs import Action, PluginContext, RunContext, hookimpl

_TAIL = 4096
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


async def run_exec(ctx: RunContext, p: ExecPayload) -> str:
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
        out, err = await proc.communicate(p.stdin.encode() if p.stdin is not None else None)
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
    if inspect.iscoroutinefunction(fn):
        return await fn(*p.args, **kwargs)
    # a sync function runs in a thread; on timeout the thread cannot be stopped, only abandoned
    return await asyncio.to_thread(fn, *p.args, **kwargs)


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
