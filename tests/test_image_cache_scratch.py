"""What a build killed with -9 or cut off left in ``<cache>/work`` goes with the next build, and never takes the
host's /dev with it.

The image build assembles a root file system and its ext4 images in a work directory (GBs); the container build
its podman contexts. A build that is killed cannot remove its own, and every later build used a new name, so they
piled up for good in a cache CI keeps between runs. Builds sharing a cache hold its lock, so the next one removes
them first; a build killed in its chroot left /proc and /dev mounted there, which are unmounted before anything
is removed (rmtree would walk into the host's /dev).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flctl.image.cache import ArtifactStore


def test_a_work_directory_a_killed_build_left_is_removed_by_the_next_build(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "cache")
    left = store.root / "work" / "4242-1234567"
    (left / "rootfs" / "usr").mkdir(parents=True)
    (left / "root.ext4").write_bytes(b"half a file system")
    with store.scratch() as work:
        assert work.is_dir() and not left.exists()
        (work / "data.ext4").write_bytes(b"data")
    assert list((store.root / "work").iterdir()) == []


def _can_bind_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _can_bind_mount(), reason="bind mounts need root")
def test_a_dev_a_killed_chroot_left_mounted_is_unmounted_not_emptied(tmp_path: Path) -> None:
    host_dev = tmp_path / "host-dev"  # stands for the host's /dev, bound into the chroot as _chroot_mounts does
    host_dev.mkdir()
    (host_dev / "null").write_text("a device node of the host")
    store = ArtifactStore(tmp_path / "cache")
    chroot_dev = store.root / "work" / "4242-1234567" / "rootfs" / "dev"
    chroot_dev.mkdir(parents=True)
    if subprocess.run(["mount", "--bind", str(host_dev), str(chroot_dev)], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow a bind mount")
    try:
        with store.scratch():
            pass
        assert (host_dev / "null").read_text() == "a device node of the host"
        assert list((store.root / "work").iterdir()) == []
    finally:
        if os.path.ismount(chroot_dev):
            subprocess.run(["umount", "-l", str(chroot_dev)], check=False)
