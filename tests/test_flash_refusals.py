"""Every refusal of `flctl flash`, with the message the user sees, and what is left on the target."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest
from flash_images import cli, have_tools, make_image

from flctl.flash import blockdev, gpt
from flctl.flash import write as flash
from flctl.flash.imagesource import parse_bmap

pytestmark = [pytest.mark.skipif(have_tools() is not None, reason=have_tools() or ""),
              pytest.mark.usefixtures("flctl_env")]


@pytest.fixture
def no_writes(monkeypatch):
    """Any refusal test that reaches the writing stage fails instead of writing."""
    def boom(*_a, **_k):
        raise AssertionError("flctl flash went on to write the target instead of refusing")
    monkeypatch.setattr(flash, "_flash_all", boom)


def _flash(image, target, fleet, *extra, board="cam-1"):
    return cli(["flash", str(image), str(target), "--board", board, "--fleet", str(fleet), "--yes", *extra])


def refused(capsys, rc) -> str:
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2, err
    assert "flctl flash: refused:" in err
    return err


def assert_marked_unbootable(target: Path) -> None:
    """Both GPT headers invalidated: no partition is visible, and flctl says why."""
    with open(target, "rb") as f, pytest.raises(gpt.GptError, match="interrupted `flctl flash`"):
        gpt.read_table(gpt.file_reader(f), target.stat().st_size)
    dump = subprocess.run(["sfdisk", "--dump", str(target)], capture_output=True, text=True).stdout
    assert "fl-data" not in dump and "fl-root" not in dump


# -- wrong images ------------------------------------------------------------------------------------------
def test_not_a_disk_image(tmp_path, fleet, capsys, no_writes):
    image = tmp_path / "random.img"
    image.write_bytes(b"\x5a" * (1 << 20))
    err = refused(capsys, _flash(image, tmp_path / "t.img", fleet))
    assert "is not an fl-edge disk image: no GPT partition table" in err


def test_gpt_without_root_partition(tmp_path, fleet, capsys, no_writes):
    image = make_image(tmp_path / "other.img", partitions=("boot", "fl-data"))
    err = refused(capsys, _flash(image, tmp_path / "t.img", fleet))
    assert "is not an fl-edge disk image: no partition labelled 'fl-root' (partitions: 'boot', 'fl-data')" in err


def test_missing_data_partition(tmp_path, fleet, capsys, no_writes):
    image = make_image(tmp_path / "nodata.img", partitions=("fl-root",))
    err = refused(capsys, _flash(image, tmp_path / "t.img", fleet))
    assert "has no data partition labelled 'fl-data'" in err
    assert "the board's identity has nowhere to go" in err


def test_missing_image(tmp_path, fleet, capsys, no_writes):
    err = refused(capsys, _flash(tmp_path / "nope.img", tmp_path / "t.img", fleet))
    assert "image" in err and "nope.img not found" in err


# -- truncated images --------------------------------------------------------------------------------------
def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def test_truncated_image_with_bmap(tmp_path, fleet, capsys, no_writes):
    image = make_image(tmp_path / "fl.img")
    _truncate(image, 20 << 20)
    err = refused(capsys, _flash(image, tmp_path / "t.img", fleet))
    assert "fl.img is 20971520 bytes but its bmap fl.img.bmap says 50331648: the image is truncated" in err


def test_truncated_image_without_bmap(tmp_path, fleet, capsys, no_writes):
    image = make_image(tmp_path / "fl.img", bmap=False)
    _truncate(image, 20 << 20)
    err = refused(capsys, _flash(image, tmp_path / "t.img", fleet))
    assert "fl.img is truncated: 20971520 bytes, but its partition table needs 50331648" in err


@pytest.mark.parametrize("compress", ["gz", "xz", "zst"])
def test_truncated_compressed_image_fails_and_marks_target(tmp_path, fleet, capsys, compress):
    """A compressed stream's end is only known when it is reached: the copy fails and the target is marked."""
    image = make_image(tmp_path / "fl.img", bmap=False, compress=compress)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) * 2 // 3])
    target = tmp_path / "t.img"
    assert _flash(image, target, fleet) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "FAILED" in err and f"fl.img.{compress} is truncated or damaged" in err
    # where the stream broke decides whether a partition table had been written (and was then invalidated)
    if target.stat().st_size > 1 << 20:
        assert "the target was marked unbootable (partition table invalidated): flash it again" in err
        assert_marked_unbootable(target)
    else:
        assert "nothing usable was written: flash it again" in err
        assert "fl-data" not in subprocess.run(["sfdisk", "--dump", str(target)], capture_output=True,
                                               text=True).stdout


def test_truncated_compressed_image_with_bmap_fails_and_marks_target(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img", compress="zst")
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 3])
    target = tmp_path / "t.img"
    assert _flash(image, target, fleet) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "fl.img.zst is truncated or does not match its block map fl.img.bmap" in err
    assert_marked_unbootable(target)


