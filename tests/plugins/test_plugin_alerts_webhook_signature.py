"""Webhook signatures that cannot be replayed (Standard Webhooks), through the real local webhook
server on 127.0.0.1.

Each delivery carries ``webhook-id`` (one per message, the same on every retry),
``webhook-timestamp`` (Unix seconds of the attempt) and ``webhook-signature: v1,<base64>``, the
HMAC-SHA256 of ``id.timestamp.body``. ``autoglm_alerts.verify`` checks them as a receiver
would, and so does the reference receiver library (``standardwebhooks``).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
from autoglm_alerts import WebhookVerificationError, verify
from autoglm_alerts.plugin import AlertsPlugin
from autoglm_alerts.settings import SendPayload, Settings
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as ReferenceError

from kernel.errors import ActionError

from .conftest import Hook, WebhookServer, make_ctx

SECRET_ENV = "AUTOGLM_TEST_WEBHOOK_SECRET"
RAW_SECRET = "whsec-test-secret"  # any string: its UTF-8 bytes are the key
STD_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()  # Standard Webhooks form


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def plugin(server: WebhookServer, **webhook: Any) -> AlertsPlugin:
    return AlertsPlugin(Settings.load({"webhook": {
        "url": server.url, "secret_env": SECRET_ENV, **webhook}}), sleep=RecordingSleep())


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


async def send(server: WebhookServer, subject: str = "disk full", **webhook: Any) -> None:
    await plugin(server, **webhook).send(make_ctx(), SendPayload(subject=subject, body="91%"))


@pytest.fixture(params=[RAW_SECRET, STD_SECRET], ids=["plain", "whsec"])
async def signed(request: pytest.FixtureRequest, webhook_server: WebhookServer,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[str, Hook]:
    """One alert sent under each form of secret: (the secret, what the server received)."""
    secret: str = request.param
    monkeypatch.setenv(SECRET_ENV, secret)
    await send(webhook_server)
    [hook] = webhook_server.received
    return secret, hook


async def test_the_signature_verifies_and_old_or_tampered_fails(
        signed: tuple[str, Hook]) -> None:
    secret, hook = signed
    h = lower(hook.headers)
    assert h["webhook-id"].startswith("msg_")
    ts = int(h["webhook-timestamp"])
    assert h["webhook-signature"].startswith("v1,")
    verify(secret, hook.headers, hook.body, now=ts)
    verify(secret, hook.headers, hook.body, now=ts + 300)  # within five minutes: accepted

    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(secret, hook.headers, hook.body, now=ts + 301)  # a replay 5 min later
    with pytest.raises(WebhookVerificationError, match="too new"):
        verify(secret, hook.headers, hook.body, now=ts - 301)
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(secret, hook.headers, hook.body.replace(b"91%", b"19%"), now=ts)
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify("another-secret", hook.headers, hook.body, now=ts)
    # the signed timestamp cannot be moved forward to dodge the age check
    moved = {**hook.headers, "webhook-timestamp": str(ts + 600)}
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(secret, moved, hook.body, now=ts + 600)
    # nor can the id be changed (receivers deduplicate on it)
    renamed = {**hook.headers, "webhook-id": "msg_other"}
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(secret, renamed, hook.body, now=ts)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        missing = {k: v for k, v in hook.headers.items() if k.lower() != name}
        with pytest.raises(WebhookVerificationError, match=name):
            verify(secret, missing, hook.body, now=ts)


async def test_the_reference_receiver_library_accepts_it(signed: tuple[str, Hook]) -> None:
    secret, hook = signed
    receiver = Webhook(secret) if secret.startswith("whsec_") else Webhook(secret.encode())
    doc = receiver.verify(hook.body, hook.headers)  # its own clock, its own 5-minute window
    assert doc["subject"] == "disk full"
    with pytest.raises(ReferenceError):
        receiver.verify(hook.body + b" ", hook.headers)


async def test_retries_keep_the_id_and_each_attempt_is_signed(
        webhook_server: WebhookServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, RAW_SECRET)
    webhook_server.statuses = [503]
    await send(webhook_server)
    first, second = webhook_server.received
    assert lower(first.headers)["webhook-id"] == lower(second.headers)["webhook-id"]
    for hook in (first, second):
        verify(RAW_SECRET, hook.headers, hook.body,
               now=int(lower(hook.headers)["webhook-timestamp"]))
    await send(webhook_server, subject="another")
    third = webhook_server.received[-1]
    assert lower(third.headers)["webhook-id"] != lower(first.headers)["webhook-id"]
    assert json.loads(third.body)["subject"] == "another"


async def test_without_a_secret_nothing_is_signed(webhook_server: WebhookServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert SECRET_ENV not in os.environ
    await send(webhook_server)
    h = lower(webhook_server.received[0].headers)
    assert "webhook-signature" not in h and "x-kernel-signature" not in h
    assert h["webhook-id"].startswith("msg_")  # receivers still deduplicate on the id


async def test_the_replayable_legacy_header_can_be_turned_off(
        webhook_server: WebhookServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, RAW_SECRET)
    await send(webhook_server, signature_header="")
    h = lower(webhook_server.received[0].headers)
    assert "x-kernel-signature" not in h and "webhook-signature" in h


def test_a_malformed_standard_secret_is_refused() -> None:
    with pytest.raises(WebhookVerificationError, match="whsec_"):
        verify("whsec_***not base64***", {"webhook-id": "msg_1", "webhook-timestamp": "1",
                                           "webhook-signature": "v1,AAAA"}, b"{}", now=1)


async def test_a_malformed_standard_secret_fails_the_send_naming_the_variable(
        webhook_server: WebhookServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "whsec_***")
    with pytest.raises(ActionError, match=SECRET_ENV) as ei:
        await send(webhook_server)
    assert not ei.value.retryable
    assert webhook_server.received == []  # nothing unsigned went out
