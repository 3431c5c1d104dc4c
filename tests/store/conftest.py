"""One store fixture, parametrised over every implementation (APScheduler's data-store suite)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from kernel.store import MemoryStore, SqliteStore, Store
from kernel.store.postgres import PostgresStore

from ..pg_cluster import PgCluster, fresh_schema, session_cluster

Reopen = Callable[[], Awaitable[Store]]


class Harness:
    """The store under test, and how to get a fresh one on the same durable state."""

    def __init__(self, kind: str, tmp_path: Path, pg: PgCluster | None = None) -> None:
        self.kind = kind
        self.path = tmp_path / "store" / "kernel.sqlite3"
        self.pg = pg
        self.pg_schema = fresh_schema()
        self.store = self._make()
        self._opened: list[Store] = [self.store]

    def _make(self) -> Store:
        if self.kind == "postgres":
            assert self.pg is not None
            return PostgresStore(self.pg.dsn, schema=self.pg_schema)
        return MemoryStore() if self.kind == "memory" else SqliteStore(self.path)

    @property
    def durable(self) -> bool:
        return self.kind in ("sqlite", "postgres")

    async def reopen(self) -> Store:
        """Close the store and open a new one on the same file or schema (durable ones)."""
        if not self.durable:
            pytest.skip("the memory store keeps nothing across a restart")
        await self.store.close()
        self.store = self._make()
        self._opened.append(self.store)
        await self.store.open()
        return self.store

    async def close(self) -> None:
        for s in self._opened:
            await s.close()


@pytest.fixture(scope="session")
def pg_cluster() -> PgCluster:
    """The session's throwaway PostgreSQL cluster (see ``tests/pg_cluster.py``)."""
    return session_cluster()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    pg = request.getfixturevalue("pg_cluster") if request.param == "postgres" else None
    h = Harness(request.param, tmp_path, pg)
    await h.store.open()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def store(harness: Harness) -> Store:
    return harness.store
