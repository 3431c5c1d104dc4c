"""The two delivery channels: email over SMTP and a JSON webhook.

**Email** uses the standard library's ``smtplib`` in a worker thread (no extra dependency):
``security = "none" | "starttls" | "ssl"``, optional login with the password read from the
environment variable named by ``password_env`` when a message is sent.

**Webhook** POSTs JSON with aiohttp, with the Standard Webhooks headers (``signing``):
``webhook-id`` (one per message, kept on retries), ``webhook-timestamp`` (this attempt's Unix
seconds) and, with ``secret_env`` set, ``webhook-signature: v1,<base64>``, the HMAC-SHA256 of
``<id>.<timestamp>.<body>``, so a receiver can reject replays (:func:`~.signing.verify`).
The older ``X-Kernel-Signature: sha256=<hex>`` (``signature_header``, the HMAC of the body
alone, replayable) is still sent for receivers that check it; ``signature_header = ""`` drops
it. Connection errors, timeouts, 429 and 5xx are retried with exponential backoff
(``backoff``, doubled each time up to ``max_backoff``; ``Retry-After`` honoured within that cap)
for at most ``attempts`` tries; other 4xx answers are not retried.

Failures leave as :class:`~kernel.errors.ActionError`: ERR_CONN_TIMEOUT (retryable) for
unreachable servers, ERR_AUTH_FAILED for a rejected login or 401/403, ERR_ACTION_FAILED
otherwise. The webhook URL can carry a token (Slack, Teams...): messages show only its host.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import os
import smtplib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from kernel.clock import SystemClock
from kernel.errors import ActionError, ErrorCode

from .settings import EmailSettings, WebhookSettings, seconds
from .signing import WebhookVerificationError, new_message_id, signed_headers

Sleep = Callable[[float], Awaitable[None]]
Wall = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message as the channels see it."""

    subject: str
    body: str
    at: float | None = None            # wall instant for the Date header (None: the MTA's)
    trace_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- email
def build_email(cfg: EmailSettings, msg: Outgoing, to: Sequence[str]) -> EmailMessage:
    em = EmailMessage()
    em["From"] = cfg.from_addr
    em["To"] = ", ".join(to)
    em["Subject"] = msg.subject
    if msg.at is not None:
        em["Date"] = email.utils.formatdate(msg.at, usegmt=True)
    if msg.trace_id:
        em["X-Kernel-Trace-Id"] = msg.trace_id
    em.set_content(msg.body or msg.subject)
    return em


def _tls(cfg: EmailSettings) -> ssl.SSLContext:
    """Certificates and host names are always verified; ``ca_file`` adds a private CA."""
    return ssl.create_default_context(cafile=cfg.ca_file or None)


def _smtp_send(cfg: EmailSettings, em: EmailMessage, password: str | None) -> None:
    host, port, timeout = cfg.host, cfg.effective_port, seconds(cfg.timeout)
    where = f"SMTP {host}:{port}"
    try:
        tls = _tls(cfg) if cfg.security != "none" else None
    except (OSError, ssl.SSLError) as exc:
        raise ActionError(f"ca_file {cfg.ca_file!r}: {exc}", code=ErrorCode.ERR_ACTION_FAILED,
                          retryable=False) from None
    try:
        smtp: smtplib.SMTP
        if cfg.security == "ssl":
            smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=tls)
        else:
            smtp = smtplib.SMTP(host, port, timeout=timeout)
        with smtp:
            if cfg.security == "starttls":
                smtp.starttls(context=tls)
            if cfg.username:
                smtp.login(cfg.username, password or "")
            smtp.send_message(em)
    except smtplib.SMTPAuthenticationError as exc:
        raise ActionError(f"{where}: login as {cfg.username!r} refused ({exc.smtp_code}); "
                          f"check the variable named by password_env ({cfg.password_env})",
                          code=ErrorCode.ERR_AUTH_FAILED, retryable=False) from None
    except smtplib.SMTPNotSupportedError as exc:
        raise ActionError(f"{where}: {exc} (set `security` to match the server: none, "
                          "starttls or ssl)", code=ErrorCode.ERR_ACTION_FAILED,
                          retryable=False) from None
    except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError) as exc:
        raise ActionError(f"{where}: {exc}", code=ErrorCode.ERR_CONN_TIMEOUT,
                          retryable=True) from None
    except smtplib.SMTPException as exc:  # refused sender/recipients, data errors
        raise ActionError(f"{where}: {type(exc).__name__}: {exc}",
                          code=ErrorCode.ERR_ACTION_FAILED, retryable=False) from None
    except ssl.SSLError as exc:
        raise ActionError(f"{where}: TLS failed: {exc}", code=ErrorCode.ERR_ACTION_FAILED,
                          retryable=False) from None
    except OSError as exc:  # refused, unreachable, timed out
        raise ActionError(f"{where}: {exc.strerror or str(exc) or type(exc).__name__}",
                          code=ErrorCode.ERR_CONN_TIMEOUT, retryable=True) from None


