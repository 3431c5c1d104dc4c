"""Local servers for the plugin tests, all real and all on 127.0.0.1.

* ``fake_openai``: :class:`FakeOpenAI`, a fake of the remote model service (aiohttp).
* ``smtp_server``: an ``aiosmtpd`` Controller whose handler keeps every message it receives.
* ``webhook_server``: an aiohttp server that records each POST and answers the status codes
  queued in ``statuses`` (200 once they run out).

Each fixture closes its server (and every socket) at the end of the test.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from kernel.hookspecs import RunContext

from .fake_openai import FakeOpenAI

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


def make_ctx(*, task_id: str | None = "t", scheduled_at: float | None = 1_767_225_600.0,
             action: str = "test", trace_id: str = TRACE_ID, attempt: int = 1,
             on_progress: Callable[[float, float | None, str], None] | None = None
             ) -> RunContext:
    log = logging.LoggerAdapter(logging.getLogger(f"kernel.action.{action}"), {})
    return RunContext(job_id="job-1", task_id=task_id, action=action, trace_id=trace_id,
                      span_id=SPAN_ID, attempt=attempt, scheduled_at=scheduled_at,
                      timeout=None, log=log, on_progress=on_progress)


@dataclass
class ProgressLog:
    """What an action reported with ``ctx.progress``: pass ``ctx()`` to the action."""

    calls: list[tuple[float, float | None, str]] = field(default_factory=list)

    def __call__(self, done: float, total: float | None, note: str) -> None:
        self.calls.append((done, total, note))

    def ctx(self, **kw: Any) -> RunContext:
        return make_ctx(on_progress=self, **kw)

    @property
    def done(self) -> list[float]:
        return [c[0] for c in self.calls]


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


# ------------------------------------------------------------------------------------ SMTP
@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class SmtpServer:
    host: str
    port: int
    messages: list[Received] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def wait_for(self, count: int = 1, *, timeout: float = 10.0) -> list[Received]:
        """Wait (on real I/O, polling) until ``count`` messages arrived."""
        for _ in range(int(timeout / 0.01)):
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            await asyncio.sleep(0.01)
        raise AssertionError(f"expected {count} message(s), got {len(self.messages)}")


class SmtpHandler:
    """Keeps every message the server accepts in ``server.messages``."""

    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_DATA(self, smtp: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.original_content or envelope.content,
                                       policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        with self.server.lock:
            self.server.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                                 msg))
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


SMTP_USER = "alerts@example.org"
SMTP_PASSWORD = "s3cret-smtp-pass"


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer("127.0.0.1", free_port())

    def authenticator(smtp: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == SMTP_USER
              and auth_data.password.decode() == SMTP_PASSWORD)
        if ok:
            server.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535

    controller = Controller(SmtpHandler(server), hostname=server.host, port=server.port,
                            authenticator=authenticator, auth_require_tls=False)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


# ------------------------------------------------------------------------------------ webhook
@dataclass
class Hook:
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int] | None = None  # the client's address: one per kept-alive connection


@dataclass
class WebhookServer:
    url: str = ""
    statuses: list[int] = field(default_factory=list)
    received: list[Hook] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = (str(peername[0]), int(peername[1])) if peername else None
        self.received.append(Hook(dict(request.headers), await request.read(), peer))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"ok": status < 400}, status=status)


@pytest.fixture
async def webhook_server() -> AsyncIterator[WebhookServer]:
    server = WebhookServer()
    app = web.Application()
    app.router.add_post("/hook", server.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/hook"
    try:
        yield server
    finally:
        await runner.cleanup()
