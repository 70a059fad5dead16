"""Files written so that a crash or a power cut leaves the old version or the new one, never a torn one.

The data partition of an appliance loses power without warning; the aggregator may be `kill -9`ed. Every
module that persists something goes through these two functions rather than its own copy of the dance.

A write cut short leaves its temp file behind (``.<name>.<8 random characters>.atomic-tmp``, as big as what was
being written: a model). Its writer holds an flock on it from its creation to its rename, which the kernel lets go
of however the writer ends (kill -9, a power cut), so :func:`sweep_interrupted_writes` removes exactly the temp
files no writer holds, whichever process or PID namespace wrote them: the aggregator and an ``fl-aggregator``
command, two ``flctl`` runs, share directories. A PID in the name could not tell that (a PID taken again after a
reboot, or seen from another container), nor could a sweep at start-up under the process's own lock (the other
process takes another lock, or none).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".atomic-tmp"
# tempfile.mkstemp's random part: 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
# What flock answers on a file system that keeps no locks, rather than a lock refused.
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP})


def fsync_dir(path: Path | str) -> None:
    """Make a rename, creation or removal inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes | memoryview | Sequence[Any], mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: a temp file in the same directory (``mode`` from its creation, so a
    secret is never briefly readable), fsync, rename over ``path``, fsync the directory. ``data`` may be a
    sequence of buffers (bytes, memoryviews, numpy arrays), written one after the other: a large file is never
    joined into one buffer in memory. The temp file is locked until its rename (see the module's docstring)."""
    path = Path(path)
    parts = [data] if isinstance(data, bytes | memoryview) else data
    fd, tmp = _locked_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:  # closing it lets go of the lock: only after the rename
            os.fchmod(fd, mode)  # inside: a refused chmod closes the descriptor too
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _locked_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside ``path``, open and flocked. A sweep may find it in the instant between its creation
    and the lock, take it for a dead writer's and remove it: then the lock is taken on a file without a name, and
    another is made."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a sweep holds it to remove it
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                # A file system without locks (NFS without its lock daemon): a sweep cannot lock the file either, so
                # keeps it (_sweep_one); the write goes on as it did before temp files were locked.
                return fd, tmp
            if os.fstat(fd).st_nlink:
                return fd, tmp
        except BaseException:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)
            raise
        os.close(fd)


@dataclass
class Swept:
    """What :func:`sweep_interrupted_writes` removed, and the temp files it could not remove (a read-only card)."""

    removed: int = 0
    freed_bytes: int = 0
    not_removed: list[str] = field(default_factory=list)  # "<path>: <why>"

    def __bool__(self) -> bool:
        return bool(self.removed or self.not_removed)

    def describe(self) -> str:
        """One line for the log."""
        line = (f"removed {self.removed} temp file{'s' if self.removed != 1 else ''} "
                f"({self.freed_bytes / 1e6:.1f} MB) left by writes a crash or power cut interrupted")
        if self.not_removed:
            line += f"; {len(self.not_removed)} could not be removed ({'; '.join(self.not_removed[:3])})"
        return line


def sweep_interrupted_writes(*directories: Path | str) -> Swept:
    """Remove from ``directories`` the temp files of :func:`atomic_write` whose writer is gone (none holds its lock):
    what a kill or a power cut left. A live writer's, from any process, stays; each file is removed by one sweep
    only, however many run at once. Other files (even hidden ones), symbolic links and missing directories are left
    alone; a removal refused is reported in ``not_removed``, never raised, and so is a temp file on a file system
    that keeps no locks, which is kept: nothing there tells a dead writer's from a live one's."""
    swept = Swept()
    for directory in directories:
        try:
            entries = [e for e in os.scandir(directory) if _TEMP_NAME.fullmatch(e.name)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            swept.not_removed.append(f"{directory}: {exc.strerror}")
            continue
        for entry in entries:
            _sweep_one(entry.path, swept)
    return swept


def _sweep_one(path: str, swept: Swept) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone (renamed by its writer, removed by another sweep), a symbolic link, not ours to read
        return
    try:
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is alive
            return
        except OSError as exc:  # no locks here (ENOLCK, EOPNOTSUPP; on NFS, EBADF for a file open read-only)
            swept.not_removed.append(f"{path}: not known to be left by a dead writer (its lock: {exc.strerror})")
            return
        try:  # still under that name: not renamed into place, nor removed by a sweep that let go of it meanwhile
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
            return
        try:
            os.unlink(path)
        except OSError as exc:
            swept.not_removed.append(f"{path}: {exc.strerror}")
            return
        swept.removed += 1
        swept.freed_bytes += held.st_size
    finally:
        os.close(fd)
