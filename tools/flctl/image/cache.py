"""Content-addressed cache for image build artifacts.

Every artifact (base root file system, wheels, kernel + initramfs, finished disk image) is stored under
``<cache>/<kind>/<key>/`` where ``key`` is a hash of everything that went into it. A build whose inputs did not
change finds its directory and skips the work; a CI job that keeps the cache directory between runs reuses it.

An entry is on disk before it is complete: every file and directory in it is fsynced before its ``.complete``
marker exists and it is renamed into place (then its kind's directory is fsynced). Without that, a power cut
soon after a build could leave an entry whose marker and name survived while its files came back empty, which
every later build would take as it is.

Old entries are pruned to the newest few and a byte budget (``ArtifactStore.prune``). An entry a process is
using (a QEMU run, a test session booting the image again and again) is held: a shared flock on its
``.complete`` marker for as long as the process lives (``hold``), which pruning, from any process, never breaks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from appliance.durable import fsync_dir

ENV_CACHE = "FL_EDGE_CACHE"
# The bytes of old entries of one kind (images, sysroots) that pruning keeps beyond the newest few: a number of
# bytes, with K, M, G or T (powers of 1024) after it if you like; 0 keeps only the newest few.
ENV_KEEP_BYTES = "FL_EDGE_CACHE_KEEP_BYTES"
DEFAULT_KEEP_BYTES = 2 * 2**30
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
COMPLETE = ".complete"
_held: dict[tuple[Path, int], BinaryIO] = {}  # (entry, inode of its marker) -> the open, locked marker


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


def sync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every directory (``root`` included), so that what the tree
    holds is on disk before anything names it complete."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = Path(dirpath, name)
            if stat.S_ISREG(path.lstat().st_mode):
                fsync_file(path)
        fsync_dir(dirpath)


def fsync_file(path: Path) -> None:
    """Make the bytes of the regular file ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """``<root>/<kind>/<key>/`` directories, published atomically and durably (build in a temp dir, fsync it all,
    then rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / COMPLETE).exists()

    @contextlib.contextmanager
    def building(self, kind: str, key: str) -> Iterator[Path]:
        """Yield an empty work dir; on success it is synced to disk (:func:`sync_tree`) and becomes
        ``path(kind, key)``, on error it is removed. Callers hold :meth:`lock`, so a partial entry of ``kind``
        found here was left by a build that was killed or lost power (of this key or an older one, which may never
        be built again), and is removed: pruning never sees one."""
        final = self.path(kind, key)
        tmp = final.with_name(f".{key}.partial-{os.getpid()}")
        if final.parent.is_dir():
            for stale in final.parent.glob(".*.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            (tmp / COMPLETE).write_text("")
            sync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            fsync_dir(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def prune(self, kind: str, keep: set[str], newest: int, keep_bytes: int) -> Pruned:
        """Remove old entries of ``kind`` (they pile up otherwise: about 0.5 GB an image). Kept: those named in
        ``keep``, the ``newest`` newest (by modification time), then older ones newest first while all kept
        entries together take at most ``keep_bytes``; and, whatever their age or size, those in use (``hold``)."""
        pruned = Pruned()
        base = self.root / kind
        if not base.is_dir():
            return pruned
        entries = sorted((p for p in base.iterdir() if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime,
                         reverse=True)  # fmt: skip
        sizes = {entry: entry_bytes(entry) for entry in entries}
        kept = {entry for i, entry in enumerate(entries) if entry.name in keep or i < newest}
        total = sum(sizes[entry] for entry in kept)
        within = True  # until the first older entry that does not fit: none older than one removed stays
        for entry in entries:
            if entry in kept:
                continue
            within = within and total + sizes[entry] <= keep_bytes
            if within:
                kept.add(entry)
                total += sizes[entry]
            elif _remove_unless_held(entry):
                pruned.removed.append(entry)
                pruned.freed_bytes += sizes[entry]
            else:
                kept.add(entry)
                total += sizes[entry]
                pruned.kept_in_use.append(entry)
        pruned.kept_bytes = total
        pruned.kept = len(kept)
        return pruned

    @contextlib.contextmanager
    def scratch(self, prefix: str = "") -> Iterator[Path]:
        """Yield an empty work directory under ``<root>/work``, removed afterwards (:func:`remove_unmounted`).
        Callers hold :meth:`lock`, so the work directories found here were left by builds that were killed or lost
        power (a root file system and its ext4 images: GBs, that no later build would remove), and go first."""
        base = self.root / "work"
        if base.is_dir():
            for left in base.iterdir():
                remove_unmounted(left)
        work = base / f"{prefix}{os.getpid()}-{time.monotonic_ns()}"
        work.mkdir(parents=True)
        try:
            yield work
        finally:
            remove_unmounted(work)

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


@dataclass
class Pruned:
    """What ``ArtifactStore.prune`` removed and kept of one kind."""

    removed: list[Path] = field(default_factory=list)
    freed_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    kept_in_use: list[Path] = field(default_factory=list)  # over the budget, but held by a running process


def prune_summary(kind: str, pruned: Pruned) -> str:
    """One line: what pruning ``kind`` freed and what the cache keeps of it."""
    held = f" ({len(pruned.kept_in_use)} over the budget: in use)" if pruned.kept_in_use else ""
    return (f"cache {kind}: removed {len(pruned.removed)}, {pruned.freed_bytes / 1e6:.0f} MB freed; "
            f"kept {pruned.kept}, {pruned.kept_bytes / 1e6:.0f} MB{held}")


def keep_bytes_from_env() -> int:
    """``$FL_EDGE_CACHE_KEEP_BYTES`` (e.g. ``2G``, ``500M``, ``0``), else DEFAULT_KEEP_BYTES; ValueError with one line
    naming the variable when it is not a size."""
    text = os.environ.get(ENV_KEEP_BYTES, "").strip()
    if not text:
        return DEFAULT_KEEP_BYTES
    number, unit = text.rstrip("KMGTkmgt"), text[len(text.rstrip("KMGTkmgt")):].upper()
    if not number.isdigit() or unit not in _UNITS:
        raise ValueError(f"{ENV_KEEP_BYTES}={text!r} is not a size: a number of bytes, e.g. 2000000000, 500M or 2G")
    return int(number) * _UNITS[unit]


def entry_bytes(entry: Path) -> int:
    """The disk space removing ``entry`` frees: the blocks its files take (sparse disk images count what they
    hold), leaving out files hard-linked from elsewhere (an image's kernel and initramfs, linked from the kernel
    entry; a disk image also published with ``--out``)."""
    total = 0
    for path in entry.rglob("*"):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            total += st.st_blocks * 512
    return total


def remove_unmounted(tree: Path) -> None:
    """Remove ``tree`` once every mount under it is lazily unmounted, and leave it while one stays: a build killed
    in its chroot left /proc and /dev mounted there, and rmtree would walk into the host's /dev."""
    for point in sorted(_mounts_under(tree), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    if not _mounts_under(tree):
        shutil.rmtree(tree, ignore_errors=True)


def _mounts_under(tree: Path) -> list[str]:
    """The mount points at or below ``tree`` (from /proc/self/mountinfo, its octal escapes undone)."""
    top = os.path.realpath(tree)
    with open("/proc/self/mountinfo") as fh:
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in fh]
    return [p for p in points if p == top or p.startswith(top + "/")]


