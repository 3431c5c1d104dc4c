"""The inference plugin: ``inference.chat``, ``inference.embed`` and ``inference.batch``.

Registered through the kernel's ``register_actions`` hook from the entry point
``inference = "autoglm_inference.plugin"``. Settings come from ``[plugins.inference]``; each
payload may override them. The API key is read from the environment variable named by
``api_key_env`` when a run starts, so it is never in the config, the payload or the logs.

Resources live as long as the kernel (the ``register_lifespan`` hook): one aiohttp session per
endpoint (``base_url``), opened at its first use and closed when the kernel stops, and the
answer of the health check, ``GET /models``, asked once per endpoint and asked again only when
a run names a model that is not in the remembered list (or after a failed check). Outside the
lifespan (a script, a test calling the plugin directly) each run has its own session.
The ``inference models`` CLI command lists what an endpoint serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from kernel.errors import ActionError, ErrorCode
from kernel.files import atomic_write
from kernel.hookspecs import Action, Command, Lifespan, PluginContext, RunContext, hookimpl
from kernel.settings import SettingsError, plugin_settings
from kernel.templates import text

from . import batch as batch_mod
from .client import ChatResult, Endpoint, OpenAIClient, make_session
from .settings import (
    BatchPayload,
    ChatPayload,
    EmbedPayload,
    FileRef,
    Settings,
    _Endpoint,
    _Generate,
    seconds,
)
from .templates import TemplateError, read_file, render, resolve, time_variables


class InferencePlugin:
    """The actions, bound to one set of settings, one gate and (within :meth:`lifespan`) one
    session per endpoint, and the remembered health check of each endpoint."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._gates: dict[str, asyncio.Semaphore] = {}
        self._sessions: dict[str, aiohttp.ClientSession] | None = None  # None: no lifespan
        self._served: dict[str, list[str] | None] = {}  # base_url -> models listed (None: none)
        self._checking: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ lifespan
    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Held open by the kernel while it runs: sessions opened inside are shared by every
        run to their endpoint and closed on the way out."""
        self._sessions = {}
        try:
            yield
        finally:
            sessions, self._sessions = self._sessions, None
            for session in sessions.values():
                await session.close()

    def sessions(self) -> list[aiohttp.ClientSession]:
        return list((self._sessions or {}).values())

    @contextlib.asynccontextmanager
    async def session(self, ep: Endpoint) -> AsyncIterator[aiohttp.ClientSession]:
        """The endpoint's shared session within the lifespan; a session for this run only
        outside it."""
        if self._sessions is None:
            async with make_session(ep, connections=self.settings.endpoint_concurrency) as own:
                yield own
            return
        session = self._sessions.get(ep.base_url)
        if session is None or session.closed:
            session = make_session(ep, connections=self.settings.endpoint_concurrency)
            self._sessions[ep.base_url] = session
        yield session

    async def served_models(self, client: OpenAIClient, *,
                            refresh: bool = False) -> list[str] | None:
        """The endpoint's model list from its health check, asked once per endpoint (or again
        with ``refresh``); a failed check raises and is not remembered."""
        base = client.endpoint.base_url
        if not refresh and base in self._served:
            return self._served[base]
        lock = self._checking.setdefault(base, asyncio.Lock())
        async with lock:
            if not refresh and base in self._served:
                return self._served[base]
            served = await client.health()
            self._served[base] = served
            return served

    # ------------------------------------------------------------------ plumbing
    def base_url(self, p: _Endpoint) -> str:
        return (p.base_url or self.settings.base_url).rstrip("/")

    def concurrency_key(self, p: Any) -> str | None:
        """The endpoint, so ``[scheduler] concurrency_limits`` can cap runs per server."""
        return self.base_url(p) if isinstance(p, _Endpoint) else self.settings.base_url

    def gate(self, base_url: str) -> asyncio.Semaphore:
        g = self._gates.get(base_url)
        if g is None:
            g = self._gates[base_url] = asyncio.Semaphore(self.settings.endpoint_concurrency)
        return g

    def endpoint(self, p: _Endpoint) -> Endpoint:
        s = self.settings
        env = p.api_key_env if p.api_key_env is not None else s.api_key_env
        return Endpoint(
            base_url=self.base_url(p),
            api_key=os.environ.get(env) if env else None,
            timeout=seconds(p.timeout, seconds(s.timeout, 120.0)),
            connect_timeout=seconds(s.connect_timeout, 10.0),
            headers=dict(s.headers),
            sse_max_line=s.sse_max_line_bytes)

    def client(self, session: aiohttp.ClientSession, ep: Endpoint,
               ctx: RunContext) -> OpenAIClient:
        return OpenAIClient(session, ep, traceparent=ctx.traceparent,
                            gate=self.gate(ep.base_url))

    def path(self, path: str) -> Path:
        return resolve(path, self.settings.base_dir)

    async def pick_model(self, client: OpenAIClient, p: _Endpoint) -> str:
        model = p.model or self.settings.model
        check = p.health_check if p.health_check is not None else self.settings.health_check
        served: list[str] | None = None
        if check:
            remembered = client.endpoint.base_url in self._served
            served = await self.served_models(client)
            if remembered and served is not None and model and model not in served:
                served = await self.served_models(client, refresh=True)  # loaded since?
        if served is not None:
            if model and model not in served:
                raise ActionError(
                    f"model {model!r} is not served by {client.endpoint.base_url} "
                    f"(served: {', '.join(served) or 'none'})",
                    code=ErrorCode.ERR_MODEL_NOT_FOUND, retryable=False)
            if not model:
                if not served:
                    raise ActionError(f"{client.endpoint.base_url}/models lists no model",
                                      code=ErrorCode.ERR_MODEL_NOT_FOUND, retryable=False)
                model = served[0]
        if not model:
            raise ActionError("no model: set `model` in [plugins.inference] or the payload "
                              "(or enable health_check to use the server's first model)",
                              code=ErrorCode.ERR_BAD_PAYLOAD)
        return model

    def variables(self, ctx: RunContext, p: _Endpoint) -> dict[str, str | dt.date]:
        """Built-in variables, then ``files`` (read now), then ``vars`` (sync: call in a
        thread)."""
        out: dict[str, str | dt.date] = {
            "task_id": ctx.task_id or "", "job_id": ctx.job_id, "trace_id": ctx.trace_id,
            **time_variables(ctx.scheduled_at, p.tz)}
        for name, spec in p.files.items():
            ref = spec if isinstance(spec, FileRef) else FileRef(path=spec)
            try:
                out[name] = read_file(self.path(ref.path), ref)
            except TemplateError as exc:
                raise TemplateError(f"files.{name}: {exc}") from None
        for name, value in p.vars.items():
            out[name] = text(value)
        return out

    def render(self, text: str, variables: dict[str, str | dt.date]) -> str:
        return render(text, variables, lambda path: read_file(self.path(path)))

    def params(self, p: _Generate) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {**s.extra_body}
        for key, value in (("max_tokens", p.max_tokens if p.max_tokens is not None
                            else s.max_tokens),
                           ("temperature", p.temperature if p.temperature is not None
                            else s.temperature),
                           ("top_p", p.top_p if p.top_p is not None else s.top_p),
                           ("stop", p.stop)):
            if value is not None:
                body[key] = value
        body.update(p.extra_body)
        body["stream"] = p.stream if p.stream is not None else s.stream
        return body

    # ------------------------------------------------------------------ inference.chat
    def _chat_messages(self, ctx: RunContext, p: ChatPayload) -> list[dict[str, str]]:
        try:
            variables = self.variables(ctx, p)
            if p.messages:
                return [{"role": m.role, "content": self.render(m.content, variables)}
                        for m in p.messages]
            assert p.prompt is not None
            msgs = []
            if p.system:
                msgs.append({"role": "system", "content": self.render(p.system, variables)})
            msgs.append({"role": "user", "content": self.render(p.prompt, variables)})
            return msgs
        except TemplateError as exc:
            raise ActionError(f"inference.chat: {exc}", code=ErrorCode.ERR_BAD_PAYLOAD) from None

    async def chat(self, ctx: RunContext, p: ChatPayload) -> str:
        messages = await asyncio.to_thread(self._chat_messages, ctx, p)
        ep = self.endpoint(p)
        async with self.session(ep) as session:
            client = self.client(session, ep, ctx)
            model = await self.pick_model(client, p)
            body = {"model": model, "messages": messages, **self.params(p)}
            result = await client.chat(body)
        _log_result(ctx, model, result)
        if p.output:
            await asyncio.to_thread(atomic_write, self.path(p.output), result.text.encode())
        return result.text

    # ------------------------------------------------------------------ inference.embed
    async def embed(self, ctx: RunContext, p: EmbedPayload) -> list[list[float]]:
        def texts() -> list[str]:
            variables = self.variables(ctx, p)
            items = [p.input] if isinstance(p.input, str) else p.input
            return [self.render(t, variables) for t in items]

        try:
            inputs = await asyncio.to_thread(texts)
        except TemplateError as exc:
            raise ActionError(f"inference.embed: {exc}", code=ErrorCode.ERR_BAD_PAYLOAD) from None
        ep = self.endpoint(p)
        async with self.session(ep) as session:
            client = self.client(session, ep, ctx)
            model = await self.pick_model(client, p)
            body: dict[str, Any] = {"model": model, "input": inputs, **p.extra_body}
            if p.dimensions is not None:
                body["dimensions"] = p.dimensions
            vectors = await client.embed(body)
        ctx.log.info("inference.embed: %d embedding(s) of dimension %d from %s",
                     len(vectors), len(vectors[0]) if vectors else 0, model)
        if p.output:
            data = msgspec.json.encode({"model": model, "embeddings": vectors})
            await asyncio.to_thread(atomic_write, self.path(p.output), data + b"\n")
        return vectors

    # ------------------------------------------------------------------ inference.batch
    def _batch_items(self, ctx: RunContext, p: BatchPayload,
                     model: str) -> list[batch_mod.Item]:
        src = self.path(p.input)
        batch_mod.ensure_distinct(src, self.path(p.output))
        records = batch_mod.read_records(src)
        try:
            shared = self.variables(ctx, p)
            system = self.render(p.system, shared) if p.system else None
        except TemplateError as exc:
            raise ActionError(f"inference.batch: {exc}", code=ErrorCode.ERR_BAD_PAYLOAD) from None
        params = self.params(p)

        def make_body(n: int, rec: dict[str, Any]) -> dict[str, Any]:
            where = f"{src}:{n}"
            if p.endpoint == "embeddings":
                text: Any = rec.get("input", rec.get("text"))
                if p.template is not None:
                    text = self._render_record(p.template, shared, rec, where)
                if not isinstance(text, str):
                    raise ActionError(f"{where}: needs `input` or `text` (or set `template`)",
                                      code=ErrorCode.ERR_BAD_PAYLOAD)
                return {"model": model, "input": [text], **p.extra_body}
            if isinstance(rec.get("messages"), list):
                messages = rec["messages"]
            else:
                prompt: Any = rec.get("prompt")
                if p.template is not None:
                    prompt = self._render_record(p.template, shared, rec, where)
                if not isinstance(prompt, str):
                    raise ActionError(f"{where}: needs `prompt` or `messages` (or set the "
                                      "payload's `template`)", code=ErrorCode.ERR_BAD_PAYLOAD)
                messages = [{"role": "user", "content": prompt}]
            if system is not None and not any(m.get("role") == "system" for m in messages
                                              if isinstance(m, dict)):
                messages = [{"role": "system", "content": system}, *messages]
            body = {"model": model, "messages": messages, **params}
            for key in ("max_tokens", "temperature", "top_p", "stop"):
                if key in rec:
                    body[key] = rec[key]
            return body

        return batch_mod.build_items(src, records, make_body)

    def _render_record(self, template: str, shared: dict[str, str | dt.date], rec: dict[str, Any],
                       where: str) -> str:
        fields = {k: v if isinstance(v, str) else msgspec.json.encode(v).decode()
                  for k, v in rec.items()}
        try:
            return self.render(template, {**shared, **fields})
        except TemplateError as exc:
            raise ActionError(f"{where}: {exc}", code=ErrorCode.ERR_BAD_PAYLOAD) from None

    async def batch(self, ctx: RunContext, p: BatchPayload) -> str:
        ep = self.endpoint(p)
        output = self.path(p.output)
        checkpoint = self.path(p.checkpoint) if p.checkpoint else \
            batch_mod.default_checkpoint(output)
        workers = p.concurrency or self.settings.batch_concurrency
        async with self.session(ep) as session:
            client = self.client(session, ep, ctx)
            model = await self.pick_model(client, p)
            items = await asyncio.to_thread(self._batch_items, ctx, p, model)

            async def call(it: batch_mod.Item) -> dict[str, Any]:
                if p.endpoint == "embeddings":
                    vectors = await client.embed(it.body)
                    return {"id": it.id, **it.carry, "embedding": vectors[0] if vectors else []}
                res = await client.chat(it.body)
                return {"id": it.id, **it.carry, "text": res.text,
                        "finish_reason": res.finish_reason, "usage": res.usage}

            report = await batch_mod.run_batch(
                items, call, output=output, checkpoint=checkpoint, concurrency=workers,
                on_item_error=p.on_item_error, log=ctx.log, progress=ctx.progress)
        ctx.log.info("inference.batch: %s", report)
        return str(report)


def _log_result(ctx: RunContext, model: str, r: ChatResult) -> None:
    tokens = (r.usage or {}).get("total_tokens")
    ctx.log.info("inference.chat: %s answered %d characters (finish_reason=%s, tokens=%s)",
                 model, len(r.text), r.finish_reason, tokens)


def _plugin(context: PluginContext) -> InferencePlugin:
    """One plugin object per load, shared by the hooks (actions and lifespan)."""
    return context.shared("inference", lambda: InferencePlugin(
        plugin_settings(context, "inference", Settings)))


@hookimpl
def register_lifespan(context: PluginContext) -> Lifespan | None:
    try:
        return _plugin(context).lifespan
    except SettingsError:
        return None  # reported once, by register_actions


async def _models_command(args: argparse.Namespace, context: PluginContext) -> int:
    settings = plugin_settings(context, "inference", Settings)
    if args.base_url:
        settings = msgspec.structs.replace(settings, base_url=args.base_url)
    plugin = InferencePlugin(settings)
    p = msgspec.convert({"prompt": ""}, ChatPayload)
    ep = plugin.endpoint(p)
    async with make_session(ep) as session:
        client = OpenAIClient(session, ep)
        served = await client.health()
    if served is None:
        print(f"{ep.base_url} is up but lists no models (it answers /health only)")
    else:
        for model in served:
            print(model)
    return 0


def _models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None,
                   help="the server to ask (default: [plugins.inference] base_url)")


@hookimpl
def register_commands() -> list[Command]:
    return [Command("models", _models_command,
                    "list the models an OpenAI-compatible server serves (GET /models), with "
                    "the key named by api_key_env", add_arguments=_models_arguments,
                    example="python -m kernel inference models --base-url "
                            "http://127.0.0.1:8000/v1")]


@hookimpl
def register_actions(context: PluginContext) -> list[Action]:
    plugin = _plugin(context)
    key = plugin.concurrency_key
    return [
        Action("inference.chat", plugin.chat,
               "Chat completion from an OpenAI-compatible server (templates, files, SSE).",
               ChatPayload, concurrency_key=key),
        Action("inference.embed", plugin.embed,
               "Embeddings of one text or a list from an OpenAI-compatible server.",
               EmbedPayload, concurrency_key=key),
        Action("inference.batch", plugin.batch,
               "A JSONL file of requests, answered with bounded concurrency; resumable.",
               BatchPayload, concurrency_key=key),
    ]
