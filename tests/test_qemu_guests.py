"""How `flctl qemu run` stops its guests, without booting the image: a QEMU with no guest OS ignores the
power button (as a guest still in its boot loader would), so the rig must stop it after the timeout; a
guest that already exited is left alone. The clean power-off itself is tests/qemu/test_qemu_run.py.
The rig keeps each appliance's key in its work dir, so a second run enrols no new device."""

from __future__ import annotations

import shutil
import stat
import subprocess
import time

import pytest

from flctl.qemu import guests, rig
from flctl.qemu.qmp import qmp_command

need_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")


def bare_guest(tmp_path, name: str) -> guests.Guest:
    """A QEMU with no kernel and its CPUs stopped (-S): nothing answers the ACPI power button."""
    sock = tmp_path / f"{name}.qmp"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-display", "none", "-S", "-monitor", "none",
         "-qmp", f"unix:{sock},server=on,wait=off", "-nodefaults"],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    appliance = rig.Appliance(name, tmp_path, rig.Identity.generate(), metrics_port=1, aggregator_port=None)
    guest = guests.Guest(appliance, proc, sock)
    while not sock.exists():  # QEMU creates the socket before it starts serving
        assert guest.running, f"QEMU exited ({proc.returncode})"
        time.sleep(0.05)
    return guest


@need_qemu
def test_a_guest_that_ignores_the_power_button_is_stopped_and_reported(tmp_path):
    guest = bare_guest(tmp_path, "fl0")
    assert qmp_command(guest.qmp_socket, "query-status")["status"] == "prelaunch"
    said = []
    outcome = guests.stop_guests([guest], timeout=0.5, report=said.append)
    assert outcome == {"fl0": guests.FORCED}
    assert not guest.running
    assert any("powering off fl0" in line for line in said)


@need_qemu
def test_a_guest_that_exited_with_0_counts_as_powered_off(tmp_path):
    guest = bare_guest(tmp_path, "fl1")
    qmp_command(guest.qmp_socket, "quit")
    guest.process.wait(timeout=30)
    assert guests.stop_guests([guest], timeout=0.5, report=lambda _: None) == {"fl1": guests.POWERED_OFF}


@need_qemu
def test_a_qemu_that_failed_is_reported_with_its_exit_code(tmp_path):
    guest = bare_guest(tmp_path, "fl2")
    guest.process.kill()
    guest.process.wait(timeout=30)
    assert guests.stop_guests([guest], timeout=0.5, report=lambda _: None) == {"fl2": "QEMU exited with -9"}


def test_a_work_dir_used_again_keeps_its_device_keys(tmp_path):
    first = rig.Identity.load_or_generate(tmp_path / "fl0-device.key")
    again = rig.Identity.load_or_generate(tmp_path / "fl0-device.key")
    assert again.device_id == first.device_id
    assert stat.S_IMODE((tmp_path / "fl0-device.key").stat().st_mode) == 0o600
    assert rig.Identity.load_or_generate(tmp_path / "fl1-device.key").device_id != first.device_id
