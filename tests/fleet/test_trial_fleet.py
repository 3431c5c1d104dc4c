"""Defects found by an outside trial of fleet mode (several kernels on one PostgreSQL database),
each reproduced against the session's real throwaway cluster.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from kernel.api.schemas import JobIn
from kernel.app import SubmitRequest
from kernel.clock import SystemClock
from kernel.config import FleetSection, parse_text
from kernel.errors import CATALOGUE, ConfigError, ErrorCode
from kernel.fleet import settings_from
from kernel.hookspecs import PluginContext
from kernel.main import banner, build
from kernel.plugins import load as load_plugins
from kernel.records import Job, JobState, Outcome, RunQuery, RunRecord
from kernel.store.postgres import PostgresStore

from ..harness import make_config
from ..pg_cluster import PgCluster
from .conftest import Fleet
from .test_kernel_fleet import Kernels, Ledger, until
from .test_refire import FireFailsStore


async def _until(cond: object, limit: float, what: str) -> None:
    end = time.monotonic() + limit
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out after {limit} s waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_long_schema_name_still_rescues_and_wakes(fleet: Fleet) -> None:
    """A valid schema name of 52-63 bytes made the NOTIFY channel (``kernel_jobs:<schema>``)
    longer than PostgreSQL's 63-byte identifiers: ``pg_notify`` refused it, so rescuing a dead
    kernel's jobs failed every time (they stayed with the dead kernel for ever), and LISTEN,
    truncated by the server, never matched the untruncated name asyncpg dispatches on."""
    fleet.schema = (fleet.schema + "_" + "s" * 63)[:63]
    a = await fleet.store()
    b = await fleet.store()
    woke: list[int] = []
    await b.listen(lambda: woke.append(1))
    await a.register_kernel("dead", "h", 1, None)
    now = time.time()
    _, owned = await a.submit_claimed([Job(id=f"j{i}", action="log", due_at=now)
                                       for i in range(3)], now, "dead", now + 2)
    assert owned == [True, True, True]
    rescue = await b.expire_kernel("dead")  # raised StoreError: channel name too long
    assert sorted(rescue.jobs) == ["j0", "j1", "j2"]
    await a.submit([Job(id="free", action="log", due_at=now)], now)
    await _until(lambda: woke, 5, "a NOTIFY on a long schema name to wake the listener")


def test_a_password_in_the_dsn_query_is_redacted() -> None:
    """libpq takes the password from the URI's query too (``?password=...``), and a DSN that is
    not a URI (``host=h password=...``) is echoed whole in the error that rejects it: both
    reached every error message, the log and ``/healthz`` in clear."""
    for dsn in ("postgresql://u@h/db?password=SECRET1",
                "postgresql://u@h/db?sslmode=require&password=SECRET2&application_name=x",
                "postgresql://u:SECRET3@h/db?password=SECRET4",
                "host=h password=SECRET5 user=u",
                "host=h password='SECRET 6' user=u"):
        where = PostgresStore(dsn).where
        assert "SECRET" not in where, where
    assert PostgresStore("postgresql://u@h:5432/db?sslmode=require").where.startswith(
        "postgresql://u@h:5432/db?sslmode=require")


@pytest.mark.parametrize("dsn", ["not-a-dsn", "mysql://kernel@db/kernel",
                                 "postgresql://kernel@db:notaport/kernel",
                                 "postgresql://kernel@db/kernel?sslmode=bogus"])
async def test_a_malformed_dsn_is_a_config_error_naming_the_field(dsn: str) -> None:
    """A DSN asyncpg cannot parse was reported as ``cannot reach PostgreSQL`` (exit 1, a
    retryable store error, so a service manager restarts it for ever), and a bad port
    (``ValueError`` from the parser) escaped as a traceback."""
    with pytest.raises(ConfigError) as info:
        await PostgresStore(dsn).open()
    assert [i.where for i in info.value.issues] == ["[store].dsn"]


async def test_a_schema_name_longer_than_postgresql_allows_is_a_config_error(
        pg_cluster: PgCluster) -> None:
    with pytest.raises(ConfigError) as info:
        await PostgresStore(pg_cluster.dsn, schema="k" * 64).open()
    assert [i.where for i in info.value.issues] == ["[store].schema"]


@pytest.mark.slow
def test_run_with_a_malformed_dsn_exits_78_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[kernel]
data_dir = "{tmp_path / 'data'}"
[store]
backend = "postgres"
dsn = "postgresql://kernel:SECRET@db:notaport/kernel"
""")
    done = subprocess.run([sys.executable, "-m", "kernel", "run", "--config", str(cfg),
                           "--no-server", "--log-format", "text"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78, done.stderr[-2000:]
    assert "[store].dsn" in done.stderr and "Traceback" not in done.stderr
    assert "SECRET" not in done.stderr


def test_validate_rejects_a_malformed_dsn_and_a_too_long_schema() -> None:
    for store, field in (('dsn = "mysql://kernel@db/kernel"', "dsn"),
                         ('dsn = "postgresql://kernel@db/kernel"\nschema = "' + "k" * 64 + '"',
                          "schema")):
        _, issues = parse_text(f'[store]\nbackend = "postgres"\n{store}\n', "c.toml")
        assert any(field in i.where or field in i.message for i in issues), (store, issues)


def test_the_banner_of_a_fleet_kernel_names_its_database_not_a_sqlite_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The start-up banner (and the "kernel started" line) named <data_dir>/kernel.sqlite3,
    a file a fleet kernel never uses, instead of its database."""
    cfg, issues = parse_text(f'[kernel]\ndata_dir = "{tmp_path}"\n[store]\nbackend = "postgres"\n'
                             'dsn = "postgresql://kernel:SECRET@db/kernel"\n', "c.toml")
    assert not [i for i in issues if i.severity == "error"]
    banner(cfg, None, "text")
    err = capsys.readouterr().err
    assert "sqlite3" not in err and "postgresql://kernel:***@db/kernel" in err, err


async def test_query_runs_by_job_id_returns_that_jobs_runs_only(fleet: Fleet) -> None:
    """``PostgresStore.query_runs`` ignored ``RunQuery.job_id``: ``GET /jobs/{id}`` of any
    finished (or cancelled-while-pending) job answered with the newest run of *another* job
    (seen on a fleet: a cancelled job reported as a ``tick`` cron run that succeeded)."""
    s = await fleet.store()
    now = time.time()
    await s.submit([Job(id=j, action="log", due_at=now) for j in ("a", "b")], now)
    for k, j in enumerate(("a", "b")):
        await s.finish(j, RunRecord(job_id=j, task_id=None, action="log", trace_id=f"t{j}",
                                    span_id="s", scheduled_at=now, started_at=now,
                                    finished_at=now + k, attempt=1, outcome=Outcome.SUCCEEDED))
    assert [r.job_id for r in await s.query_runs(RunQuery(job_id="a"))] == ["a"]
    assert await s.query_runs(RunQuery(job_id="never")) == []


async def test_a_finish_after_a_cancel_from_another_kernel_is_superseded(fleet: Fleet) -> None:
    """``DELETE /jobs/{id}`` on kernel B of a job running on kernel A records the attempt as
    cancelled (and answers ``cancelled: true``); A's run goes on (a documented limit), but its
    finish was then recorded as a second, ordinary run of the same attempt with its follow-ups
    stored: a retry or a dependent of a cancelled job ran (README: "it is not run again"; the
    catalogue's ERR_SUPERSEDED: "or it was cancelled meanwhile ... its follow-ups dropped")."""
    a, b = await fleet.store(), await fleet.store()
    await a.register_kernel("ka", "h", 1, None)
    now = time.time()
    await a.submit_claimed([Job(id="c", action="log", due_at=now)], now, "ka", now + 2)
    assert await a.mark_running_owned("ka", "c", now, 1)
    cancelled = RunRecord(job_id="c", task_id=None, action="log", trace_id="t", span_id="s1",
                          scheduled_at=now, started_at=None, finished_at=now + 1, attempt=1,
                          outcome=Outcome.CANCELLED, error_code="ERR_CANCELLED")
    assert await b.cancel("c", cancelled) is not None  # what Kernel.cancel does on kernel B
    done = RunRecord(job_id="c", task_id=None, action="log", trace_id="t", span_id="s2",
                     scheduled_at=now, started_at=now, finished_at=now + 2, attempt=1,
                     outcome=Outcome.FAILED, error_code="ERR_CONN_TIMEOUT")
    retry = Job(id="c-retry", action="log", due_at=now + 5, attempt=2)
    assert not await a.finish_owned("ka", "c", done, [retry])
    assert await a.get_job("c-retry") is None
    assert [r.outcome for r in await a.query_runs(RunQuery(job_id="c"))] == [Outcome.CANCELLED]
    assert [r.span_id for r in await a.superseded_runs("c")] == ["s2"]
    # the same without follow-ups (the one-statement path of a fleet kernel's usual group)
    await a.submit_claimed([Job(id="d", action="log", due_at=now)], now, "ka", now + 2)
    assert await a.mark_running_owned("ka", "d", now, 1)
    assert await b.cancel("d", msgspec.structs.replace(cancelled, job_id="d")) is not None
    assert not await a.finish_owned("ka", "d", msgspec.structs.replace(done, job_id="d"))
    assert [r.outcome for r in await a.query_runs(RunQuery(job_id="d"))] == [Outcome.CANCELLED]


@pytest.mark.slow
async def test_cancelling_a_run_on_another_kernel_does_not_claim_it_ended(fleet: Fleet) -> None:
    """A job found only in the store (running on another kernel) was reported ended and
    cancelled at once, while it ran on; the fleet cannot stop it (README: 'or running: true')."""
    ledger = Ledger()
    ks = Kernels(fleet, ledger)
    ledger.hold.clear()
    try:
        await ks.start(n=2)
        res = await ks.kernels[0].submit(SubmitRequest(action="rec", payload={"hold": True}))
        await until(lambda: any(r[1] == res.job.id for r in ledger.rows))
        rep = await ks.kernels[1].cancel_and_wait(res.job.id)
        assert rep.was is JobState.RUNNING
        assert not rep.ended, rep  # it is still running on kernel 0
    finally:
        ledger.hold.set()
        await ks.stop()


def test_post_jobs_accepts_the_gpu_fields_the_readme_documents() -> None:
    body = msgspec.json.decode(b'{"action": "log", "gpu_memory_mb": 1000, "gpu": 0}',
                               type=JobIn)
    assert msgspec.structs.asdict(body).get("gpu_memory_mb") == 1000


@pytest.mark.slow
async def test_occurrences_missed_while_the_database_was_down_are_caught_up(
        fleet: Fleet) -> None:
    """In a fleet, occurrences whose fire failed (database unreachable) were dropped for good,
    whatever the task's misfire policy; firing them again once the database answers is safe
    (the fired table keys them) and is what misfire = catch_up promises."""
    store = FireFailsStore(fleet.cluster.dsn, schema=fleet.schema)
    ledger = Ledger()
    plugins = load_plugins(PluginContext(), extra=[("rec", ledger.plugin(0))],
                           use_entry_points=False)
    kernel = build(make_config("""
        [[tasks]]
        id = "beat"
        schedule = "* * * * * *"
        action = "rec"
        misfire = "catch_up"
        overlap = "allow_all"
        misfire_grace = "1h"
        """), clock=SystemClock(), plugins=plugins, store=store)
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))
    try:
        await asyncio.wait_for(started.wait(), 30)
        await until(lambda: len(ledger.rows) >= 1, 10)
        store.down = True
        await until(lambda: len(store.failed) >= 2, 10)
        store.down = False
        missed = set(store.failed)
        await until(lambda: {r[3] for r in ledger.rows} >= missed, 5)
    finally:
        kernel.stop("test")
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)


