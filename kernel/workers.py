"""Worker processes for ``python`` actions: user code runs outside the kernel's event loop.

A :class:`WorkerPool` keeps up to ``workers`` processes. Each is a fresh interpreter
(``python -c``, fork+exec by ``asyncio.create_subprocess_exec``, in a session of its own so a
kill reaches the target's children too), never a fork of the kernel: the kernel has threads
(the store writer, aiosqlite, ``to_thread``) and a fork copies their locks in whatever state
they are. This is multiprocessing's ``spawn`` start, without ``multiprocessing``: its spawn and
forkserver starts re-import the kernel's ``__main__`` script in every worker (a script that
embeds the kernel without an ``if __name__ == "__main__"`` guard would run again), and need a
thread for the first start; here the worker gets only the kernel's ``sys.path``. Each worker,
before it runs anything:

* ignores SIGINT (Ctrl-C is the kernel's to handle; the kernel then stops its workers);
* caps its memory with ``RLIMIT_DATA`` set in the worker itself (never a ``preexec_fn``):
  a target that allocates beyond the cap gets ``MemoryError`` and the run fails with
  ERR_MEMORY_LIMIT. ``RLIMIT_AS`` is not used because CUDA reserves huge ``PROT_NONE``
  address ranges that ``RLIMIT_AS`` counts and ``RLIMIT_DATA`` does not;
* dies with the kernel: a watchdog thread blocks on a socket only the kernel holds open and
  kills the worker's process group when it closes (kernel exit, crash or SIGKILL).

A worker runs one call at a time: a sync target in its main thread, an async target in the
worker's own event loop (an ``asyncio.Runner`` kept across calls). Workers are kept apart by
*shape*, what is fixed when a worker starts: its memory cap and the GPU it sees
(``CUDA_VISIBLE_DEVICES``, read once by CUDA); a call gets an idle worker of its shape or a new
one. The run's ``KERNEL_*`` variables are set in the worker's environment for each call, so
processes a target starts see them as ``exec`` children do. ``sys.exit`` in a target
ends the call, not the worker. Results and exceptions cross back pickled; the kernel unpickles
them with an allow-list of built-in types only, so a reply never imports user code into the
kernel: other results arrive as their ``repr``, other exceptions as an ActionError naming the
exception's type (ConnectionError and TimeoutError subclasses keep their built-in base, which
the kernel retries as ERR_CONN_TIMEOUT). Log records the target writes are forwarded to the
kernel's logging.

A worker is recycled after ``max_tasks_per_worker`` calls, or when its resident memory after a
call is above ``recycle_rss_mb``. A call that is cancelled (timeout, DELETE, shutdown) kills its
worker: SIGTERM to the worker's process group, SIGKILL after ``grace`` seconds. The next call
starts a fresh worker.

Wire protocol on a socketpair: frames of an 8-byte big-endian length and a pickle.
kernel → worker ``("call", target, args, kwargs, context | None, env)``;
worker → kernel ``("ready", pid)``, ``("log", record dict)``, ``("ok", result, rss_mb)``,
``("err", exception description, traceback text, rss_mb)``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import importlib
import inspect
import io
import json
import logging
import math
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .errors import ActionError, BadPayload, ErrorCode, KernelError, Retry

log = logging.getLogger("kernel.workers")

_HDR = struct.Struct("!Q")
_KERNEL_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds ``kernel/``
_MB = 1024 * 1024


class PythonSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[python]``: how ``python`` actions run (see the module docstring)."""

    workers: int = 8                      # at most this many worker processes (started on demand)
    max_tasks_per_worker: int = 100       # recycle a worker after this many calls (0: never)
    recycle_rss_mb: int | None = None     # recycle a worker whose RSS after a call is above this
    memory_mb: int | None = None          # default memory cap of a worker (RLIMIT_DATA)
    in_process: bool = False              # run every python action in the kernel's own loop
    start_timeout: float = 60.0           # seconds a new worker may take to be ready

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers: must be at least 1")
        if self.max_tasks_per_worker < 0:
            raise ValueError("max_tasks_per_worker: must be 0 (never recycle) or more")
        for name in ("recycle_rss_mb", "memory_mb"):
            v = getattr(self, name)
            if v is not None and v < 32:
                raise ValueError(f"{name}: must be at least 32 (MB), or left unset")
        if not (math.isfinite(self.start_timeout) and self.start_timeout > 0):
            raise ValueError("start_timeout: must be a positive number of seconds")


