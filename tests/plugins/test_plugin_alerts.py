"""alerts: the pure rule engine and rate limiter, email through a real SMTP server (aiosmtpd on
127.0.0.1), signed webhooks with retries through a real aiohttp server, and the subscriber
inside a kernel on a fake clock."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import shutil
import ssl
import subprocess
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiosmtpd.controller import Controller
from autoglm_alerts import plugin as alerts_plugin
from autoglm_alerts.plugin import AlertsPlugin, AlertSubscriber
from autoglm_alerts.rules import Engine
from autoglm_alerts.settings import SendPayload, Settings

from kernel import config as config_mod
from kernel.clock import FakeClock
from kernel.errors import ActionError, ErrorCode
from kernel.events import Event, RunFailed, RunSucceeded, RunTimedOut
from kernel.hookspecs import Action, PluginContext, RunContext, hookimpl
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import Outcome, RunRecord
from kernel.store.memory import MemoryStore

from .conftest import (
    SMTP_PASSWORD,
    SMTP_USER,
    SmtpHandler,
    SmtpServer,
    WebhookServer,
    free_port,
    make_ctx,
)

PASS_ENV = "AUTOGLM_TEST_SMTP_PASSWORD"
SECRET_ENV = "AUTOGLM_TEST_WEBHOOK_SECRET"
SECRET = "whsec-test-secret"


def run_record(task: str | None, *, ok: bool, at: float, code: str | None = None) -> RunRecord:
    return RunRecord(job_id=f"j{at}", task_id=task, action="rec", trace_id="ab" * 16,
                     span_id="cd" * 8, scheduled_at=at, started_at=at, finished_at=at,
                     attempt=1, outcome=Outcome.SUCCEEDED if ok else Outcome.FAILED,
                     error_code=None if ok else (code or "ERR_ACTION_FAILED"),
                     detail="" if ok else "boom")


def failed(task: str | None, at: float, *, will_retry: bool = False) -> Event:
    return RunFailed(at=at, run=run_record(task, ok=False, at=at), duration=0.1,
                     will_retry=will_retry)


def succeeded(task: str, at: float) -> Event:
    return RunSucceeded(at=at, run=run_record(task, ok=True, at=at), duration=0.1)


def settings(**table: Any) -> Settings:
    table.setdefault("webhook", {"url": "http://127.0.0.1:9/hook"})
    return Settings.load(table)


def smtp_table(server: SmtpServer, **kw: Any) -> dict[str, Any]:
    return {"host": server.host, "port": server.port, "security": "none",
            "username": SMTP_USER, "password_env": PASS_ENV, "from": "kernel@example.org",
            "to": ["ops@example.org", "oncall@example.org"], **kw}


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASS_ENV, SMTP_PASSWORD)
    monkeypatch.setenv(SECRET_ENV, SECRET)


class RecordingSleep:
    """Stands in for asyncio.sleep in the webhook backoff: records, returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# ------------------------------------------------------------------------------ rule engine
def kinds(engine: Engine, events: list[Event]) -> list[tuple[str, str]]:
    return [(a.kind, a.task_id) for ev in events for a in engine.observe(ev)]


def test_rules_failure_streak_recovery_and_success() -> None:
    s = settings(rules=[{"tasks": ["nightly_*"], "on": ["consecutive_failures", "recovery"],
                         "consecutive": 3},
                        {"tasks": ["nightly_b"], "on": ["failure", "success"]}])
    e = Engine(s.rules, s.rate_limit, s.channels())
    got = kinds(e, [failed("nightly_a", 1), failed("nightly_a", 2, will_retry=True),
                    failed("nightly_a", 3), failed("nightly_a", 4), failed("nightly_a", 5),
                    succeeded("nightly_a", 6), succeeded("nightly_a", 7),
                    failed("other", 8), failed(None, 9),
                    failed("nightly_b", 10), succeeded("nightly_b", 11)])
    assert got == [("consecutive_failures", "nightly_a"),  # the 3rd final failure, once
                   ("recovery", "nightly_a"),
                   ("failure", "nightly_b"),
                   ("recovery", "nightly_b"), ("success", "nightly_b")]


