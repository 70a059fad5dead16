"""Read and write files in an ext4 filesystem that sits at a byte offset of a disk or image, without mounting.

e2fsprogs open `DEVICE?offset=N` (the unix I/O manager's offset option), so `mkfs.ext4 -E offset=`,
`debugfs` and `e2fsck` work on a partition inside an image file or a whole disk: no loop device, no partition
device nodes, no root needed for files. That is what lets `flctl flash` run the same way in CI, in containers
and on a laptop.
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

EXT_MAGIC = 0xEF53


class Ext4Error(Exception):
    """An e2fsprogs command failed; the message carries its output."""


@dataclass(frozen=True)
class Ext4Volume:
    """An ext4 filesystem at `offset` bytes into `device` (a disk or a disk image), `size` bytes long."""

    device: Path
    offset: int
    size: int

    @property
    def spec(self) -> str:
        if "?" in str(self.device):
            raise Ext4Error(f"{self.device}: a path containing '?' cannot be opened by e2fsprogs")
        return f"{self.device}?offset={self.offset}"

    def has_filesystem(self) -> bool:
        """True when an ext2/3/4 superblock is present (magic number at byte 1080)."""
        with open(self.device, "rb") as f:
            f.seek(self.offset + 1024 + 56)
            raw = f.read(2)
        return len(raw) == 2 and struct.unpack("<H", raw)[0] == EXT_MAGIC

    def label(self) -> str:
        with open(self.device, "rb") as f:
            f.seek(self.offset + 1024 + 120)
            return f.read(16).split(b"\0", 1)[0].decode(errors="replace")

    def mkfs(self, label: str) -> None:
        """Create an empty ext4 filesystem filling the partition."""
        _run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", f"offset={self.offset}", str(self.device),
              f"{self.size // 1024}k"])

    def set_label(self, label: str) -> None:
        self.debugfs([f"ssv volume_name {label}"], write=True)

    def debugfs(self, commands: list[str], write: bool = False) -> str:
        """Run debugfs commands; any error line it prints makes this raise (debugfs itself exits 0)."""
        args = ["debugfs"] + (["-w"] if write else []) + ["-f", "-", self.spec]
        proc = subprocess.run(args, input="\n".join(commands) + "\n", capture_output=True, text=True,
                              check=False)
        errors = [line for line in proc.stderr.splitlines()
                  if line.strip() and not line.startswith("debugfs ")]
        if proc.returncode != 0 or errors:
            raise Ext4Error(f"debugfs on {self.spec} failed: {'; '.join(errors) or proc.returncode}")
        return proc.stdout

    def read(self, path: str) -> bytes | None:
        """The contents of `path` in the filesystem, or None when it does not exist."""
        proc = subprocess.run(["debugfs", "-R", f"cat {path}", self.spec], capture_output=True, check=False)
        err = proc.stderr.decode(errors="replace")
        if "not found" in err or "File not found" in err:
            return None
        errors = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
        if proc.returncode != 0 or errors:
            raise Ext4Error(f"debugfs cat {path} on {self.spec} failed: {'; '.join(errors)}")
        return proc.stdout

    def stat(self, path: str) -> tuple[int, int, int] | None:
        """(mode with type bits, uid, gid) of `path`, or None when it does not exist."""
        proc = subprocess.run(["debugfs", "-R", f"stat {path}", self.spec], capture_output=True, text=True,
                              check=False)
        if "not found" in proc.stderr:
            return None
        m_type = re.search(r"Type:\s+(\w+)\s+Mode:\s+(\d+)", proc.stdout)
        m_owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", proc.stdout)
        if not (m_type and m_owner):
            raise Ext4Error(f"debugfs stat {path} on {self.spec}: unexpected output: {proc.stderr.strip()}")
        kind = {"regular": 0o100000, "directory": 0o040000, "symlink": 0o120000}.get(m_type.group(1), 0)
        return kind | int(m_type.group(2), 8), int(m_owner.group(1)), int(m_owner.group(2))

    def install(self, files: list[tuple[Path, str, int]], dirs: list[tuple[str, int]], uid: int,
                gid: int) -> None:
        """Create `dirs` (path, mode) and copy host files to (host path, fs path, mode), all owned uid:gid.

        Existing files are replaced. Directories and files are given exactly the mode and owner asked for.
        """
        cmds: list[str] = []
        for d, mode in dirs:
            if self.stat(d) is None:
                cmds.append(f"mkdir {d}")
            cmds += [f"sif {d} mode 0{0o040000 | mode:o}", f"sif {d} uid {uid}", f"sif {d} gid {gid}"]
        for host, dest, mode in files:
            if self.stat(dest) is not None:
                cmds.append(f"rm {dest}")
            cmds += [f'write "{host}" {dest}', f"sif {dest} mode 0{0o100000 | mode:o}",
                     f"sif {dest} uid {uid}", f"sif {dest} gid {gid}"]
        self.debugfs(cmds, write=True)

    def grow(self) -> None:
        """Grow the (unmounted) filesystem to fill `size`: checked first, read-only, so resize2fs may skip the
        "run e2fsck first" guard it applies to filesystems it has not seen checked."""
        self.fsck()
        _run(["resize2fs", "-f", self.spec, f"{self.size // 1024}K"])

    def fsck(self) -> None:
        """Check the filesystem read-only; raise with e2fsck's findings when it is not clean."""
        proc = subprocess.run(["e2fsck", "-fn", self.spec], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise Ext4Error(f"filesystem check of {self.spec} failed (e2fsck exit {proc.returncode}): "
                            f"{proc.stdout.strip()[-500:]}")


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Ext4Error(f"{args[0]} failed: {(proc.stderr or proc.stdout).strip()}")


def passwd_entry(text: str, user: str) -> tuple[int, int] | None:
    """(uid, gid) of `user` in /etc/passwd text."""
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[0] == user and parts[2].isdigit() and parts[3].isdigit():
            return int(parts[2]), int(parts[3])
    return None
