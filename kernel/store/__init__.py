"""Durable state: the store contract and its implementations.

``base`` holds the contract (:class:`Store`); ``sqlite`` the durable implementation (one SQLite
file, WAL, group commit), with ``sqlite_tx`` the transactions its writer thread runs; ``memory``
an in-process one with the same contract; ``schema`` the persisted format (tables, forward
migrations, row codecs). Nothing here reads a clock: methods
that need "now" take it as an argument.
"""

from pathlib import Path

from kernel.store.base import Store
from kernel.store.memory import MemoryStore
from kernel.store.sqlite import SqliteStore


def describe(backend: str, sqlite_path: Path, dsn: str | None, schema: str) -> str:
    """The store a config names, for banners and ``KernelStarted``: the SQLite file, the
    PostgreSQL database (its DSN without a password) and schema, or memory."""
    if backend == "memory":
        return "memory (nothing persists)"
    if backend == "postgres":
        from kernel.store.postgres import redact  # (asyncpg only when it is used)

        return f"PostgreSQL {redact(dsn or '')} (schema {schema})"
    return str(sqlite_path)


__all__ = ["MemoryStore", "SqliteStore", "Store", "describe"]
