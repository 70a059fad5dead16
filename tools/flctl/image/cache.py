"""Content-addressed cache for image build artifacts.

Every artifact (base root file system, wheels, kernel + initramfs, finished disk image) is stored under
``<cache>/<kind>/<key>/`` where ``key`` is a hash of everything that went into it. A build whose inputs did not
change finds its directory and skips the work; a CI job that keeps the cache directory between runs reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

ENV_CACHE = "FL_EDGE_CACHE"


def cache_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``explicit``, else ``$FL_EDGE_CACHE``, else ``$XDG_CACHE_HOME/fl-edge``, else
    ``~/.cache/fl-edge`` (under sudo: root's, as sudo resets the environment)."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is invalid and ignored
        return Path(xdg) / "fl-edge"
    return Path.home() / ".cache" / "fl-edge"


class InputHash:
    """A SHA-256 over named inputs; each input is framed by its name so two inputs cannot run together."""

    def __init__(self, purpose: str) -> None:
        self._h = hashlib.sha256()
        self.text("purpose", purpose)

    def text(self, name: str, value: str) -> InputHash:
        self._frame(name, value.encode())
        return self

    def data(self, name: str, value: bytes) -> InputHash:
        self._frame(name, value)
        return self

    def file(self, name: str, path: Path) -> InputHash:
        self._frame(name, path.read_bytes())
        return self

    def tree(self, name: str, root: Path, exclude: Iterable[str] = ("__pycache__",)) -> InputHash:
        """Hash every file's relative path, mode bits, and content (or symlink target) under ``root``."""
        skip = set(exclude)
        if not root.is_dir():
            raise FileNotFoundError(f"input directory {root} does not exist")
        for path in sorted(_walk(root, skip)):
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                self._frame(f"{name}:link:{rel}", os.readlink(path).encode())
            elif stat.S_ISDIR(st.st_mode):
                self._frame(f"{name}:dir:{rel}", oct(stat.S_IMODE(st.st_mode)).encode())
            else:
                self._frame(f"{name}:file:{rel}:{oct(stat.S_IMODE(st.st_mode))}", path.read_bytes())
        return self

    def child(self, name: str, other: InputHash) -> InputHash:
        self._frame(name, other.hexdigest().encode())
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def key(self) -> str:
        """Short key used as a directory name (80 bits are plenty for a local cache)."""
        return self.hexdigest()[:20]

    def _frame(self, name: str, payload: bytes) -> None:
        self._h.update(len(name).to_bytes(4, "big") + name.encode())
        self._h.update(len(payload).to_bytes(8, "big") + payload)


def _walk(root: Path, skip: set[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        base = Path(dirpath)
        for d in dirnames:
            yield base / d
        for f in filenames:
            if f not in skip and not f.endswith(".pyc"):
                yield base / f


class ArtifactStore:
    """``<root>/<kind>/<key>/`` directories, published atomically (build in a temp dir, then rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / ".complete").exists()

    @contextlib.contextmanager
    def building(self, kind: str, key: str) -> Iterator[Path]:
        """Yield an empty work dir; on success it becomes ``path(kind, key)``, on error it is removed."""
        final = self.path(kind, key)
        tmp = final.with_name(f".{key}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            (tmp / ".complete").write_text("")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def prune(self, kind: str, keep: set[str]) -> list[Path]:
        """Remove entries of ``kind`` not in ``keep`` (old images pile up otherwise); returns what went."""
        removed = []
        base = self.root / kind
        if not base.is_dir():
            return removed
        for entry in base.iterdir():
            if entry.name not in keep and not entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise builds sharing this cache (two pytest sessions, CI jobs on one runner)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
