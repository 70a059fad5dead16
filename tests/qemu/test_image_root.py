"""The built image's root file system, read on the host with debugfs (no boot): nothing of the machine that
built it, and the modes Debian ships.

mmdebstrap copies the build host's /etc/resolv.conf and /etc/hostname into the tree it makes (with that host's
modes: 0755 on the machine where this was found); the image must keep neither.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu]


@pytest.fixture(scope="module")
def root_etc(dev_image, tmp_path_factory) -> Path:
    """/etc of the image's root partition, dumped with its modes."""
    from flctl.image.disk import ROOT_LABEL, extract_partition

    if shutil.which("debugfs") is None:
        pytest.skip("debugfs is not installed (e2fsprogs)")
    work = tmp_path_factory.mktemp("image-root")
    part = work / "root.ext4"
    extract_partition(dev_image.disk, dev_image.partition(ROOT_LABEL), part)
    subprocess.run(["debugfs", "-R", f"rdump /etc {work}", str(part)], check=True, capture_output=True)
    return work / "etc"


def host_nameservers() -> list[str]:
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        return []
    return re.findall(r"^\s*nameserver\s+\S+", text, re.MULTILINE)


def test_image_holds_no_resolver_or_name_of_the_build_host(root_etc):
    assert not (root_etc / "resolv.conf").exists() and not (root_etc / "resolv.conf").is_symlink()
    assert not (root_etc / "apt/apt.conf.d/99mmdebstrap").exists(), "the build's apt options stay on the build host"
    hostname = root_etc / "hostname"
    assert hostname.read_text() == "fl-dev\n"
    assert oct(hostname.stat().st_mode & 0o7777) == "0o644"
    leaked = [
        str(path.relative_to(root_etc))
        for path in root_etc.rglob("*")
        if path.is_file() and not path.is_symlink() and any(ns in path.read_text(errors="replace")
                                                             for ns in host_nameservers())
    ]  # fmt: skip
    assert not leaked, f"the build host's nameserver is in {leaked}"


def test_overlay_files_have_debian_modes(root_etc):
    assert oct((root_etc / "fl-agent/agent.toml").stat().st_mode & 0o7777) == "0o644"
    assert oct((root_etc / "fl-agent").stat().st_mode & 0o7777) == "0o755"
    assert oct((root_etc / "fstab").stat().st_mode & 0o7777) == "0o644"
