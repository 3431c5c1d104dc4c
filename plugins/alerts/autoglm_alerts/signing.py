"""Webhook signatures in the Standard Webhooks form (https://www.standardwebhooks.com).

Every delivery carries three headers:

* ``webhook-id``: ``msg_<32 hex>``, one per message and the same on each retry of it, so a
  receiver can drop a message it has already handled;
* ``webhook-timestamp``: the Unix seconds at which this attempt was signed;
* ``webhook-signature``: ``v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``.

Because the id and the timestamp are inside the signed bytes, a captured request cannot be
replayed later: the receiver rejects a timestamp more than :data:`TOLERANCE` seconds (5 min)
away from its own clock, and a changed timestamp or id breaks the signature.

The key: a secret of the form ``whsec_<base64>`` (what Standard Webhooks libraries generate
and expect) is the base64-decoded bytes; any other secret is used as its UTF-8 bytes (give
receivers' libraries those bytes, e.g. Python's ``standardwebhooks.Webhook(secret.encode())``).

:func:`verify` is the receiver's side, for Python receivers and tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from collections.abc import Mapping

from kernel.clock import SystemClock

TOLERANCE = 300.0  # seconds a receiver accepts between a webhook-timestamp and its own clock
PREFIX = "whsec_"


class WebhookVerificationError(ValueError):
    """A delivery failed verification; the message says why (missing header, too old, bad
    signature...). Answer it with 400/401 and do not act on it."""


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def signing_key(secret: str | bytes) -> bytes:
    """The HMAC key: bytes as they are, ``whsec_<base64>`` decoded, another string's UTF-8."""
    if isinstance(secret, bytes):
        key = secret
    elif secret.startswith(PREFIX):
        rest = secret[len(PREFIX):].strip()
        try:
            key = base64.b64decode(rest + "=" * (-len(rest) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise WebhookVerificationError(
                f"a secret starting with {PREFIX!r} must continue in base64 (Standard Webhooks "
                f"form {PREFIX}<base64>); use another prefix for a plain-text secret") from None
    else:
        key = secret.encode()
    if not key:
        raise WebhookVerificationError("the webhook secret is empty")
    return key


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64>``."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str | bytes | None, msg_id: str, timestamp: int,
                   body: bytes) -> dict[str, str]:
    """``webhook-id`` and ``webhook-timestamp``, and ``webhook-signature`` when there is a
    secret."""
    h = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    if secret:
        h["webhook-signature"] = signature(signing_key(secret), msg_id, timestamp, body)
    return h


def verify(secret: str | bytes, headers: Mapping[str, str], body: bytes, *,
           now: float | None = None, tolerance: float = TOLERANCE) -> None:
    """Check a delivery as a receiver: ``headers`` (any case) and the raw ``body`` bytes.

    ``now`` is the receiver's wall clock in Unix seconds (default: the system's). Raises
    :class:`WebhookVerificationError` when a header is missing, the timestamp is more than
    ``tolerance`` seconds old or ahead, or no ``v1`` signature matches; returns ``None``
    otherwise. Deduplicate on ``webhook-id`` as well: within the tolerance a replay verifies.
    """
    h = {k.lower(): v for k, v in headers.items()}
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        if not h.get(name):
            raise WebhookVerificationError(f"the {name} header is missing")
    msg_id, sent, given = h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"]
    try:
        timestamp = int(sent)
    except ValueError:
        raise WebhookVerificationError(
            f"webhook-timestamp {sent[:40]!r} is not Unix seconds") from None
    if now is None:
        now = SystemClock().wall()
    if timestamp < now - tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp is too old: {now - timestamp:.0f} s ago, more than "
            f"{tolerance:g} s (a replay, or a clock out of step)")
    if timestamp > now + tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp is too new: {timestamp - now:.0f} s ahead, more than "
            f"{tolerance:g} s (a clock out of step)")
    expected = signature(signing_key(secret), msg_id, timestamp, body).encode()
    for candidate in given.split():
        if hmac.compare_digest(expected, candidate.encode()):
            return
    raise WebhookVerificationError("no webhook-signature matches the body, id and timestamp "
                                   "(tampered, or signed with another secret)")