# -- bmap checksum -----------------------------------------------------------------------------------------
def test_checksum_mismatch_in_bmap(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img")
    bmap = parse_bmap(Path(f"{image}.bmap"))
    biggest = max(bmap.ranges, key=lambda r: r.last - r.first)
    with open(image, "r+b") as f:  # one flipped byte in the middle of the largest mapped range
        offset = (biggest.first + biggest.last) // 2 * bmap.block_size + 123
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    target = tmp_path / "t.img"
    assert _flash(image, target, fleet) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "FAILED" in err
    assert "fl.img does not match its block map fl.img.bmap (checksum mismatch for blocks range" in err
    assert "the image is corrupt or the bmap belongs to another image" in err
    assert_marked_unbootable(target)


def test_failure_while_writing_identity_leaves_target_unbootable(tmp_path, fleet, capsys):
    """An image without the fl-agent user: the copy succeeded, the identity cannot be owned: marked bad."""
    image = make_image(tmp_path / "fl.img", passwd=False)
    target = tmp_path / "t.img"
    assert _flash(image, target, fleet) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "the image's /etc/passwd has no fl-agent user" in err
    assert_marked_unbootable(target)


# -- targets -----------------------------------------------------------------------------------------------
def test_root_disk_is_refused_even_with_force(fleet, tmp_path, capsys, no_writes):
    disks = blockdev.root_disks()
    if not disks:
        pytest.skip("/ is not on a block device here (container overlay root), so there is no root disk")
    image = make_image(tmp_path / "fl.img")
    disk = Path("/dev") / sorted(disks)[0]
    if not disk.exists():
        pytest.skip(f"{disk} has no device node here")
    err = refused(capsys, _flash(image, disk, fleet, "--force"))
    assert f"{disk} is the disk holding / (the running system); refusing to write it" in err


def test_not_removable_needs_force():
    fixed = blockdev.Target(Path("/dev/sdz"), True, 500 << 30, "sdz", "ACME SSD", removable=False)
    with pytest.raises(blockdev.UnsafeTarget, match=r"/dev/sdz \(ACME SSD, 500.0 GiB\) is not a removable disk; "
                                                    r"pass --force if you really mean to overwrite it"):
        blockdev.check_safe(fixed)
    blockdev.check_safe(fixed, force=True)
    # SD cards behind MMC hosts and USB readers often report removable=0: they count as removable
    blockdev.check_safe(blockdev.Target(Path("/dev/mmcblk9"), True, 32 << 30, "mmcblk9", "SD", False, "mmc"))


def test_target_is_the_image_itself(tmp_path, fleet, capsys, no_writes):
    image = make_image(tmp_path / "fl.img")
    err = refused(capsys, _flash(image, image, fleet))
    assert "is the image itself" in err


def test_target_directory_missing(tmp_path, fleet, capsys, no_writes):
    image = make_image(tmp_path / "fl.img")
    err = refused(capsys, _flash(image, tmp_path / "nodir" / "t.img", fleet))
    assert "directory" in err and "nodir does not exist" in err


def test_block_device_that_is_not_there(tmp_path, fleet, capsys, no_writes):
    image = make_image(tmp_path / "fl.img")
    err = refused(capsys, _flash(image, "/dev/sdzz", fleet))
    assert "/dev/sdzz does not exist (is the card or board plugged in?)" in err


# -- arguments, fleet, confirmation ------------------------------------------------------------------------
def test_unconfirmed_without_terminal(tmp_path, fleet, capsys, no_writes):
    image = make_image(tmp_path / "fl.img")
    target = tmp_path / "t.img"
    rc = cli(["flash", str(image), str(target), "--board", "cam-1", "--fleet", str(fleet)])
    err = refused(capsys, rc)
    assert f"new image file {target}" in err  # what would have been overwritten is shown
    assert "not confirmed" in err and "pass --yes" in err
    assert not target.exists()


def test_unknown_board(tmp_path, fleet, capsys, no_writes):
    image = make_image(tmp_path / "fl.img")
    err = refused(capsys, _flash(image, tmp_path / "t.img", fleet, board="cam-99"))
    assert "board 'cam-99' is not in fleet" in err and "cam-1, cam-2, cam-3" in err


def test_wrong_passphrase_refuses_before_writing(tmp_path, fleet, capsys, monkeypatch, no_writes):
    image = make_image(tmp_path / "fl.img")
    monkeypatch.setenv("FLCTL_PASSPHRASE", "wrong")
    err = refused(capsys, _flash(image, tmp_path / "t.img", fleet))
    assert "wrong passphrase" in err
    assert not (tmp_path / "t.img").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["T1", "T2", "--board", "cam-1"], "2 targets given: use --many"),
    (["T1", "T2", "--many", "--boards", "cam-1"], "--boards names 1 board(s) for 2 target(s)"),
    (["T1", "T2", "--many", "--boards", "cam-1,cam-1"], "--boards lists a board twice"),
    (["T1", "--many"], "--many needs --boards"),
    (["T1"], "--board NAME is required"),
    (["T1", "--board", "cam-1", "--owner", "fl-agent"], "--owner 'fl-agent': expected UID:GID"),
])
def test_argument_errors(tmp_path, fleet, capsys, no_writes, argv, message):
    image = make_image(tmp_path / "fl.img", bmap=False)
    argv = [str(tmp_path / a) if a.startswith("T") and len(a) == 2 else a for a in argv]
    err = refused(capsys, cli(["flash", str(image), *argv, "--fleet", str(fleet), "--yes"]))
    assert message in err


def test_gzip_stream_error_message_is_not_a_traceback(tmp_path, fleet, capsys):
    image = tmp_path / "bad.img.gz"
    image.write_bytes(gzip.compress(b"\0" * 4096)[:-12] + b"garbage!")
    err = refused(capsys, _flash(image, tmp_path / "t.img", fleet))
    assert "is not an fl-edge disk image" in err or "cannot read" in err
    assert "Traceback" not in err
