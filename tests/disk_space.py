"""The disk space a full test session needs, checked before the first test: a full disk otherwise shows up as
hundreds of unrelated setup errors (every tmp_path, spool and image write fails) a third of the way in."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flctl.image.cache import cache_root

#: What one session writes at its peak, with margin: about 2 GB of disk images in session fixtures, 1.4 GB of
#: container images, a new image cache entry (0.5 GB) and the largest test's spool. FL_TEST_NEEDED_BYTES
#: overrides it (a run of a few test files needs far less).
NEEDED_BYTES = 6 * 1024**3


def needed_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """FL_TEST_NEEDED_BYTES when set (a whole number of bytes), else NEEDED_BYTES. Read when the session starts,
    not on import: conftest imports this module for every run, ``--collect-only`` included."""
    text = environ.get("FL_TEST_NEEDED_BYTES", "").strip()
    if not text:
        return NEEDED_BYTES
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"FL_TEST_NEEDED_BYTES={text!r} is not a whole number of bytes (e.g. 2000000000)")
    return int(text)


def session_paths(basetemp: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where the session writes: its temporary directory (pytest's ``--basetemp`` when given, else the system's),
    the fl-edge build cache and podman's storage."""
    temporary = Path(basetemp) if basetemp else Path(tempfile.gettempdir())
    return [temporary, cache_root(), Path("/var/lib/containers")]


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def shortfall(paths: Iterable[Path], needed: int, free: Callable[[Path], int] = free_bytes) -> str | None:
    """One line naming the file systems among ``paths`` (the nearest existing directory of each) whose free
    space is below ``needed``, or None. Paths on one file system count once."""
    seen: dict[int, Path] = {}
    for path in paths:
        while not path.exists():
            path = path.parent
        seen.setdefault(path.stat().st_dev, path)
    short = [(path, available) for path, available in ((p, free(p)) for p in seen.values()) if available < needed]
    if not short:
        return None
    where = ", ".join(f"{available / 1024**3:.1f} GB free at {path}" for path, available in short)
    return (f"not enough disk for the tests: {where}; a session needs about {needed / 1024**3:.1f} GB "
            "(free some: `podman image prune`, old /tmp/pytest-of-*)")
