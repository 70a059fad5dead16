"""File systems and the GPT disk image of the appliance.

Layout of ``fl-dev.img`` (GPT, 1 MiB aligned):

  part 1  PARTLABEL=fl-root  ext4 LABEL=fl-root  read-only root (no journal: it is never written)
  part 2  PARTLABEL=fl-data  ext4 LABEL=fl-data  data partition, mounted at /data (journal, checked at boot)

``make_data_fs`` is also how the QEMU rig gives each appliance its own writable data partition with its
identity on it (the root image stays shared and read-only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 1024 * 1024
SECTOR = 512
ALIGN = MIB
ROOT_LABEL = "fl-root"
DATA_LABEL = "fl-data"
DEFAULT_DATA_SIZE = 256 * MIB
# GPT type GUIDs: Linux x86-64 root (Discoverable Partitions Spec) and Linux filesystem data.
TYPE_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
TYPE_LINUX_DATA = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


class DiskError(RuntimeError):
    """Building a file system or the disk image failed."""


@dataclass(frozen=True)
class PartitionExtent:
    """Where a partition sits in the disk image (bytes)."""

    name: str
    offset: int
    size: int

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def tree_size(root: Path) -> int:
    """Apparent size of a tree in bytes, counting each file rounded up to 4 KiB blocks (ext4's unit)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        total += 4096 * (1 + len(dirnames) // 64)
        for f in filenames:
            st = os.lstat(os.path.join(dirpath, f))
            total += (st.st_size + 4095) // 4096 * 4096 if st.st_size else 0
    return total


def root_fs_size(root: Path) -> int:
    """Content + 10 % + 32 MiB for metadata and inodes, rounded up to whole MiB."""
    need = tree_size(root)
    size = int(need * 1.10) + 32 * MIB
    return (size + MIB - 1) // MIB * MIB


def make_ext4(
    image: Path, size: int, label: str, source: Path | None = None, journal: bool = True, uuid: str | None = None
) -> None:
    """Create an ext4 file system image of ``size`` bytes, populated from ``source`` (mkfs.ext4 -d)."""
    if size % MIB:
        raise DiskError(f"file system size {size} is not a whole number of MiB")
    if image.exists():
        image.unlink()
    with open(image, "wb") as fh:
        fh.truncate(size)
    cmd = ["mkfs.ext4", "-q", "-F", "-L", label, "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
    if not journal:
        cmd += ["-O", "^has_journal"]
    if uuid:
        cmd += ["-U", uuid]
    if source is not None:
        cmd += ["-d", str(source)]
    cmd += [str(image), f"{size // 1024}k"]
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise DiskError(f"mkfs.ext4 for {label} failed: {proc.stderr.strip()[-800:]}")


def make_data_fs(image: Path, size: int = DEFAULT_DATA_SIZE, source: Path | None = None) -> None:
    """The data partition's file system (LABEL=fl-data), optionally pre-populated (identity, config)."""
    make_ext4(image, size, DATA_LABEL, source=source, journal=True)


def assemble_gpt(disk: Path, parts: list[tuple[str, Path, str]]) -> list[PartitionExtent]:
    """Write a GPT disk holding each (name, fs image, type GUID) in order; returns their extents."""
    offset = ALIGN
    extents = []
    for name, image, _ in parts:
        size = image.stat().st_size
        if size % ALIGN:
            raise DiskError(f"{image} is not a whole number of MiB")
        extents.append(PartitionExtent(name, offset, size))
        offset += size
    total = offset + ALIGN  # room for the backup GPT
    if disk.exists():
        disk.unlink()
    with open(disk, "wb") as fh:
        fh.truncate(total)
    cmd = ["sgdisk", "--clear"]
    for i, ((name, _, type_guid), ext) in enumerate(zip(parts, extents, strict=True), start=1):
        first = ext.offset // SECTOR
        last = (ext.offset + ext.size) // SECTOR - 1
        cmd += [f"--new={i}:{first}:{last}", f"--typecode={i}:{type_guid}", f"--change-name={i}:{name}"]
    cmd.append(str(disk))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DiskError(f"sgdisk failed: {proc.stderr.strip() or proc.stdout.strip()}")
    for (_, image, _), ext in zip(parts, extents, strict=True):
        sparse_copy_into(image, disk, ext.offset)
    return extents


def sparse_copy_into(src: Path, dst: Path, offset: int, chunk: int = MIB) -> None:
    """Copy ``src`` into ``dst`` at ``offset`` without writing all-zero chunks (keeps ``dst`` sparse)."""
    zero = bytes(chunk)
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        pos = 0
        while True:
            block = fi.read(chunk)
            if not block:
                break
            if block != zero[: len(block)]:
                fo.seek(offset + pos)
                fo.write(block)
            pos += len(block)


def extract_partition(disk: Path, extent: PartitionExtent, dest: Path) -> None:
    """Sparse copy of one partition of ``disk`` into its own file."""
    with open(dest, "wb") as fh:
        fh.truncate(extent.size)
    zero = bytes(MIB)
    with open(disk, "rb") as fi, open(dest, "r+b") as fo:
        fi.seek(extent.offset)
        done = 0
        while done < extent.size:
            block = fi.read(min(MIB, extent.size - done))
            if block != zero[: len(block)]:
                fo.seek(done)
                fo.write(block)
            done += len(block)


def make_bmap(disk: Path) -> Path:
    """``bmaptool create``: the block map `bmaptool copy` (flctl flash) uses to write only mapped blocks."""
    bmap = disk.with_name(disk.name + ".bmap")
    if shutil.which("bmaptool") is None:
        raise DiskError("bmaptool is not installed (apt-get install bmap-tools)")
    proc = subprocess.run(["bmaptool", "create", "-o", str(bmap), str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DiskError(f"bmaptool create failed: {proc.stderr.strip()}")
    return bmap


def fsck_clean(image: Path) -> tuple[bool, str]:
    """Forced read-only e2fsck of a file system image: (clean, output)."""
    proc = subprocess.run(["e2fsck", "-f", "-n", str(image)], capture_output=True, text=True, check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr
