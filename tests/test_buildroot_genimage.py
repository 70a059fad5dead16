"""The Buildroot boards' post-image step run for real on a stand-in root file system: genimage with the
board's genimage.cfg, bmaptool, zstd (board/fl-edge/common/post-image.sh, as Buildroot calls it), then
`flctl flash` takes the result as it takes the Yocto image and provisions a board on it.

The stand-in rootfs.ext4 is a small ext4 labelled fl-root with the /etc/passwd line Buildroot makes for the
agent; Buildroot itself is not run (tests/test_buildroot_make.py does that where a checkout exists).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from buildroot_tree import BOARDS
from flash_images import AGENT_GID, AGENT_UID, assert_provisioned, cli, have_tools

from flctl.flash.imagesource import open_image
from flctl.flash.write import AGENT_USER, DATA_LABEL, ROOT_LABEL

TOOLS = ("genimage", "bmaptool", "zstd", "mke2fs", "mkdosfs", "mcopy", "mdir", "blkid")
missing = [t for t in TOOLS if not shutil.which(t)]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"missing host tools: {', '.join(missing)} (tools/host-packages.txt)"),
    pytest.mark.skipif(have_tools() is not None, reason=have_tools() or ""),
]


def stand_in_rootfs(images: Path) -> None:
    root = images.parent / "root"
    (root / "etc").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        f"{AGENT_USER}:x:{AGENT_UID}:{AGENT_GID}:fl-agent (federated learning):/var/lib/fl-agent:/usr/sbin/nologin\n")
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", ROOT_LABEL, "-d", str(root), str(images / "rootfs.ext4"),
                    "16M"], check=True)


def post_image(tmp_path: Path, board: str) -> Path:
    """Run the board's post-image.sh as Buildroot does (BINARIES_DIR, BUILD_DIR; args: images dir, board
    dir); returns the images directory."""
    images = tmp_path / "images"
    images.mkdir()
    stand_in_rootfs(images)
    if board == "raspberrypi4-64":
        firmware = images / "rpi-firmware"
        firmware.mkdir()
        (firmware / "config.txt").write_text("start_file=start4.elf\nfixup_file=fixup4.dat\nkernel=Image\n")
        for name in ("start4.elf", "fixup4.dat", "cmdline.txt"):
            (firmware / name).write_bytes(b"stand-in " + name.encode())
        (images / "bcm2711-rpi-4-b.dtb").write_bytes(b"stand-in dtb")
        (images / "Image").write_bytes(b"stand-in kernel")
    env = {**os.environ, "BINARIES_DIR": str(images), "BUILD_DIR": str(tmp_path / "build")}
    subprocess.run([str(BOARDS / "common" / "post-image.sh"), str(images), str(BOARDS / board)], env=env,
                   check=True, capture_output=True)
    return images


@pytest.mark.parametrize("board", ["qemu-x86_64", "raspberrypi4-64"])
def test_post_image_writes_the_disk_flctl_flash_accepts(tmp_path, board):
    images = post_image(tmp_path, board)
    for name in ("fl-image.img", "fl-image.img.zst"):
        image = open_image(images / name)
        assert image.bmap is not None, f"{name}: flctl flash did not find fl-image.img.bmap"
        names = [p.name for p in image.table.partitions]
        assert names == ([*(["boot"] if board == "raspberrypi4-64" else []), ROOT_LABEL, DATA_LABEL])
        assert image.table.partitions[0].offset % (1 << 20) == 0, "partitions aligned to 1 MiB"
    blkid = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(images / "fl-data.ext4")],
                           capture_output=True, text=True, check=True)
    assert blkid.stdout.strip() == DATA_LABEL
    if board == "raspberrypi4-64":
        listing = subprocess.run(["mdir", "-b", "-i", str(images / "boot.vfat"), "::"], capture_output=True,
                                 text=True, check=True).stdout
        for name in ("start4.elf", "fixup4.dat", "config.txt", "cmdline.txt", "bcm2711-rpi-4-b.dtb", "Image"):
            assert f"::/{name}" in listing, f"{name} is not in the boot partition:\n{listing}"


@pytest.mark.usefixtures("flctl_env")
def test_flctl_flash_provisions_a_board_on_the_buildroot_image(tmp_path, fleet):
    images = post_image(tmp_path, "qemu-x86_64")
    target = tmp_path / "board.img"
    assert cli(["flash", str(images / "fl-image.img.zst"), str(target), "--board", "cam-1", "--fleet", str(fleet),
                "--yes"]) == 0
    raw = tmp_path / "raw.img"
    subprocess.run(["zstd", "-dqf", str(images / "fl-image.img.zst"), "-o", str(raw)], check=True)
    assert_provisioned(target, raw, fleet, "cam-1")