def test_alert_text_and_timeouts_count_as_failures() -> None:
    s = settings(rules=[{"on": ["failure"]}])
    e = Engine(s.rules, s.rate_limit, s.channels(), "[k] ")
    rec = run_record("t1", ok=False, at=1_767_225_600.0, code="ERR_TIMEOUT")
    [alert] = e.observe(RunTimedOut(at=1_767_225_600.0, run=rec, duration=5.0))
    assert alert.subject == "[k] task t1 failed (ERR_TIMEOUT)"
    assert "trace id:   " + "ab" * 16 in alert.body
    assert "scheduled:  2026-01-01T00:00:00Z" in alert.body
    assert "python -m kernel explain ERR_TIMEOUT" in alert.body
    assert alert.channels == ("webhook",)
    assert alert.data["error_code"] == "ERR_TIMEOUT"


def test_rate_limit_caps_a_task_failing_every_second_and_summarises() -> None:
    s = settings(rules=[{"on": ["failure"]}], rate_limit={"max_messages": 5, "window": "1h"})
    e = Engine(s.rules, s.rate_limit, s.channels())
    sent = [a for t in range(3600) for a in e.observe(failed("flaky", float(t)))]
    assert len(sent) == 5
    assert [a.kind for a in e.observe(failed("quiet", 100.0))] == ["failure"]  # per task
    after = e.observe(failed("flaky", 3600.0))
    assert [a.kind for a in after] == ["summary", "failure"]
    assert after[0].data["suppressed"] == 3595
    assert "3595 alert(s) for task flaky were suppressed" in after[0].subject
    assert e.limiter.suppressed_total == 3595


# ------------------------------------------------------------------------------ email
async def test_send_email_with_login_and_file_body(smtp_server: SmtpServer,
                                                   tmp_path: Path) -> None:
    (tmp_path / "summary.md").write_text("All quiet. {not a placeholder}\n", "utf-8")
    plugin = AlertsPlugin(settings(email=smtp_table(smtp_server), base_dir=str(tmp_path)))
    ctx = make_ctx(task_id="daily", scheduled_at=1_773_108_000.0)  # 2026-03-10T02:00Z
    p = SendPayload(subject="Summary for {yesterday} ({task_id})",
                    body="{file:summary.md}-- {who}", channels=["email"], vars={"who": "bot"})
    result = await plugin.send(ctx, p)
    assert result == "sent: email to 2 recipient(s)"
    [got] = await smtp_server.wait_for(1)
    assert smtp_server.logins == [SMTP_USER]
    assert got.mail_from == "kernel@example.org"
    assert got.rcpt_tos == ["ops@example.org", "oncall@example.org"]
    assert got.message["Subject"] == "Summary for 2026-03-09 (daily)"
    assert got.message["X-Kernel-Trace-Id"] == ctx.trace_id
    assert parsedate_to_datetime(got.message["Date"]).timestamp() == 1_773_108_000.0
    assert got.message.get_content().replace("\r\n", "\n") == (
        "All quiet. {not a placeholder}\n-- bot\n")


async def test_email_failures_are_classified(smtp_server: SmtpServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASS_ENV, "wrong-password")
    plugin = AlertsPlugin(settings(email=smtp_table(smtp_server)))
    with pytest.raises(ActionError) as ei:
        await plugin.send(make_ctx(), SendPayload(subject="x", channels=["email"]))
    assert ei.value.code is ErrorCode.ERR_AUTH_FAILED
    assert "wrong-password" not in str(ei.value)

    closed = AlertsPlugin(settings(email=smtp_table(smtp_server, port=free_port())))
    with pytest.raises(ActionError) as ei:
        await closed.send(make_ctx(), SendPayload(subject="x", channels=["email"]))
    assert ei.value.code is ErrorCode.ERR_CONN_TIMEOUT and ei.value.retryable
    assert smtp_server.messages == []


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("security", ["starttls", "ssl"])
async def test_email_over_tls(tmp_path: Path, security: str) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server = SmtpServer("127.0.0.1", free_port())
    tls: dict[str, Any] = ({"tls_context": server_ctx, "require_starttls": True}
                           if security == "starttls" else {"ssl_context": server_ctx})
    controller = Controller(SmtpHandler(server), hostname=server.host, port=server.port, **tls)
    controller.start()
    try:
        table = smtp_table(server, security=security, username="", password_env="")
        with pytest.raises(ActionError, match="TLS failed|CERTIFICATE_VERIFY_FAILED"):
            await AlertsPlugin(settings(email=table)).send(
                make_ctx(), SendPayload(subject="x", channels=["email"]))  # untrusted cert
        table["ca_file"] = str(cert)
        result = await AlertsPlugin(settings(email=table)).send(
            make_ctx(), SendPayload(subject="over tls", channels=["email"]))
        assert result.startswith("sent: email")
        [got] = await server.wait_for(1)
        assert got.message["Subject"] == "over tls"
    finally:
        controller.stop()


