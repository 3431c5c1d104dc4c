"""Identifiers: job ids, W3C trace and span ids, and ``traceparent`` parsing."""

from __future__ import annotations

import itertools
import os
import re

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


# A 48-bit sequence starting at a random point per process, then 80 random bits.
_SEQ = itertools.count(int.from_bytes(os.urandom(4), "big") << 16)


def job_id() -> str:
    """32 hex characters: a per-process increasing 48-bit prefix and 80 random bits.

    Increasing ids keep the store's primary-key index append-mostly (one dirty page per batch
    instead of one per job), which is what lets group commit reach 40k+ jobs/s; the random part
    keeps ids unique across processes and restarts. Unlike UUIDv7 the prefix is not a timestamp
    (nothing outside ``clock`` reads time, and ids reveal nothing)."""
    return f"{next(_SEQ) & 0xFFFF_FFFF_FFFF:012x}{os.urandom(10).hex()}"


def trace_id() -> str:
    return os.urandom(16).hex()


def span_id() -> str:
    return os.urandom(8).hex()


def parse_traceparent(header: str | None) -> tuple[str, str] | None:
    """``(trace_id, parent_span_id)`` from a W3C ``traceparent`` header, or None if invalid."""
    if not header:
        return None
    m = _TRACEPARENT.match(header.strip().lower())
    if not m or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
        return None
    return m.group(2), m.group(3)
