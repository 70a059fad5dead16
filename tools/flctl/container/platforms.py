"""The architectures the container images are built for, and how each gets its wheels and runs here.

A foreign architecture's binaries run through qemu-user-static registered with binfmt_misc with the F flag
(fix-binary): the kernel opens the interpreter when the handler is registered, so it works inside a
container whose root file system has no qemu in it.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

# bookworm's CPython: the images' Python, so wheels are chosen for it (and the host's bytecode matches it).
IMAGE_PYTHON = "3.11"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


class PlatformError(RuntimeError):
    """An architecture that cannot be built or run here; the message says what to install or enable."""


@dataclass(frozen=True)
class Platform:
    name: str  # Debian's and OCI's name: amd64, arm64
    machine: str  # the kernel's (uname -m): x86_64, aarch64

    @property
    def wheel_tags(self) -> list[str]:
        """pip options selecting CPython 3.11 binary wheels that run on bookworm (glibc 2.36) here."""
        tags = [f"--platform=manylinux_2_{minor}_{self.machine}" for minor in range(17, 37)]
        abi = "cp" + IMAGE_PYTHON.replace(".", "")
        return [*tags, f"--python-version={IMAGE_PYTHON}", "--implementation=cp", f"--abi={abi}", "--abi=abi3",
                "--abi=none"]  # fmt: skip

    @property
    def foreign(self) -> bool:
        return self.machine != platform.machine()


PLATFORMS = {p.name: p for p in (Platform("amd64", "x86_64"), Platform("arm64", "aarch64"))}
ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}


def platform_named(name: str) -> Platform:
    key = ALIASES.get(name, name)
    if key not in PLATFORMS:
        raise PlatformError(f"unknown architecture {name!r}: images are built for {', '.join(PLATFORMS)}")
    return PLATFORMS[key]


def host_platform() -> Platform:
    return platform_named(platform.machine())


def ensure_emulation(target: Platform) -> None:
    """Make sure ``target``'s binaries run here: mount binfmt_misc and enable qemu-user-static's handler when
    they are installed but off (a machine without systemd does neither at boot), else say what is missing."""
    if not target.foreign:
        return
    entry = BINFMT_DIR / f"qemu-{target.machine}"
    if not entry.exists():
        if not (BINFMT_DIR / "register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], check=False,
                           capture_output=True)
        subprocess.run(["update-binfmts", "--enable", f"qemu-{target.machine}"], check=False, capture_output=True)
    try:
        text = entry.read_text()
    except OSError:
        raise PlatformError(
            f"{target.name} images need qemu-user-static registered with binfmt_misc ({entry} is missing): "
            "apt-get install qemu-user-static binfmt-support (tools/host-packages.txt)"
        ) from None
    if not text.startswith("enabled"):
        raise PlatformError(f"{entry} is disabled: update-binfmts --enable qemu-{target.machine}")
    flags = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")), "")
    if "F" not in flags:
        raise PlatformError(f"{entry} lacks the F (fix-binary) flag, so containers cannot find the emulator: "
                            "use Debian's qemu-user-static, which registers it with F")
