"""The route table of the HTTP API, and the OpenAPI 3.1 document built from it.

``ROUTES`` is the single list of operations: the server registers a handler for each entry (by
its ``name``) and ``document()`` describes each one, so a route cannot exist undocumented. Body
and response schemas come from the msgspec Structs in :mod:`kernel.api.schemas`
(``msgspec.json.schema_components``); OpenAPI 3.1 uses JSON Schema 2020-12, so they fit as they
are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from kernel.config import TaskConfig
from kernel.errors import ErrorCode

from . import schemas as s

REF = "#/components/schemas/{name}"

ERRORS: dict[int, str] = {
    400: "The request is malformed or names something invalid (ERR_BAD_REQUEST, "
         "ERR_BAD_PAYLOAD, ERR_ACTION_NOT_FOUND, ERR_CONFIG_INVALID); `field` names the field.",
    401: "A bearer token is needed: the one in `<data_dir>/api.token` on a loopback address, "
         "else the variable named by `[server] token_env` (ERR_UNAUTHORIZED).",
    403: "Sent by a web page (a cross-site `Origin` or `Sec-Fetch-Site`) or with a foreign "
         "`Host` (DNS rebinding) (ERR_FORBIDDEN_ORIGIN).",
    404: "No such job, task, trace or route (ERR_NOT_FOUND).",
    405: "The route exists but not with this method (ERR_BAD_REQUEST).",
    408: "The request body did not arrive within `[server] read_timeout` (ERR_BAD_REQUEST).",
    409: "The task exists already; replace it with PUT (ERR_CONFIG_INVALID).",
    413: "The body is larger than `[server] max_body_bytes` (ERR_BAD_REQUEST).",
    415: "A body was sent without `Content-Type: application/json` "
         "(ERR_UNSUPPORTED_MEDIA_TYPE).",
    429: "The ready queue is full; nothing was stored. Retry later (ERR_QUEUE_FULL).",
    500: "A bug in the kernel; it keeps running (ERR_INTERNAL).",
    503: "The kernel is starting or stopping (ERR_SHUTTING_DOWN), or the store failed "
         "(ERR_STORE_*). Retry later.",
}

STATUS: dict[ErrorCode, int] = {
    ErrorCode.ERR_NOT_FOUND: 404,
    ErrorCode.ERR_UNAUTHORIZED: 401,
    ErrorCode.ERR_FORBIDDEN_ORIGIN: 403,
    ErrorCode.ERR_UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.ERR_QUEUE_FULL: 429,
    ErrorCode.ERR_SHUTTING_DOWN: 503,
    ErrorCode.ERR_STORE_UNAVAILABLE: 503,
    ErrorCode.ERR_STORE_LOCKED: 503,
    ErrorCode.ERR_STORE_READONLY: 503,
    ErrorCode.ERR_STORE_FULL: 503,
    ErrorCode.ERR_STORE_CORRUPT: 503,
    ErrorCode.ERR_INTERNAL: 500,
    ErrorCode.ERR_PLUGIN_LOAD: 500,
}
"""Status by error code; every other code is a client's mistake: 400."""

_COMMON = (401, 403, 500)
_BODY = (400, 413, 415, 408)
_SUBMIT = (*_BODY, 429, 503)


@dataclass(frozen=True, slots=True)
class Route:
    """One operation. ``name`` is its operationId and the server's handler name."""

    method: str
    path: str
    name: str
    summary: str
    tag: str
    ok: int
    response: Any
    ok_text: str = "OK"
    body: Any = None
    body_optional: bool = False
    query: Any = None
    errors: tuple[int, ...] = ()
    public: bool = False
    content_type: str = "application/json"
    description: str = ""

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.path)


_TASK_RUNTIME = ("Runtime task changes live in memory only: they are not written to config.toml "
                 "and a config reload (SIGHUP, file watcher) or a restart replaces them.")

