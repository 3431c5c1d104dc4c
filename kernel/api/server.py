"""The HTTP API: an aiohttp server run as a kernel service, inside the kernel's event loop.

It calls only the kernel's public methods. Every answer is JSON; every failure is
``{"error": {"code", "message", "field"}}`` with a 4xx for anything the client did, 503 when the
kernel cannot take work now, and 500 (logged, never fatal) for a bug. The error middleware is
the one place where exceptions become responses:

* :class:`~kernel.errors.KernelError` -> the status of its ``code`` (:data:`STATUS`);
* aiohttp's own HTTP errors (no such route, wrong method, body too large) -> JSON errors;
* anything else -> logged with its traceback, 500 ``ERR_INTERNAL``.

Who may call it (see :mod:`kernel.api.security` and the README's "Security model"): every
request but ``GET /healthz`` needs ``Authorization: Bearer <token>``: the token in the variable
named by ``[server] token_env`` if it is set, else (on a loopback address only) the one in the
data dir's token file, created at start with mode 0600. A non-loopback address without the
variable refuses to start. Before that, a guard refuses what a web browser sends on a page's
behalf: a cross-site ``Origin`` / ``Sec-Fetch-Site``, a foreign ``Host`` (DNS rebinding), a body
that is not ``application/json``; no CORS headers are ever sent.

Timeouts: ``[server] read_timeout`` bounds receiving a body (408) and idle keep-alive;
``write_timeout`` bounds the work of a read-only (GET) request (503). A request that changes
state is never cut short, so an acknowledged write is always complete.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import hmac
import importlib.metadata
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from kernel import config as config_mod
from kernel.app import Kernel, Snapshot, SubmitRequest
from kernel.config import Config, TaskConfig, secs
from kernel.errors import (
    ActionNotFound,
    BadPayload,
    ConfigError,
    ConfigIssue,
    ErrorCode,
    KernelError,
    NotFound,
)
from kernel.events import ConfigReloaded, Event, LoopStalled
from kernel.records import JobState, Outcome, RunQuery
from kernel.validate import validate

from . import openapi
from . import schemas as s
from .security import is_loopback as is_loopback  # re-exported: the loopback test
from .security import load_or_create_token, refusal, token_path

log = logging.getLogger("kernel.api")

Metrics = Callable[[Snapshot], tuple[bytes, str]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


RELOADS_KEPT = 10
#: The deepest nesting of arrays and objects a request body may have. Deeper JSON is a client's
#: mistake (or an attack on the recursion limit), refused with 400 before it is decoded.
MAX_JSON_DEPTH = 64
_HTTP_CODES = {401: ErrorCode.ERR_UNAUTHORIZED, 404: ErrorCode.ERR_NOT_FOUND}
_JSON = "application/json"
_ENCODER = msgspec.json.Encoder()


class AddressInUse(ConfigError):
    """The API's address is taken by another process: a runtime failure (``run`` exits 1, so
    that a service manager tries again, docs/SERVICE.md), not an invalid file, although the
    message names ``[server] port``."""


class RequestError(KernelError):
    """A client error found by the API itself: its status, and the field it is about."""

    code = ErrorCode.ERR_BAD_REQUEST

    def __init__(self, message: str, *, field: str | None = None, status: int = 400,
                 code: ErrorCode | None = None, issues: list[ConfigIssue] | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field
        self.status = status
        self.issues = issues


# ================================================================================== helpers


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_ENCODER.encode(body), status=status, content_type=_JSON,
                        headers=headers)


def _error(status: int, code: ErrorCode, message: str, field: str | None = None,
           issues: list[ConfigIssue] | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    detail = s.ErrorDetail(code=code, message=message, field=field)
    if issues:
        detail.issues = [s.Issue(where=i.where, message=i.message) for i in issues]
    return _json(s.ErrorOut(error=detail), status, headers)


def _bad_value(exc: msgspec.ValidationError, prefix: str = "",
               code: ErrorCode = ErrorCode.ERR_BAD_REQUEST) -> RequestError:
    field, text = s.field_path(str(exc), prefix)
    return RequestError(f"{field}: {text}" if field else text, field=field, code=code)


def token_required(cfg: Config) -> bool:
    """Whether the API demands a token: always, unless ``[server] require_token = false`` on a
    loopback address (read with a default while the config does not have the field)."""
    srv = cfg.server
    return not is_loopback(srv.host) or bool(getattr(srv, "require_token", True))


def api_token(cfg: Config, *, require_token: bool | None = None) -> str | None:
    """The bearer token the API demands, or ``None`` when none is required.

    The variable named by ``[server] token_env`` if set; else, on a loopback address, the token
    file in the data dir (created, mode 0600, if missing). ``require_token`` overrides
    :func:`token_required`.

    :raises ConfigError: a non-loopback address without the variable, or a token file that
        cannot be written.
    """
    srv = cfg.server
    needed = token_required(cfg) if require_token is None else require_token
    if not needed:
        return None
    token = os.environ.get(srv.token_env, "")
    if token:
        return token
    if not is_loopback(srv.host):
        raise ConfigError([ConfigIssue(
            cfg.source, "[server].host",
            f"the API is bound to {srv.host!r}, which is not a loopback address, so it needs "
            f"a bearer token: set the environment variable {srv.token_env} (named by "
            "[server] token_env), or bind host = \"127.0.0.1\"")])
    path = token_path(cfg.data_dir())
    try:
        token, what = load_or_create_token(path)
    except OSError as exc:
        raise ConfigError([ConfigIssue(
            cfg.source, "[kernel].data_dir",
            f"cannot write the API token file {path}: {exc.strerror or exc} (the data dir must "
            f"be writable by the kernel's user, or set {srv.token_env})")]) from None
    if what != "kept":
        log.log(logging.INFO if what == "created" else logging.WARNING,
                "API token file %s %s", path, what)
    return token


def _json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` (JSON, maybe invalid) nests arrays/objects deeper than ``limit``."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # cannot be deeper: the common case costs two C scans
    depth = 0
    for ch in _STRINGS.sub(b"", raw).translate(None, _NOT_BRACKETS):
        depth += 1 if ch in (0x5B, 0x7B) else -1
        if depth > limit:
            return True
    return False


_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


# ================================================================================== the API


class Api:
    """The handlers. One instance per server; it holds no state but a lock for task edits."""

    def __init__(self, kernel: Kernel, *, metrics: Metrics | None = None,
                 token: str | None = None) -> None:
        self.kernel = kernel
        self._metrics = metrics
        self.token = token
        srv = kernel.config.server
        self.bind_host = srv.host
        self._token_hint = (f"the token is in {token_path(kernel.config.data_dir())}, readable "
                            f"by the kernel's user, or in ${srv.token_env} if that is set"
                            if is_loopback(srv.host) else
                            f"the token is in the kernel's ${srv.token_env}")
        self.max_body = srv.max_body_bytes
        self.read_timeout = secs(srv.read_timeout) or None
        self.write_timeout = secs(srv.write_timeout) or None
        self._openapi: bytes | None = None
        self.last_stall: s.StallOut | None = None
        self.reloads: collections.deque[s.ReloadOut] = collections.deque(maxlen=RELOADS_KEPT)

    def observe(self, event: Event) -> None:
        """Event-bus subscriber: remember the recent configuration changes and the last loop
        stall for the TUI."""
        if isinstance(event, LoopStalled):
            self.last_stall = s.StallOut(at=event.at, lag=event.lag, job_ids=list(event.job_ids),
                                         task_ids=list(event.task_ids))
        elif isinstance(event, ConfigReloaded):
            self.reloads.appendleft(s.ReloadOut(
                at=event.at, source=event.source, added=list(event.added),
                removed=list(event.removed), changed=list(event.changed), error=event.error))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body,
                              middlewares=[self._errors, self._guard, self._auth])
        for r in openapi.ROUTES:
            app.router.add_route(r.method, r.path, getattr(self, r.name), name=r.name)
        return app

    # ------------------------------------------------------------------ middlewares
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.method != "GET" or not self.write_timeout:
                return await handler(request)
            deadline = asyncio.timeout(self.write_timeout)
            try:
                async with deadline:
                    return await handler(request)
            except TimeoutError:
                if not deadline.expired():
                    raise
            return _error(503, ErrorCode.ERR_STORE_UNAVAILABLE, "no answer within "
                          f"[server] write_timeout ({self.write_timeout:g} s); retry later")
        except RequestError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return _error(exc.status, exc.code, exc.message, exc.field, exc.issues, headers)
        except ConfigError as exc:
            return _error(400, exc.code, exc.message, _issue_field(exc.issues), exc.issues)
        except KernelError as exc:
            status = openapi.STATUS.get(exc.code, 400)
            headers = {"Retry-After": "1"} if status in (429, 503) else None
            field = _kernel_field(exc)
            if status >= 500:
                log.error("%s %s failed: [%s] %s", request.method, request.path, exc.code, exc)
            return _error(status, exc.code, exc.message, field, headers=headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _HTTP_CODES.get(exc.status, ErrorCode.ERR_BAD_REQUEST)
            if exc.status == 413:
                message = f"the body is larger than [server] max_body_bytes ({self.max_body})"
            elif exc.status == 404:
                message = f"no route {request.path!r} (see /openapi.json)"
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {request.path!r}"
            else:
                message = exc.reason
            return _error(exc.status, code, message, headers={
                k: v for k, v in exc.headers.items() if k.lower() == "allow"})
        except Exception:  # a bug: log it, answer 500, keep serving
            log.exception("%s %s raised an unexpected exception", request.method, request.path)
            return _error(500, ErrorCode.ERR_INTERNAL,
                          "unexpected error in the kernel (logged); please report it")

    def _authorised(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        scheme, _, cred = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            cred.strip().encode("utf-8", "replace"), self.token.encode("utf-8", "replace"))

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse what a browser sends for a web page (see :mod:`kernel.api.security`)."""
        no = refusal(request.method, request.headers, has_body=request.body_exists,
                     bind_host=self.bind_host)
        if no is not None:
            raise RequestError(no.message, status=no.status, code=no.code)
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        public = request.method == "GET" and request.path == "/healthz"
        if not public and not self._authorised(request):
            raise RequestError(f"this API needs 'Authorization: Bearer <token>' "
                               f"({self._token_hint})", status=401,
                               code=ErrorCode.ERR_UNAUTHORIZED)
        return await handler(request)

    # ------------------------------------------------------------------ request decoding
    async def _body(self, request: web.Request, typ: type[T], *,
                    optional: bool = False) -> T | None:
        raw = await self._raw(request)
        if optional and not raw.strip():
            return None
        try:
            return msgspec.json.decode(raw, type=typ)
        except msgspec.ValidationError as exc:
            raise _bad_value(exc) from None
        except msgspec.DecodeError as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from None
        except RecursionError:  # a backstop: _raw refuses deep nesting before this
            raise _too_deep() from None

    async def _raw(self, request: web.Request) -> bytes:
        """The body, within ``max_body_bytes`` and ``read_timeout``, nested at most
        :data:`MAX_JSON_DEPTH` deep."""
        if request.content_length is not None and request.content_length > self.max_body:
            raise RequestError(f"the body is larger than [server] max_body_bytes "
                               f"({self.max_body})", status=413)
        try:
            if request.content.is_eof():  # all of it arrived already: no wait, no timer
                raw = await request.read()
            else:
                async with asyncio.timeout(self.read_timeout):
                    raw = await request.read()
        except TimeoutError:
            raise RequestError(f"the body did not arrive within [server] read_timeout "
                               f"({self.read_timeout:g} s)", status=408) from None
        except (ConnectionResetError, web.RequestPayloadError) as exc:
            # the client's doing (it hung up, or sent a broken chunked body), not a bug
            log.info("%s %s: the client closed the connection or sent a broken body before "
                     "its body arrived: %s", request.method, request.path, exc)
            raise RequestError(f"the body could not be read: {exc}") from None
        if _json_depth_exceeds(raw, MAX_JSON_DEPTH):
            raise _too_deep()
        return raw

    @staticmethod
    def _query(request: web.Request, typ: type[T]) -> T:
        q: dict[str, str] = {}
        for k, v in request.query.items():
            if k in q:
                raise RequestError(f"{k}: given more than once", field=k)
            q[k] = v
        try:
            return msgspec.convert(q, typ, strict=False)
        except msgspec.ValidationError as exc:
            raise _bad_value(exc) from None

    @staticmethod
    def _instant(value: str | float, field: str) -> float:
        try:
            return s.parse_instant(value)
        except ValueError as exc:
            raise RequestError(f"{field}: {exc}", field=field) from None

    def _submit_request(self, item: s.JobIn, traceparent: str | None,
                        prefix: str = "") -> SubmitRequest:
        """Check what the kernel would refuse, so that the error can name its field."""
        plugins = self.kernel.plugins
        try:
            action = plugins.action(item.action)
        except ActionNotFound as exc:
            raise RequestError(exc.message, field=f"{prefix}action", code=exc.code) from None
        if action.payload_type is not None:
            try:  # what plugins.decode_payload does, keeping the field's path
                msgspec.convert(item.payload, action.payload_type, strict=False)
            except msgspec.ValidationError as exc:
                raise _bad_value(exc, f"{prefix}payload", ErrorCode.ERR_BAD_PAYLOAD) from None
        at: float | None = None
        if item.at is not None:
            if item.delay is not None:
                raise RequestError("give either 'delay' or 'at', not both", field=f"{prefix}at")
            at = self._instant(item.at, f"{prefix}at")
            if at > self.kernel.clock.wall() + s.MAX_SECONDS:
                raise RequestError(f"{prefix}at: more than ten years ahead",
                                   field=f"{prefix}at")
        return SubmitRequest(action=item.action, payload=item.payload, delay=item.delay, at=at,
                             dedup_key=item.dedup_key, dedup_ttl=item.dedup_ttl,
                             priority=item.priority, timeout=item.timeout,
                             gpu_memory_mb=item.gpu_memory_mb, gpu=item.gpu,
                             traceparent=traceparent)

    # ------------------------------------------------------------------ jobs
    async def submit(self, request: web.Request) -> web.Response:
        item = await self._body(request, s.JobIn)
        assert item is not None
        req = self._submit_request(item, request.headers.get("traceparent"))
        res = await self.kernel.submit(req)
        return _json(s.accepted(res.job, res.existed), 200 if res.existed else 201,
                     {"Location": f"/jobs/{res.job.id}"})

    async def submit_batch(self, request: web.Request) -> web.Response:
        batch = await self._body(request, s.BatchIn)
        assert batch is not None
        tp = request.headers.get("traceparent")
        reqs = [self._submit_request(j, tp, f"jobs[{i}].") for i, j in enumerate(batch.jobs)]
        results = await self.kernel.submit_many(reqs)
        out = [s.accepted(r.job, r.existed) for r in results]
        return _json(out, 200 if all(r.existed for r in results) else 201)

    async def list_jobs(self, request: web.Request) -> web.Response:
        q = self._query(request, s.JobsQuery)
        jobs = await self.kernel.store.list_jobs(state=q.state, task_id=q.task, limit=q.limit,
                                                 offset=q.offset)
        return _json(s.JobList(jobs=[s.job_out(j) for j in jobs], limit=q.limit,
                               offset=q.offset))

    async def get_job(self, request: web.Request) -> web.Response:
        """A live job as it is; a finished one as its last run in the history says."""
        job_id = request.match_info["id"]
        job = await self.kernel.get_job(job_id)
        if job is not None:
            return _json(s.job_out(job))
        runs = await self.kernel.store.query_runs(RunQuery(job_id=job_id, limit=1))
        if runs:
            run = runs[0]
            state = JobState.CANCELLED if run.outcome is Outcome.CANCELLED else JobState.DONE
            return _json(s.finished_job_out(run, state))
        raise NotFound(f"no job {job_id!r}: it was never submitted, or it finished so long ago "
                       "that its run left the history ([store] history_max_rows / "
                       "history_max_age)")

    async def cancel_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        rep = await self.kernel.cancel_and_wait(job_id)
        if rep.was is not JobState.RUNNING:
            return _json(s.CancelOut(id=job_id, cancelled=True, was=rep.was))
        return _json(s.CancelOut(
            id=job_id, was=rep.was, running=not rep.ended, outcome=rep.outcome,
            error_code=rep.error_code,
            cancelled=rep.ended and rep.outcome in (Outcome.CANCELLED.value,
                                                    Outcome.TIMED_OUT.value)))

    # ------------------------------------------------------------------ runs
    async def list_runs(self, request: web.Request) -> web.Response:
        q = self._query(request, s.RunsQuery)
        since = None if q.since is None else self._instant(q.since, "since")
        until = None if q.until is None else self._instant(q.until, "until")
        runs = await self.kernel.store.query_runs(RunQuery(
            task_id=q.task, outcome=q.outcome, since=since, until=until, limit=q.limit,
            offset=q.offset))
        return _json(s.RunList(runs=[s.run_out(r) for r in runs], limit=q.limit,
                               offset=q.offset))

    async def trace_runs(self, request: web.Request) -> web.Response:
        trace_id = request.match_info["trace_id"]
        runs = await self.kernel.store.query_runs(RunQuery(trace_id=trace_id, limit=s.PAGE_MAX))
        if not runs:
            raise NotFound(f"no runs of trace {trace_id!r} (yet)")
        runs.reverse()  # oldest first: the order the trace's runs happened in
        return _json(s.RunList(runs=[s.run_out(r) for r in runs], limit=s.PAGE_MAX, offset=0))

    # ------------------------------------------------------------------ tasks
    def _task_out(self, task_id: str) -> s.TaskOut | None:
        for view in self.kernel.snapshot().tasks:
            if view.id == task_id:
                tc = self.kernel.config.task(task_id)
                return s.task_out(view, tc.description if tc is not None else "")
        return None

    def _known(self, task_id: str) -> s.TaskOut:
        out = self._task_out(task_id)
        if out is None:
            raise NotFound(f"no task {task_id!r}")
        return out

    async def list_tasks(self, request: web.Request) -> web.Response:
        descriptions = {t.id: t.description for t in self.kernel.config.tasks}
        return _json(s.TaskList(tasks=[s.task_out(v, descriptions.get(v.id, ""))
                                       for v in self.kernel.snapshot().tasks]))

    async def _task_body(self, request: web.Request, path_id: str | None) -> TaskConfig:
        raw_body = await self._raw(request)
        try:
            raw = msgspec.json.decode(raw_body)
        except msgspec.DecodeError as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise _too_deep() from None
        if not isinstance(raw, dict):
            raise RequestError("the body must be a task table (a JSON object), as in "
                               "config.toml's [[tasks]]")
        if path_id is not None:
            if "id" not in raw:
                raw["id"] = path_id
            elif raw["id"] != path_id:
                raise RequestError(f"id: {raw['id']!r} differs from the path's {path_id!r}",
                                   field="id")
        source = f"{request.method} {request.path}"
        cfg, issues = config_mod.decode({"tasks": [raw]}, source)
        if issues or len(cfg.tasks) != 1:
            raise ConfigError(issues or source)
        return cfg.tasks[0]

    async def _apply(self, edit: Callable[[list[TaskConfig]], list[TaskConfig]], source: str,
                     task_id: str) -> s.TaskChanged:
        """One task change, through the kernel's one lock for task changes (the config file's
        reloads take it too): ``edit`` sees the task list as it is under that lock."""

        def check(cfg: Config) -> None:
            errors = [i for i in validate(msgspec.structs.replace(cfg, source=source),
                                          self.kernel.plugins) if i.severity == "error"]
            if errors:
                raise ConfigError(errors)

        ev = await self.kernel.edit_tasks(edit, "api", check)
        return s.TaskChanged(task=self._task_out(task_id), added=ev.added, removed=ev.removed,
                             changed=ev.changed)

    async def add_task(self, request: web.Request) -> web.Response:
        tc = await self._task_body(request, None)

        def add(current: list[TaskConfig]) -> list[TaskConfig]:
            if any(t.id == tc.id for t in current):
                raise RequestError(f"task {tc.id!r} exists already; replace it with PUT "
                                   f"/tasks/{tc.id}", field="id", status=409,
                                   code=ErrorCode.ERR_CONFIG_INVALID)
            return [*current, tc]

        return _json(await self._apply(add, "POST /tasks", tc.id), 201)

    async def replace_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        tc = await self._task_body(request, task_id)

        def replace(current: list[TaskConfig]) -> list[TaskConfig]:
            if not any(t.id == task_id for t in current):
                raise NotFound(f"no task {task_id!r} (add it with POST /tasks)")
            return [tc if t.id == task_id else t for t in current]

        return _json(await self._apply(replace, f"PUT /tasks/{task_id}", task_id))

    async def delete_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]

        def delete(current: list[TaskConfig]) -> list[TaskConfig]:
            if not any(t.id == task_id for t in current):
                raise NotFound(f"no task {task_id!r}")
            return [t for t in current if t.id != task_id]

        return _json(await self._apply(delete, f"DELETE /tasks/{task_id}", task_id))

    async def pause_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        await self.kernel.pause(task_id)
        return _json(self._known(task_id))

    async def resume_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        await self.kernel.resume(task_id)
        return _json(self._known(task_id))

    async def trigger_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        self._known(task_id)
        body = await self._body(request, s.TriggerIn, optional=True)
        job = await self.kernel.trigger(task_id, body.payload if body is not None else None)
        return _json(s.accepted(job), 201, {"Location": f"/jobs/{job.id}"})

    async def backfill_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        self._known(task_id)
        body = await self._body(request, s.BackfillIn)
        assert body is not None
        start = self._instant(body.start, "start")
        end = self._instant(body.end, "end")
        if end < start:
            raise RequestError("end: must not be before start", field="end")
        jobs = await self.kernel.backfill(task_id, start, end)
        return _json(s.BackfillOut(task_id=task_id, count=len(jobs),
                                   jobs=[s.accepted(j) for j in jobs]), 201)

    # ------------------------------------------------------------------ kernel
    async def healthz(self, request: web.Request) -> web.Response:
        health = await self.kernel.store.health()
        store_ok = bool(health.get("ok"))
        accepting = self.kernel.accepting
        ok = store_ok and accepting
        out = s.HealthOut(status="ok" if ok else "unavailable", accepting=accepting, loop="ok",
                          store_ok=store_ok, unsaved=self.kernel.unsaved)
        if self._authorised(request):
            out.store = health
        return _json(out, 200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            raise NotFound("no metrics exporter is installed in this kernel")
        body, content_type = self._metrics(self.kernel.snapshot())
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def snapshot(self, request: web.Request) -> web.Response:
        snap = self.kernel.snapshot()
        runs = await self.kernel.store.query_runs(RunQuery(limit=20))
        return _json(s.SnapshotOut(snapshot=snap, recent_runs=runs, reloads=list(self.reloads),
                                   last_stall=self.last_stall))

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = _ENCODER.encode(openapi.document(version=_version()))
        return web.Response(body=self._openapi, content_type=_JSON)


def _version() -> str:
    try:
        return importlib.metadata.version("open-autoglm-kernel")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _too_deep() -> RequestError:
    return RequestError(f"the body nests arrays/objects more than {MAX_JSON_DEPTH} levels deep")


def _kernel_field(exc: KernelError) -> str | None:
    """The field a kernel error is about, where its type or message says so."""
    if isinstance(exc, ActionNotFound):
        return "action"
    if isinstance(exc, BadPayload) and exc.message.startswith("payload"):
        return "payload"
    m = re.match(r"^([a-z_]+): ", exc.message)
    return m.group(1) if m else None


def _issue_field(issues: list[ConfigIssue]) -> str | None:
    """The field of the first issue: "task 'x'.schedule" -> "schedule"."""
    if not issues:
        return None
    where = issues[0].where
    m = re.match(r"^(?:task '(?:[^'\\]|\\.)*'|tasks\[\d+\])\.(.+)$", where)
    return m.group(1) if m else None


# ================================================================================== service


async def api_service(kernel: Kernel, *, metrics: Metrics | None = None,
                      require_token: bool | None = None) -> None:
    """Serve the API until cancelled; set ``kernel.api_url`` once bound.

    ``require_token`` overrides the loopback check (``None``: decide from ``[server] host``).

    :raises ConfigError: a token is needed and not set, or the address cannot be bound.
    """
    kernel.expect_api()
    srv = kernel.config.server
    token = api_token(kernel.config, require_token=require_token)
    api = Api(kernel, metrics=metrics, token=token)
    keepalive = min(75.0, secs(srv.read_timeout) or 75.0)
    # auto_decompress=False: aiohttp would inflate a gzip/deflate body in the event loop as
    # it arrives, before any check (the guard refuses encoded bodies instead)
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False,
                           keepalive_timeout=keepalive, shutdown_timeout=5.0,
                           auto_decompress=False)
    unsubscribe = kernel.bus.subscribe(api.observe)
    await runner.setup()
    try:
        site = web.TCPSite(runner, srv.host or None, srv.port)
        try:
            await site.start()
        except OSError as exc:
            error = AddressInUse if exc.errno == errno.EADDRINUSE else ConfigError
            raise error([ConfigIssue(
                kernel.config.source, "[server].port",
                f"cannot listen on {srv.host}:{srv.port}: {exc.strerror or exc} (another "
                "process may use the port; port = 0 picks a free one)")]) from None
        kernel.api_listening(_url(runner, srv.host))
        log.info("HTTP API listening on %s%s", kernel.api_url,
                 " (no token required: [server] require_token = false)" if token is None else
                 f" (bearer token required: {token_path(kernel.config.data_dir())})"
                 if not os.environ.get(srv.token_env) else
                 f" (bearer token required: ${srv.token_env})")
        await asyncio.Event().wait()
    finally:
        unsubscribe()
        await runner.cleanup()


def _url(runner: web.AppRunner, host: str) -> str:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            h, port = str(addr[0]), int(addr[1])
            if h in ("0.0.0.0", "::", ""):
                h = "127.0.0.1" if h != "::" else "::1"
            return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"
    return f"http://{host}"
