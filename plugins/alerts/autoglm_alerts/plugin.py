"""The alerts plugin: a subscriber that turns run events into messages, and ``alerts.send``.

``AlertSubscriber.handle`` runs inside the kernel's event bus: it only asks the pure rule
engine what to send and puts that on a bounded queue. ``run`` (owned by the kernel's services
task group) drains the queue and delivers each alert through its channels; a channel that fails
is logged and never stops the subscriber or the kernel. Alerts still queued at shutdown are
dropped (and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import aiohttp

from kernel.errors import ActionError, ErrorCode
from kernel.events import Event
from kernel.hookspecs import Action, Lifespan, PluginContext, RunContext, Subscriber, hookimpl
from kernel.settings import SettingsError, plugin_settings
from kernel.templates import TemplateError, file_reader, render, text, time_variables

from .channels import EmailChannel, Outgoing, Sleep, WebhookChannel
from .rules import Alert, Engine
from .settings import SendPayload, Settings

log = logging.getLogger("kernel.plugin.alerts")


class Channels:
    """The configured channels, bound to one aiohttp session for webhooks."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession,
                 sleep: Sleep) -> None:
        self.email = EmailChannel(settings.email) if settings.email else None
        self.webhook = (WebhookChannel(settings.webhook, session, sleep=sleep)
                        if settings.webhook else None)

    def get(self, name: str) -> EmailChannel | WebhookChannel:
        ch = self.email if name == "email" else self.webhook if name == "webhook" else None
        if ch is None:
            raise ActionError(f"channel {name!r} is not configured (add [plugins.alerts."
                              f"{name}])", code=ErrorCode.ERR_BAD_PAYLOAD)
        return ch


class AlertSubscriber:
    def __init__(self, settings: Settings, *, sleep: Sleep = asyncio.sleep) -> None:
        self.settings = settings
        self.engine = Engine(settings.rules, settings.rate_limit, settings.channels(),
                             settings.subject_prefix)
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=settings.queue_size)
        self.sleep = sleep
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def handle(self, event: Event) -> None:
        for alert in self.engine.observe(event):
            try:
                self.queue.put_nowait(alert)
            except asyncio.QueueFull:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    log.warning("alerts queue full (%d): %d alert(s) dropped",
                                self.settings.queue_size, self.dropped)

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            channels = Channels(self.settings, session, self.sleep)
            try:
                while True:
                    alert = await self.queue.get()
                    await self.deliver(channels, alert)
            finally:
                if self.queue.qsize():
                    log.warning("alerts: %d alert(s) not sent at shutdown", self.queue.qsize())

    async def deliver(self, channels: Channels, alert: Alert) -> None:
        msg = Outgoing(alert.subject, alert.body, alert.at, alert.data.get("trace_id"),
                       alert.data)
        for name in alert.channels:
            try:
                await channels.get(name).send(msg)
                self.sent += 1
            except Exception as exc:  # one channel's failure must not stop the others
                self.failed += 1
                log.error("alert %r for task %s not sent by %s: %s", alert.kind,
                          alert.task_id, name, exc)


class AlertsPlugin:
    def __init__(self, settings: Settings, *, sleep: Sleep = asyncio.sleep) -> None:
        self.settings = settings
        self.sleep = sleep
        self._session: aiohttp.ClientSession | None = None  # open within lifespan()

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Held open while the kernel runs: ``alerts.send`` reuses one HTTP session."""
        async with aiohttp.ClientSession() as session:
            self._session = session
            try:
                yield
            finally:
                self._session = None

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[aiohttp.ClientSession]:
        """The lifespan's session, or one for this run only outside it."""
        if self._session is not None and not self._session.closed:
            yield self._session
            return
        async with aiohttp.ClientSession() as own:
            yield own

    async def send(self, ctx: RunContext, p: SendPayload) -> str:
        names: Sequence[str] = p.channels or self.settings.channels()
        if not names:
            raise ActionError("alerts.send: no channel is configured; add "
                              "[plugins.alerts.email] or [plugins.alerts.webhook]",
                              code=ErrorCode.ERR_BAD_PAYLOAD)
        variables = {"task_id": ctx.task_id or "", "trace_id": ctx.trace_id,
                     "job_id": ctx.job_id, **time_variables(ctx.scheduled_at, p.tz),
                     **{k: text(v) for k, v in p.vars.items()}}

        def build() -> tuple[str, str]:
            files = file_reader(self.settings.base_dir)
            return render(p.subject, variables, files), render(p.body, variables, files)

        try:
            subject, body = await asyncio.to_thread(build)
        except TemplateError as exc:
            raise ActionError(f"alerts.send: {exc}", code=ErrorCode.ERR_BAD_PAYLOAD) from None
        msg = Outgoing(subject, body, ctx.scheduled_at, ctx.trace_id,
                       {"kind": "message", "task_id": ctx.task_id, "job_id": ctx.job_id})
        done: list[str] = []
        async with self.session() as session:
            channels = Channels(self.settings, session, self.sleep)
            for name in names:
                try:
                    done.append(await channels.get(name).send(msg, to=p.to))
                except ActionError as exc:
                    if done:
                        exc.message = f"{exc.message} (already sent: {', '.join(done)})"
                    raise
        ctx.log.info("alerts.send: %r sent: %s", subject, ", ".join(done))
        return f"sent: {', '.join(done)}"


def _settings(context: PluginContext) -> Settings:
    return context.shared("alerts", lambda: plugin_settings(context, "alerts", Settings))


def _plugin(context: PluginContext) -> AlertsPlugin:
    return context.shared("alerts.plugin", lambda: AlertsPlugin(_settings(context)))


@hookimpl
def register_lifespan(context: PluginContext) -> Lifespan | None:
    try:
        return _plugin(context).lifespan
    except SettingsError:
        return None  # reported once, by register_actions


@hookimpl
def register_actions(context: PluginContext) -> list[Action]:
    plugin = _plugin(context)
    return [Action("alerts.send", plugin.send,
                   "Send a message (email, webhook); the body may include {file:...}.",
                   SendPayload)]


@hookimpl
def register_subscribers(context: PluginContext) -> list[Subscriber]:
    try:
        settings = _settings(context)
    except SettingsError:
        return []  # reported once, by register_actions
    if not settings.rules:
        return []
    return [AlertSubscriber(settings)]
