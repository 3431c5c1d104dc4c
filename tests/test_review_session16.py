"""Review of session 16's kernel changes (3067f46..HEAD): defects shown by tests.

Each test here demonstrated a defect (it failed on the code reviewed); all are fixed now. None of these
needs a PostgreSQL server: the fleet member runs against a fake store, and the kernel is built
with a PostgresStore that is never opened.
"""

from __future__ import annotations

import asyncio

import pytest

from kernel.clock import FakeClock
from kernel.config import StoreSection
from kernel.fleet import FleetMember, FleetSettings
from kernel.hookspecs import PluginContext
from kernel.main import build
from kernel.plugins import load as load_plugins
from kernel.records import Job
from kernel.store.postgres import PostgresStore

from .harness import make_config

SETTINGS = FleetSettings(heartbeat=1.0, ttl=3600.0, horizon=10.0, batch=100)


class GatedStore:
    """Only ``claim_due``: each call is recorded and waits for ``gate`` (a claim round trip)."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def claim_due(self, owner: str, now: float, horizon: float, limit: int, *,
                        max_gpu_memory_mb: int | None = None) -> list[Job]:
        self.calls += 1
        self.entered.set()
        await self.gate.wait()
        return []


async def _spin(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_wake_during_a_claim_round_trip_is_not_lost() -> None:
    clock = FakeClock()
    store = GatedStore()
    room = [2]
    m = FleetMember(store, clock, SETTINGS, on_claimed=lambda _jobs: None,  # type: ignore[arg-type]
                    on_fenced=lambda: None, on_pauses=lambda _s: None,
                    max_gpu_memory_mb=lambda: None, gpu_held=list,
                    drop_queued=lambda _ids: None, room=lambda: room[0])
    m.fenced = False  # (joined)
    claims = asyncio.create_task(m.claims())
    try:
        await asyncio.wait_for(store.entered.wait(), 5)
        # meanwhile this kernel's own API stores a burst: it claims its room at insert and
        # leaves the rest (Journal.new_jobs -> left_unclaimed); the commit's NOTIFY arrives
        m.left_unclaimed()
        m._wake.set()
        store.gate.set()  # the claim's snapshot was taken before that commit: it got nothing
        await _spin()
        m.room_freed()  # runs end here: the kernel has room again
        await _spin()
        # without the clock moving (no poll), the kernel must have claimed again
        assert store.calls >= 2
    finally:
        claims.cancel()
        await asyncio.gather(claims, return_exceptions=True)


async def test_jobs_held_by_a_concurrency_key_do_not_use_up_the_room() -> None:
    clock = FakeClock()
    store = PostgresStore("postgresql://kernel@localhost/kernel", schema="k")  # never opened
    k = build(make_config("[scheduler]\nmax_concurrency = 4\n"
                          "[scheduler.concurrency_limits]\ngpu = 1\n"
                          "[fleet]\nclaim_horizon = \"2s\"\n"),
              clock=clock, store=store,
              plugins=load_plugins(PluginContext(), use_entry_points=False))
    assert k.fleet is not None
    mono = clock.monotonic()
    for i in range(4):  # four jobs of one key whose limit is 1 (e.g. one GPU endpoint)
        k._dispatcher.offer(Job(id=f"g{i}", action="log", due_at=clock.wall()), mono,
                            concurrency_key="gpu")
    started = k._dispatcher.plan(mono)
    assert len(started) == 1 and k._dispatcher.queued == 3  # three held by the key
    free_slots = 4 - len(started)
    # three slots are free: jobs of other keys could start at once
    assert k._room() >= free_slots


def _asyncpg_accepts(dsn: str) -> bool:
    """Whether asyncpg (what PostgresStore connects with) parses ``dsn``."""
    import inspect

    from asyncpg import connect_utils

    parse = connect_utils._parse_connect_dsn_and_args
    kwargs = {name: None for name in inspect.signature(parse).parameters if name != "dsn"}
    try:
        parse(dsn=dsn, **kwargs)
    except connect_utils.exceptions.ClientConfigurationError:
        return False
    return True


@pytest.mark.parametrize("dsn", [
    "postgresql:///db?host=/run/postgresql",
    "postgresql://kernel:@db-host/kernel",  # an empty password
    "postgres://kernel@db-host:5432/kernel",
])
def test_uri_dsns_are_accepted_by_config_and_the_driver(dsn: str) -> None:
    StoreSection(backend="postgres", dsn=dsn)
    assert _asyncpg_accepts(dsn)


def test_a_key_value_dsn_is_refused_by_the_config_as_the_driver_refuses_it() -> None:
    """asyncpg takes URIs only: a libpq key=value DSN passed validate and failed at connect."""
    dsn = "host=/tmp dbname=kernel user=kernel"
    assert not _asyncpg_accepts(dsn)
    with pytest.raises(ValueError, match="not a PostgreSQL URI"):
        StoreSection(backend="postgres", dsn=dsn)


class _FakeKernel:
    """What ConfigReloader.reload uses of a kernel: it keeps its config but the tasks."""

    def __init__(self, config: object) -> None:
        self.config = config
        self.errors: list[object] = []

    async def reload(self, new: object, source: str) -> None:
        import msgspec

        self.config = msgspec.structs.replace(self.config, tasks=list(new.tasks))  # type: ignore[attr-defined]

    def report_reload_error(self, source: str, exc: object) -> None:
        self.errors.append(exc)


async def test_a_reload_that_reverts_an_unapplied_change_does_not_warn(
        caplog: pytest.LogCaptureFixture) -> None:
    from kernel.reload import ConfigReloader

    base = "[scheduler]\nmax_concurrency = 4\n"
    start = make_config(base)
    changed = make_config(base + "[server]\nmax_body_bytes = 4096\n")
    reverted = make_config(base)
    files = [changed, reverted]
    reloader = ConfigReloader(None, None, None, load=lambda *_a: files.pop(0),  # type: ignore[arg-type]
                              loaded=start)
    reloader.kernel = _FakeKernel(start)  # type: ignore[assignment]
    with caplog.at_level("WARNING", logger="kernel.reload"):
        assert await reloader.reload("test")
        assert "[server]" in caplog.text  # not applied: right
        caplog.clear()
        assert await reloader.reload("test")  # the files are as at start again
    assert "[server]" not in caplog.text, caplog.text


async def test_a_huge_claim_horizon_is_refused_or_the_room_stays_finite() -> None:
    clock = FakeClock()
    store = PostgresStore("postgresql://kernel@localhost/kernel", schema="k")  # never opened
    try:
        cfg = make_config("[fleet]\nclaim_horizon = 1e308\n")
    except AssertionError:
        return  # refused as a config error: fine
    k = build(cfg, clock=clock, store=store,
              plugins=load_plugins(PluginContext(), use_entry_points=False))
    assert k.fleet is not None
    k._dispatcher.ended += 10  # runs ended in the last half second
    await clock.advance(0.5)
    assert k.fleet.room() >= 0
