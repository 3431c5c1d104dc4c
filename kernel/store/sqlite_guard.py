"""What the SQLite store does before SQLite may write: take ownership, then check the files.

Blocking file work, run on the store's writer thread while it opens (no asyncio in here).

Ownership. One store file has one owner: :class:`OwnerLock` holds an exclusive ``flock`` on
``<db>-lock`` for as long as the store is open, and writes the holder's pid into it. A second
owner, in another process or in this one, is refused with :class:`~kernel.errors.StoreLocked`
naming that pid. The operating system drops a ``flock`` when the last descriptor of its open
file goes, so a holder killed with SIGKILL never leaves a stale lock: the file stays, the lock
does not. (SQLite's ``locking_mode=EXCLUSIVE`` was the other candidate; it would lock out the
store's own reader connections and the read-only inspection tools, and it is taken only at the
first write.) The descriptor is close-on-exec, so ``exec`` children never inherit it; a child
that is *forked* without exec shares it and keeps the lock while it lives, which the refusal
message points out when the recorded pid is gone. On NFS, Linux emulates ``flock`` with POSIX
locks; keep the store on a local disk.

Clean close. The lock file also says whether its last owner closed the store: ``starting``
while it opens, ``open`` once the write-ahead log exists, ``closed`` after a clean close (when
SQLite has checkpointed the WAL into the file and removed it). A store found ``open`` by the
next owner was killed or crashed; its WAL then holds every commit since the last checkpoint,
and if the WAL is gone those commits are lost: :func:`wal_loss` says so, at ERROR with
ERR_STORE_WAL_LOST, with the number of pages the ``-shm`` index still counts.

Checks before the first write, in this order: the lock, when its file exists (a busy store is
reported at once); the WAL-loss check (it reads ``-shm`` before any SQLite connection resets
it); :func:`check_writable` (``-wal``, ``-shm``, the file and its directory: SQLite maps
``-shm`` into memory, and one it cannot write ends in SIGBUS); :func:`probe`, on a read-only
connection: ours, not newer, and ``PRAGMA quick_check`` clean. A file refused by the probe is
left exactly as it was (a read-only connection never checkpoints and never writes the header;
without a ``-wal`` the file is read as immutable, so no ``-wal``/``-shm`` appear), and, when no
lock file existed yet, none is created. The probe reads the whole file once per start:
0.22 s for a 260 MB store of 500,000 jobs from the page cache, a sequential read from disk.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import struct
from pathlib import Path
from typing import Final
from urllib.parse import quote

from kernel.errors import ErrorCode, StoreCorrupt, StoreLocked, StoreReadOnly
from kernel.store import schema
from kernel.store import sqlite_tx as tx

log = logging.getLogger("kernel.store")

LOCK_SUFFIX: Final = "-lock"
_QUICK_CHECK_ROWS: Final = 5
_SHM_VERSION: Final = 3007000  # WalIndexHdr.iVersion


def sidecar(db: Path, suffix: str) -> Path:
    return db.with_name(db.name + suffix)


class OwnerLock:
    """The exclusive, process-lifetime lock on ``<db>-lock``; see the module docstring."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.path = sidecar(db, LOCK_SUFFIX)
        self.fd: int | None = None
        self.previous = b""  # what the last owner left in the file

    def __repr__(self) -> str:
        return f"OwnerLock({str(self.path)!r}, {'held' if self.fd is not None else 'free'})"

    @property
    def held(self) -> bool:
        return self.fd is not None

    def previous_state(self) -> tuple[int | None, str | None]:
        """The last owner's (pid, state), as far as the file says."""
        return _parse(self.previous)

    def acquire(self, *, create: bool) -> bool:
        """Take the lock; False when ``create`` is false and there is no lock file yet.

        :raises StoreLocked: another store holds it (the message names its pid).
        :raises StoreReadOnly: the lock file cannot be opened for writing.
        """
        if self.fd is not None:
            return True
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            if not create:
                return False
            raise
        except PermissionError as e:
            raise StoreReadOnly(
                f"{self.path}: the store's lock file cannot be opened for writing ({e.strerror}); "
                "make it and its directory writable by the kernel's user"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, _ = _parse(_read(fd))
            os.close(fd)
            raise StoreLocked(self._busy(holder)) from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.previous = _read(fd)
        self.mark("starting")
        return True

    def _busy(self, holder: int | None) -> str:
        who = "another store" if holder is None else f"pid {holder}"
        if holder == os.getpid():
            who = f"another store in this process (pid {holder})"
        elif holder is not None and not _alive(holder):
            who += (" (no longer running: a process it forked still holds the lock; "
                    f"find it with `fuser {self.path}`)")
        return (f"{self.db}: the store is in use by {who}, which holds {self.path}; "
                "a store has one kernel at a time")

    def mark(self, state: str) -> None:
        """Record this process as the owner, in ``state`` (starting | open | closed)."""
        self._write(json.dumps({"pid": os.getpid(), "state": state}).encode() + b"\n")

    def restore(self) -> None:
        """Put back what the last owner wrote (an open that failed changes nothing)."""
        self._write(self.previous)

    def _write(self, data: bytes) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # the last descriptor of this open file: the flock goes with it


def _read(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


def _parse(data: bytes) -> tuple[int | None, str | None]:
    try:
        d = json.loads(data)
        pid, state = d.get("pid"), d.get("state")
    except (ValueError, AttributeError):
        return None, None
    return (pid if isinstance(pid, int) else None), (state if isinstance(state, str) else None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- a WAL deleted after an unclean close ----------------------------------------------------


def unchecked_frames(shm: Path) -> int | None:
    """WAL frames committed but not yet copied into the database, per the ``-shm`` index.

    ``None`` when the file is missing or its header is not a valid, initialised WAL index
    (two identical copies of ``WalIndexHdr``, then ``WalCkptInfo.nBackfill``).
    """
    try:
        with shm.open("rb") as f:
            head = f.read(100)
    except OSError:
        return None
    if len(head) < 100 or head[:48] != head[48:96]:
        return None
    version, _, _, is_init = struct.unpack_from("=IIIB", head, 0)
    if version != _SHM_VERSION or not is_init:
        return None
    (max_frame,) = struct.unpack_from("=I", head, 16)
    (backfilled,) = struct.unpack_from("=I", head, 96)
    return max(0, int(max_frame) - int(backfilled))


def wal_loss(lock: OwnerLock) -> str | None:
    """Say (at ERROR, ERR_STORE_WAL_LOST) what is lost if the last owner did not close the
    store and its WAL is gone; the message, or None when nothing is amiss."""
    pid, state = lock.previous_state()
    db = lock.db
    wal = sidecar(db, "-wal")
    if state != "open" or wal.exists() or not db.exists():
        return None
    frames = unchecked_frames(sidecar(db, "-shm"))
    who = f"pid {pid}" if pid is not None else "its last kernel"
    if frames is None:
        lost = ("every write committed since the last checkpoint (the -shm index that counted "
                "them is gone too) is lost")
    else:
        lost = f"{frames} pages of committed writes that were only in it are lost"
    text = (
        f"{db} was not closed cleanly ({who} was killed or crashed) and its write-ahead log "
        f"{wal} is gone: {lost}: acknowledged submissions, run results and schedule state from "
        f"before the crash. The store goes on with what {db.name} holds; resubmit what was "
        "acknowledged shortly before the crash, and never delete the -wal or -shm file of a "
        "database that was not closed"
    )
    log.error("%s", text, extra={"error_code": ErrorCode.ERR_STORE_WAL_LOST.value})
    return f"[{ErrorCode.ERR_STORE_WAL_LOST.value}] {text}"


# -- writable, ours, undamaged -----------------------------------------------------------------


def check_writable(db: Path) -> None:
    """Refuse, naming it, a file SQLite must write but cannot: ``-wal``, ``-shm``, the database,
    or their directory (``os.access`` honours ``chattr +i`` even for root).

    :raises StoreReadOnly:
    """
    for p in (sidecar(db, "-shm"), sidecar(db, "-wal"), db):
        if p.exists() and not os.access(p, os.W_OK):
            raise StoreReadOnly(
                f"{p} is not writable by this process (uid {os.geteuid()}); SQLite must write it "
                "(an unwritable -shm ends in SIGBUS). Make it writable (chmod u+w; chattr -i if "
                "immutable); nothing was opened or changed"
            )
    d = db.parent
    if not os.access(d, os.W_OK | os.X_OK):
        raise StoreReadOnly(
            f"{d}: the store's directory is not writable by this process (uid {os.geteuid()}); "
            f"SQLite creates {db.name}-wal and {db.name}-shm there; nothing was changed"
        )


def _wal_mode(db: Path) -> bool:
    """Whether the file's header says WAL mode (read and write format versions 2)."""
    try:
        with db.open("rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return head[:16] == b"SQLite format 3\x00" and head[18:20] == b"\x02\x02"


def probe(db: Path, busy_timeout: float) -> int:
    """Check an existing file on a read-only connection: it is ours (or an empty SQLite file),
    not from a newer kernel, and ``PRAGMA quick_check`` finds no damage. Its schema version.

    :raises StoreCorrupt: and the file is left untouched.
    :raises sqlite3.Error: anything else (the caller translates it).
    """
    where = str(db)
    # A WAL-mode file without a -wal file holds the whole database, and nobody writes it (a
    # writer would have the -wal): read it as immutable, so that not even an empty -wal and
    # -shm are created (a read-only connection in WAL mode makes both). Otherwise a plain
    # read-only connection, which takes SQLite's locks, reads through a -wal and never
    # checkpoints; on a rollback-journal file it creates nothing.
    mode = "ro&immutable=1" if _wal_mode(db) and not sidecar(db, "-wal").exists() else "ro"
    con = sqlite3.connect(f"file:{quote(str(db.absolute()))}?mode={mode}", uri=True,
                          isolation_level=None, timeout=busy_timeout)
    try:
        version = tx.check_ours(con, where)
        schema.migration_plan(where, version)  # refuses a newer schema
        problems = [str(r[0]) for r in con.execute(f"PRAGMA quick_check({_QUICK_CHECK_ROWS})")]
    except sqlite3.DatabaseError as e:
        if not tx.is_corruption(e):
            raise
        problems = [str(e)]
    finally:
        con.close()
    if problems != ["ok"]:
        raise StoreCorrupt(
            f"{where} is damaged (PRAGMA quick_check: {'; '.join(problems)}); the file was left "
            "untouched. Restore it from a backup, or move it aside and salvage what you can "
            f"(`sqlite3 {where} .recover`), then start again"
        )
    return version


__all__ = [
    "LOCK_SUFFIX",
    "OwnerLock",
    "check_writable",
    "probe",
    "sidecar",
    "unchecked_frames",
    "wal_loss",
]
