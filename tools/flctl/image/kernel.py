"""The appliance kernel for direct boot: Debian's kernel package, trimmed for a fast boot under emulation.

What the QEMU rig measured (docs/qemu.md): a Debian kernel with its stock 36 MB initrd and every module took
~100 s to reach multi-user under TCG; the same kernel booted as an *uncompressed* vmlinux through PVH, with a
small busybox initramfs and only the ~30 modules the appliance needs, takes 15-20 s. This module produces that:

- the kernel QEMU's ``-kernel`` boots: on x86_64 ``vmlinux``, the ELF kernel extracted from the package's
  bzImage (booted through PVH); on arm64 ``Image``, which Debian's package ships uncompressed;
- ``initrd.img``: busybox + the modules needed to reach the root disk + ``tools/image/initramfs-init``;
- ``modules/``: the selected modules (and their dependencies) in ``lib/modules/<kver>`` layout for the rootfs.
"""

from __future__ import annotations

import fcntl
import lzma
import os
import shutil
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from appliance.durable import fsync_dir

from .arch import AMD64, Architecture, is_foreign
from .cache import fsync_file

BUSYBOX_PACKAGE = "busybox-static"
# The host's Debian: where a foreign architecture's packages come from too (same suites, same kernel version).
DEBIAN_SOURCES = (
    ("http://deb.debian.org/debian", "bookworm bookworm-updates"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
)
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
APT_LISTS_MAX_AGE = 24 * 3600
# download_deb's private directory under <cache>/debs: apt-get download writes there, never at a name builds take.
DOWNLOAD_PREFIX = ".download-"

ELF_MAGIC = b"\x7fELF"
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b\x08"
ARM64_IMAGE_MAGIC = b"ARM\x64"  # at offset 56 of an arm64 Image (Documentation/arch/arm64/booting.rst)


class KernelError(RuntimeError):
    """The kernel package or its contents are not what the image needs."""


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    arch: str = "amd64"

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


@dataclass(frozen=True)
class Apt:
    """apt for one architecture's packages: the host's own apt, or (``state`` set) a private apt state for a
    foreign architecture, so that the host's dpkg never learns of arm64 (no ``dpkg --add-architecture``)."""

    arch: str = "amd64"
    state: Path | None = None

    def options(self) -> list[str]:
        if self.state is None:
            return []
        return [
            "-o", f"Dir::Etc::SourceList={self.state / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=-",
            "-o", f"Dir::State={self.state}",
            "-o", f"Dir::Cache={self.state / 'cache'}",
            "-o", f"Dir::State::status={self.state / 'status'}",
            "-o", f"APT::Architecture={self.arch}",
            "-o", f"APT::Architectures={self.arch}",
            "-o", "Acquire::Check-Valid-Until=false",  # a frozen snapshot mirror's Release may have expired
        ]  # fmt: skip

    def prepare(self) -> None:
        """Create the private state (sources, empty dpkg status) the first time."""
        if self.state is None:
            return
        for d in ("lists/partial", "cache/archives/partial"):
            (self.state / d).mkdir(parents=True, exist_ok=True)
        lines = [f"deb [signed-by={DEBIAN_KEYRING}] {url} {suite} main"
                 for url, suites in DEBIAN_SOURCES for suite in suites.split()]  # fmt: skip
        (self.state / "sources.list").write_text("\n".join(lines) + "\n")
        (self.state / "status").touch()

    def stale(self) -> bool:
        """A private state's package lists are a day old (the host's are refreshed by whoever runs the host): a
        kernel version the mirror has since replaced would no longer download."""
        if self.state is None:
            return False
        lists = [p for p in (self.state / "lists").glob("*_Packages*")]
        return not lists or min(p.stat().st_mtime for p in lists) < time.time() - APT_LISTS_MAX_AGE


def apt_for(arch: Architecture, cache: Path) -> Apt:
    """The host's apt for the host's architecture, else a private one under ``cache``."""
    if is_foreign(arch):
        return Apt(arch.name, cache / "apt" / arch.name)
    return Apt(arch.name)


HOST_APT = Apt()


def resolve_package(name: str, apt: Apt = HOST_APT) -> DebPackage:
    """The candidate version of ``name`` in ``apt``'s sources (``apt-cache policy``).

    A fresh CI container often has no package lists at all: then ``apt-get update`` once and ask again.
    """
    apt.prepare()
    if apt.stale():
        _run(["apt-get", *apt.options(), "update", "-qq"])
    for attempt in range(2):
        version = _candidate(name, apt)
        if version:
            return DebPackage(name, version, apt.arch)
        if attempt == 0:
            _run(["apt-get", *apt.options(), "update", "-qq"])
    raise KernelError(
        f"apt has no {apt.arch} candidate for {name!r} even after apt-get update (Debian bookworm sources needed)"
    )


def _candidate(name: str, apt: Apt) -> str | None:
    out = _run(["apt-cache", *apt.options(), "policy", name])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    return None


def resolve_kernel_package(arch: Architecture = AMD64, apt: Apt = HOST_APT) -> DebPackage:
    """The versioned linux-image package the architecture's meta package (``linux-image-amd64``) points at."""
    meta = arch.kernel_meta_package
    resolve_package(meta, apt)  # makes sure the package lists exist
    out = _run(["apt-cache", *apt.options(), "depends", meta])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return resolve_package(line.split(":", 1)[1].strip(), apt)
    raise KernelError(f"could not find the kernel package {meta} depends on")


def download_deb(pkg: DebPackage, dest: Path, apt: Apt = HOST_APT) -> Path:
    """``apt-get download`` the exact version into ``dest`` (a cache dir) unless it is already there.

    A .deb there is taken as it is from then on, so only a whole one, on disk, may take its name. apt-get download
    writes straight to the name it keeps (a kill or a power cut mid-download leaves a truncated .deb) and never
    fsyncs; so it downloads into ``dest/.download-<pid>``, and the file is fsynced, renamed into ``dest`` and the
    rename made durable. Downloads into ``dest`` take turns (a flock on ``dest/.download.lock``: an image build and
    a test session's guest kernel may share it), so a download directory found here was left by one that was
    killed or lost power, and is removed."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / pkg.filename
    if target.exists():
        return target
    with open(dest / ".download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # downloaded while this one waited
            return target
        for stale in dest.glob(f"{DOWNLOAD_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = dest / f"{DOWNLOAD_PREFIX}{os.getpid()}"
        work.mkdir()
        try:
            _run(["apt-get", *apt.options(), "download", "-q", "-o", "APT::Sandbox::User=root",
                  f"{pkg.name}:{pkg.arch}={pkg.version}"], cwd=work)  # fmt: skip
            downloaded = work / pkg.filename
            if not downloaded.exists():
                found = sorted(work.glob(f"{pkg.name}_*.deb"))
                raise KernelError(f"apt-get download did not produce {target.name} (found {[p.name for p in found]})")
            fsync_file(downloaded)
            os.replace(downloaded, target)
            fsync_dir(dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def extract_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Find the compressed payload in a bzImage and return the ELF kernel inside it.

    The payload's offset is not recorded in a convenient place, so (like the kernel's scripts/extract-vmlinux)
    try every occurrence of a known compression magic until one decompresses to an ELF file.
    """
    for magic, decompress in ((XZ_MAGIC, _unxz), (GZIP_MAGIC, _gunzip)):
        start = bzimage.find(magic)
        while start != -1:
            try:
                elf = decompress(bzimage[start:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf.startswith(ELF_MAGIC):
                return elf
            start = bzimage.find(magic, start + 1)
    raise KernelError("no xz- or gzip-compressed ELF kernel found in the bzImage")


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    # wbits 16+MAX: gzip framing; a decompressobj stops at the end of the member and ignores trailing bytes.
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def module_load_order(root: Path, kver: str, names: tuple[str, ...]) -> list[Path]:
    """Module files (relative to ``lib/modules/<kver>``) needed for ``names``, dependencies first."""
    out = _run(["modprobe", "-d", str(root), "-S", kver, "-a", "--show-depends", *names])
    moddir = root / "lib" / "modules" / kver
    order: list[Path] = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "insmod":
            rel = Path(parts[1]).resolve().relative_to(moddir.resolve())
            if rel not in order:
                order.append(rel)
        elif parts[:1] == ["builtin"]:
            continue
    missing = [n for n in names if not any(p.name.split(".")[0].replace("-", "_") == n for p in order)]
    builtin = (moddir / "modules.builtin").read_text()
    missing = [n for n in missing if f"/{n}.ko" not in builtin.replace("-", "_")]
    if missing:
        raise KernelError(f"kernel {kver} has no module(s) {', '.join(missing)}")
    return order


@dataclass(frozen=True)
class KernelBuild:
    kver: str
    kernel: Path  # what QEMU's -kernel boots (Architecture.kernel_file)
    initrd: Path
    modules_root: Path  # contains lib/modules/<kver>/...


def bootable_kernel(packaged: bytes, arch: Architecture) -> bytes:
    """The kernel QEMU boots directly, from the package's /boot/vmlinuz: the ELF inside an x86 bzImage (PVH
    boot); an arm64 Image as it is (gunzipped if a package ever ships it compressed)."""
    if arch.kernel_file == "vmlinux":
        return extract_vmlinux(packaged)
    if packaged.startswith(GZIP_MAGIC):
        packaged = _gunzip(packaged)
    if packaged[56:60] != ARM64_IMAGE_MAGIC:
        raise KernelError(f"the {arch.name} kernel package's vmlinuz is not an arm64 Image (no ARM\\x64 magic)")
    return packaged


def build_kernel(
    kernel_deb: Path, busybox_deb: Path, init_script: Path, out: Path, work: Path, arch: Architecture = AMD64
) -> KernelBuild:
    """Produce the bootable kernel, initrd.img and the trimmed module tree in ``out`` (``work`` is scratch)."""
    pkg_root = work / "kernel-pkg"
    extract_deb(kernel_deb, pkg_root)
    kvers = sorted(p.name for p in (pkg_root / "lib" / "modules").iterdir())
    if len(kvers) != 1:
        raise KernelError(f"expected one kernel version in {kernel_deb.name}, found {kvers}")
    kver = kvers[0]
    packaged = list((pkg_root / "boot").glob("vmlinuz-*"))
    if len(packaged) != 1:
        raise KernelError(f"expected one vmlinuz in {kernel_deb.name}, found {packaged}")
    kernel = out / arch.kernel_file
    kernel.write_bytes(bootable_kernel(packaged[0].read_bytes(), arch))
    shutil.copy2(pkg_root / "boot" / f"config-{kver}", out / "config")

    _run(["depmod", "-b", str(pkg_root), kver])
    moddir = pkg_root / "lib" / "modules" / kver
    # Rootfs module tree: the selected modules plus the index files depmod needs to rebuild the maps.
    rootfs_order = module_load_order(pkg_root, kver, arch.rootfs_modules)
    mods_out = out / "modules" / "lib" / "modules" / kver
    for rel in rootfs_order:
        (mods_out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, mods_out / rel)
    for index in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (moddir / index).exists():
            shutil.copy2(moddir / index, mods_out / index)
    _run(["depmod", "-b", str(out / "modules"), kver])

    # Initramfs: busybox, boot modules in load order, the init script. Uncompressed cpio: smaller to
    # decompress (nothing) than to read under emulation.
    bb_root = work / "busybox-pkg"
    extract_deb(busybox_deb, bb_root)
    busybox = bb_root / "bin" / "busybox"
    if not busybox.exists():
        raise KernelError(f"{busybox_deb.name} has no bin/busybox")
    initramfs = work / "initramfs"
    for d in ("bin", "dev", "proc", "sys", "run", "newroot", "lib/modules"):
        (initramfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, initramfs / "bin" / "busybox")
    os.chmod(initramfs / "bin" / "busybox", 0o755)
    os.symlink("busybox", initramfs / "bin" / "sh")
    shutil.copy2(init_script, initramfs / "init")
    os.chmod(initramfs / "init", 0o755)
    boot_order = module_load_order(pkg_root, kver, arch.initramfs_modules)
    lines = []
    for i, rel in enumerate(boot_order):
        name = f"{i:02d}-{rel.name}"
        shutil.copy2(moddir / rel, initramfs / "lib" / "modules" / name)
        lines.append(name)
    (initramfs / "lib" / "modules" / "load-order").write_text("\n".join(lines) + "\n")
    initrd = out / "initrd.img"
    _cpio_newc(initramfs, initrd)
    (out / "kver").write_text(kver + "\n")
    return KernelBuild(kver=kver, kernel=kernel, initrd=initrd, modules_root=out / "modules")


def load_kernel_build(out: Path, arch: Architecture = AMD64) -> KernelBuild:
    kver = (out / "kver").read_text().strip()
    return KernelBuild(kver, kernel=out / arch.kernel_file, initrd=out / "initrd.img", modules_root=out / "modules")


def _cpio_newc(root: Path, dest: Path) -> None:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with open(dest, "wb") as fh:
        subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0", "--reproducible"],
            input=("\n".join(names) + "\n").encode(),
            cwd=root,
            stdout=fh,
            check=True,
        )


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise KernelError(f"{cmd[0]} is not installed (see tools/host-packages.txt)") from exc
    if proc.returncode != 0:
        raise KernelError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout
