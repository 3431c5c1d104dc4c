"""The only place in the kernel that reads time.

Two quantities, kept apart:

* **monotonic** seconds (``monotonic()``): delays, timeouts, the timing wheel. Never jumps.
* **wall** seconds since the Unix epoch, UTC (``wall()``): cron, persisted instants, history.

``wall_to_mono`` converts a wall instant into the monotonic deadline the wheel understands; it is
the one place where the two meet. ``sleep_until`` lets the kernel wait for a monotonic deadline
or an earlier wake-up; ``FakeClock`` implements it without real sleeping so tests are
deterministic (advance the clock, and every sleeper whose deadline has passed wakes up).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Monotonic seconds (arbitrary origin)."""
        ...

    def wall(self) -> float:
        """Wall-clock seconds since the Unix epoch (UTC)."""
        ...

    async def sleep_until(self, deadline: float | None, wake: asyncio.Event) -> None:
        """Return when ``monotonic() >= deadline`` or ``wake`` is set (``None``: only wake)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds`` of this clock's monotonic time."""
        ...

    def wall_to_mono(self, wall_instant: float) -> float:
        """The monotonic deadline at which ``wall_instant`` will be reached (past: now)."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic`` and ``time.time``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float | None, wake: asyncio.Event) -> None:
        if wake.is_set():
            return
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(timeout):
                await wake.wait()
        except TimeoutError:
            pass

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def wall_to_mono(self, wall_instant: float) -> float:
        mono = time.monotonic()
        return mono + max(0.0, wall_instant - time.time())


class FakeClock:
    """A clock for tests: time moves only when ``advance`` (or ``set_wall``) is called.

    ``await clock.advance(dt)`` moves both times forward and then yields to the event loop until
    every task woken by the move has had a chance to run, so tests read naturally::

        await clock.advance(5)   # the kernel has now fired everything due in those 5 s
    """

    def __init__(self, wall: float = 1_767_225_600.0, mono: float = 1000.0) -> None:
        self._wall = wall
        self._mono = mono
        self._sleepers: list[tuple[float, asyncio.Event]] = []

    def monotonic(self) -> float:
        return self._mono

    def wall(self) -> float:
        return self._wall

    def wall_to_mono(self, wall_instant: float) -> float:
        return self._mono + max(0.0, wall_instant - self._wall)

    async def sleep_until(self, deadline: float | None, wake: asyncio.Event) -> None:
        if wake.is_set() or (deadline is not None and self._mono >= deadline):
            return
        ev = asyncio.Event()
        entry = (float("inf") if deadline is None else deadline, ev)
        self._sleepers.append(entry)
        try:
            waiter = asyncio.ensure_future(wake.wait())
            timer = asyncio.ensure_future(ev.wait())
            try:
                await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                timer.cancel()
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._mono + seconds, asyncio.Event())

    def _wake_due(self) -> None:
        for deadline, ev in list(self._sleepers):
            if deadline <= self._mono:
                ev.set()

    async def advance(self, seconds: float, *, step: float | None = None) -> None:
        """Move time forward by ``seconds``, in steps of ``step`` (default: one jump per due
        sleeper, so that everything scheduled inside the interval fires in order)."""
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        target = self._mono + seconds
        while True:
            await settle()
            pending = [d for d, _ in self._sleepers if self._mono < d <= target]
            nxt = min(pending) if pending else target
            if step is not None:
                nxt = min(nxt, self._mono + step)
            self._wall += nxt - self._mono
            self._mono = nxt
            self._wake_due()
            await settle()
            if self._mono >= target:
                break

    async def jump(self, seconds: float) -> None:
        """Move both times forward at once, as a stalled loop (or a suspended machine) sees it:
        sleepers wake only after the whole jump (trio's ``MockClock.jump``)."""
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        self._mono += seconds
        self._wall += seconds
        self._wake_due()
        await settle()

    def set_wall(self, wall: float) -> None:
        """Jump wall time without moving monotonic time (an NTP step, or a restart later)."""
        self._wall = wall


async def settle(rounds: int = 50) -> None:
    """Yield to the event loop ``rounds`` times so woken tasks can run to their next await."""
    for _ in range(rounds):
        await asyncio.sleep(0)
