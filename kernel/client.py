"""CLI client of a running kernel's HTTP API: ``submit``, ``jobs``, ``runs``, ``tasks``,
``pause``, ``resume``, ``trigger``, ``cancel``, ``backfill``.

Every command takes ``--url`` (default ``$KERNEL_URL``, else http://127.0.0.1:8765), ``--token``
(default ``$KERNEL_API_TOKEN``, else, for a loopback URL only, the kernel's token file
``<data dir>/api.token``, data dir ``$KERNEL_DATA_DIR`` or the default one) and ``--json`` (print
the API's JSON instead of a table). Bodies are sent as ``application/json``.
Exit status: 0 done, 1 the kernel is unreachable or refused the request (one line on stderr:
``error [CODE]: message``), 2 invalid arguments (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from .api.security import is_loopback, loopback_name, read_token, token_path
from .config import Config
from .durations import parse_duration
from .records import JobState, Outcome

DEFAULT_URL = "http://127.0.0.1:8765"
TIMEOUT = 60.0


def default_token(url: str) -> str | None:
    """The token to send to ``url`` when none was given: ``$KERNEL_API_TOKEN``, else the local
    kernel's token file, but only to a loopback URL (the file's token never leaves the box)."""
    if env := os.environ.get("KERNEL_API_TOKEN"):
        return env
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return None
    if not loopback_name(host.lower()) or not _resolves_to_loopback(host):
        return None
    return read_token(token_path(Config().data_dir()))


def _resolves_to_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback one. ``*.localhost`` means
    this machine by RFC 6761, but a resolver without that rule (glibc's, without
    systemd-resolved) asks DNS, whose answer could be any host."""
    h = host.strip("[]")
    if is_loopback(h):
        return True  # an address literal: no lookup
    try:
        infos = socket.getaddrinfo(h, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(is_loopback(str(info[4][0]).split("%", 1)[0]) for info in infos)


class ClientFailure(Exception):
    """Ends a command: ``line`` goes to stderr and the exit status is 1."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


class Client:
    """A small JSON client of the kernel's API (one aiohttp session per command)."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, *, body: Any = None,
                   params: dict[str, str] | None = None) -> Any:
        assert self._session is not None
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            async with self._session.request(method, self.url + path, json=body,
                                             params=params, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorError:
            raise ClientFailure(f"cannot reach the kernel at {self.url}: is it running? "
                                "(start it with ./scripts/run)") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClientFailure(f"error: no answer from the kernel at {self.url}: "
                                f"{exc or type(exc).__name__}") from None
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if status >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict):
                raise ClientFailure(f"error [{err.get('code')}]: {err.get('message')}")
            raise ClientFailure(f"error [HTTP {status}]: {raw[:200].decode('utf-8', 'replace')}")
        return data


# ================================================================================ arguments


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"argv\": [\"ls\"]}'")
    return value


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


Command = Callable[[Client, argparse.Namespace], Awaitable[Any]]


def _handler(fn: Command) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        url = a.url or os.environ.get("KERNEL_URL") or DEFAULT_URL
        if not url.startswith(("http://", "https://")):
            print(f"error: --url {url!r} must start with http:// or https://", file=sys.stderr)
            return 2
        token = a.token if a.token is not None else default_token(url)

        async def main() -> Any:
            async with Client(url, token) as client:
                return await fn(client, a)

        try:
            data = asyncio.run(main())
        except ClientFailure as exc:
            print(exc.line, file=sys.stderr)
            return 1
        if a.json:
            print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0

    return run


