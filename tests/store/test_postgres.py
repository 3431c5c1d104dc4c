"""What the PostgreSQL store does beyond the shared contract: schema versions, refusals, errors,
group commit, reconnects, and writers on several connections (a fleet) at once."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import pytest

from kernel.errors import StoreCorrupt, StoreError
from kernel.records import Job, JobKind, Outcome, RunRecord
from kernel.store.pg_schema import PURGE_LOCK
from kernel.store.postgres import PostgresStore, redact

from ..pg_cluster import PgCluster, fresh_schema


def job(i: str, due: float = 100.0, **kw: object) -> Job:
    return Job(id=i, action="log", due_at=due, payload={"n": i}, **kw)  # type: ignore[arg-type]


async def sql(cluster: PgCluster, statement: str) -> None:
    con = await asyncpg.connect(cluster.dsn)
    try:
        await con.execute(statement)
    finally:
        await con.close()


async def test_schema_version_is_recorded_and_reopening_keeps_it(pg_cluster: PgCluster) -> None:
    name = fresh_schema()
    async with PostgresStore(pg_cluster.dsn, schema=name) as s:
        await s.submit([job("a")], now=0.0)
        assert (await s.health())["schema_version"] == 1
    async with PostgresStore(pg_cluster.dsn, schema=name) as s:
        assert await s.count_jobs() == 1
    con = await asyncpg.connect(pg_cluster.dsn)
    try:
        assert [r[0] for r in await con.fetch(f"SELECT version FROM {name}.schema_version")] == [1]
    finally:
        await con.close()


async def test_a_newer_schema_is_refused_untouched(pg_cluster: PgCluster) -> None:
    name = fresh_schema()
    async with PostgresStore(pg_cluster.dsn, schema=name):
        pass
    await sql(pg_cluster, f"INSERT INTO {name}.schema_version (version) VALUES (99)")
    with pytest.raises(StoreCorrupt, match="version 99 is newer"):
        await PostgresStore(pg_cluster.dsn, schema=name).open()


async def test_another_applications_schema_is_refused(pg_cluster: PgCluster) -> None:
    name = fresh_schema()
    await sql(pg_cluster, f"CREATE SCHEMA {name}; CREATE TABLE {name}.jobs (x int)")
    with pytest.raises(StoreCorrupt, match="another application"):
        await PostgresStore(pg_cluster.dsn, schema=name).open()


async def test_kernels_opening_together_migrate_once(pg_cluster: PgCluster) -> None:
    name = fresh_schema()
    stores = [PostgresStore(pg_cluster.dsn, schema=name) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await stores[1].submit([job("a")], now=0.0)
        assert await stores[2].count_jobs() == 1
    finally:
        for s in stores:
            await s.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_server_is_a_store_error_without_the_password() -> None:
    dsn = f"postgresql://kernel:s3cret@127.0.0.1:{free_port()}/kernel"
    with pytest.raises(StoreError, match="cannot reach PostgreSQL") as info:
        await PostgresStore(dsn, connect_timeout=5.0).open()
    assert "s3cret" not in str(info.value) and "kernel:***@127.0.0.1" in str(info.value)
    assert redact("postgresql:///db?host=/tmp/x") == "postgresql:///db?host=/tmp/x"


async def test_concurrent_submitters_are_group_committed(pg_cluster: PgCluster) -> None:
    async with PostgresStore(pg_cluster.dsn, schema=fresh_schema()) as s:
        await asyncio.gather(*(s.submit([job(f"j{i}")], now=0.0) for i in range(300)))
        assert await s.count_jobs() == 300
        assert s.batched_ops == 300 and s.batches < 30


async def test_the_writer_reconnects_after_losing_its_connection(pg_cluster: PgCluster) -> None:
    async with PostgresStore(pg_cluster.dsn, schema=fresh_schema()) as s:
        await s.submit([job("a")], now=0.0)
        con = await asyncpg.connect(pg_cluster.dsn)
        try:
            killed = await con.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'open-autoglm-kernel' AND pid <> pg_backend_pid()")
        finally:
            await con.close()
        assert killed >= 1
        outcomes: list[str] = []
        for i in range(3):  # the first write may meet the dead connection; later ones work
            try:
                await s.submit([job(f"b{i}")], now=0.0)
                outcomes.append("ok")
            except StoreError as e:
                outcomes.append(e.message)
        assert outcomes[1:] == ["ok", "ok"]
        assert outcomes[0] == "ok" or "cannot reach PostgreSQL" in outcomes[0]
        assert await s.get_job("b2") is not None


async def test_two_kernels_racing_one_dedup_key_store_one_job(pg_cluster: PgCluster) -> None:
    name = fresh_schema()
    async with (PostgresStore(pg_cluster.dsn, schema=name) as a,
                PostgresStore(pg_cluster.dsn, schema=name) as b):
        for round_ in range(10):
            key = f"key{round_}"
            res = await asyncio.gather(*(
                s.submit([job(f"{round_}-{k}-{i}", dedup_key=key, dedup_expires_at=1e9)],
                         now=0.0)
                for i in range(5) for k, s in (("a", a), ("b", b))))
            flat = [r[0] for r in res]
            assert sum(not r.existed for r in flat) == 1
            assert len({r.job.id for r in flat}) == 1
        assert await a.count_jobs() == 10


async def test_two_kernels_racing_one_cron_occurrence_store_one_job(
    pg_cluster: PgCluster,
) -> None:
    name = fresh_schema()
    async with (PostgresStore(pg_cluster.dsn, schema=name) as a,
                PostgresStore(pg_cluster.dsn, schema=name) as b):
        res = await asyncio.gather(*(
            s.submit([job(f"{k}{i}", 60.0, kind=JobKind.CRON, task_id="t", scheduled_at=60.0)],
                     now=0.0)
            for i in range(10) for k, s in (("a", a), ("b", b))))
        assert sum(not r[0].existed for r in res) == 1
        assert await b.count_jobs() == 1


async def test_one_kernel_at_a_time_purges(pg_cluster: PgCluster) -> None:
    async with PostgresStore(pg_cluster.dsn, schema=fresh_schema()) as s:
        await s.submit([job("a", dedup_key="k", dedup_expires_at=5.0)], now=0.0)
        await s.finish("a", RunRecord(
            job_id="a", task_id=None, action="log", trace_id="t", span_id="s",
            scheduled_at=None, started_at=1.0, finished_at=2.0, attempt=1,
            outcome=Outcome.SUCCEEDED))
        other = await asyncpg.connect(pg_cluster.dsn)  # another kernel, purging right now
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", PURGE_LOCK)
            assert await s.prune_history(100.0, max_rows=0, max_age=None) == 0
            assert await s.purge_dedup(now=10.0) == 0
            await other.execute("SELECT pg_advisory_unlock($1)", PURGE_LOCK)
        finally:
            await other.close()
        assert await s.prune_history(100.0, max_rows=0, max_age=None) == 1
        assert await s.purge_dedup(now=10.0) == 1


async def test_fleet_calls_on_a_closed_store_refuse(pg_cluster: PgCluster) -> None:
    s = PostgresStore(pg_cluster.dsn, schema=fresh_schema())
    with pytest.raises(StoreError, match="not open"):
        await s.claim_due("k", now=0.0, horizon=1.0, limit=10)
    with pytest.raises(StoreError, match="not open"):
        await s.finish_owned("k", "j", RunRecord(
            job_id="j", task_id=None, action="log", trace_id="t", span_id="s",
            scheduled_at=None, started_at=1.0, finished_at=2.0, attempt=1,
            outcome=Outcome.SUCCEEDED))


def test_insert_statement_passes_columns_equal_across_the_batch_once() -> None:
    from kernel.store import pg_schema as ps

    rows = [ps.job_row(job("a", 1.0), b"x", "k1"), ps.job_row(job("b", 2.0, priority=5), b"y", "k1")]
    sql_text, params = ps.insert_jobs_sql(ps.columns(rows, len(ps.JOB_COLUMNS)))
    scalars = [p for p in params if not isinstance(p, list)]
    arrays = [p for p in params if isinstance(p, list)]
    # id, due_at, body and priority differ; state, kind, owner, attempt... are one value each
    assert arrays == [["a", "b"], [1.0, 2.0], [0, 5], [b"x", b"y"]]
    assert "k1" in scalars and "pending" in scalars
    assert sql_text.count("[]") == 4 and "$" in sql_text


async def test_a_batch_mixing_kinds_priorities_and_owners_is_stored_as_given(
        pg_cluster: PgCluster) -> None:
    async with PostgresStore(pg_cluster.dsn, schema=fresh_schema()) as s:
        await s.register_kernel("k", "h", 1, now=0.0)
        jobs = [job("p", 1.0, priority=3), job("q", 1.0, gpu_memory_mb=512),
                job("c", 1.0, kind=JobKind.CRON, task_id="t", scheduled_at=1.0),
                job("far", 99.0, attempt=2)]
        _, owned = await s.submit_claimed(jobs, now=0.0, owner="k", claim_before=5.0)
        assert owned == [True, True, True, False]
        got = {j.id: j for j in await s.get_jobs(["p", "q", "c", "far"])}
        assert (got["p"].priority, got["q"].gpu_memory_mb, got["far"].attempt) == (3, 512, 2)
        assert (got["c"].kind, got["c"].task_id, got["c"].scheduled_at) == (JobKind.CRON, "t", 1.0)
        assert [j.id for j in await s.owned_jobs("k")] == ["p", "q", "c"]
        # every column equal: one value each, still stored per job
        await s.submit([job("s1", 5.0), job("s2", 5.0)], now=0.0)
        assert sorted(j.id for j in await s.get_jobs(["s1", "s2"])) == ["s1", "s2"]


async def test_commits_are_synchronous_whatever_the_servers_default(
        pg_cluster: PgCluster) -> None:
    """A job is acknowledged after its COMMIT: the store's connections ask for synchronous
    commit, or a server run with ``synchronous_commit = off`` loses acknowledged jobs when it
    crashes (the test cluster runs with it off, as such a server would)."""
    con = await asyncpg.connect(pg_cluster.dsn)
    try:
        assert await con.fetchval("SHOW synchronous_commit") == "off"  # the server's default
    finally:
        await con.close()
    async with PostgresStore(pg_cluster.dsn, schema=fresh_schema()) as s:
        assert [r[0] for r in await s._read("SHOW synchronous_commit")] == ["on"]
        writer = await s._take_writer()  # where the group commits run
        try:
            assert await writer.fetchval("SHOW synchronous_commit") == "on"
        finally:
            s._drop_writer(writer)
