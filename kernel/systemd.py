"""systemd integration without a dependency: readiness, watchdog, status and stopping.

The ``sd_notify`` protocol is one datagram of newline-separated ``VAR=value`` lines sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` names Linux's abstract
namespace). Without the variable every call is a cheap no-op, so the same process runs under
``Type=notify``, under ``Type=exec`` and in a terminal.

:class:`SystemdNotify` is a kernel service (``KernelParts(services=[...])``):

* ``READY=1`` once the kernel has recovered its store and armed every task (the ``started``
  event of :meth:`Kernel.run`) and, when the API is on, once it listens;
* ``WATCHDOG=1`` every ``$WATCHDOG_USEC / 4``, but only on a tick whose event-loop lag (how
  late the tick woke) is below ``$WATCHDOG_USEC / 4``: a loop that is blocked or starved stops
  feeding, and systemd restarts the kernel when ``WatchdogSec`` passes without a healthy tick;
* ``STATUS=running 1/64, queued 0, timers 12, tasks 3`` on every tick (``systemctl status``);
* ``STOPPING=1`` when the kernel begins its orderly shutdown (``KernelStopping`` on the bus).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .clock import Clock
from .events import Event, KernelStopping

if TYPE_CHECKING:
    from .app import Kernel, Snapshot

log = logging.getLogger("kernel.systemd")

STATUS_PERIOD = 5.0
"""Seconds between STATUS updates when there is no watchdog."""


class Notifier:
    """Sends sd_notify datagrams to one socket; a no-op when ``address`` is None."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._sock: socket.socket | None = None
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def send(self, *lines: str) -> bool:
        """Send one datagram holding ``lines``; True if it was handed to the socket.

        Never raises and never blocks: a full or vanished socket drops the message (it is
        state the next message repeats), and the first failure is logged."""
        if self.address is None or not lines:
            return False
        if any("\n" in line for line in lines):
            raise ValueError("an sd_notify line cannot contain a newline")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self._target())
        except OSError as exc:
            self.failed += 1
            if self.failed == 1:
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_seconds(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """``$WATCHDOG_USEC`` in seconds, or None when there is no watchdog for this process (the
    variable is missing, not a positive integer, or ``$WATCHDOG_PID`` names another process)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wpid = env.get("WATCHDOG_PID", "")
    if wpid and wpid != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1_000_000


def status_line(snap: Snapshot) -> str:
    """The counts ``systemctl status`` shows: ``running 1/64, queued 0, timers 12, tasks 3``."""
    return (f"running {len(snap.running)}/{snap.max_concurrency}, queued {snap.queued}, "
            f"timers {snap.timers}, tasks {len(snap.tasks)}")


async def feed(notifier: Notifier, clock: Clock, *, watchdog: float | None,
               status: Callable[[], str], ticks: int | None = None) -> None:
    """The watchdog and status loop (until cancelled, or ``ticks`` ticks for tests).

    With a watchdog the tick period is ``watchdog / 4`` and ``WATCHDOG=1`` goes out only on a
    tick that woke less than ``watchdog / 4`` late; without one, ``STATUS=`` every
    :data:`STATUS_PERIOD` seconds."""
    period = watchdog / 4 if watchdog is not None else STATUS_PERIOD
    bound = period
    n = 0
    while ticks is None or n < ticks:
        n += 1
        due = clock.monotonic() + period
        await clock.sleep(period)
        lag = clock.monotonic() - due
        try:
            lines = [f"STATUS={status()}"]
        except Exception:  # a kernel that cannot describe itself is not healthy either
            log.exception("cannot build the systemd status line: watchdog not fed")
            continue
        if watchdog is not None:
            if lag < bound:
                lines.insert(0, "WATCHDOG=1")
            else:
                log.warning("event loop %.2f s late (bound %.2f s): systemd watchdog not fed",
                            lag, bound)
        notifier.send(*lines)


class SystemdNotify:
    """The kernel service; see the module docstring. ``started`` is the event passed to
    :meth:`Kernel.run`; ``wait_api`` makes READY wait for the HTTP API to listen."""

    def __init__(self, notifier: Notifier, started: asyncio.Event, *, watchdog: float | None,
                 wait_api: bool = False, api_poll: float = 0.02) -> None:
        self.notifier = notifier
        self.started = started
        self.watchdog = watchdog
        self.wait_api = wait_api
        self.api_poll = api_poll
        self.stopping: str | None = None

    def observe(self, ev: Event) -> None:
        """A bus subscriber (subscribe it before ``Kernel.run``): STOPPING=1 on KernelStopping."""
        if isinstance(ev, KernelStopping):
            self.stopping = ev.reason
            self.notifier.send("STOPPING=1", f"STATUS=stopping ({ev.reason})")

    def _status(self, kernel: Kernel) -> str:
        line = status_line(kernel.snapshot())
        return line if self.stopping is None else f"stopping ({self.stopping}): {line}"

    async def __call__(self, kernel: Kernel) -> None:
        if not self.notifier.enabled:
            return
        await self.started.wait()
        # the API service sets kernel.api_url once its port is bound; it has no event to wait on
        while self.wait_api and kernel.api_url is None:  # noqa: ASYNC110
            await asyncio.sleep(self.api_poll)
        self.notifier.send("READY=1", f"STATUS=ready: {self._status(kernel)}")
        log.info("told systemd the kernel is ready%s", "" if self.watchdog is None else
                 f" (watchdog {self.watchdog:g} s, fed every {self.watchdog / 4:g} s)")
        await feed(self.notifier, kernel.clock, watchdog=self.watchdog,
                   status=lambda: self._status(kernel))
