"""Durable state: the store contract and its implementations.

``base`` holds the contract (:class:`Store`); ``sqlite`` the durable implementation (one SQLite
file, WAL, group commit), with ``sqlite_tx`` the transactions its writer thread runs; ``memory``
an in-process one with the same contract; ``schema`` the persisted format (tables, forward
migrations, row codecs). Nothing here reads a clock: methods
that need "now" take it as an argument.
"""

from kernel.store.base import Store
from kernel.store.memory import MemoryStore
from kernel.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "SqliteStore", "Store"]
