"""The one request type from the outside (Python API, HTTP, CLI) to the kernel, and how a
request becomes a job: checked once, the action resolved once, its payload decoded once."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from . import ids
from .errors import BadPayload
from .plugins import PluginSet
from .records import Job, JobKind


class SubmitRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A one-shot job submission (Python API, HTTP ``POST /jobs``, CLI ``submit``)."""

    action: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    delay: float | None = None     # seconds from now
    at: float | None = None        # wall instant (epoch seconds); exclusive with delay
    dedup_key: str | None = None
    dedup_ttl: float | None = None  # seconds; default [store] dedup_ttl
    priority: int = 0
    timeout: float | None = None
    traceparent: str | None = None
    gpu_memory_mb: int = 0
    gpu: int | None = None


def job_from_request(req: SubmitRequest, plugins: PluginSet, wall: float, *,
                     default_dedup_ttl: float | None) -> Job:
    """Check ``req`` (action known, payload valid for it, times finite) and make its job.

    :raises ActionNotFound, BadPayload: naming the field and what would be valid.
    """
    action = plugins.action(req.action)
    plugins.decode_payload(action, req.payload)
    if req.delay is not None and req.at is not None:
        raise BadPayload("give either 'delay' or 'at', not both")
    for name in ("delay", "at", "timeout"):
        value = getattr(req, name)
        if value is not None and not math.isfinite(value):
            raise BadPayload(f"{name}: must be a finite number")
    if req.delay is not None and req.delay < 0:
        raise BadPayload("delay: must be 0 or more seconds")
    if req.timeout is not None and req.timeout <= 0:
        raise BadPayload("timeout: must be a positive number of seconds")
    if req.gpu_memory_mb < 0:
        raise BadPayload("gpu_memory_mb: must be 0 or more")
    due = wall + (req.delay or 0.0) if req.at is None else req.at
    tp = ids.parse_traceparent(req.traceparent)
    ttl = req.dedup_ttl if req.dedup_ttl is not None else default_dedup_ttl
    return Job(
        id=ids.job_id(), action=req.action, payload=req.payload, kind=JobKind.SUBMIT,
        due_at=due, scheduled_at=due, priority=req.priority, timeout=req.timeout,
        dedup_key=req.dedup_key,
        dedup_expires_at=(wall + (ttl or 0.0)) if req.dedup_key else None,
        trace_id=tp[0] if tp else ids.trace_id(), parent_span_id=tp[1] if tp else None,
        created_at=wall, gpu_memory_mb=req.gpu_memory_mb, gpu=req.gpu)
