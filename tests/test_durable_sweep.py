"""What a write cut short leaves (durable.atomic_write's temp file, as big as a model) is removed by a sweep, and a
temp file a live writer is filling is never removed, whichever process sweeps. The writers are real processes
(tests/interrupted_writes.py)."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
from interrupted_writes import HALF, killed_write, live_write

from appliance import durable
from appliance.durable import TEMP_SUFFIX, atomic_write, sweep_interrupted_writes


def test_a_write_killed_midway_leaves_its_temp_file_and_a_sweep_removes_it(tmp_path: Path) -> None:
    target = tmp_path / "v00000003.release"
    target.write_bytes(b"the version before")
    (left,) = killed_write(target)
    assert left.stat().st_size == HALF

    swept = sweep_interrupted_writes(tmp_path)
    assert (swept.removed, swept.freed_bytes, swept.not_removed) == (1, HALF, [])
    assert "removed 1 temp file (1.0 MB)" in swept.describe()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert target.read_bytes() == b"the version before"
    assert not sweep_interrupted_writes(tmp_path), "a second sweep found something again"


def test_a_live_writers_temp_file_is_never_removed_and_its_write_completes(tmp_path: Path) -> None:
    target = tmp_path / "model.flpkg"
    with live_write(target) as writer:
        (live,) = writer.temp_files()
        assert not sweep_interrupted_writes(tmp_path)  # another process sweeping the directory, as at its start
        assert live.exists()
        writer.finish()
    assert target.read_bytes() == b"x" * HALF + b"y" * HALF
    assert writer.temp_files() == []


def test_only_atomic_writes_temp_names_are_swept(tmp_path: Path) -> None:
    kept = [".hidden", ".model.flpkg.abcd1234", f"model{TEMP_SUFFIX}", f".x.short{TEMP_SUFFIX}", "v1.release"]
    for name in kept:
        (tmp_path / name).write_bytes(b"not a temp file of atomic_write")
    (tmp_path / f".link.abcd1234{TEMP_SUFFIX}").symlink_to(tmp_path / "v1.release")
    (tmp_path / f".dir.abcd1234{TEMP_SUFFIX}").mkdir()
    (tmp_path / f".model.flpkg.k2_x9q0z{TEMP_SUFFIX}").write_bytes(b"left by a kill")

    swept = sweep_interrupted_writes(tmp_path, tmp_path / "missing")
    assert (swept.removed, swept.not_removed) == (1, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*kept, f".link.abcd1234{TEMP_SUFFIX}", f".dir.abcd1234{TEMP_SUFFIX}"])


def test_a_sweep_between_a_temp_files_creation_and_its_lock_does_not_lose_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep may find a temp file before its writer has locked it, and remove it: the writer then makes another,
    instead of renaming a file that is no longer there (which failed the write)."""
    target = tmp_path / "agent-state.json"
    lock, swept = durable.fcntl.flock, []

    def flock(fd: int, operation: int) -> None:
        if operation == durable.fcntl.LOCK_EX and not swept:  # the writer's lock, the first time: a sweep first
            swept.append(sweep_interrupted_writes(tmp_path).removed)
        lock(fd, operation)

    monkeypatch.setattr(durable.fcntl, "flock", flock)
    atomic_write(target, b'{"last_round": 7}')
    assert swept == [1]
    assert target.read_bytes() == b'{"last_round": 7}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_temp_file_that_cannot_be_removed_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    left = tmp_path / f".agent-state.json.abcd1234{TEMP_SUFFIX}"
    left.write_bytes(b"{")

    def read_only(path: str, *args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "unlink", read_only)
    swept = sweep_interrupted_writes(tmp_path)
    assert swept.removed == 0 and swept.not_removed == [f"{left}: Read-only file system"]
    assert "1 could not be removed" in swept.describe()


def _no_locks(errno_: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """flock as a file system that keeps no locks answers it (NFS without its lock daemon: ENOLCK)."""
    def flock(fd: int, operation: int) -> None:
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(durable.fcntl, "flock", flock)


@pytest.mark.parametrize("errno_", [errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF], ids=["ENOLCK", "EOPNOTSUPP", "EBADF"])
def test_a_sweep_on_a_file_system_without_locks_keeps_the_temp_file_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int
) -> None:
    """A sweep that cannot lock a temp file cannot tell a dead writer's from a live one's: it keeps it and names it,
    and the process starting (the agent, the aggregator, flctl provision) goes on. (EBADF: NFS refuses an exclusive
    flock on a file opened read-only.)"""
    (left,) = killed_write(tmp_path / "agent-state.json")
    _no_locks(errno_, monkeypatch)
    swept = sweep_interrupted_writes(tmp_path)
    assert swept.removed == 0 and len(swept.not_removed) == 1 and str(left) in swept.not_removed[0]
    assert left.exists()
    assert "1 could not be removed" in swept.describe()


def test_atomic_write_on_a_file_system_without_locks_still_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Locking the temp file only guards it from a sweep, which keeps what it cannot lock: a file system without
    locks (flock: ENOLCK) still takes the write, as before temp files were locked."""
    target = tmp_path / "fleet.json"
    _no_locks(errno.ENOLCK, monkeypatch)
    atomic_write(target, b'{"boards": []}')
    assert target.read_bytes() == b'{"boards": []}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_refused_chmod_leaves_neither_a_temp_file_nor_an_open_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses chmod (vfat without the quiet option answers EPERM) fails the write in one
    OSError; before, the temp file's descriptor (and with it its lock) stayed open for the life of the process."""
    target = tmp_path / "agent-state.json"
    target.write_bytes(b"old")

    def refused(fd: int, mode: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refused)
    with pytest.raises(PermissionError):
        atomic_write(target, b"new")
    assert not [p for p in _open_files() if TEMP_SUFFIX in p]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent-state.json"] and target.read_bytes() == b"old"


def _open_files() -> list[str]:
    """What this process's descriptors point at (a removed file shows as "<path> (deleted)")."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor os.listdir itself used, closed by now
            continue
    return targets


def test_the_temp_file_is_still_locked_when_it_is_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is what keeps a sweep off a live write: released before the rename, a sweep in that instant would
    remove the file about to become the target, and the rename would fail."""
    target = tmp_path / "model.bin"
    locked_at_rename = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        probe = os.open(src, os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked_at_rename.append(False)
        except BlockingIOError:
            locked_at_rename.append(True)
        finally:
            os.close(probe)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    atomic_write(target, b"weights")
    assert locked_at_rename == [True] and target.read_bytes() == b"weights"
