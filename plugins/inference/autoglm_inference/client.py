"""An OpenAI-compatible HTTP client: chat completions (plain or SSE), embeddings, health.

Every failure leaves this module as an :class:`~kernel.errors.ActionError` with a catalogue
code, translated here at the boundary (``map_status`` and ``_transport_errors``):

==================================================  =========================  =========
what happened                                       code                       retryable
==================================================  =========================  =========
connection refused or reset, DNS, any timeout       ERR_CONN_TIMEOUT           yes
HTTP 401 / 403                                      ERR_AUTH_FAILED            no
other 4xx to the health check ``GET /models``       ERR_AUTH_FAILED            no
HTTP 404, or an error saying the model is unknown   ERR_MODEL_NOT_FOUND        no
HTTP 429 / 503 (``Retry-After`` honoured)           ERR_OVERLOADED             yes
HTTP 400/413/422 saying the context is too long     ERR_CONTEXT_TOO_LONG       no
other 4xx                                           ERR_BAD_PAYLOAD            no
HTTP 502 / 504                                      ERR_CONN_TIMEOUT           yes
other 5xx                                           ERR_ACTION_FAILED          yes
a reply that is not the expected JSON               ERR_BAD_RESPONSE           yes
an SSE line longer than ``sse_max_line_bytes``      ERR_BAD_RESPONSE           no
==================================================  =========================  =========

Streamed answers (SSE) are split into lines here, not by aiohttp's ``readline``: that one gives
up at twice the session's ``read_bufsize`` (128 KiB by default) with ``LineTooLong``, which is no
``ClientError`` and escaped uncoded. A server that does not stream incrementally sends the whole
completion in one ``data:`` line, so the limit is the endpoint's ``sse_max_line_bytes`` (8 MiB by
default): a line up to it is read whole, a longer one is ERR_BAD_RESPONSE naming the endpoint and
the limit, and is not retried (the same request would get the same line). Each request in flight
holds at most one such line in memory.

The health check is a ``GET`` without a body: the only things of the user's in it are the
endpoint and the API key, so a 4xx there (other than 404, 429) cannot be the payload's fault.
LiteLLM's proxy, for one, answers ``400 {"error": {"message": "No connected db.", "type":
"no_db_connection"}}`` to a key that is not its master key when it has no database; that is
reported as ERR_AUTH_FAILED (not retried: a retry with the same key gets the same answer) with
the endpoint, the status and the server's message, wherever it comes from.

The API key is sent in the ``Authorization`` header only; it is never logged nor put in an
error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from kernel.errors import ActionError, ErrorCode, Retry

_BODY_MAX = 500
DEFAULT_SSE_MAX_LINE = 8 * 1024 * 1024  # bytes in one SSE line (one streamed event)


class Overloaded(Retry):
    """429/503 with a ``Retry-After``: run again after ``delay`` seconds (ERR_OVERLOADED)."""

    def __init__(self, delay: float, message: str) -> None:
        super().__init__(delay, message)
        self.code = ErrorCode.ERR_OVERLOADED


@dataclass(frozen=True, slots=True)
class Endpoint:
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 120.0
    connect_timeout: float = 10.0
    headers: Mapping[str, str] = field(default_factory=dict)
    sse_max_line: int = DEFAULT_SSE_MAX_LINE

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    def origin_url(self, path: str) -> str:
        """``path`` at the server root (``/health`` lives there on vLLM and TGI)."""
        parts = urlsplit(self.base_url)
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


@dataclass(frozen=True, slots=True)
class ChatResult:
    text: str
    finish_reason: str | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None


def make_session(ep: Endpoint, *, connections: int = 8) -> aiohttp.ClientSession:
    """A session for one endpoint; each request still carries its own endpoint's timeout."""
    return aiohttp.ClientSession(
        timeout=request_timeout(ep), connector=aiohttp.TCPConnector(limit=connections))


def request_timeout(ep: Endpoint) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=ep.timeout, sock_connect=ep.connect_timeout)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds, or an HTTP date measured
    against the response's own ``Date`` header (so no local clock is read)."""
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        now = email.utils.parsedate_to_datetime(headers.get("Date", ""))
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, (when - now).total_seconds())


def _error_fields(text: str) -> tuple[str, str]:
    """``(message, code)`` from an OpenAI-style ``{"error": {...}}`` body, or the raw text."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:_BODY_MAX], ""
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        msg = err.get("message") or err.get("detail") or json.dumps(err)
        code = err.get("code") or err.get("type") or ""
        return str(msg)[:_BODY_MAX], str(code)
    if isinstance(err, str):
        return err[:_BODY_MAX], ""
    return text.strip()[:_BODY_MAX], ""


def _is_context_error(message: str, code: str) -> bool:
    m = message.lower()
    return (code == "context_length_exceeded" or "context length" in m
            or "context_length" in m or "maximum context" in m or "too many tokens" in m
            or "prompt is too long" in m)


def _is_auth_error(message: str, code: str) -> bool:
    """LiteLLM's answer (HTTP 400) to an unknown key when the proxy has no database."""
    return code == "no_db_connection" or "no connected db" in message.lower()