# ------------------------------------------------------------------------------ webhook
async def test_webhook_is_signed_and_retried_after_a_500(webhook_server: WebhookServer) -> None:
    webhook_server.statuses = [500, 503]
    sleep = RecordingSleep()
    plugin = AlertsPlugin(settings(webhook={"url": webhook_server.url, "secret_env": SECRET_ENV,
                                            "backoff": 0.5, "headers": {"X-Team": "ml"}}),
                          sleep=sleep)
    result = await plugin.send(make_ctx(task_id="t9"), SendPayload(subject="hi", body="there"))
    assert result == "sent: webhook (3 attempt(s))"
    assert sleep.delays == [0.5, 1.0]  # exponential backoff
    assert len(webhook_server.received) == 3
    hook = webhook_server.received[-1]
    expected = "sha256=" + hmac.new(SECRET.encode(), hook.body, hashlib.sha256).hexdigest()
    assert hook.headers["X-Kernel-Signature"] == expected
    assert hook.headers["X-Team"] == "ml"
    doc = json.loads(hook.body)
    assert doc["subject"] == "hi" and doc["body"] == "there" and doc["text"] == "hi\n\nthere"
    assert doc["task_id"] == "t9" and doc["trace_id"] == make_ctx().trace_id
    assert {h.body for h in webhook_server.received} == {hook.body}  # the same bytes each time


async def test_webhook_gives_up(webhook_server: WebhookServer) -> None:
    sleep = RecordingSleep()
    webhook_server.statuses = [500] * 10
    plugin = AlertsPlugin(settings(webhook={"url": webhook_server.url, "attempts": 3,
                                            "backoff": 1, "max_backoff": 1.5}), sleep=sleep)
    with pytest.raises(ActionError, match="after 3 attempts") as ei:
        await plugin.send(make_ctx(), SendPayload(subject="x"))
    assert ei.value.retryable and sleep.delays == [1.0, 1.5]

    webhook_server.statuses = [400]
    webhook_server.received.clear()
    with pytest.raises(ActionError, match="HTTP 400") as ei:
        await plugin.send(make_ctx(), SendPayload(subject="x"))
    assert not ei.value.retryable and len(webhook_server.received) == 1

    refused = AlertsPlugin(settings(webhook={"url": f"http://127.0.0.1:{free_port()}/h",
                                             "attempts": 2}), sleep=RecordingSleep())
    with pytest.raises(ActionError) as ei:
        await refused.send(make_ctx(), SendPayload(subject="x"))
    assert ei.value.code is ErrorCode.ERR_CONN_TIMEOUT


# ------------------------------------------------------------------------------ subscriber
async def test_many_failures_send_few_mails(smtp_server: SmtpServer) -> None:
    s = settings(rules=[{"on": ["failure", "consecutive_failures"], "consecutive": 3,
                         "channels": ["email"]}],
                 email=smtp_table(smtp_server), rate_limit={"max_messages": 4, "window": "1h"})
    sub = AlertSubscriber(s)
    for t in range(2000):  # a per-second task failing for half an hour
        sub.handle(failed("every_second", 1_000.0 + t))
    assert sub.queue.qsize() == 4
    runner = asyncio.create_task(sub.run())
    try:
        got = await smtp_server.wait_for(4)
        sub.handle(succeeded("other", 1_000.0 + 3600))  # the next event after the window
        #                                                   sends the summary
        got = await smtp_server.wait_for(5)
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    subjects = [r.message["Subject"] for r in got]
    failure = "[kernel] task every_second failed (ERR_ACTION_FAILED)"
    assert subjects[:4] == [failure, failure,
                            "[kernel] task every_second failed 3 times in a row", failure]
    assert subjects[4] == "[kernel] 1997 alert(s) for task every_second were suppressed"
    assert len(got) == 5 and sub.sent == 5


