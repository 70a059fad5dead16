"""Files written so that a crash or a power cut leaves the old version or the new one, never a torn one.

The data partition of an appliance loses power without warning; the aggregator may be `kill -9`ed. Every
module that persists something goes through these two functions rather than its own copy of the dance.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
    joined into one buffer in memory."""
    path = Path(path)
    parts = [data] if isinstance(data, bytes | memoryview) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