def add_client_commands(sub: Any) -> None:
    """Add the client subcommands to ``sub`` (an argparse subparsers action)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument("--url", default=None,
                   help=f"the kernel's API (default: $KERNEL_URL, else {DEFAULT_URL})")
    g.add_argument("--token", default=None,
                   help="bearer token (default: $KERNEL_API_TOKEN, else for a loopback URL "
                        "the kernel's <data dir>/api.token; data dir: $KERNEL_DATA_DIR or "
                        "~/.local/share/open-autoglm-kernel)")
    g.add_argument("--json", action="store_true", help="print the API's JSON answer")

    def cmd(name: str, fn: Command, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=help_text,
                                                    description=help_text)
        p.set_defaults(handler=_handler(fn))
        return p

    p = cmd("submit", _submit, "submit a one-shot job to a running kernel")
    p.add_argument("action", help="an installed action (see `python -m kernel plugins`)")
    p.add_argument("--payload", type=_json_object, default=None, help="JSON object")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--delay", type=_seconds, default=None,
                      help="run after this long (seconds, or e.g. 30s, 5m)")
    when.add_argument("--at", default=None, help="run at this ISO-8601 instant")
    p.add_argument("--dedup-key", default=None,
                   help="a key: a second submission with it returns the first job")
    p.add_argument("--dedup-ttl", type=_seconds, default=None,
                   help="how long the key is remembered (default: [store] dedup_ttl)")
    p.add_argument("--priority", type=int, default=None, help="higher runs first (default 0)")
    p.add_argument("--timeout", type=_seconds, default=None, help="run timeout")

    p = cmd("jobs", _jobs, "list pending and running jobs")
    p.add_argument("--state", choices=[s.value for s in JobState], default=None)
    p.add_argument("--task", default=None, help="only this task's jobs")
    p.add_argument("--limit", type=int, default=100)

    p = cmd("runs", _runs, "query run history, newest first")
    p.add_argument("--task", default=None)
    p.add_argument("--outcome", choices=[o.value for o in Outcome], default=None)
    p.add_argument("--since", default=None, help="ISO-8601 instant or epoch seconds")
    p.add_argument("--until", default=None, help="ISO-8601 instant or epoch seconds")
    p.add_argument("--limit", type=int, default=20)

    cmd("tasks", _tasks, "list tasks and their state")
    for name, fn, text in (("pause", _pause, "pause a task's schedule"),
                           ("resume", _resume, "resume a paused task")):
        cmd(name, fn, text).add_argument("id", help="task id")
    p = cmd("trigger", _trigger, "run a task now, outside its schedule")
    p.add_argument("id", help="task id")
    p.add_argument("--payload", type=_json_object, default=None,
                   help="JSON object replacing the task's payload for this run")
    cmd("cancel", _cancel, "cancel a pending, queued or running job").add_argument(
        "job_id", help="job id")
    p = cmd("backfill", _backfill, "run a task's occurrences in [start, end]")
    p.add_argument("id", help="task id")
    p.add_argument("--start", required=True, help="ISO-8601 instant")
    p.add_argument("--end", required=True, help="ISO-8601 instant")


# ================================================================================ commands


def _out(a: argparse.Namespace, text: str) -> None:
    if not a.json:
        print(text)


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    return iso.replace("T", " ").replace("+00:00", "Z")


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from .tables import print_table

    print_table(title, columns, rows)


async def _submit(c: Client, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"action": a.action}
    for key, value in (("payload", a.payload), ("delay", a.delay), ("at", a.at),
                       ("dedup_key", a.dedup_key), ("dedup_ttl", a.dedup_ttl),
                       ("priority", a.priority), ("timeout", a.timeout)):
        if value is not None:
            body[key] = value
    data = await c.call("POST", "/jobs", body=body)
    if data.get("existed"):
        _out(a, f"already submitted: job {data['id']} (dedup key {a.dedup_key!r}); "
                "nothing new was stored")
    else:
        _out(a, f"submitted job {data['id']} (due {_when(data['due_at'])}, "
                f"trace {data['trace_id']})")
    return data


async def _jobs(c: Client, a: argparse.Namespace) -> Any:
    params = {"limit": str(a.limit)}
    if a.state:
        params["state"] = a.state
    if a.task:
        params["task"] = a.task
    data = await c.call("GET", "/jobs", params=params)
    if not a.json:
        _table(f"Jobs ({len(data['jobs'])})",
               ["id", "action", "task", "kind", "state", "due", "attempt", "priority"],
               [[j["id"], j["action"], j["task_id"] or "-", j["kind"], j["state"],
                 _when(j["due_at"]), str(j["attempt"]), str(j["priority"])]
                for j in data["jobs"]])
    return data


async def _runs(c: Client, a: argparse.Namespace) -> Any:
    params = {"limit": str(a.limit)}
    for key in ("task", "outcome", "since", "until"):
        if getattr(a, key):
            params[key] = getattr(a, key)
    data = await c.call("GET", "/runs", params=params)
    if not a.json:
        _table(f"Runs ({len(data['runs'])}, newest first)",
               ["finished", "task", "action", "outcome", "code", "attempt", "trace", "detail"],
               [[_when(r["finished_at"]), r["task_id"] or "-", r["action"], r["outcome"],
                 r["error_code"] or "", str(r["attempt"]), r["trace_id"],
                 r["detail"][:60]] for r in data["runs"]])
    return data


async def _tasks(c: Client, a: argparse.Namespace) -> Any:
    data = await c.call("GET", "/tasks")
    if not a.json:
        def state(t: dict[str, Any]) -> str:
            return "disabled" if not t["enabled"] else "paused" if t["paused"] else "active"

        _table(f"Tasks ({len(data['tasks'])})",
               ["id", "action", "schedule", "state", "next due", "last", "running"],
               [[t["id"], t["action"], t["schedule"] or ("after " + ", ".join(t["after"])
                                                           if t["after"] else "-"),
                 state(t), _when(t["next_due"]), t["last_error_code"] or t["last_outcome"]
                 or "-", str(t["running"])] for t in data["tasks"]])
    return data


async def _pause(c: Client, a: argparse.Namespace) -> Any:
    data = await c.call("POST", f"/tasks/{quote(a.id, safe='')}/pause")
    _out(a, f"paused task {a.id}")
    return data


async def _resume(c: Client, a: argparse.Namespace) -> Any:
    data = await c.call("POST", f"/tasks/{quote(a.id, safe='')}/resume")
    _out(a, f"resumed task {a.id} (next due {_when(data.get('next_due'))})")
    return data


async def _trigger(c: Client, a: argparse.Namespace) -> Any:
    body = {"payload": a.payload} if a.payload is not None else None
    data = await c.call("POST", f"/tasks/{quote(a.id, safe='')}/trigger", body=body)
    _out(a, f"triggered task {a.id}: job {data['id']} (trace {data['trace_id']})")
    return data


async def _cancel(c: Client, a: argparse.Namespace) -> Any:
    data = await c.call("DELETE", f"/jobs/{quote(a.job_id, safe='')}")
    if data.get("running"):
        _out(a, f"job {a.job_id} is still running: it did not stop when cancelled; the kernel "
                "abandons it (ERR_ABANDONED) and frees its slot")
    elif data["was"] == "running" and not data["cancelled"]:
        _out(a, f"job {a.job_id} finished before the cancel took effect: {data.get('outcome')}")
    else:
        code = f", {data['error_code']}" if data.get("error_code") else ""
        _out(a, f"cancelled job {a.job_id} (it was {data['was']}{code})")
    return data


async def _backfill(c: Client, a: argparse.Namespace) -> Any:
    data = await c.call("POST", f"/tasks/{quote(a.id, safe='')}/backfill",
                        body={"start": a.start, "end": a.end})
    _out(a, f"backfilled task {a.id}: {data['count']} job(s) submitted")
    return data
