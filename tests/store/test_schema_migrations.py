"""Forward migrations of the SQLite schema on real files: a database written by an older kernel
is brought up to date when opened, keeping its rows."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from kernel.records import Outcome, RunQuery, RunRecord
from kernel.store import SqliteStore, schema


def old_database(path: Path, version: int, runs: list[RunRecord]) -> None:
    """A file as a kernel at schema ``version`` left it (its migrations only), with ``runs``."""
    with contextlib.closing(sqlite3.connect(path)) as con:
        for v in range(1, version + 1):
            for sql in schema.MIGRATIONS[v]:
                con.execute(sql)
            con.execute(f"PRAGMA user_version = {v}")
        con.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
        con.executemany(
            "INSERT INTO runs (job_id, task_id, outcome, trace_id, finished_at, body) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(r.job_id, r.task_id, r.outcome, r.trace_id, r.finished_at, schema.encode(r))
             for r in runs])
        con.commit()


def run(job_id: str, at: float) -> RunRecord:
    return RunRecord(job_id=job_id, task_id=None, action="noop", trace_id=f"t-{job_id}",
                     span_id="s", scheduled_at=None, started_at=at - 1, finished_at=at,
                     attempt=1, outcome=Outcome.SUCCEEDED)


def plan_of(con: sqlite3.Connection, sql: str) -> str:
    return " | ".join(str(r[-1]) for r in con.execute(f"EXPLAIN QUERY PLAN {sql}", ("j1", 10)))


async def test_a_version_1_store_gets_the_runs_by_job_index(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    old_database(path, 1, [run("j1", 10.0), run("j2", 11.0), run("j1", 12.0)])
    by_job = ("SELECT body FROM runs WHERE job_id = ? "
              "ORDER BY finished_at DESC, seq DESC LIMIT ?")
    with contextlib.closing(sqlite3.connect(path)) as con:
        assert "runs_job" not in plan_of(con, by_job)
    async with SqliteStore(path) as s:
        found = await s.query_runs(RunQuery(job_id="j1"))
        assert [r.finished_at for r in found] == [12.0, 10.0]
    with contextlib.closing(sqlite3.connect(path)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == schema.LATEST_VERSION >= 2
        indexes = {r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs'")}
        assert "runs_job" in indexes
        assert "USING INDEX runs_job" in plan_of(con, by_job)


async def test_a_new_store_has_the_runs_by_job_index(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    async with SqliteStore(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as con:
        assert con.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'runs_job'").fetchone()
