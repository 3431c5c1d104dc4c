"""``[plugins.alerts]`` settings (rules, rate limit, email, webhook) and the ``alerts.send``
payload. Secrets are never here: only the *names* of the environment variables holding them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from kernel.settings import check_tz, duration, load_settings

Channel = Literal["email", "webhook"]
On = Literal["failure", "consecutive_failures", "recovery", "success"]


_seconds = duration


class Rule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Which runs alert, on what, and through which channels.

    ``tasks``: task ids or shell-style patterns (``"*"``, ``"nightly_*"``). ``on``:
    ``failure`` (every final failure or timeout; attempts that will be retried do not count),
    ``consecutive_failures`` (once, when a streak reaches ``consecutive``), ``recovery`` (the
    first success after a failure), ``success``. ``channels``: default every configured one.
    """

    tasks: list[str] = msgspec.field(default_factory=lambda: ["*"])
    on: list[On] = msgspec.field(default_factory=lambda: ["failure"])
    consecutive: int = 3
    channels: list[Channel] | None = None

    def __post_init__(self) -> None:
        if self.consecutive < 1:
            raise ValueError("consecutive: must be at least 1")
        if not self.on:
            raise ValueError("on: name at least one of failure, consecutive_failures, "
                             "recovery, success")


class RateLimit(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """At most ``max_messages`` per task per ``window``; the rest are counted and reported in
    one summary when the window has passed."""

    max_messages: int = 5
    window: float | str = "1h"

    def __post_init__(self) -> None:
        self.window = _seconds("window", self.window)
        if self.max_messages < 1:
            raise ValueError("max_messages: must be at least 1")


class EmailSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "localhost"
    port: int | None = None            # default: 25 (none), 587 (starttls), 465 (ssl)
    security: Literal["none", "starttls", "ssl"] = "starttls"
    ca_file: str = ""                  # PEM bundle to verify the server with ("" = system CAs)
    username: str = ""
    password_env: str = ""             # NAME of the variable holding the password
    from_addr: str = msgspec.field(default="", name="from")
    to: list[str] = msgspec.field(default_factory=list)
    timeout: float | str = 30.0

    def __post_init__(self) -> None:
        self.timeout = _seconds("timeout", self.timeout)
        if not self.from_addr:
            raise ValueError("from: the sender address is required, e.g. "
                             "from = \"kernel@example.org\"")
        if not self.to:
            raise ValueError("to: give at least one recipient address")
        if self.username and not self.password_env:
            raise ValueError("password_env: name the environment variable holding the "
                             "SMTP password (the password itself never goes in the config)")

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return {"none": 25, "starttls": 587, "ssl": 465}[self.security]


class WebhookSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str
    secret_env: str = ""               # NAME of the variable holding the HMAC secret
    signature_header: str = "X-Kernel-Signature"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    attempts: int = 4
    backoff: float | str = 1.0         # first delay; doubles each attempt
    max_backoff: float | str = 30.0
    timeout: float | str = 10.0

    def __post_init__(self) -> None:
        self.backoff = _seconds("backoff", self.backoff)
        self.max_backoff = _seconds("max_backoff", self.max_backoff)
        self.timeout = _seconds("timeout", self.timeout)
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url: must start with http:// or https://")
        if self.attempts < 1:
            raise ValueError("attempts: must be at least 1")


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    rules: list[Rule] = msgspec.field(default_factory=list)
    rate_limit: RateLimit = msgspec.field(default_factory=RateLimit)
    email: EmailSettings | None = None
    webhook: WebhookSettings | None = None
    subject_prefix: str = "[kernel] "
    base_dir: str = ""                 # relative {file:...} paths are taken from here
    queue_size: int = 1000             # alerts waiting to be sent; beyond it they are dropped

    def __post_init__(self) -> None:
        configured = set(self.channels())
        for i, rule in enumerate(self.rules):
            for ch in rule.channels or ():
                if ch not in configured:
                    raise ValueError(f"rules[{i}].channels: {ch!r} is not configured (add a "
                                     f"[plugins.alerts.{ch}] table)")
        if self.rules and not configured:
            raise ValueError("rules: no channel is configured; add [plugins.alerts.email] "
                             "or [plugins.alerts.webhook]")

    def channels(self) -> list[str]:
        out = []
        if self.email is not None:
            out.append("email")
        if self.webhook is not None:
            out.append("webhook")
        return out

    @classmethod
    def load(cls, table: Mapping[str, Any]) -> Settings:
        return load_settings(cls, table, "[plugins.alerts]")


class SendPayload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``alerts.send``: a message a task sends as one of its steps.

    ``subject`` and ``body`` are templates of the kernel's dialect (``kernel.templates``):
    ``{file:path}`` is a file's content (e.g. the inference output), ``{name}`` a variable
    (``vars``, ``task_id``, ``trace_id``, ``date``, ``yesterday``), ``{yesterday:%d.%m.%Y}`` a
    formatted date, ``{{name}}`` a literal ``{name}``.
    """

    subject: str
    body: str = ""
    channels: list[Channel] | None = None   # default: every configured channel
    to: list[str] | None = None             # email recipients instead of the configured ones
    vars: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    tz: str = "UTC"

    def __post_init__(self) -> None:
        check_tz(self.tz)


def seconds(value: float | str) -> float:
    """A duration field after ``__post_init__`` made it a float."""
    return float(value)
