"""Several PostgresStores on one schema of the session's throwaway cluster: a fleet's store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kernel.store.postgres import PostgresStore

from ..pg_cluster import PgCluster, fresh_schema, session_cluster


@pytest.fixture(scope="session")
def pg_cluster() -> PgCluster:
    """The session's throwaway PostgreSQL cluster (see ``tests/pg_cluster.py``)."""
    return session_cluster()


class Fleet:
    """Stores that share one schema, as the kernels of one fleet share one database."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.schema = fresh_schema("fleet")
        self.stores: list[PostgresStore] = []

    async def store(self, **kw: object) -> PostgresStore:
        s = PostgresStore(self.cluster.dsn, schema=self.schema, **kw)  # type: ignore[arg-type]
        await s.open()
        self.stores.append(s)
        return s

    async def close(self) -> None:
        for s in self.stores:
            await s.close()


@pytest.fixture
async def fleet(pg_cluster: PgCluster) -> AsyncIterator[Fleet]:
    f = Fleet(pg_cluster)
    try:
        yield f
    finally:
        await f.close()
