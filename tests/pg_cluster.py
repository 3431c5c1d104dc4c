"""A throwaway PostgreSQL cluster for the tests: initdb in a temp dir, a unix socket, no TCP.

One cluster per test session (:func:`session_cluster`), shared by every test directory; each test
gets its own PostgreSQL schema in it (:func:`fresh_schema`), which is much cheaper than a database
per test. Tuned for tests, not durability: ``fsync=off``, ``synchronous_commit=off``, small
shared buffers, and the data directory on a RAM file system (``/dev/shm``) where one with room is
mounted: ``initdb`` writes ~40 MB in thousands of files, and on this VM's disk that alone took
~0.95 s against ~0.4 s on tmpfs. ``KERNEL_TEST_PG_DIR`` names another parent directory. A
durable cluster (the benchmarks) always lives on disk.

``initdb`` refuses to run as root: as root, the cluster is created and run by an unprivileged
user (``KERNEL_TEST_PG_USER``, default ``nobody``) that owns the temp dir; the tests connect over
the socket as the ``postgres`` role with trust authentication.

When the server cannot be started, the PostgreSQL tests fail where PostgreSQL is required (``CI``
is set, or ``KERNEL_TEST_PG=required``, which ``./scripts/test`` sets) and are skipped with the
reason otherwise.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

_counter = itertools.count(1)


def required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("KERNEL_TEST_PG") == "required"


def find_bin() -> Path | None:
    """The directory of ``initdb``/``pg_ctl``: ``KERNEL_TEST_PG_BIN``, Debian's layout, PATH."""
    if env := os.environ.get("KERNEL_TEST_PG_BIN"):
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


_RAM_DIR = Path("/dev/shm")
_RAM_NEEDED = 512 << 20  # the cluster is ~40 MB after initdb; the suite's WAL and tables add more


def _ram_dir() -> str | None:
    """``/dev/shm`` when it is a writable directory with room (Docker's default is only 64 MB)."""
    if os.environ.get("KERNEL_TEST_PG_DIR"):
        return os.environ["KERNEL_TEST_PG_DIR"]
    try:
        st = os.statvfs(_RAM_DIR)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < _RAM_NEEDED or not os.access(_RAM_DIR, os.W_OK):
        return None
    return str(_RAM_DIR)


class PgCluster:
    """One initdb'd, started cluster; :meth:`stop` removes it."""

    def __init__(self, *, durable: bool = False) -> None:
        # Benchmarks: fsync, synchronous_commit and autovacuum on, as in production; tests: off.
        self.durable = durable
        self.bin = find_bin()
        # short: a socket path is <= 107 B
        self.root = Path(tempfile.mkdtemp(prefix="kpg-", dir=None if durable else _ram_dir()))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user: str | None = None
        self.started = False
        self.startup_seconds = 0.0

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

    def start(self) -> None:
        t0 = time.perf_counter()
        if self.bin is None or not (self.bin / "initdb").exists():
            raise RuntimeError(
                "PostgreSQL's server binaries (initdb, pg_ctl) were not found: install the "
                "server package (Debian: apt-get install postgresql-15) or set "
                "KERNEL_TEST_PG_BIN to the directory that holds initdb"
            )
        if os.geteuid() == 0:
            self.user = os.environ.get("KERNEL_TEST_PG_USER", "nobody")
            shutil.chown(self.root, user=self.user)
        os.chmod(self.root, 0o755)
        init = self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr.strip()}")
        sync = "on" if self.durable else "off"
        opts = " ".join([
            "-c listen_addresses=''", f"-c unix_socket_directories={self.root}",
            f"-c fsync={sync}", f"-c synchronous_commit={sync}", f"-c full_page_writes={sync}",
            f"-c shared_buffers={'128MB' if self.durable else '32MB'}",
            "-c max_connections=100", "-c wal_level=minimal",
            "-c max_wal_senders=0", f"-c autovacuum={'on' if self.durable else 'off'}",
            "-c jit=off",
        ])
        start = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                          "-w", "-t", "30", "-o", opts, "start")
        if start.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed ({start.returncode}): "
                               f"{start.stderr.strip()} {log}")
        self.started = True
        self.startup_seconds = time.perf_counter() - t0

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.root}"

    def stop(self) -> None:
        if self.started and self.bin is not None:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                      "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def durable_dsn(dsn: str | None = None) -> Iterator[str]:
    """For benchmarks: ``dsn`` if given, else a throwaway cluster's with ``fsync``,
    ``synchronous_commit`` and autovacuum on (as in production), removed afterwards."""
    if dsn is not None:
        yield dsn
        return
    cluster = PgCluster(durable=True)
    cluster.start()
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


_cluster: PgCluster | None = None
_failure: str | None = None


def session_cluster() -> PgCluster:
    """The session's cluster, started on first use (fails or skips: see the module doc)."""
    global _cluster, _failure
    if _cluster is None and _failure is None:
        cluster = PgCluster()
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            cluster.stop()
            _failure = f"cannot start a throwaway PostgreSQL cluster: {e}"
        else:
            _cluster = cluster
            atexit.register(cluster.stop)
    if _cluster is None:
        assert _failure is not None
        if required():
            pytest.fail(_failure + " (PostgreSQL is required here: CI or KERNEL_TEST_PG)")
        pytest.skip(_failure + " (set KERNEL_TEST_PG=required to make this a failure)")
    return _cluster


def fresh_schema(prefix: str = "t") -> str:
    """A schema name no other test of this session uses."""
    return f"{prefix}_{os.getpid()}_{next(_counter)}"


__all__ = ["PgCluster", "find_bin", "fresh_schema", "required", "session_cluster"]
