"""What a flash target is (a disk or an image file) and whether writing to it is safe.

Everything comes from sysfs and /proc (no udev, no root needed to ask): size, model, removable flag, the
partitions and device-mapper/loop stacks above and below a disk, mounts and swaps.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

SYS_BLOCK = Path("/sys/block")


class UnsafeTarget(Exception):
    """Writing to the target would destroy something in use or something the user did not mean."""


@dataclass
class Target:
    path: Path
    is_block: bool
    size: int  # bytes; for a file that does not exist yet, 0
    name: str = ""  # kernel name (sdb, mmcblk0, loop3) for block devices
    model: str = ""
    removable: bool = False
    transport: str = ""  # usb, mmc, loop, ... when known
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        size = human_size(self.size)
        if not self.is_block:
            return f"image file {self.path} ({size})" if self.size else f"new image file {self.path}"
        model = self.model or "unknown model"
        kind = "removable" if self.removable else "NOT removable"
        via = f", {self.transport}" if self.transport else ""
        return f"{self.path}: {model}, {size}, {kind}{via}"


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _sysfs_dir(devno: int) -> Path | None:
    p = Path(f"/sys/dev/block/{os.major(devno)}:{os.minor(devno)}")
    return p.resolve() if p.exists() else None


def _disk_of(sysdir: Path) -> str:
    """The whole-disk kernel name for a disk or partition sysfs dir."""
    return sysdir.parent.name if (sysdir / "partition").exists() else sysdir.name


def _lower_disks(name: str, seen: set[str] | None = None) -> set[str]:
    """The disk itself plus every disk below it (dm/md slaves, the file behind a loop is not a disk)."""
    seen = set() if seen is None else seen
    if name in seen:
        return seen
    seen.add(name)
    base = SYS_BLOCK / name
    dirs = [base] + [p for p in base.glob(f"{name}*") if (p / "partition").exists()]
    for d in dirs:
        slaves = d / "slaves"
        if slaves.is_dir():
            for s in slaves.iterdir():
                _lower_disks(_disk_of(s.resolve()), seen)
    return seen


def _mounts() -> list[tuple[int, str]]:
    """(device number, mount point) of every mount; device number 0:x entries (tmpfs...) are skipped."""
    out = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        major, minor = (int(x) for x in parts[2].split(":"))
        if major:
            out.append((os.makedev(major, minor), parts[4].replace("\\040", " ")))
    return out


def _swaps() -> list[str]:
    return [line.split()[0] for line in _read(Path("/proc/swaps")).splitlines()[1:] if line.strip()]


def _devices_in_use() -> dict[str, str]:
    """Disk name -> what uses it ("mounted at /x", "swap"), following partitions, dm and md down to disks."""
    used: dict[str, str] = {}
    for devno, mnt in _mounts():
        d = _sysfs_dir(devno)
        if d is not None:
            for disk in _lower_disks(_disk_of(d)):
                used.setdefault(disk, f"mounted at {mnt}")
    for swap in _swaps():
        try:
            d = _sysfs_dir(os.stat(swap).st_rdev)
        except OSError:
            continue
        if d is not None:
            for disk in _lower_disks(_disk_of(d)):
                used.setdefault(disk, f"used as swap ({swap})")
    return used


def root_disks() -> set[str]:
    """The disk(s) holding the running system's `/` (empty inside containers whose root is an overlay)."""
    d = _sysfs_dir(os.stat("/").st_dev)
    return _lower_disks(_disk_of(d)) if d is not None else set()


def _holders(name: str) -> list[str]:
    base = SYS_BLOCK / name
    dirs = [base] + [p for p in base.glob(f"{name}*") if (p / "partition").exists()]
    return sorted({h.name for d in dirs if (d / "holders").is_dir() for h in (d / "holders").iterdir()})


