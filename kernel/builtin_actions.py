"""Built-in actions, registered through the same hook as any plugin: ``exec``, ``python``, ``log``.

``exec`` runs an argv list (no shell) in its own process group with a clean environment by
default plus the ``KERNEL_*`` variables; on timeout or cancellation the whole group gets
SIGTERM, then SIGKILL after ``grace`` seconds. On Linux the program also dies with the kernel
(the parent-death signal, SIGKILL): a SIGKILLed kernel leaves no orphan still running a job
that the next start runs again. Those settings and the optional limits (memory, CPU time, nice)
are made by the program's launcher: util-linux's ``setpriv --pdeathsig KILL`` when there are no
limits (2 ms), else a tiny wrapper (``python -I -S -c``, ~20 ms) that sets them on itself and
then ``execvp``s the program. No ``preexec_fn``, which runs Python between fork and exec and is
unsafe in a process with threads (the kernel has the store writer, aiosqlite and ``to_thread``
threads). The parent-death signal reaches the program itself, not children it forks into its
group after that: those are orphaned when the kernel is killed (they are still stopped with the
group on a time-out, a cancel or an orderly shutdown). The memory cap
is ``RLIMIT_DATA`` (heap and private writable mappings), not ``RLIMIT_AS``: CUDA reserves huge
``PROT_NONE`` virtual ranges at initialisation, which ``RLIMIT_AS`` counts (a CUDA program fails
to start under any realistic cap) and ``RLIMIT_DATA`` does not.

``python`` calls ``module:function`` in a worker process (:mod:`kernel.workers`) unless the
payload (or ``[python] in_process``) asks for the kernel's own loop; see that module.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any

import msgspec

from .errors import ActionError, ErrorCode
from .events import Event
from .hookspecs import Action, PluginContext, RunContext, Subscriber, hookimpl
from .workers import PythonSettings, WorkerPool, resolve

log = logging.getLogger("kernel.actions")

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
    grace: float = 3.0  # SIGTERM → SIGKILL; inside the kernel's cancel grace (5 s) on purpose
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
    in_process: bool = False        # run in the kernel's loop (async) or a thread (sync)
    memory_mb: int | None = None    # memory cap of the worker (default: [python] memory_mb)
    grace: float = 2.0              # on timeout/cancel: SIGTERM, SIGKILL after this many seconds

    def __post_init__(self) -> None:
        if ":" not in self.target:
            raise ValueError("target: must look like 'package.module:function'")
        if self.memory_mb is not None and self.memory_mb < 32:
            raise ValueError("memory_mb: must be at least 32 (MB), or left unset")
        if not (math.isfinite(self.grace) and self.grace >= 0):
            raise ValueError("grace: must be a number of seconds >= 0")
        if self.in_process and self.memory_mb is not None:
            raise ValueError("memory_mb: applies to worker processes; not with in_process = true")


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


# Asks (Linux) to be SIGKILLed when the kernel dies, and exits at once if it already has (the
# kernel, its parent, is named by pid); sets the limits on itself; then becomes the program
# (same pid, same process group). An exec failure is written to stderr with exit status 127,
# as a shell does.
_LIMITS_WRAPPER = """\
import os, resource, sys
kernel, data, cpu, nice = sys.argv[1:5]
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != int(kernel):
        os._exit(137)
def cap(which, soft, hard):
    top = resource.getrlimit(which)[1]
    if top != resource.RLIM_INFINITY:
        soft, hard = min(soft, top), min(hard, top)
    resource.setrlimit(which, (soft, hard))
try:
    if data:
        cap(resource.RLIMIT_DATA, int(data), int(data))
    if cpu:
        cap(resource.RLIMIT_CPU, int(cpu), int(cpu) + 1)
    if nice:
        os.nice(int(nice))
    os.execvp(sys.argv[5], sys.argv[5:])
except OSError as exc:
    sys.stderr.write(f"cannot start {sys.argv[5]!r}: {exc.strerror or exc}\\n")
    os._exit(127)