def hold(entry: Path) -> None:
    """Mark the cache entry ``entry`` in use for as long as this process runs (nothing when it is not a finished
    entry). The lock goes with the process however it ends. An entry being pruned at this moment is gone when this
    returns. One descriptor per entry: holding a rebuilt entry (--rebuild: a new marker) lets go of its old marker."""
    marker = entry / COMPLETE
    try:
        fh = open(marker, "rb")  # noqa: SIM115 (held open on purpose, until the process exits)
    except FileNotFoundError:
        return
    held = (entry, os.fstat(fh.fileno()).st_ino)
    if held in _held:
        fh.close()
        return
    fcntl.flock(fh, fcntl.LOCK_SH)  # waits while a prune holds it exclusively
    try:
        current = marker.stat().st_ino == held[1]
    except FileNotFoundError:  # that prune removed it
        current = False
    if not current:
        fh.close()
        return
    for older in [h for h in _held if h[0] == entry]:
        _held.pop(older).close()
    _held[held] = fh


def _remove_unless_held(entry: Path) -> bool:
    """Remove ``entry`` unless a process holds it (this one included); whether it went."""
    marker = entry / COMPLETE
    if not marker.exists():
        shutil.rmtree(entry, ignore_errors=True)
        return True
    with open(marker, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(entry, ignore_errors=True)  # under the lock: a hold waits, then finds the entry gone
    return True
