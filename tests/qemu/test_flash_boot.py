"""End to end: `flctl provision` + `flctl flash` of the development image, then the flashed disk boots in QEMU.

The guest gets the flashed disk as its only drive (root=LABEL=fl-root and /data by label from the partitions
`flctl flash` wrote), comes up with the provisioned identity, and its first update is accepted by an aggregator
that imported the fleet's enrolment file with `fl-aggregator enroll --from`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

# Generous: pytest collects tests/qemu/ first and this module first in it, so its first test's setup includes
# the session's image build; a busy 2-core machine can triple TCG times.
pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(2400)]

BOARD = "edge-q1"
CARD_EXTRA = 256 << 20
PASSPHRASE = "flash boot test passphrase"
# Quick rounds on an emulated CPU: per-board settings edited in the fleet before flashing.
BOARD_SETTINGS = """poll_wait_seconds = 5.0
[data]
source = "synthetic"
samples_per_round = 64
[training]
max_threads = 1
"""


def _flctl(*argv: str) -> tuple[int, str]:
    """flctl flash/provision through the subcommands' own parsers, capturing what the user would see."""
    import argparse
    import contextlib
    import io

    from flctl import provision
    from flctl.flash import write as flash

    parser = argparse.ArgumentParser(prog="flctl")
    sub = parser.add_subparsers(dest="command", required=True)
    flash.add_parser(sub)
    provision.add_parser(sub)
    args = parser.parse_args(list(argv))
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = args.func(args)
    return rc, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def flashed(dev_image, host_aggregator, tmp_path_factory):
    """The dev image flashed to a disk file with board BOARD's identity; the aggregator has enrolled it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FLCTL_PASSPHRASE", PASSPHRASE)
    mp.setenv("FLCTL_KDF_LEVEL", "interactive")
    work = tmp_path_factory.mktemp("flash-boot")
    fleet = work / "fleet"
    try:
        rc, out = _flctl(
            "provision",
            "--fleet",
            str(fleet),
            "--names",
            BOARD,
            "--aggregator-url",
            "http://10.0.2.100:8080",
            "--aggregator-state",
            str(host_aggregator.state),
        )
        assert rc == 0, out
        # the fleet adopted the running aggregator's key: boards pin the key that signs the tasks
        assert (fleet / "aggregator.pub").read_text().strip() == host_aggregator.public_key_hex
        toml = fleet / "boards" / BOARD / "agent.toml"
        toml.write_text(toml.read_text() + BOARD_SETTINGS)
        enrolled = subprocess.run(
            [
                str(Path(sys.executable).with_name("fl-aggregator")),
                "enroll",
                "--state",
                str(host_aggregator.state),
                "--from",
                str(fleet / "enroll.jsonl"),
            ],
            capture_output=True,
            text=True,
        )
        assert enrolled.returncode == 0, enrolled.stderr
        # the "card": a loop device 256 MiB larger than the image, so fl-data is grown as on a real card;
        # QEMU then boots its backing file
        disk = work / f"{BOARD}.img"
        with open(disk, "wb") as f:
            f.truncate(dev_image.disk.stat().st_size + CARD_EXTRA)
        loop = subprocess.run(["losetup", "-f", "--show", str(disk)], capture_output=True, text=True)
        started = time.monotonic()
        if loop.returncode != 0:  # no loop devices here: an image file, which is never grown
            print(f"\n[flash] no loop device ({loop.stderr.strip()}): flashing an image file")
            disk.unlink()
            rc, out = _flctl("flash", str(dev_image.disk), str(disk), "--board", BOARD, "--fleet", str(fleet),
                             "--yes")
        else:
            try:
                rc, out = _flctl("flash", str(dev_image.disk), loop.stdout.strip(), "--board", BOARD, "--fleet",
                                 str(fleet), "--yes")
            finally:
                subprocess.run(["losetup", "-d", loop.stdout.strip()], check=False)
            assert "(grown to fill the device)" in out, out
        assert rc == 0, out
        print(f"\n[flash] {dev_image.disk.name} -> {disk.name} in {time.monotonic() - started:.1f} s")
        from flctl.provision import open_fleet

        key = open_fleet(fleet, None).device_key(BOARD)
        yield disk, fleet, key
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def flashed_boot(boot_appliance, host_aggregator, flashed, tmp_path_factory):
    from flctl.ports import free_port
    from flctl.qemu import rig as qemu_rig
    from flctl.qemu.rig import Appliance, Identity

    disk, _fleet, key = flashed
    work = tmp_path_factory.mktemp("flash-boot-rig")
    appliance = Appliance(BOARD, work, Identity(key), metrics_port=free_port(), aggregator_port=host_aggregator.port)
    mp = pytest.MonkeyPatch()
    # the flashed disk is the guest's only drive: its own fl-root and fl-data partitions, found by label
    mp.setattr(qemu_rig, "drive_args", lambda art, a: ["-drive", f"file={disk},format=raw,if=virtio,discard=unmap"])
    try:
        booted = boot_appliance(appliance, work)
    finally:
        mp.undo()
    yield booted, appliance
    if booted.qemu.status:
        booted.qemu.off()


def test_flashed_board_boots_with_its_provisioned_identity(flashed_boot, flashed):
    guest, _appliance = flashed_boot
    _disk, fleet, _key = flashed
    assert guest.check("findmnt -n -o SOURCE /").strip() == "/dev/vda1"
    assert guest.check("findmnt -n -o SOURCE /data").strip() == "/dev/vda2"
    assert (
        guest.check("cat /var/lib/fl-agent/identity/aggregator.pub").strip()
        == (fleet / "aggregator.pub").read_text().strip()
    )
    assert guest.check("stat -c '%U %a' /var/lib/fl-agent/identity/device.key").strip() == "fl-agent 600"
    assert "samples_per_round = 64" in guest.check("cat /var/lib/fl-agent/agent.toml")


def test_flashed_board_uses_the_whole_card(flashed_boot, flashed, dev_image):
    """fl-data was grown at flash time: the kernel finds the backup GPT at the disk's end, the data partition
    and its file system span the extra space, and the boot-time fsck passed."""
    guest, _appliance = flashed_boot
    from flctl.flash import gpt

    if flashed[0].stat().st_size <= dev_image.disk.stat().st_size:
        pytest.skip("no loop device on this host: the board was flashed as an image file, which is not grown")

    with open(dev_image.disk, "rb") as f:
        shipped = gpt.read_table(gpt.file_reader(f), dev_image.disk.stat().st_size).by_name("fl-data")
    assert "Alternate GPT" not in guest.check("dmesg")
    partition = int(guest.check("blockdev --getsize64 /dev/vda2").strip())
    filesystem = int(guest.check("df -B1 --output=size /data | tail -1").strip())
    assert partition > shipped.size + CARD_EXTRA - (2 << 20), (partition, shipped.size)
    assert filesystem > shipped.size + CARD_EXTRA // 2, (filesystem, shipped.size)
    # ActiveState too: `systemctl show` of a unit that does not exist also says Result=success
    unit = r"'systemd-fsck@dev-disk-by\x2dlabel-fl\x2ddata.service'"
    fsck = guest.check(f"systemctl show -p Result -p ActiveState {unit}")
    assert sorted(fsck.split()) == ["ActiveState=active", "Result=success"], fsck


@pytest.mark.timeout(1200)
def test_flashed_boards_first_update_is_accepted(flashed_boot, host_aggregator):
    guest, appliance = flashed_boot
    if host_aggregator.process is None:
        pytest.skip(host_aggregator.skip_reason)
    deadline = time.monotonic() + 900
    shown = time.monotonic()
    while True:
        if time.monotonic() - shown > 120:  # progress in the log of a slow (emulated) run
            shown = time.monotonic()
            print("\n[qemu] " + guest.run("journalctl -b -u fl-agent --no-pager -n 5 -o cat", timeout=120)[1])
        rounds = {r["round"]: r for r in host_aggregator.status()["rounds"]}
        if appliance.identity.device_id in (rounds.get(1, {}).get("devices") or []):
            break
        if time.monotonic() > deadline:
            _code, journal = guest.run("journalctl -b -u fl-agent --no-pager -n 60", timeout=120)
            pytest.fail(f"round 1 not completed by the flashed board: {rounds}\nfl-agent journal:\n{journal}")
        guest.run("true")  # keep reading the console
        time.sleep(3)
    assert rounds[1]["participants"] == 1