@dataclass(frozen=True, slots=True)
class PoolStats:
    started: int
    recycled: int
    killed: int
    died: int
    idle: int
    busy: int


# ====================================================================== the worker process side
def resolve(target: str) -> Any:
    """Import ``package.module:attr.path``; BadPayload when it cannot be found or called."""
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


class _Chan:
    """The worker's end of the socketpair (blocking; sends are locked: logs come from threads)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self.lock:
            self.sock.sendall(_HDR.pack(len(data)) + data)

    def _exact(self, n: int) -> bytes | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                return None
            got += k
        return bytes(buf)

    def recv(self) -> Any:
        hdr = self._exact(_HDR.size)
        if hdr is None:
            return None
        data = self._exact(_HDR.unpack(hdr)[0])
        return None if data is None else pickle.loads(data)


class _ForwardLogs(logging.Handler):
    _EXTRA = ("trace_id", "task_id", "job_id", "attempt", "span_id", "action")

    def __init__(self, chan: _Chan) -> None:
        super().__init__(logging.DEBUG)
        self.chan = chan

    def emit(self, record: logging.LogRecord) -> None:
        try:
            d: dict[str, Any] = {
                "name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                "msg": record.getMessage(), "created": record.created,
                "exc_text": (logging.Formatter().formatException(record.exc_info)
                             if record.exc_info else None),
                "process": record.process, "threadName": record.threadName}
            for k in self._EXTRA:
                v = getattr(record, k, None)
                if isinstance(v, str | int | float | type(None)):
                    d[k] = v
            self.chan.send(("log", d))
        except Exception:  # a log line must never break the call
            self.handleError(record)


def _watch_parent(alive: socket.socket) -> None:
    with contextlib.suppress(OSError):
        alive.recv(1)  # the kernel never writes: this returns when its end closes
    with contextlib.suppress(OSError):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(1)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MB
    except (OSError, ValueError, IndexError):
        import resource  # ru_maxrss: the peak, in KiB on Linux and bytes on macOS

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(peak) / (_MB if sys.platform == "darwin" else 1024)


def _context(fields: dict[str, Any]) -> Any:
    from .hookspecs import RunContext  # only when a target asks for it

    logger = logging.getLogger(fields.pop("logger"))
    extra = fields.pop("extra")
    return RunContext(**fields, log=logging.LoggerAdapter(logger, extra))


async def _await(aw: Any) -> Any:
    return await aw


def _call(runner: asyncio.Runner, target: str, args: list[Any], kwargs: dict[str, Any],
          ctx: dict[str, Any] | None) -> Any:
    fn = resolve(target)
    if ctx is not None:
        kwargs = {**kwargs, "ctx": _context(ctx)}
    try:
        if inspect.iscoroutinefunction(fn):
            return runner.run(fn(*args, **kwargs))
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value):
            value = runner.run(_await(value))
        return value
    except SystemExit as exc:  # a script's main() calling sys.exit() ends the call, not the worker
        if exc.code in (None, 0):
            return None
        raise ActionError(f"python target {target!r} called sys.exit({exc.code!r})",
                          code=ErrorCode.ERR_ACTION_FAILED) from None


def _describe(exc: BaseException, target: str, memory_mb: int | None) -> tuple[Any, ...]:
    """An exception as something the kernel can rebuild without importing user code."""
    if isinstance(exc, MemoryError):
        cap = f" (memory cap {memory_mb} MB: `memory_mb`)" if memory_mb else ""
        return ("action", f"python target {target!r} ran out of memory{cap}",
                ErrorCode.ERR_MEMORY_LIMIT.value, False)
    if isinstance(exc, Retry):
        return ("retry", exc.message, exc.code.value, exc.delay)
    if isinstance(exc, ActionError):
        return ("action", exc.message, exc.code.value, exc.retryable)
    if isinstance(exc, BadPayload):
        return ("bad_payload", exc.message)
    if isinstance(exc, KernelError):
        return ("action", exc.message, exc.code.value, False)
    if type(exc).__module__ == "builtins":
        try:
            data = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
            safe_loads(data)
            return ("pickled", data)
        except Exception:  # an argument that is not a plain value
            pass
    text = f"{type(exc).__name__}: {exc}"
    for base in (ConnectionError, TimeoutError):
        if isinstance(exc, base):
            return ("builtin", base.__name__, text)
    return ("action", text, ErrorCode.ERR_ACTION_FAILED.value, None)


def _result(value: Any) -> Any:
    """``value`` if the kernel can unpickle it with the allow-list, else its ``repr``."""
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        safe_loads(data)
        return value
    except Exception:
        try:
            return repr(value)[:4096]
        except Exception as exc:
            return f"<unrepresentable {type(value).__name__}: {exc}>"


@dataclass(frozen=True, slots=True)
class Shape:
    """What a worker is started with and cannot change afterwards."""

    memory_mb: int | None = None
    gpu: int | None = None


# The worker's command line: python -c BOOT <sys.path as JSON> <socket fd> <alive fd> <shape>
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "from kernel.workers import boot; boot(sys.argv[2:])")


def boot(argv: list[str]) -> None:
    """Entry point of a worker process (see ``_BOOT``)."""
    sock_fd, alive_fd, memory_mb, gpu = argv
    worker_main(socket.socket(fileno=int(sock_fd)), socket.socket(fileno=int(alive_fd)),
                Shape(int(memory_mb) if memory_mb else None, int(gpu) if gpu else None))


def worker_main(sock: socket.socket, alive: socket.socket, shape: Shape) -> None:
    """The body of a worker process."""
    memory_mb = shape.memory_mb
    if shape.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(shape.gpu)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_watch_parent, args=(alive,), name="kernel-watchdog",
                     daemon=True).start()
    if memory_mb is not None:
        import resource

        cap = memory_mb * _MB
        hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    chan = _Chan(sock)
    root = logging.getLogger()
    root.handlers[:] = [_ForwardLogs(chan)]
    root.setLevel(logging.DEBUG)
    runner = asyncio.Runner()
    chan.send(("ready", os.getpid()))
    while True:
        msg = chan.recv()
        if msg is None or msg[0] != "call":
            break
        _, target, args, kwargs, ctx, env = msg
        os.environ.update(env)
        try:
            reply: tuple[Any, ...] = ("ok", _result(_call(runner, target, args, kwargs, ctx)))
        except BaseException as exc:  # everything crosses back; the worker carries on
            reply = ("err", _describe(exc, target, memory_mb),
                     "".join(traceback.format_exception(exc)))
        chan.send((*reply, _rss_mb()))
    with contextlib.suppress(Exception):
        runner.close()


# ====================================================================== the kernel side
_SAFE = frozenset(
    name for name, obj in vars(builtins).items()
    if isinstance(obj, type) and (issubclass(obj, BaseException) or obj in (
        bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset,
        slice, range)))


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _SAFE:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain value")


def safe_loads(data: bytes) -> Any:
    """Unpickle built-in values and exceptions only (nothing is imported)."""
    return _SafeUnpickler(io.BytesIO(data)).load()


def _rebuild(desc: tuple[Any, ...]) -> BaseException:
    kind = desc[0]
    if kind == "retry":
        return Retry(desc[3], desc[1], code=ErrorCode(desc[2]))
    if kind == "action":
        return ActionError(desc[1], code=ErrorCode(desc[2]), retryable=desc[3])
    if kind == "bad_payload":
        return BadPayload(desc[1])
    if kind == "pickled":
        exc = safe_loads(desc[1])
        if isinstance(exc, BaseException):
            return exc
    if kind == "builtin" and desc[1] in ("ConnectionError", "TimeoutError"):
        cls: type[BaseException] = getattr(builtins, desc[1])
        return cls(desc[2])
    return ActionError(f"unreadable error from a python worker: {desc!r:.200}")


def _how(code: int | None) -> str:
    if code is None:
        return "it closed its connection"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = " (the out-of-memory killer?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass(eq=False)
class _Worker:
    proc: asyncio.subprocess.Process
    pid: int
    shape: Shape
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    alive: socket.socket
    tasks: int = 0
    gone: bool = False

    async def send(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_HDR.pack(len(data)) + data)
        await self.writer.drain()

    async def recv(self) -> Any:
        hdr = await self.reader.readexactly(_HDR.size)
        data = await self.reader.readexactly(_HDR.unpack(hdr)[0])
        return data


async def _wait_exit(proc: asyncio.subprocess.Process, timeout: float | None) -> int | None:
    """The exit code once the process has ended (None if it still runs after ``timeout``)."""
    try:
        async with asyncio.timeout(timeout):
            return await proc.wait()
    except TimeoutError:
        return None


@dataclass(eq=False)
class WorkerPool:
    """Up to ``settings.workers`` worker processes; :meth:`call` runs one target in one."""

    settings: PythonSettings = field(default_factory=PythonSettings)
    started: int = 0
    recycled: int = 0
    killed: int = 0
    died: int = 0
    _idle: list[_Worker] = field(default_factory=list)
    _busy: set[_Worker] = field(default_factory=set)
    _reaping: set[asyncio.Task[None]] = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None
    _closed: bool = False
    _pids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        # a pool dropped without close() (an action used outside a kernel) still kills its workers
        weakref.finalize(self, _kill_all, self._pids)

    def stats(self) -> PoolStats:
        return PoolStats(self.started, self.recycled, self.killed, self.died, len(self._idle),
                         len(self._busy))

    def pids(self) -> set[int]:
        return set(self._pids)

    async def call(self, target: str, args: list[Any], kwargs: dict[str, Any], *,
                   context: dict[str, Any] | None = None, memory_mb: int | None = None,
                   gpu: int | None = None, env: dict[str, str] | None = None,
                   grace: float = 2.0, log_to: logging.Logger | None = None) -> Any:
        """Run ``target(*args, **kwargs)`` in a worker and return its result or raise its
        exception. Cancelling the awaiting task kills the worker (SIGTERM, SIGKILL after
        ``grace`` seconds) before the cancellation propagates."""
        if self._closed:
            raise ActionError("python workers are stopping", code=ErrorCode.ERR_SHUTTING_DOWN)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.workers)
        shape = Shape(memory_mb if memory_mb is not None else self.settings.memory_mb, gpu)
        async with self._slots:
            if self._closed:
                raise ActionError("python workers are stopping", code=ErrorCode.ERR_SHUTTING_DOWN)
            w = self._take_idle(shape) or await self._spawn(shape)
            self._busy.add(w)
            try:
                await w.send(("call", target, args, kwargs, context, env or {}))
                while True:
                    msg = safe_loads(await w.recv())
                    if msg[0] == "log":
                        _emit(msg[1], log_to)
                        continue
                    break
            except (asyncio.IncompleteReadError, ConnectionError, OSError, EOFError) as exc:
                self._busy.discard(w)
                code = await self._reap_dead(w)
                raise ActionError(
                    f"the worker process running python target {target!r} died ({_how(code)})",
                    code=ErrorCode.ERR_WORKER_DIED) from exc
            except BaseException:  # cancelled (timeout, DELETE, shutdown): kill the worker
                self._busy.discard(w)
                self.killed += 1
                reap = asyncio.ensure_future(self._retire(w, grace))
                self._reaping.add(reap)
                reap.add_done_callback(self._reaping.discard)
                await asyncio.shield(reap)
                raise
            self._busy.discard(w)
            w.tasks += 1
            rss = float(msg[-1])
            limit = self.settings.max_tasks_per_worker
            if self._closed or (limit and w.tasks >= limit) or (
                    self.settings.recycle_rss_mb is not None
                    and rss > self.settings.recycle_rss_mb):
                self.recycled += 1
                await self._retire(w, 0.0)
            else:
                self._idle.append(w)
        if msg[0] == "ok":
            return msg[1]
        if log_to is not None and log_to.isEnabledFor(logging.DEBUG):
            log_to.debug("python target %s raised in worker %d:\n%s", target, w.pid, msg[2])
        raise _rebuild(msg[1])

    def _take_idle(self, shape: Shape) -> _Worker | None:
        for i, w in enumerate(self._idle):
            if w.shape == shape:
                return self._idle.pop(i)
        if self._idle and len(self._idle) + len(self._busy) >= self.settings.workers:
            # no room for one more process: retire an idle worker of another shape
            self._schedule_retire(self._idle.pop(0))
        return None

    def _schedule_retire(self, w: _Worker) -> None:
        t = asyncio.ensure_future(self._retire(w, 0.0))
        self._reaping.add(t)
        t.add_done_callback(self._reaping.discard)

    async def _spawn(self, shape: Shape) -> _Worker:
        parent, child = socket.socketpair()
        alive, alive_child = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _BOOT, json.dumps([_KERNEL_ROOT, *sys.path]),
                str(child.fileno()), str(alive_child.fileno()),
                "" if shape.memory_mb is None else str(shape.memory_mb),
                "" if shape.gpu is None else str(shape.gpu),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(child.fileno(), alive_child.fileno()),
                start_new_session=True)
        except BaseException as exc:
            for sock in (parent, alive):
                sock.close()
            if isinstance(exc, OSError):
                raise ActionError(f"cannot start a python worker ({sys.executable}): {exc}",
                                  code=ErrorCode.ERR_WORKER_DIED) from None
            raise
        finally:
            child.close()
            alive_child.close()
        self._pids.add(proc.pid)
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        w = _Worker(proc, proc.pid, shape, reader, writer, alive)
        self.started += 1
        try:
            async with asyncio.timeout(self.settings.start_timeout):
                hello = safe_loads(await w.recv())
            if hello[0] != "ready":
                raise EOFError(hello)
        except BaseException as exc:
            await asyncio.shield(self._retire(w, 0.0))
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ActionError(f"a python worker did not start: {type(exc).__name__}: {exc}",
                              code=ErrorCode.ERR_WORKER_DIED) from None
        return w

    async def _reap_dead(self, w: _Worker) -> int | None:
        """A worker that closed its connection: its exit code (it is then gone for good)."""
        try:
            code = await _wait_exit(w.proc, 5.0)
        except BaseException:
            self._schedule_retire(w)
            raise
        if code is None:
            await self._retire(w, 0.0)
        else:
            self.died += 1
            self._forget(w)
        return code

    async def _retire(self, w: _Worker, grace: float) -> None:
        """End a worker: SIGTERM its group and wait ``grace`` seconds (0: SIGKILL at once),
        then SIGKILL the group; closing ``alive`` makes the worker's watchdog kill it too."""
        if w.gone:
            return
        try:
            if grace > 0 and w.proc.returncode is None:
                _kill_group(w.pid, signal.SIGTERM)
                await _wait_exit(w.proc, grace)
        finally:  # also when cancelled during the grace (a pool closing)
            if w.proc.returncode is None:
                _kill_group(w.pid, signal.SIGKILL)
            else:  # the leader is gone; children it left in its group are not
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(w.pid, signal.SIGKILL)
            w.alive.close()
            try:
                await _wait_exit(w.proc, 10.0)  # SIGKILL: at once; reaped, not left a zombie
            finally:
                self._forget(w)

    def _forget(self, w: _Worker) -> None:
        if w.gone:
            return
        w.gone = True
        w.alive.close()
        w.writer.close()
        self._pids.discard(w.pid)

    async def close(self, bound: float = 5.0) -> None:
        """Kill every worker: idle ones at once, busy ones (a pool closed under running calls;
        their calls fail with ERR_WORKER_DIED) with SIGKILL. Kills in flight (a call's SIGTERM
        grace) get up to ``bound`` seconds, then SIGKILL: close never waits longer."""
        self._closed = True
        idle, self._idle = self._idle, []
        for w in self._busy:
            _kill_group(w.pid, signal.SIGKILL)
        work = [asyncio.ensure_future(self._retire(w, 0.0)) for w in idle]
        work += list(self._reaping)
        if work:
            _, late = await asyncio.wait(work, timeout=bound)
            if late:
                _kill_all(self._pids)
                for t in late:
                    t.cancel()
                await asyncio.gather(*late, return_exceptions=True)


def _kill_all(pids: set[int]) -> None:
    for pid in list(pids):
        _kill_group(pid, signal.SIGKILL)


def _emit(d: dict[str, Any], default: logging.Logger | None) -> None:
    logger = logging.getLogger(d["name"]) if d.get("name") not in (None, "root") else (
        default or log)
    if not logger.isEnabledFor(d["levelno"]):
        return
    record = logging.makeLogRecord(d)
    logger.handle(record)