def _transport(sysdir: Path, name: str) -> str:
    if name.startswith("loop"):
        return "loop"
    if name.startswith("mmcblk"):
        return "mmc"
    real = str(sysdir.resolve())
    if "/usb" in real:
        return "usb"
    return ""


def _loops_backed_by(path: Path) -> list[str]:
    """Loop devices whose backing file is `path`."""
    try:
        ino = path.stat()
    except OSError:
        return []
    found = []
    for loop in SYS_BLOCK.glob("loop*"):
        backing = _read(loop / "loop" / "backing_file")
        if not backing:
            continue
        try:
            st = os.stat(backing.removesuffix(" (deleted)"))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (ino.st_dev, ino.st_ino):
            found.append(loop.name)
    return found


def inspect(path: str | os.PathLike[str]) -> Target:
    """Describe a target without opening it for writing."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        if str(p).startswith("/dev/"):
            raise UnsafeTarget(f"{p} does not exist (is the card or board plugged in?)") from None
        if not p.parent.is_dir():
            raise UnsafeTarget(f"cannot create image file {p}: directory {p.parent} does not exist") from None
        return Target(p, False, 0)
    if stat.S_ISREG(st.st_mode):
        return Target(p, False, st.st_size)
    if not stat.S_ISBLK(st.st_mode):
        raise UnsafeTarget(f"{p} is neither a block device nor a regular file")
    sysdir = _sysfs_dir(st.st_rdev)
    if sysdir is None:
        raise UnsafeTarget(f"{p}: no sysfs entry for this block device")
    name = sysdir.name
    if (sysdir / "partition").exists():
        raise UnsafeTarget(f"{p} is a partition of /dev/{sysdir.parent.name}; give the whole disk "
                           f"(/dev/{sysdir.parent.name})")
    size = int(_read(sysdir / "size") or 0) * 512
    vendor = _read(sysdir / "device" / "vendor")
    model = " ".join(x for x in (vendor, _read(sysdir / "device" / "model") or _read(sysdir / "device" / "name"))
                     if x)
    if name.startswith("loop"):
        model = f"loop device backed by {_read(sysdir / 'loop' / 'backing_file') or 'nothing'}"
    transport = _transport(sysdir, name)
    removable = _read(sysdir / "removable") == "1"
    return Target(p, True, size, name, model, removable, transport)


def check_safe(target: Target, force: bool = False) -> None:
    """Raise UnsafeTarget with the reason when `target` must not be written.

    Never overridable: the disk holding `/`, a mounted or swapped-on disk, a disk held by dm/md/another
    device, an image file attached to a loop device. `force` only overrides "not removable": SD cards behind
    MMC hosts and USB bridges often report removable=0, so USB, MMC and loop devices count as removable.
    """
    if not target.is_block:
        loops = _loops_backed_by(target.path)
        if loops:
            used = _devices_in_use()
            detail = "; ".join(f"/dev/{lp}" + (f" ({used[lp]})" if lp in used else "") for lp in loops)
            raise UnsafeTarget(f"{target.path} is in use: attached to {detail}; detach it first "
                               f"(umount, losetup -d)")
        return
    name = target.name
    if name in root_disks():
        raise UnsafeTarget(f"{target.path} is the disk holding / (the running system); refusing to write it")
    used = _devices_in_use()
    if name in used:
        raise UnsafeTarget(f"{target.path} is {used[name]}; unmount it first")
    holders = _holders(name)
    if holders:
        raise UnsafeTarget(f"{target.path} is in use by {', '.join(holders)} (device-mapper/RAID); release it first")
    if target.size == 0:
        raise UnsafeTarget(f"{target.path} has size 0 (no medium in the reader?)")
    if not (target.removable or target.transport in ("usb", "mmc", "loop")) and not force:
        raise UnsafeTarget(f"{target.path} ({target.model or 'unknown model'}, {human_size(target.size)}) is "
                           f"not a removable disk; pass --force if you really mean to overwrite it")
