"""`flctl flash` onto real block devices (loop devices), and refusals of devices and files in use."""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flash_images import assert_provisioned, cli, have_tools, make_image

from flctl.flash import gpt
from flctl.flash.ext4image import Ext4Error, Ext4Volume

pytestmark = [pytest.mark.skipif(have_tools() is not None, reason=have_tools() or ""),
              pytest.mark.usefixtures("flctl_env")]


@contextmanager
def loop_device(backing: Path, *extra: str) -> Iterator[Path]:
    proc = subprocess.run(["losetup", "-f", "--show", *extra, str(backing)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot create a loop device here: {proc.stderr.strip() or 'losetup failed'}")
    dev = Path(proc.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


@contextmanager
def mounted(dev: Path, where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", str(dev), str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def _blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_flash_to_loop_device(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img")
    backing = _blank(tmp_path / "card.bin", 64 << 20)  # a "card" larger than the image
    with loop_device(backing) as dev:
        rc = cli(["flash", str(image), str(dev), "--board", "cam-2", "--fleet", str(fleet), "--yes"])
        err = " ".join(capsys.readouterr().err.split())
        assert rc == 0, err
        assert f"{dev} provisioned as board cam-2" in err
    assert_provisioned(backing, image, fleet, "cam-2")


def test_flash_to_loop_device_without_bmap(tmp_path, fleet):
    image = make_image(tmp_path / "fl.img", compress="zst", bmap=False)
    raw = make_image(tmp_path / "ref.img", bmap=False)  # only for its size; fl-root content differs
    backing = _blank(tmp_path / "card.bin", 64 << 20)
    with loop_device(backing) as dev:
        assert cli(["flash", str(image), str(dev), "--board", "cam-3", "--fleet", str(fleet), "--yes"]) == 0
    subprocess.run(["zstd", "-dqf", str(image), "-o", str(raw)], check=True)
    assert_provisioned(backing, raw, fleet, "cam-3")


def test_too_small_device_is_refused(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img")
    backing = _blank(tmp_path / "small.bin", 16 << 20)
    with loop_device(backing) as dev:
        rc = cli(["flash", str(image), str(dev), "--board", "cam-1", "--fleet", str(fleet), "--yes"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2
    assert f"{dev} (16.0 MiB) is smaller than the image (48.0 MiB)" in err
    assert backing.read_bytes() == b"\0" * (16 << 20)


def test_mounted_device_is_refused(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img")
    backing = _blank(tmp_path / "card.bin", 64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True)
    with loop_device(backing) as dev, mounted(dev, tmp_path / "mnt") as mnt:
        (mnt / "photo.jpg").write_bytes(b"precious")
        rc = cli(["flash", str(image), str(dev), "--board", "cam-1", "--fleet", str(fleet), "--yes", "--force"])
        err = " ".join(capsys.readouterr().err.split())
        assert rc == 2
        assert f"flctl flash: refused: {dev} is mounted at {mnt}; unmount it first" in err
        assert (mnt / "photo.jpg").read_bytes() == b"precious"
    assert b"EFI PART" not in backing.read_bytes()[:8192]


def test_image_file_attached_to_a_mounted_loop_is_refused(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img")
    target = make_image(tmp_path / "board.img", data="ext4", bmap=False)
    before = target.read_bytes()[:2048 * 512 + (22 << 20)]  # table + fl-root (mounting alters fl-data)
    data_offset = 2048 * 512 + 22 * (1 << 20)  # the fl-data partition of make_image's 48 MiB layout
    with loop_device(target, "-o", str(data_offset), "--sizelimit", str(22 << 20)) as dev, \
            mounted(dev, tmp_path / "mnt") as mnt:
        rc = cli(["flash", str(image), str(target), "--board", "cam-1", "--fleet", str(fleet), "--yes"])
        err = " ".join(capsys.readouterr().err.split())
        assert rc == 2
        assert f"{target} is in use: attached to {dev} (mounted at {mnt}); detach it first" in err
    assert target.read_bytes()[:len(before)] == before


def test_old_backup_table_at_the_card_end_cannot_resurrect_a_failed_board(tmp_path, fleet, capsys):
    """A card that held a GPT keeps its backup header at its end; a failed flash must invalidate it too."""
    old = make_image(tmp_path / "old.img", size_mb=64, bmap=False)  # the card's previous life: a full-size GPT
    backing = tmp_path / "card.bin"
    old.rename(backing)
    image = make_image(tmp_path / "fl.img", passwd=False)  # fails at the identity step (no fl-agent user)
    with loop_device(backing) as dev:
        assert cli(["flash", str(image), str(dev), "--board", "cam-1", "--fleet", str(fleet), "--yes"]) == 1
    assert "marked unbootable" in capsys.readouterr().err
    with open(backing, "rb") as f:
        f.seek((64 << 20) - 512)
        assert f.read(8) != b"EFI PART"
    dump = subprocess.run(["sfdisk", "--dump", str(backing)], capture_output=True, text=True)
    assert "fl-data" not in dump.stdout, dump.stdout + dump.stderr


@contextmanager
def partition_node(dev: Path, number: int, where: Path) -> Iterator[Path]:
    """A device node for partition `number` of loop device `dev` (no udev here to make /dev/loopNpM)."""
    import os
    import stat

    sysdir = Path("/sys/class/block") / f"{dev.name}p{number}"
    if not sysdir.exists():  # partscan may be off: add the partitions explicitly (BLKPG)
        subprocess.run(["partx", "-a", str(dev)], capture_output=True, check=False)
    deadline = time.monotonic() + 5
    while not (sysdir / "dev").exists():
        if time.monotonic() > deadline:
            pytest.skip(f"the kernel did not scan {dev}'s partitions (no {sysdir})")
        time.sleep(0.1)
    major, minor = (int(x) for x in (sysdir / "dev").read_text().split(":"))
    node = where / f"{dev.name}p{number}"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(major, minor))
    try:
        yield node
    finally:
        node.unlink()


def test_partition_instead_of_disk_is_refused(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img")
    card = make_image(tmp_path / "card.img", bmap=False)
    with loop_device(card, "-P") as dev, partition_node(dev, 1, tmp_path) as part:
        rc = cli(["flash", str(image), str(part), "--board", "cam-1", "--fleet", str(fleet), "--yes"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2
    assert f"{part} is a partition of {dev}; give the whole disk ({dev})" in err


def test_disk_with_a_mounted_partition_is_refused(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img")
    card = make_image(tmp_path / "card.img", data="ext4", bmap=False)
    with loop_device(card, "-P") as dev, partition_node(dev, 2, tmp_path) as part, \
            mounted(part, tmp_path / "mnt") as mnt:
        rc = cli(["flash", str(image), str(dev), "--board", "cam-1", "--fleet", str(fleet), "--yes"])
        err = " ".join(capsys.readouterr().err.split())
        assert rc == 2
        assert f"{dev} is mounted at {mnt}; unmount it first" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "rc"), [("yes\n", 0), ("no\n", 2), ("\n", 2)])
def test_confirmation_shows_model_and_size(tmp_path, fleet, capsys, monkeypatch, answer, rc):
    image = make_image(tmp_path / "fl.img")
    backing = _blank(tmp_path / "card.bin", 64 << 20)
    monkeypatch.setattr("sys.stdin", _Terminal(answer))
    with loop_device(backing) as dev:
        assert cli(["flash", str(image), str(dev), "--board", "cam-1", "--fleet", str(fleet)]) == rc
    captured = capsys.readouterr()
    err = " ".join((captured.err + captured.out).split())
    assert f"{dev}: loop device backed by {backing}, 64.0 MiB, NOT removable, loop" in err
    assert "Everything on these targets will be lost." in err
    if rc == 0:
        assert_provisioned(backing, image, fleet, "cam-1")
    else:
        assert "not confirmed" in err
        with open(backing, "rb") as f:
            assert f.read(1 << 20) == b"\0" * (1 << 20)


def _table(disk: Path):  # type: ignore[no-untyped-def]
    with open(disk, "rb") as f:
        return gpt.read_table(gpt.file_reader(f), disk.stat().st_size)


def _filesystem_bytes(disk: Path, part) -> int:  # type: ignore[no-untyped-def]
    out = subprocess.run(["dumpe2fs", "-h", f"{disk}?offset={part.offset}"], capture_output=True, text=True,
                         check=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


@pytest.mark.parametrize("data", ["empty", "ext4"])
def test_fl_data_grows_to_fill_a_larger_card(tmp_path, fleet, capsys, data):
    """A 48 MiB image on a 160 MiB card: the backup GPT moves to the card's end and fl-data (formatted by the
    flash, or shipped formatted by the image and resized) fills the rest, identity intact."""
    image = make_image(tmp_path / "fl.img", data=data)
    card = 160 << 20
    backing = _blank(tmp_path / "card.bin", card)
    with loop_device(backing) as dev:
        rc = cli(["flash", str(image), str(dev), "--board", "cam-1", "--fleet", str(fleet), "--yes"])
        err = " ".join(capsys.readouterr().err.split())
        assert rc == 0, err
    before, after = _table(image).by_name("fl-data"), _table(backing)
    grown = after.by_name("fl-data")
    assert after.header.alternate_lba == card // 512 - 1, "the backup GPT header belongs at the card's end"
    assert grown.first_lba == before.first_lba and grown.size > card - (50 << 20), grown
    assert f"fl-data {grown.size / 2**20:.1f} MiB (grown to fill the device)" in err
    assert grown.size - 4096 < _filesystem_bytes(backing, grown) <= grown.size  # the filesystem fills it
    assert_provisioned(backing, image, fleet, "cam-1")  # sfdisk --verify, fl-root as built, identity, fsck


def test_no_grow_keeps_the_images_layout(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img", data="ext4")
    backing = _blank(tmp_path / "card.bin", 160 << 20)
    with loop_device(backing) as dev:
        rc = cli(["flash", str(image), str(dev), "--board", "cam-2", "--fleet", str(fleet), "--yes", "--no-grow"])
        err = " ".join(capsys.readouterr().err.split())
        assert rc == 0, err
    assert _table(backing).by_name("fl-data") == _table(image).by_name("fl-data")
    assert "grown" not in err
    assert_provisioned(backing, image, fleet, "cam-2")


def test_a_failed_grow_leaves_the_card_unbootable(tmp_path, fleet, capsys, monkeypatch):
    def broken(self) -> None:  # type: ignore[no-untyped-def]
        raise Ext4Error("resize2fs failed: simulated")

    monkeypatch.setattr(Ext4Volume, "grow", broken)
    image = make_image(tmp_path / "fl.img", data="ext4")
    card = 160 << 20
    backing = _blank(tmp_path / "card.bin", card)
    with loop_device(backing) as dev:
        rc = cli(["flash", str(image), str(dev), "--board", "cam-3", "--fleet", str(fleet), "--yes"])
        err = " ".join(capsys.readouterr().err.split())
    assert rc == 1
    assert "resize2fs failed: simulated; the target was marked unbootable" in err
    raw = backing.read_bytes()
    # the table sfdisk already moved has no valid header left: neither the primary nor the one at the card's end
    assert raw[512:520] != b"EFI PART" and raw[card - 512:card - 504] != b"EFI PART"