def _is_model_error(message: str, code: str) -> bool:
    m = message.lower()
    return code in ("model_not_found", "NotFoundError") or (
        "model" in m and ("does not exist" in m or "not found" in m))


def map_status(status: int, text: str, headers: Mapping[str, str], where: str) -> ActionError:
    """The ActionError for an HTTP error answer (see the module's table)."""
    message, code = _error_fields(text)
    what = f"{where}: HTTP {status}" + (f": {message}" if message else "")
    if status in (401, 403) or _is_auth_error(message, code):
        return ActionError(f"{what} (set the environment variable named by `api_key_env`)",
                           code=ErrorCode.ERR_AUTH_FAILED, retryable=False)
    if status == 404 or _is_model_error(message, code):
        return ActionError(what, code=ErrorCode.ERR_MODEL_NOT_FOUND, retryable=False)
    if status in (429, 503):
        delay = retry_after(headers)
        if delay is not None:
            return Overloaded(delay, f"{what} (retry after {delay:g} s)")
        return ActionError(what, code=ErrorCode.ERR_OVERLOADED, retryable=True)
    if status in (400, 413, 422) and _is_context_error(message, code):
        return ActionError(what, code=ErrorCode.ERR_CONTEXT_TOO_LONG, retryable=False)
    if status in (502, 504):
        return ActionError(what, code=ErrorCode.ERR_CONN_TIMEOUT, retryable=True)
    if status >= 500:
        return ActionError(what, code=ErrorCode.ERR_ACTION_FAILED, retryable=True)
    return ActionError(what, code=ErrorCode.ERR_BAD_PAYLOAD, retryable=False)


def map_health_status(status: int, text: str, headers: Mapping[str, str],
                      where: str) -> ActionError:
    """The ActionError for an error answer to the health check, which carries no payload: a
    4xx other than 404/429 is the server refusing the endpoint or the key (see the module)."""
    if status in (404, 429) or not 400 <= status < 500:
        return map_status(status, text, headers, where)
    message, _ = _error_fields(text)
    what = f"{where}: HTTP {status}" + (f": {message}" if message else "")
    return ActionError(
        f"{what} (the server refused a request that carries no payload, only the endpoint and "
        "the API key: check the key in the variable named by `api_key_env` (a LiteLLM proxy "
        "without a database accepts only its master key), or set health_check = false)",
        code=ErrorCode.ERR_AUTH_FAILED, retryable=False)


@contextlib.asynccontextmanager
async def _transport_errors(where: str) -> AsyncIterator[None]:
    try:
        yield
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer in time ({type(exc).__name__})"
        raise ActionError(f"{where}: {reason}", code=ErrorCode.ERR_CONN_TIMEOUT,
                          retryable=True) from None
    except aiohttp.ClientError as exc:
        raise ActionError(f"{where}: {type(exc).__name__}: {exc}",
                          code=ErrorCode.ERR_ACTION_FAILED, retryable=True) from None


def _bad_reply(where: str, detail: str) -> ActionError:
    return ActionError(f"{where}: unexpected reply: {detail}", code=ErrorCode.ERR_BAD_RESPONSE,
                       retryable=True)


def _line_too_long(where: str, limit: int) -> ActionError:
    return ActionError(
        f"{where}: the streamed answer (SSE) has a line longer than {limit} bytes, the limit "
        "set by `sse_max_line_bytes` in [plugins.inference]: raise it, or set stream = false",
        code=ErrorCode.ERR_BAD_RESPONSE, retryable=False)


async def sse_lines(content: aiohttp.StreamReader, limit: int,
                    where: str) -> AsyncIterator[bytes]:
    """The lines of an SSE body without their ``\n``, each at most ``limit`` bytes; a longer
    one raises ERR_BAD_RESPONSE as soon as the limit is passed (not when the line ends)."""
    buf = bytearray()
    async for chunk in content.iter_any():
        start = 0
        while (nl := chunk.find(b"\n", start)) != -1:
            if len(buf) + nl - start > limit:
                raise _line_too_long(where, limit)
            if buf:
                buf += chunk[start:nl]
                yield bytes(buf)
                buf.clear()
            else:
                yield chunk[start:nl]
            start = nl + 1
        if len(buf) + len(chunk) - start > limit:
            raise _line_too_long(where, limit)
        buf += chunk[start:]
    if buf:
        yield bytes(buf)


