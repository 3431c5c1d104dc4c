"""kernel.files.atomic_write: whole files only, also for several writers of one target."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kernel.files import atomic_write


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it


def test_a_secret_is_written_private(tmp_path: Path) -> None:
    target = tmp_path / "api.token"
    atomic_write(target, b"s3cret", mode=0o600)
    assert target.stat().st_mode & 0o777 == 0o600


def test_two_writers_in_one_process_do_not_share_a_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    both_written = threading.Barrier(2, timeout=10)
    local = threading.local()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        # Both writers have written their temporary before either renames it: the
        # interleaving that made one writer's rename fail (or publish the other's bytes).
        if not getattr(local, "waited", False):
            local.waited = True
            both_written.wait()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    errors: list[BaseException] = []
    datas = [b"A" * 100_000, b"B" * 50_000]

    def writer(data: bytes) -> None:
        try:
            atomic_write(target, data)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(d,)) for d in datas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert target.read_bytes() in datas
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"old")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