ROUTES: tuple[Route, ...] = (
    Route("POST", "/jobs/batch", "submit_batch", "Submit up to 10,000 jobs, all or nothing",
          "jobs", 201, list[s.JobAccepted], "Every job is durable (committed).",
          body=s.BatchIn, errors=_SUBMIT,
          description="Answered only after the jobs are committed. One item per job, in "
                      "order; `existed` marks an item whose dedup key named an earlier job "
                      "(200 if every item existed). A W3C `traceparent` header applies to all."),
    Route("POST", "/jobs", "submit", "Submit a one-shot job", "jobs", 201, s.JobAccepted,
          "The job is durable (committed).", body=s.JobIn, errors=_SUBMIT,
          description="Answered only after the job is committed to the store. `delay` "
                      "(seconds) and `at` (ISO-8601) are exclusive; neither means now. "
                      "200 with the earlier job's id when `dedup_key` was seen within its TTL. "
                      "A W3C `traceparent` header makes the job part of that trace."),
    Route("GET", "/jobs", "list_jobs", "List pending and running jobs", "jobs", 200, s.JobList,
          query=s.JobsQuery, errors=(400, 503)),
    Route("GET", "/jobs/{id}", "get_job", "A job: live, or finished with its outcome", "jobs",
          200, (s.JobOut, s.FinishedJobOut), errors=(404, 503),
          description="A pending or running job as it is now (`JobOut`); a finished one as its "
                      "last run in the history says (`FinishedJobOut`: `state` done or "
                      "cancelled, with `outcome` and `error_code`), for as long as the history "
                      "keeps it. 404 only for an id never submitted or pruned from history."),
    Route("DELETE", "/jobs/{id}", "cancel_job", "Cancel a pending, queued or running job",
          "jobs", 200, s.CancelOut, errors=(404, 503)),
    Route("GET", "/runs", "list_runs", "Query run history (newest first)", "runs", 200,
          s.RunList, query=s.RunsQuery, errors=(400, 503),
          description="`since` is inclusive and `until` exclusive, on the finish instant; "
                      "both take ISO-8601 or epoch seconds."),
    Route("GET", "/runs/{trace_id}", "trace_runs", "Every run of one trace", "runs", 200,
          s.RunList, errors=(404, 503)),
    Route("GET", "/tasks", "list_tasks", "Tasks and their state", "tasks", 200, s.TaskList),
    Route("POST", "/tasks", "add_task", "Add a task at runtime", "tasks", 201, s.TaskChanged,
          body=TaskConfig, errors=(*_BODY, 409, 503),
          description="The body is a task table as in config.toml's [[tasks]]. It is validated "
                      "with the rest of the configuration; on any problem nothing changes and "
                      "the 400 lists every issue. " + _TASK_RUNTIME),
    Route("PUT", "/tasks/{id}", "replace_task", "Replace a task at runtime", "tasks", 200,
          s.TaskChanged, body=TaskConfig, errors=(*_BODY, 404, 503),
          description="`id` in the body may be left out; if given it must match the path. "
                      "Runs in flight finish under the old definition. " + _TASK_RUNTIME),
    Route("DELETE", "/tasks/{id}", "delete_task", "Remove a task at runtime", "tasks", 200,
          s.TaskChanged, errors=(400, 404, 503),
          description="Refused (400) while another task depends on it. " + _TASK_RUNTIME),
    Route("POST", "/tasks/{id}/pause", "pause_task", "Pause a task's schedule", "tasks", 200,
          s.TaskOut, errors=(404, 503)),
    Route("POST", "/tasks/{id}/resume", "resume_task", "Resume a paused task", "tasks", 200,
          s.TaskOut, errors=(404, 503),
          description="Occurrences that came due while paused are not run."),
    Route("POST", "/tasks/{id}/trigger", "trigger_task", "Run a task now", "tasks", 201,
          s.JobAccepted, "The job is durable (committed).", body=s.TriggerIn,
          body_optional=True, errors=(*_BODY, 404, 503),
          description="An optional `payload` replaces the task's payload for this run."),
    Route("POST", "/tasks/{id}/backfill", "backfill_task",
          "Run a task's occurrences in [start, end]", "tasks", 201, s.BackfillOut,
          "The jobs are durable (committed).", body=s.BackfillIn, errors=(*_BODY, 404, 503),
          description="At most 10,000 occurrences per request."),
    Route("GET", "/healthz", "healthz", "Liveness and readiness", "kernel", 200, s.HealthOut,
          errors=(403, 503), public=True,
          description="200 when the store is healthy and the kernel accepts work, else 503 "
                      "with the same body. Needs no token; store details are shown only to an "
                      "authorised caller."),
    Route("GET", "/metrics", "metrics", "Prometheus metrics", "kernel", 200, None,
          errors=(404,), content_type="text/plain",
          description="404 when the kernel was started without a metrics exporter."),
    Route("GET", "/snapshot", "snapshot", "The kernel's state, for the TUI", "kernel", 200,
          s.SnapshotOut, errors=(503,),
          description="The kernel snapshot (instants in epoch seconds) and the last 20 runs."),
    Route("GET", "/openapi.json", "openapi", "This document", "kernel", 200, None,
          content_type="application/json"),
)