class OpenAIClient:
    """Calls one endpoint through ``session``; ``gate`` bounds requests in flight to it."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: Endpoint, *,
                 traceparent: str | None = None,
                 gate: asyncio.Semaphore | None = None) -> None:
        self.session = session
        self.endpoint = endpoint
        self.traceparent = traceparent
        self.gate = gate or asyncio.Semaphore(64)
        self.timeout = request_timeout(endpoint)  # the session may be shared by endpoints' runs

    def headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", **self.endpoint.headers}
        if self.endpoint.api_key:
            h["Authorization"] = f"Bearer {self.endpoint.api_key}"
        if self.traceparent:
            h["traceparent"] = self.traceparent
        return h

    async def _get(self, url: str, where: str) -> tuple[int, str, dict[str, str]]:
        async with self.gate, _transport_errors(where), self.session.get(
                url, headers=self.headers(), timeout=self.timeout) as resp:
            return resp.status, await resp.text(errors="replace"), dict(resp.headers)

    async def health(self) -> list[str] | None:
        """The served model ids from ``GET {base_url}/models``; ``None`` when the server has
        no model list but answers ``GET /health``. Raises the mapped error otherwise."""
        url = self.endpoint.url("/models")
        where = f"health check GET {url}"
        status, text, headers = await self._get(url, where)
        if status < 400:
            try:
                body = json.loads(text) if text.strip() else None
            except json.JSONDecodeError:
                body = None
            data = body.get("data") if isinstance(body, dict) else None
            if isinstance(data, list):
                return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]
            return None
        if status != 404:
            raise map_health_status(status, text, headers, where)
        url = self.endpoint.origin_url("/health")
        where = f"health check GET {url}"
        status, text, headers = await self._get(url, where)
        if status >= 400:
            raise map_status(status, text, headers, where)
        return None

    async def chat(self, body: dict[str, Any]) -> ChatResult:
        """POST /chat/completions; with ``body["stream"]`` the SSE chunks are assembled."""
        url = self.endpoint.url("/chat/completions")
        where = f"POST {url}"
        stream = bool(body.get("stream"))
        async with self.gate, _transport_errors(where), self.session.post(
                url, json=body, headers=self.headers(), timeout=self.timeout) as resp:
            if resp.status >= 400:
                raise map_status(resp.status, await resp.text(errors="replace"),
                                 resp.headers, where)
            if stream:
                return await _read_sse(resp, where, self.endpoint.sse_max_line)
            try:
                obj = await resp.json(content_type=None)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _bad_reply(where, f"not JSON ({exc})") from None
        return _chat_result(obj, where)

    async def embed(self, body: dict[str, Any]) -> list[list[float]]:
        url = self.endpoint.url("/embeddings")
        where = f"POST {url}"
        async with self.gate, _transport_errors(where), self.session.post(
                url, json=body, headers=self.headers(), timeout=self.timeout) as resp:
            if resp.status >= 400:
                raise map_status(resp.status, await resp.text(errors="replace"),
                                 resp.headers, where)
            try:
                obj = await resp.json(content_type=None)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _bad_reply(where, f"not JSON ({exc})") from None
        try:
            data = sorted(obj["data"], key=lambda d: d.get("index", 0))
            return [[float(x) for x in d["embedding"]] for d in data]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _bad_reply(where, f"no embeddings in the answer ({exc!r})") from None


def _chat_result(obj: Any, where: str) -> ChatResult:
    if isinstance(obj, dict) and "error" in obj:
        message, code = _error_fields(json.dumps(obj))
        raise map_status(400 if _is_context_error(message, code) else 500, json.dumps(obj),
                         {}, where)
    try:
        choice = obj["choices"][0]
        content = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise _bad_reply(where, f"no choices[0].message ({exc!r})") from None
    return ChatResult(text=content, finish_reason=choice.get("finish_reason"),
                      model=obj.get("model"), usage=obj.get("usage"))


async def _read_sse(resp: aiohttp.ClientResponse, where: str, limit: int) -> ChatResult:
    """Assemble ``choices[0].delta.content`` from ``data:`` lines until ``data: [DONE]``."""
    parts: list[str] = []
    finish: str | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None
    done = False
    async for raw in sse_lines(resp.content, limit, where):
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments (":"), event/id fields
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            raise _bad_reply(where, f"an SSE event is not JSON: {data[:80]!r}") from None
        if isinstance(obj, dict) and "error" in obj:
            message, code = _error_fields(data)
            status = 400 if _is_context_error(message, code) else 503
            raise map_status(status, data, {}, f"{where} (stream)")
        model = obj.get("model", model)
        usage = obj.get("usage") or usage
        for choice in obj.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                parts.append(delta["content"])
            finish = choice.get("finish_reason") or finish
    if not done and finish is None:
        raise ActionError(f"{where}: the stream ended before [DONE]",
                          code=ErrorCode.ERR_CONN_TIMEOUT, retryable=True)
    return ChatResult(text="".join(parts), finish_reason=finish, model=model, usage=usage)
