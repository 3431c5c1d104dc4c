"""A FAKE of a remote OpenAI-compatible model server, for tests only.

It is a real aiohttp HTTP server on 127.0.0.1 (a free port), so the inference plugin is tested
through real sockets, real headers and real SSE framing; only the "model" is fake: it answers
``reply(body)`` (by default ``"echo: <last user message>"``). It records every request (method,
path, headers, JSON body) in ``requests`` so tests check what the plugin actually sent.

Routes: ``GET /v1/models``, ``GET /health``, ``POST /v1/chat/completions`` (plain JSON, or SSE
chunks ending in ``data: [DONE]`` when the body says ``stream: true``), ``POST /v1/embeddings``.

Error modes, consumed one per chat/embeddings request from ``errors`` (a list of names):
``"401"``, ``"404"`` (model not found), ``"429"`` (with ``Retry-After: retry_after``),
``"503"``, ``"500"``, ``"context"`` (400 ``context_length_exceeded``), ``"hang"`` (never answers
until the server closes: the client's timeout fires), ``"stream_error"`` (an SSE error event),
``"not_json"`` (200 with an HTML body).
``fail_after = N`` makes every chat/embeddings request after the first N successful ones answer
503 (a server that falls over half-way through a batch); ``hang_after = N`` makes them hang
instead. ``hold``, when set to an ``asyncio.Event``, keeps every chat request waiting until it
is set; ``in_flight``/``max_in_flight`` count concurrent chat requests. ``api_key`` set: requests without
``Authorization: Bearer <api_key>`` get 401. ``models_error = (status, message, code)`` makes
``GET /v1/models`` answer that error (e.g. LiteLLM's 400 ``no_db_connection`` for a key it does
not know when it has no database). Each request records ``peer``, the client's ``(host, port)``:
requests over one kept-alive connection share it. ``sse_line_bytes = N`` makes a streamed reply
carry its whole text in ONE ``data:`` line of exactly N bytes (the text is padded with ``x``),
as a server that does not stream incrementally would, to test the client's line limit.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    peer: tuple[str, int] | None = None


def default_reply(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return f"echo: {users[-1] if users else ''}"


@dataclass
class FakeOpenAI:
    models: tuple[str, ...] = ("fake-model",)
    api_key: str | None = None
    reply: Callable[[dict[str, Any]], str] = default_reply
    errors: list[str] = field(default_factory=list)
    fail_after: int | None = None
    hang_after: int | None = None
    hold: asyncio.Event | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    retry_after: str = "7"
    has_models_route: bool = True
    models_error: tuple[int, str, str] | None = None
    sse_line_bytes: int | None = None
    requests: list[Recorded] = field(default_factory=list)
    answered: int = 0
    base_url: str = ""
    _runner: web.AppRunner | None = None
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}/v1"
        return self.base_url

    async def close(self) -> None:
        self._closing.set()
        if self.hold is not None:
            self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---------------------------------------------------------------- helpers for tests
    def posts(self, path: str = "/v1/chat/completions") -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == path]

    def gets(self, path: str = "/v1/models") -> list[Recorded]:
        return [r for r in self.requests if r.method == "GET" and r.path == path]

    # ---------------------------------------------------------------- handlers
    async def _record(self, request: web.Request) -> Recorded:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = (str(peername[0]), int(peername[1])) if peername else None
        rec = Recorded(request.method, request.path, dict(request.headers), body, peer)
        self.requests.append(rec)
        return rec

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        return None

    async def _models(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        if not self.has_models_route:
            return _error(404, "Not Found", "not_found")
        if (denied := self._unauthorized(request)) is not None:
            return denied
        if self.models_error is not None:
            return _error(*self.models_error)
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "fake"} for m in self.models]})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return web.Response(text="")

    async def _error_mode(self, request: web.Request, body: Any) -> web.StreamResponse | None:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        if isinstance(body, dict) and body.get("model") not in self.models:
            return _error(404, f"The model `{body.get('model')}` does not exist.",
                          "model_not_found")
        if self.fail_after is not None and self.answered >= self.fail_after:
            return _error(503, "server is shutting down", "unavailable")
        if self.hang_after is not None and self.answered >= self.hang_after:
            await self._closing.wait()
            return _error(503, "closing", "closing")
        mode = self.errors.pop(0) if self.errors else None
        if mode is None:
            return None
        if mode == "401":
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        if mode == "404":
            return _error(404, "The model `x` does not exist.", "model_not_found")
        if mode == "429":
            return _error(429, "Rate limit reached", "rate_limit_exceeded",
                          headers={"Retry-After": self.retry_after})
        if mode == "503":
            return _error(503, "The server is overloaded", "overloaded")
        if mode == "500":
            return _error(500, "internal error", "server_error")
        if mode == "context":
            return _error(400, "This model's maximum context length is 4096 tokens. However, "
                          "your messages resulted in 9000 tokens.", "context_length_exceeded")
        if mode == "hang":
            await self._closing.wait()
            return _error(503, "closing", "closing")
        if mode == "not_json":
            return web.Response(status=200, text="<html>502 proxy says hello</html>",
                                content_type="text/html")
        if mode == "stream_error":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"error": {"message": "engine overloaded", '
                             b'"code": "overloaded"}}\n\n')
            await resp.write_eof()
            return resp
        raise AssertionError(f"unknown error mode {mode!r}")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._chat_inner(request)
        finally:
            self.in_flight -= 1

    async def _chat_inner(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request)
        body = rec.body
        if self.hold is not None:
            await self.hold.wait()
        if (resp := await self._error_mode(request, body)) is not None:
            return resp
        text = self.reply(body)
        self.answered += 1
        model = body["model"]
        usage = {"prompt_tokens": 10, "completion_tokens": len(text.split()),
                 "total_tokens": 10 + len(text.split())}
        if not body.get("stream"):
            return web.json_response({
                "id": f"chatcmpl-{self.answered}", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if self.sse_line_bytes is not None:
            await resp.write(_one_line_event(model, text, self.sse_line_bytes))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        words = text.split(" ")
        chunks = [{"role": "assistant"}] + [
            {"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
        for i, delta in enumerate(chunks):
            event = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            if i == 1:
                await resp.write(b": keep-alive\n\n")  # an SSE comment, to be skipped
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        last = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
        await resp.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request)
        body = rec.body
        if (resp := await self._error_mode(request, body)) is not None:
            return resp
        self.answered += 1
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i,
                 "embedding": [float(len(t)), float(len(t.split())), float(i)]}
                for i, t in enumerate(inputs)]
        return web.json_response({"object": "list", "model": body["model"], "data": data[::-1],
                                  "usage": {"prompt_tokens": 1, "total_tokens": 1}})


def _one_line_event(model: str, text: str, size: int) -> bytes:
    """One ``data:`` line of exactly ``size`` bytes (newline excluded) carrying ``text`` padded
    with ``x`` up to the size, then the blank line that ends the event."""
    def line(content: str) -> bytes:
        event = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": model,
                 "choices": [{"index": 0, "delta": {"content": content},
                              "finish_reason": "stop"}]}
        return f"data: {json.dumps(event)}".encode()

    pad = size - len(line(text))
    if pad < 0:
        raise ValueError(f"sse_line_bytes {size} is shorter than the event itself")
    out = line(text + "x" * pad)
    assert len(out) == size
    return out + b"\n\n"


def _error(status: int, message: str, code: str,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "error", "code": code}},
                             status=status, headers=headers)