def _schemas() -> tuple[dict[Any, dict[str, Any]], dict[str, Any]]:
    types: list[Any] = list(s.SCHEMA_TYPES)
    for r in ROUTES:
        for t in (r.body, *_alternatives(r.response), r.query):
            if t is not None and t not in types:
                types.append(t)
    one, components = msgspec.json.schema_components(types, ref_template=REF)
    return dict(zip(types, one, strict=True)), components


def _alternatives(response: Any) -> tuple[Any, ...]:
    """A route's response types: one type, or a tuple of alternatives (``anyOf``)."""
    return response if isinstance(response, tuple) else (response,)


def _error_response(status: int) -> dict[str, Any]:
    return {"description": ERRORS[status],
            "content": {"application/json": {"schema": {"$ref": REF.format(name="ErrorOut")}}}}


def document(*, version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in :data:`ROUTES`."""
    by_type, components = _schemas()
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        params: list[dict[str, Any]] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in r.path_params]
        if r.query is not None:
            props = components[r.query.__name__]["properties"]
            params += [{"name": k, "in": "query", "required": False, "schema": v}
                       for k, v in props.items()]
        if isinstance(r.response, tuple):
            ok_body: dict[str, Any] = {"schema": {"anyOf": [by_type[t] for t in r.response]}}
        elif r.response is not None:
            ok_body = {"schema": by_type[r.response]}
        elif r.name == "openapi":
            ok_body = {"schema": {"type": "object"}}
        else:
            ok_body = {"schema": {"type": "string"}}
        responses: dict[str, Any] = {
            str(r.ok): {"description": r.ok_text, "content": {r.content_type: ok_body}}}
        if r.name in ("submit", "submit_batch"):
            responses["200"] = {"description": "The dedup key named an earlier job; nothing new "
                                "was stored.", "content": {"application/json": ok_body}}
        for status in sorted({*r.errors, *(() if r.public else _COMMON)}):
            responses[str(status)] = _error_response(status)
        op: dict[str, Any] = {"operationId": r.name, "summary": r.summary, "tags": [r.tag],
                              "responses": responses}
        if r.description:
            op["description"] = r.description
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": not r.body_optional, "content": {
                "application/json": {"schema": by_type[r.body]}}}
        if r.public:
            op["security"] = []
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Open-AutoGLM Kernel API",
            "version": version,
            "description": (
                "The kernel's HTTP API: submit jobs, query runs, manage tasks. Errors are "
                "`{\"error\": {\"code\", \"message\", \"field\"}}` with a stable `ERR_*` code "
                "(`python -m kernel explain CODE`). Every route but GET /healthz needs "
                "`Authorization: Bearer <token>`: the variable named by `[server] token_env` "
                "if set, else (on loopback) the token in `<data_dir>/api.token`. Request "
                "bodies must be `application/json`, nested at most 64 deep; requests from web "
                "pages (cross-site `Origin` / `Sec-Fetch-Site`) and foreign `Host`s are "
                "refused (403), and no CORS headers are sent. "
                + _TASK_RUNTIME),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
