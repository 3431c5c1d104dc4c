"""A real kernel with its HTTP API on 127.0.0.1 (a free port), on a fake clock.

``serve()`` starts one (``api`` is the fixture for the default config) and gives an ``Api``:
the harness (kernel, clock, recording action ``rec``), the base URL and ``call()``, a small JSON
client that behaves as a well-behaved local client does: it sends ``Content-Type:
application/json`` with a body and the bearer token the kernel wrote to its data dir (a fresh
temporary directory per kernel). ``exec`` and ``python`` keep their payload schemas but run
nothing here, so no request (fuzzed ones included) can start a program.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kernel.api.security import TOKEN_FILE
from kernel.api.server import Metrics, api_service
from kernel.app import KernelParts
from kernel.clock import settle
from kernel.hookspecs import RunContext
from kernel.store.base import Store

from ..harness import Harness, make_harness

T0 = 1_767_225_600.0  # FakeClock's default wall time: 2026-01-01T00:00:00Z
T0_ISO = "2026-01-01T00:00:00+00:00"

CONFIG = """
[server]
host = "127.0.0.1"
port = 0
max_body_bytes = 262144
[scheduler]
max_concurrency = 2
queue_depth = 4
[[tasks]]
id = "tick"
schedule = "@every 60s"
action = "rec"
description = "every minute"
[[tasks]]
id = "after_tick"
after = ["tick"]
action = "rec"
"""


@dataclasses.dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def error(self) -> dict[str, Any]:
        assert isinstance(self.body, dict) and "error" in self.body, self
        err: dict[str, Any] = self.body["error"]
        return err


_NO_BODY = object()


@dataclasses.dataclass
class Api:
    h: Harness
    url: str
    http: aiohttp.ClientSession
    data_dir: Path
    token: str | None  # what the kernel wrote to <data_dir>/api.token, if it did

    @property
    def kernel(self) -> Any:
        return self.h.kernel

    async def call(self, method: str, path: str, body: Any = _NO_BODY, *,
                   data: bytes | None = None, headers: dict[str, str] | None = None,
                   params: dict[str, str] | None = None, auth: bool = True) -> Reply:
        """``headers`` are added to (and replace) the defaults; ``auth=False`` sends no token."""
        if body is not _NO_BODY:
            data = json.dumps(body).encode()
        sent: dict[str, str] = {}
        if data is not None:
            sent["Content-Type"] = "application/json"
        if auth and self.token is not None:
            sent["Authorization"] = f"Bearer {self.token}"
        sent.update(headers or {})
        async with self.http.request(method, self.url + path, data=data, headers=sent,
                                     params=params) as resp:
            raw = await resp.read()
            try:
                parsed: Any = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode("utf-8", "replace")
            return Reply(resp.status, parsed, resp.headers)

    async def idle(self) -> None:
        await self.h.idle()

    async def advance(self, seconds: float) -> None:
        await self.h.advance(seconds)


async def _noop(ctx: RunContext, payload: Any) -> str:
    return "not run in tests"


def make_safe(h: Harness) -> None:
    """``exec`` and ``python`` keep their payload types but do nothing."""
    actions = h.kernel.plugins.actions
    for name in ("exec", "python"):
        actions[name] = dataclasses.replace(actions[name], run=_noop)


async def wait_bound(h: Harness) -> str:
    """Wait (for real I/O, not a timer) until the API is listening; surface a start failure."""
    assert h.task is not None
    async with asyncio.timeout(10):
        while h.kernel.api_url is None:
            if h.task.done():
                h.task.result()
                raise AssertionError("the kernel stopped before the API was bound")
            await asyncio.sleep(0.001)
    return str(h.kernel.api_url)


@asynccontextmanager
async def serve(text: str = CONFIG, *, store: Store | None = None,
                metrics: Metrics | None = None, require_token: bool | None = None,
                configure: Callable[[Harness], None] | None = None) -> AsyncIterator[Api]:
    service = partial(api_service, metrics=metrics, require_token=require_token)
    h = make_harness(text, store=store, parts=KernelParts(services=[service]))
    make_safe(h)
    with tempfile.TemporaryDirectory(prefix="kernel-api-") as tmp:
        data_dir = Path(tmp) / "data"
        if not h.kernel.config.kernel.data_dir:
            h.kernel.config.kernel.data_dir = str(data_dir)
        data_dir = h.kernel.config.data_dir()
        if configure is not None:
            configure(h)
        await h.start()
        try:
            url = await wait_bound(h)
            token_file = data_dir / TOKEN_FILE
            token = token_file.read_text().strip() if token_file.exists() else None
            async with aiohttp.ClientSession() as http:
                yield Api(h, url, http, data_dir, token)
        finally:
            h.rec.release.set()
            if h.task is not None and not h.task.done():
                await h.stop()
            await settle()


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serve() as a:
        yield a