class FailingPlugin:
    async def run(self, ctx: RunContext, payload: Any) -> Any:
        raise ActionError("the model said no", code=ErrorCode.ERR_OVERLOADED, retryable=False)

    @hookimpl
    def register_actions(self, context: PluginContext) -> list[Action]:
        return [Action("always_fails", self.run)]


async def test_subscriber_inside_a_kernel(webhook_server: WebhookServer) -> None:
    cfg, issues = config_mod.parse_text(f"""
        [store]
        backend = "memory"
        [server]
        enabled = false
        [[tasks]]
        id = "flaky"
        schedule = "@every 1s"
        action = "always_fails"
        [plugins.alerts]
        rules = [{{ tasks = ["flaky"], on = ["failure"] }}]
        rate_limit = {{ max_messages = 2, window = "1h" }}
        webhook = {{ url = "{webhook_server.url}", secret_env = "{SECRET_ENV}" }}
        """, "test.toml")
    assert not issues
    ps = load_plugins(PluginContext(settings=cfg.plugins),
                      extra=[("alerts", alerts_plugin), ("failing", FailingPlugin())],
                      use_entry_points=False)
    # (the built-in plugin may have subscribers of its own)
    assert not ps.problems and len(_alert_subscribers(ps.subscribers)) == 1
    clock = FakeClock()
    kernel = build(cfg, clock=clock, plugins=ps, store=MemoryStore())
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))
    await started.wait()
    await clock.advance(30)  # thirty failures
    for _ in range(1000):
        if len(webhook_server.received) >= 2:
            break
        await asyncio.sleep(0.01)
    kernel.stop("test")
    while not task.done():
        await clock.advance(1)
        await asyncio.sleep(0)
    await task
    docs = [json.loads(h.body) for h in webhook_server.received]
    assert len(docs) == 2  # the rate limit held back the other 28
    assert docs[0]["kind"] == "failure" and docs[0]["error_code"] == "ERR_OVERLOADED"
    assert "the model said no" in docs[0]["detail"]


def _alert_subscribers(subs: list[Any]) -> list[AlertSubscriber]:
    return [s for s in subs if isinstance(s, AlertSubscriber)]


def test_settings_mistakes_are_plugin_problems() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rules": [{"channels": ["email"]}], "webhook": {"url": "http://x/h"}},
         "'email' is not configured"),
        ({"rules": [{}]}, "no channel is configured"),
        ({"email": {"to": ["a@b"]}}, "from"),
        ({"email": {"from": "a@b", "to": ["c@d"], "username": "u"}}, "password_env"),
        ({"rules": [{"on": ["explode"]}], "webhook": {"url": "http://x/h"}}, "on"),
        ({"rate_limit": {"window": "soon"}}, "window"),
    ]
    for table, needle in cases:
        ps = load_plugins(PluginContext(settings={"alerts": table}),
                          extra=[("alerts", alerts_plugin)], use_entry_points=False)
        messages = " ".join(p.message for p in ps.problems)
        assert "[plugins.alerts]" in messages and needle in messages, (table, messages)
    ok = load_plugins(PluginContext(), extra=[("alerts", alerts_plugin)], use_entry_points=False)
    assert "alerts.send" in ok.actions and _alert_subscribers(ok.subscribers) == []
    assert not ok.problems
    payload = msgspec.convert({"subject": "s", "channels": ["pager"]}, dict[str, Any])
    with pytest.raises(Exception, match="channels"):
        ok.decode_payload(ok.action("alerts.send"), payload)