def test_a_ttl_that_declares_live_kernels_dead_is_refused() -> None:
    """``ttl`` not above ``heartbeat`` was accepted: every kernel was declared dead by the
    others between two of its own heartbeats, fenced itself every cycle (seen: 10 fencings in
    12 s with heartbeat 2s, ttl 1s) and its running jobs were rescued and run again while they
    still ran."""
    for ttl in ("1s", "3s"):  # 3 s: one late heartbeat would kill
        _, issues = parse_text(f'[fleet]\nheartbeat = "2s"\nttl = "{ttl}"\n', "c.toml")
        assert [i.where for i in issues] == ["[fleet].ttl"], issues
        with pytest.raises(ValueError, match="ttl"):
            FleetSection(heartbeat="2s", ttl=ttl)
    assert settings_from(FleetSection(heartbeat="2s", ttl="4s")).ttl == 4.0
    assert settings_from(FleetSection()).ttl == 10.0


def test_validate_rejects_a_ttl_below_twice_the_heartbeat() -> None:
    _, issues = parse_text('[fleet]\nheartbeat = "2s"\nttl = "1s"\n', "c.toml")
    assert any("ttl" in i.where or "ttl" in i.message for i in issues), issues


@pytest.mark.slow
async def test_a_burst_on_one_busy_kernel_is_shared_with_idle_ones(fleet: Fleet) -> None:
    ledger = Ledger()
    ks = Kernels(fleet, ledger)
    ledger.hold.clear()
    try:
        await ks.start("[scheduler]\nmax_concurrency = 2\n", n=2)
        for _ in range(6):
            await ks.kernels[0].submit(SubmitRequest(action="rec", payload={"hold": True}))
        # kernel 0 can run 2 of them; kernel 1 is idle and could run 2 more
        await until(lambda: len(ledger.rows) >= 4, 5)
    finally:
        ledger.hold.set()
        await ks.stop()


def test_the_store_unavailable_remedy_covers_the_fleet_database() -> None:
    assert "dsn" in CATALOGUE[ErrorCode.ERR_STORE_UNAVAILABLE].remedy