class EmailChannel:
    name = "email"

    def __init__(self, cfg: EmailSettings) -> None:
        self.cfg = cfg

    async def send(self, msg: Outgoing, *, to: Sequence[str] | None = None) -> str:
        recipients = list(to or self.cfg.to)
        em = build_email(self.cfg, msg, recipients)
        password = os.environ.get(self.cfg.password_env) if self.cfg.password_env else None
        await asyncio.to_thread(_smtp_send, self.cfg, em, password)
        return f"email to {len(recipients)} recipient(s)"


# ----------------------------------------------------------------------------------- webhook
def sign(secret: bytes, body: bytes) -> str:
    """The legacy ``X-Kernel-Signature`` value: the HMAC of the body alone (replayable)."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def webhook_body(msg: Outgoing) -> bytes:
    doc = {"text": f"{msg.subject}\n\n{msg.body}".strip(), "subject": msg.subject,
           "body": msg.body, "trace_id": msg.trace_id, "at": msg.at, **msg.data}
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


class WebhookChannel:
    name = "webhook"

    def __init__(self, cfg: WebhookSettings, session: aiohttp.ClientSession,
                 *, sleep: Sleep = asyncio.sleep, wall: Wall | None = None) -> None:
        self.cfg = cfg
        self.session = session
        self.sleep = sleep
        self.wall = wall or SystemClock().wall
        self.where = f"webhook {urlsplit(cfg.url).netloc}"

    def headers(self, body: bytes, msg_id: str, secret: str | None) -> dict[str, str]:
        """One attempt's headers, signed now (a retry gets a fresh timestamp, the same id)."""
        h = {"Content-Type": "application/json", **self.cfg.headers}
        try:
            h.update(signed_headers(secret, msg_id, int(self.wall()), body))
        except WebhookVerificationError as exc:
            raise ActionError(f"{self.where}: the secret in ${self.cfg.secret_env}: {exc}",
                              code=ErrorCode.ERR_ACTION_FAILED, retryable=False) from None
        if secret and self.cfg.signature_header:
            h[self.cfg.signature_header] = sign(secret.encode(), body)
        return h

    async def _attempt(self, body: bytes, headers: dict[str, str]) -> tuple[ActionError | None,
                                                                           float | None]:
        timeout = aiohttp.ClientTimeout(total=seconds(self.cfg.timeout))
        try:
            async with self.session.post(self.cfg.url, data=body, headers=headers,
                                         timeout=timeout) as resp:
                if resp.status < 300:
                    return None, None
                text = (await resp.text(errors="replace")).strip()[:200]
                status = resp.status
                wait = resp.headers.get("Retry-After")
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            return ActionError(f"{self.where}: {str(exc) or type(exc).__name__}",
                               code=ErrorCode.ERR_CONN_TIMEOUT, retryable=True), None
        what = f"{self.where}: HTTP {status}" + (f": {text}" if text else "")
        if status in (401, 403):
            return ActionError(what, code=ErrorCode.ERR_AUTH_FAILED, retryable=False), None
        retryable = status >= 500 or status in (408, 429)
        delay = float(wait) if wait and wait.strip().isdigit() else None
        return ActionError(what, code=ErrorCode.ERR_ACTION_FAILED, retryable=retryable), delay

    async def send(self, msg: Outgoing, *, to: Sequence[str] | None = None) -> str:
        body = webhook_body(msg)
        msg_id = new_message_id()
        secret = os.environ.get(self.cfg.secret_env) if self.cfg.secret_env else None
        delay = seconds(self.cfg.backoff)
        cap = seconds(self.cfg.max_backoff)
        for attempt in range(1, self.cfg.attempts + 1):
            err, asked = await self._attempt(body, self.headers(body, msg_id, secret))
            if err is None:
                return f"webhook ({attempt} attempt(s))"
            if not err.retryable or attempt == self.cfg.attempts:
                if attempt > 1:
                    err.message = f"{err.message} (after {attempt} attempts)"
                raise err
            await self.sleep(min(cap, max(delay, asked or 0.0)))
            delay = min(cap, delay * 2)
        raise AssertionError("unreachable")
