"""The architectures the development image is built for, and what differs between them.

Everything else (packages, overlays, units, layout) is the same: an arm64 image is the x86_64 one with
Debian's arm64 packages, an arm64 kernel and aarch64 wheels. A foreign architecture's chroot runs through
qemu-user-static (binfmt_misc with the F flag, so the interpreter works inside the chroot).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

# bookworm's Python: the agent's venv in the image is made by it, so wheels are fetched for this version.
GUEST_PYTHON = "3.11"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


class ArchitectureError(ValueError):
    """An architecture the image cannot be built for, or a host that cannot run its chroot."""


@dataclass(frozen=True)
class Architecture:
    """One target architecture of the image."""

    name: str  # Debian's name (dpkg --print-architecture): amd64, arm64
    machine: str  # the kernel's and ELF's name (uname -m): x86_64, aarch64
    kernel_meta_package: str
    kernel_file: str  # what QEMU's -kernel boots: an uncompressed ELF vmlinux (PVH) or the arm64 Image
    console: str  # the serial console's device
    initramfs_modules: tuple[str, ...]  # loaded by the initramfs, in order, to reach the root disk
    rootfs_modules: tuple[str, ...]  # shipped in the root file system, loaded on demand
    gpt_root_type: str  # Discoverable Partitions Specification: the root partition of this architecture
    # pip --platform tags of binary wheels that run on bookworm (glibc 2.36) on this architecture.
    wheel_platforms: tuple[str, ...]
    # Kernel arguments beyond the common ones (the rig's, for how this architecture is emulated).
    cmdline_extra: str = ""

    @property
    def kernel_cmdline(self) -> str:
        common = f"console={self.console},115200 root=LABEL=fl-root rootfstype=ext4 ro panic=-1 loglevel=4"
        return f"{common} {self.cmdline_extra}".strip()


# Modules both kernels need beyond reaching the disk: network, entropy, autofs, and vivid's virtual cameras
# (real V4L2 devices and udev hotplug events in the rig).
_COMMON_MODULES = ("virtio_net", "virtio_rng", "virtio_console", "autofs4", "vivid", "evdev")

AMD64 = Architecture(
    name="amd64",
    machine="x86_64",
    kernel_meta_package="linux-image-amd64",
    kernel_file="vmlinux",
    console="ttyS0",
    initramfs_modules=("virtio_pci", "virtio_blk", "crc32c_generic", "crc32c_intel", "ext4"),
    # The ACPI power button as an input device (evdev), which systemd-logind answers with a clean poweroff: a
    # board's power button, and the rig's QMP system_powerdown (flctl qemu run's Ctrl-C and SIGTERM).
    rootfs_modules=(
        *("virtio_pci", "virtio_blk", "crc32c_generic", "crc32c_intel", "ext4"),
        *_COMMON_MODULES,
        "button",
    ),
    gpt_root_type="4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    wheel_platforms=tuple(f"manylinux_2_{minor}_x86_64" for minor in range(17, 37)),
)

ARM64 = Architecture(
    name="arm64",
    machine="aarch64",
    kernel_meta_package="linux-image-arm64",
    kernel_file="Image",
    console="ttyAMA0",  # the virt machine's PL011 UART (built into Debian's arm64 kernel)
    initramfs_modules=("virtio_pci", "virtio_blk", "crc32c_generic", "ext4"),
    # The virt machine's power button is a gpio-keys key on its PL061 GPIO (QMP system_powerdown presses it).
    rootfs_modules=("virtio_pci", "virtio_blk", "crc32c_generic", "ext4", *_COMMON_MODULES, "gpio_keys"),
    gpt_root_type="B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
    wheel_platforms=tuple(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)),
    # Emulated on an x86 host, udev's coldplug took over 90 s (systemd's default device timeout) to label the
    # data partition on a busy machine, and data.mount failed with everything after it: wait up to 5 minutes.
    cmdline_extra="systemd.default_device_timeout_sec=300",
)

ARCHITECTURES = {a.name: a for a in (AMD64, ARM64)}
# What users may also call them (uname -m, Python's platform.machine()).
ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}


def architecture(name: str) -> Architecture:
    """The architecture called ``name`` (Debian's name or uname's); one clear error for anything else."""
    key = ALIASES.get(name, name)
    if key not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ArchitectureError(f"unknown architecture {name!r}: the image is built for {known}")
    return ARCHITECTURES[key]


def host_architecture() -> Architecture:
    """The architecture of this machine (the default target)."""
    return architecture(platform.machine())


def is_foreign(arch: Architecture) -> bool:
    return arch.machine != platform.machine()


def check_can_emulate(arch: Architecture) -> None:
    """A foreign chroot needs qemu-user-static registered with binfmt_misc: say so before mmdebstrap runs."""
    if not is_foreign(arch):
        return
    entry = BINFMT_DIR / f"qemu-{arch.machine}"
    try:
        text = entry.read_text()
    except OSError:
        raise ArchitectureError(
            f"building the {arch.name} image needs qemu-user-static registered with binfmt_misc "
            f"({entry} is missing): apt-get install qemu-user-static binfmt-support"
        ) from None
    if not text.startswith("enabled"):
        raise ArchitectureError(f"{entry} is disabled: enable it (update-binfmts --enable qemu-{arch.machine})")
