"""Logging: one JSON object per line (or readable text on a terminal), secrets redacted,
and an event observer that turns run events into log lines with trace id, task, job, attempt,
outcome, duration and error code.

When stderr is connected to the journal (``$JOURNAL_STREAM`` names its device and inode, as
systemd sets it), every line starts with a syslog priority prefix (``<3>`` error, ``<4>``
warning, ``<6>`` info, ``<7>`` debug) that journald strips and stores as the entry's priority,
so ``journalctl -p err`` finds the errors; ``journalctl -o cat`` shows the bare JSON lines."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
from typing import IO, Any

from .events import (
    ConfigReloaded,
    Event,
    KernelStarted,
    KernelStopping,
    MisfireDecided,
    RunFinished,
    RunStarted,
    StoreFailed,
)

_FIELDS = ("trace_id", "span_id", "task_id", "job_id", "attempt", "outcome", "duration",
           "error_code", "action", "lateness")
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)
_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(r"(?i)((?:api[_-]?key|token|password|secret)\"?\s*[:=]\s*\"?)[^\s\",}]{3,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
]


class Redactor(logging.Filter):
    """Masks values of secret-looking environment variables and common secret patterns."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        super().__init__()
        env = os.environ if environ is None else environ
        self.values = sorted({v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 6},
                             key=len, reverse=True)

    def redact(self, text: str) -> str:
        for v in self.values:
            text = text.replace(v, "***")
        for pat in _SECRET_PATTERNS:
            text = pat.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        red = self.redact(msg)
        if red != msg:
            record.msg, record.args = red, None
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for f in _FIELDS:
            v = getattr(record, f, None)
            if v is not None:
                out[f] = v
        if record.exc_info:
            out["exc"] = self.redactor.redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s%(ctx)s")
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        bits = [f"{f}={getattr(record, f)}" for f in ("task_id", "trace_id", "error_code")
                if getattr(record, f, None) is not None]
        record.ctx = (" [" + " ".join(bits) + "]") if bits else ""
        text = super().format(record)
        return self.redactor.redact(text) if record.exc_info else text


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalPrefix(logging.Formatter):
    """Wraps a formatter: ``<N>`` before every line of a record (a traceback in text mode spans
    several lines, and journald reads the prefix per line)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return prefix + self.inner.format(record).replace("\n", "\n" + prefix)


def is_journal(stream: IO[str], environ: dict[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal's stream socket: ``$JOURNAL_STREAM`` is
    ``<device>:<inode>`` of the very file descriptor (systemd's own check; a child whose
    stderr was redirected elsewhere inherits the variable but not the match)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # io.StringIO has no descriptor
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(level: str = "info", fmt: str = "auto", stream: IO[str] | None = None, *,
          environ: dict[str, str] | None = None) -> str:
    """Install the root handler on ``stream`` (stderr); returns the format chosen (``json`` or
    ``text``: ``auto`` means text on a terminal, JSON lines otherwise)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    redactor = Redactor()
    handler = logging.StreamHandler(stream)
    handler.addFilter(redactor)
    formatter: logging.Formatter = (JsonFormatter(redactor) if fmt == "json"
                                    else TextFormatter(redactor))
    if is_journal(stream, environ):
        formatter = JournalPrefix(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiosqlite", "asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return fmt


class EventLogger:
    """Observer: one log line per run event, carrying the run's fields as structured extras."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("kernel.runs")

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, RunStarted):
            if not self.log.isEnabledFor(logging.DEBUG):  # the hot path: build nothing
                return
            self.log.debug("run started: %s", ev.task_id or ev.action, extra={
                "trace_id": ev.trace_id, "span_id": ev.span_id, "task_id": ev.task_id,
                "job_id": ev.job_id, "attempt": ev.attempt, "action": ev.action,
                "lateness": round(ev.lateness, 6)})
        elif isinstance(ev, RunFinished):
            r = ev.run
            level = logging.INFO if r.outcome.value in ("succeeded", "skipped") else logging.WARNING
            if not self.log.isEnabledFor(level):
                return
            text = f"run {r.outcome.value}: {r.task_id or r.action}"
            if r.error_code:
                text += f" [{r.error_code}] {r.detail[:300]}"
            self.log.log(level, text, extra={
                "trace_id": r.trace_id, "span_id": r.span_id, "task_id": r.task_id,
                "job_id": r.job_id, "attempt": r.attempt, "outcome": r.outcome.value,
                "duration": round(ev.duration, 6), "error_code": r.error_code,
                "action": r.action})
        elif isinstance(ev, MisfireDecided):
            rec = ev.record
            if rec.missed == 0:  # every late occurrence ran (catch-up): nothing was skipped
                self.log.info("task %s: %d late occurrence(s) run (policy %s)", rec.task_id,
                              rec.ran, rec.policy, extra={"task_id": rec.task_id})
            else:
                self.log.warning("misfire: task %s missed %d occurrence(s); policy %s ran %d",
                                 rec.task_id, rec.missed, rec.policy, rec.ran,
                                 extra={"task_id": rec.task_id,
                                        "error_code": "ERR_MISFIRE_SKIPPED"})
        elif isinstance(ev, ConfigReloaded):
            if ev.error:
                self.log.error("reload from %s rejected: %s", ev.source, ev.error,
                               extra={"error_code": "ERR_CONFIG_INVALID"})
            else:
                self.log.info("reloaded %s: added=%s removed=%s changed=%s", ev.source,
                              ev.added, ev.removed, ev.changed)
        elif isinstance(ev, StoreFailed):
            self.log.error("store failure: %s", ev.message, extra={"error_code": ev.error_code})
        elif isinstance(ev, KernelStarted):
            self.log.info("kernel started: %d task(s), store %s, %d job(s) recovered",
                          ev.tasks, ev.store, ev.recovered_jobs)
        elif isinstance(ev, KernelStopping):
            self.log.info("kernel stopping (%s)", ev.reason)