"""


_LINUX = sys.platform.startswith("linux")
_SETPRIV_FAILED = b"setpriv: failed to execute "


@functools.cache
def _setpriv() -> str | None:
    """util-linux's ``setpriv`` if it sets the parent-death signal here (>= 2.33; asked once,
    2 ms), else None."""
    path = shutil.which("setpriv") if _LINUX else None
    if path is None:
        return None
    try:
        ok = subprocess.run([path, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", ":"],
                            capture_output=True, timeout=5, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        log.info("%s has no --pdeathsig: exec actions start through a Python wrapper instead "
                 "(~20 ms each)", path)
    return path if ok else None


_PROBED: list[str | None] = []  # [_setpriv()] once asked (in a thread: it runs a process)


async def _launch(argv: list[str], limits: ExecLimits) -> list[str]:
    """The command line that starts ``argv``: with the parent-death signal (Linux) and the
    limits asked for; ``argv`` itself elsewhere when no limit is asked for."""
    if limits.memory_mb is None and limits.cpu_sec is None and limits.nice is None:
        if not _LINUX:
            return argv
        if not _PROBED:
            _PROBED.append(await asyncio.to_thread(_setpriv))
        setpriv = _PROBED[0]
        if setpriv is not None:
            return [setpriv, "--pdeathsig", "KILL", "--", *argv]
    return [sys.executable, "-I", "-S", "-c", _LIMITS_WRAPPER, str(os.getpid()),
            "" if limits.memory_mb is None else str(limits.memory_mb * 1024 * 1024),
            "" if limits.cpu_sec is None else str(limits.cpu_sec),
            "" if limits.nice is None else str(limits.nice), *argv]


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
            *await _launch(p.argv, p.limits),
            stdin=asyncio.subprocess.PIPE if p.stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_child_env(p, ctx),
            cwd=p.cwd,
            start_new_session=True,
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
    if proc.returncode == 127 and err.startswith(b"cannot start "):  # the limits wrapper
        raise ActionError(_tail(err).strip(), code=ErrorCode.ERR_EXEC_FAILED)
    if proc.returncode in (126, 127) and err.startswith(_SETPRIV_FAILED):  # setpriv's exec
        why = _tail(err).strip().rsplit(": ", 1)[-1]
        raise ActionError(f"cannot start {p.argv[0]!r}: {why}", code=ErrorCode.ERR_EXEC_FAILED)
    if proc.returncode != 0:
        how = (f"killed by signal {-proc.returncode}" if proc.returncode and proc.returncode < 0
               else f"exit status {proc.returncode}")
        raise ActionError(f"{p.argv[0]} failed ({how}): {_tail(err).strip() or _tail(out).strip()}",
                          code=ErrorCode.ERR_EXEC_FAILED)
    return _tail(out)


async def run_python_in_process(ctx: RunContext, p: PythonPayload) -> Any:
    """The kernel's own process: an async target in its loop (it must not block), a sync one
    in a daemon thread (abandoned, not stopped, on timeout)."""
    fn = resolve(p.target)
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


def _context_fields(ctx: RunContext) -> dict[str, Any]:
    """A RunContext as plain values; the worker rebuilds it with a logger of the same name."""
    fields = {name: getattr(ctx, name) for name in ctx.__struct_fields__
              if name not in ("log", "on_progress")}  # (progress stays in the kernel)
    fields["logger"] = ctx.log.logger.name
    fields["extra"] = dict(ctx.log.extra or {})
    return fields


class PythonRunner:
    """The ``python`` action of one plugin load: its worker pool, made on first use."""

    def __init__(self, settings: PythonSettings | None = None) -> None:
        self.settings = settings or PythonSettings()
        self.pool: WorkerPool | None = None

    async def run(self, ctx: RunContext, p: PythonPayload) -> Any:
        if p.in_process or (self.settings.in_process and p.memory_mb is None):
            return await run_python_in_process(ctx, p)
        if self.pool is None:
            self.pool = WorkerPool(self.settings)
        return await self.pool.call(
            p.target, list(p.args), dict(p.kwargs),
            context=_context_fields(ctx) if p.pass_context else None,
            memory_mb=p.memory_mb, gpu=ctx.gpu_index,
            env={k: v for k, v in ctx.env().items() if k != "CUDA_VISIBLE_DEVICES"},
            grace=p.grace, log_to=ctx.log.logger)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()


class PoolOwner:
    """A subscriber only for its ``run``: the kernel owns it in its task group and cancels it
    at shutdown, after the last run; then the worker processes are stopped."""

    def __init__(self, runner: PythonRunner) -> None:
        self.runner = runner

    def handle(self, event: Event) -> None:
        pass

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await self.runner.close()


def python_settings(context: PluginContext) -> PythonSettings:
    """``[python]`` settings as the composition root hands them in (``settings["python"]``);
    an invalid table is logged and the defaults are used (``validate`` reports it)."""
    raw = context.section("python")
    try:
        return msgspec.convert(dict(raw), PythonSettings)
    except msgspec.ValidationError as exc:
        log.error("[python]: %s; using the defaults [ERR_CONFIG_INVALID]", exc)
        return PythonSettings()


def _runner(context: PluginContext) -> PythonRunner:
    shared = getattr(context, "shared", None)  # one runner per plugin load, for both hooks
    if shared is None:
        return PythonRunner(python_settings(context))
    runner: PythonRunner = shared("builtin.python", lambda: PythonRunner(python_settings(context)))
    return runner


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


async def _log(ctx: RunContext, payload: Any) -> Any:
    return await run_log(ctx, payload)


@hookimpl
def register_actions(context: PluginContext) -> list[Action]:
    return [
        Action("exec", _exec, "Run a program (argv list, no shell) in its own process group.",
               ExecPayload),
        Action("python", _runner(context).run,
               "Call module:function in a worker process (async or sync; in_process: in the "
               "kernel's loop).", PythonPayload),
        Action("log", _log, "Write a message to the kernel log.", LogPayload),
    ]


@hookimpl
def register_subscribers(context: PluginContext) -> list[Subscriber]:
    return [PoolOwner(_runner(context))]
