"""Atomic file writes for actions and plugins: a temporary file beside the target, fsync, then
``os.replace``.

A reader sees the old file or the new one, never half of one, even if the process dies. Every
call writes its own temporary (``.{name}.{random}.tmp``, created with ``O_EXCL``), so writers of
one target, in threads of one process or in several processes, never share one: the last
rename wins and each rename publishes one writer's whole file. The file gets ``mode`` less the
umask: by default what ``open()`` would give it (0666), unlike ``tempfile.mkstemp``'s 0600; pass
``mode=0o600`` for a secret (it is never readable by others, not even for a moment).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _create_temporary(path: Path, mode: int) -> tuple[Path, int]:
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, _FLAGS, mode)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def atomic_write(path: Path, data: bytes, *, mode: int = 0o666) -> None:
    """Replace ``path`` with ``data`` atomically (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temporary(path, mode)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where we can
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
