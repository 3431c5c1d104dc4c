"""Typed settings (``[plugins.inference]``) and the payloads of the three actions.

Everything is decoded once, at the boundary: the kernel converts a task's payload into one of the
payload Structs before the action runs, and ``Settings.load`` converts the config table when the
plugin registers. A payload field left out (``None``) falls back to the plugin setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from kernel.settings import check_tz, duration, load_settings

from .client import DEFAULT_SSE_MAX_LINE

DEFAULT_BASE_URL = "http://localhost:8000/v1"


def _seconds(name: str, value: float | str | None) -> float | None:
    return None if value is None else duration(name, value)


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[plugins.inference]``: the defaults every payload may override."""

    base_url: str = DEFAULT_BASE_URL
    model: str = ""                   # "" = the first model the server lists at /models
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of an environment variable, never the key
    timeout: float | str = 120.0      # one HTTP request, seconds or "2m"
    connect_timeout: float | str = 10.0
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    health_check: bool = True         # GET {base_url}/models (or /health) once per endpoint
    endpoint_concurrency: int = 4     # requests in flight per base_url, across all runs
    batch_concurrency: int = 4        # workers of one inference.batch run
    sse_max_line_bytes: int = DEFAULT_SSE_MAX_LINE  # longest line of a streamed answer (8 MiB)
    base_dir: str = ""                # relative paths are taken from here ("" = working dir)
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    extra_body: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.timeout = _seconds("timeout", self.timeout) or 120.0
        self.connect_timeout = _seconds("connect_timeout", self.connect_timeout) or 10.0
        if self.endpoint_concurrency < 1:
            raise ValueError("endpoint_concurrency: must be at least 1")
        if self.batch_concurrency < 1:
            raise ValueError("batch_concurrency: must be at least 1")
        if self.sse_max_line_bytes < 1024:
            raise ValueError("sse_max_line_bytes: must be at least 1024 (bytes in one line of "
                             f"a streamed answer; the default is {DEFAULT_SSE_MAX_LINE})")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url: must start with http:// or https://")

    @classmethod
    def load(cls, table: Mapping[str, Any]) -> Settings:
        return load_settings(cls, table, "[plugins.inference]")


class FileRef(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A file read at run time into a template variable.

    ``field`` reads a JSONL file (e.g. the preprocess output) and joins that field of every
    record with ``joiner``; ``max_chars`` keeps the first characters and marks the cut.
    """

    path: str
    field: str | None = None
    joiner: str = "\n"
    max_chars: int | None = None


class Message(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: str
    content: str


class _Endpoint(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    timeout: float | str | None = None
    health_check: bool | None = None
    vars: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    files: dict[str, str | FileRef] = msgspec.field(default_factory=dict)
    tz: str = "UTC"                   # zone of the {date} and {yesterday} variables
    output: str | None = None

    def __post_init__(self) -> None:
        self.timeout = _seconds("timeout", self.timeout)
        check_tz(self.tz)
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url: must start with http:// or https://")


class _Generate(_Endpoint):
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    extra_body: dict[str, Any] = msgspec.field(default_factory=dict)
    stream: bool | None = None


class ChatPayload(_Generate):
    """``inference.chat``: a ``prompt`` (with optional ``system``) or a ``messages`` list.

    Every text is a template (``kernel.templates``): ``{name}`` takes ``vars``/``files``/built-in
    variables, ``{date:%Y%m%d}`` formats a date, ``{file:path}`` is a whole file, ``{{name}}``
    is a literal ``{name}``.
    """

    prompt: str | None = None
    system: str | None = None
    messages: list[Message] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.prompt is None) == (not self.messages):
            raise ValueError("give either `prompt` (and optionally `system`) or `messages`")


class EmbedPayload(_Endpoint):
    """``inference.embed``: one text or a list; each is a template like the chat prompt."""

    input: str | list[str]
    dimensions: int | None = None
    extra_body: dict[str, Any] = msgspec.field(default_factory=dict)


class BatchPayload(_Generate):
    """``inference.batch``: a JSONL file of requests in, a JSONL file of answers out.

    Each input line is ``{"id": ..., "prompt": ...}`` or ``{"id": ..., "messages": [...]}``;
    with ``template``, any record (e.g. preprocess output ``{"id", "text", ...}``) is rendered
    through it, its fields being the variables. ``endpoint = "embeddings"`` embeds instead.
    """

    input: str = ""
    output: str = ""  # required here (checked below)
    template: str | None = None
    system: str | None = None
    endpoint: Literal["chat", "embeddings"] = "chat"
    concurrency: int | None = None
    checkpoint: str | None = None     # default: <output>.partial
    on_item_error: Literal["record", "fail"] = "record"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.input:
            raise ValueError("input: name the JSONL file of requests")
        if not self.output:
            raise ValueError("output: name the JSONL file to write the answers to")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency: must be at least 1")


def seconds(value: float | str | None, default: float) -> float:
    """A duration field after decoding (``__post_init__`` made it a float)."""
    return default if value is None else float(value)
