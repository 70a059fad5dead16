"""`flctl flash` onto image files: bmap and full copies, compressed inputs, identity on the data partition."""

from __future__ import annotations

import subprocess

import pytest
from flash_images import (
    AGENT_GID,
    AGENT_UID,
    assert_provisioned,
    board_record,
    cli,
    data_volume,
    have_tools,
    make_image,
)

pytestmark = [pytest.mark.skipif(have_tools() is not None, reason=have_tools() or ""),
              pytest.mark.usefixtures("flctl_env")]


def _flash(image, target, fleet, board, *extra):
    return cli(["flash", str(image), str(target), "--board", board, "--fleet", str(fleet), "--yes", *extra])


def test_bmap_flash_writes_image_and_identity(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img")
    target = tmp_path / "board.img"
    assert _flash(image, target, fleet, "cam-1") == 0
    err = capsys.readouterr().err
    assert "provisioned as board cam-1" in err and "by bmap" in err
    assert_provisioned(target, image, fleet, "cam-1")


def test_full_copy_without_bmap(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img", bmap=False)
    target = tmp_path / "board.img"
    assert _flash(image, target, fleet, "cam-2") == 0
    assert "by full copy" in capsys.readouterr().err
    assert_provisioned(target, image, fleet, "cam-2")


@pytest.mark.parametrize("compress", ["gz", "xz", "zst"])
@pytest.mark.parametrize("bmap", [True, False], ids=["bmap", "nobmap"])
def test_compressed_images(tmp_path, fleet, compress, bmap):
    raw = tmp_path / "ref.img"
    image = make_image(tmp_path / "fl.img", compress=compress, bmap=bmap)
    subprocess.run({"gz": ["gzip", "-dc"], "xz": ["xz", "-dc"], "zst": ["zstd", "-dcq"]}[compress] + [str(image)],
                   stdout=raw.open("wb"), check=True)
    target = tmp_path / "board.img"
    assert _flash(image, target, fleet, "cam-3") == 0
    assert_provisioned(target, raw, fleet, "cam-3")


@pytest.mark.parametrize("data", ["ext4", "junk"])
def test_data_partition_formatted_or_reused(tmp_path, fleet, data):
    image = make_image(tmp_path / "fl.img", data=data)
    target = tmp_path / "board.img"
    assert _flash(image, target, fleet, "cam-1") == 0
    assert_provisioned(target, image, fleet, "cam-1")


def test_reflash_replaces_identity(tmp_path, fleet):
    image = make_image(tmp_path / "fl.img")
    target = tmp_path / "board.img"
    assert _flash(image, target, fleet, "cam-1") == 0
    assert _flash(image, target, fleet, "cam-2") == 0
    assert_provisioned(target, image, fleet, "cam-2")


def test_owner_override_when_image_lacks_the_user(tmp_path, fleet):
    image = make_image(tmp_path / "fl.img", passwd=False)
    target = tmp_path / "board.img"
    assert _flash(image, target, fleet, "cam-1", "--owner", f"{AGENT_UID}:{AGENT_GID}") == 0
    assert_provisioned(target, image, fleet, "cam-1")


def test_many_targets_in_parallel_each_with_its_identity(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img")
    targets = [tmp_path / f"t{i}.img" for i in range(3)]
    rc = cli(["flash", "--many", str(image), *map(str, targets), "--boards", "cam-1,cam-2,cam-3",
              "--fleet", str(fleet), "--yes"])
    assert rc == 0
    err = capsys.readouterr().err
    for t, board in zip(targets, ["cam-1", "cam-2", "cam-3"], strict=True):
        assert_provisioned(t, image, fleet, board)
        assert board_record(fleet, board)["device_id"] in err
    assert err.count("│ ok ") == 3


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs: writing an image there fails with 'No space left', like a failing card."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_many_reports_the_failed_target_and_exits_nonzero(tmp_path, fleet, capsys, full_disk):
    image = make_image(tmp_path / "fl.img")
    good = tmp_path / "good.img"
    bad = full_disk / "bad.img"
    rc = cli(["flash", "--many", str(image), str(good), str(bad), "--boards", "cam-1,cam-2",
              "--fleet", str(fleet), "--yes"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("FAILED") == 1 and "No space left on device" in err
    assert err.count("│ ok ") == 1
    assert_provisioned(good, image, fleet, "cam-1")


def test_board_config_edited_in_the_fleet_is_flashed(tmp_path, fleet):
    image = make_image(tmp_path / "fl.img")
    toml = fleet / "boards" / "cam-2" / "agent.toml"
    original = toml.read_text()
    try:
        toml.write_text(original + "[data]\nsamples_per_round = 64\n")
        target = tmp_path / "board.img"
        assert _flash(image, target, fleet, "cam-2") == 0
        assert data_volume(target).read("fl-agent/agent.toml") == toml.read_bytes()
    finally:
        toml.write_text(original)


def test_board_config_the_agent_would_reject_is_refused(tmp_path, fleet, capsys):
    image = make_image(tmp_path / "fl.img")
    toml = fleet / "boards" / "cam-2" / "agent.toml"
    original = toml.read_text()
    try:
        toml.write_text(original + "[data]\nsamples_per_rund = 64\n")
        target = tmp_path / "board.img"
        assert _flash(image, target, fleet, "cam-2") == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "board cam-2's agent.toml would stop the agent" in err and "samples_per_rund" in err
        assert not target.exists()
    finally:
        toml.write_text(original)
