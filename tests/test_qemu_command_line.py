"""The QEMU command lines the rig builds, without booting: `flctl qemu run` (plain QEMU) and `flctl qemu env`
(labgrid's QEMUDriver). The guest's netdev has a name (net0) that added options can refer to, and options
given after `--` reach every guest, last, with {name} replaced by the appliance's name; the packet-capture
test adds `-object filter-dump,id=dump,netdev=net0,file=...` this way."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil

import pytest
import yaml

from flctl.image.build import ImageArtifacts
from flctl.qemu import cli, rig

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")

MIB = 1 << 20
CAPTURE = "filter-dump,id=dump,netdev=net0,file=/tmp/cap-{name}.pcap"


@pytest.fixture
def art(tmp_path):
    manifest = {"partitions": [{"name": "fl-root", "offset": MIB, "size": 64 * MIB},
                               {"name": "fl-data", "offset": 65 * MIB, "size": 16 * MIB}],
                "cmdline": "console=ttyS0", "fl_agent_uid": 990, "fl_agent_gid": 990}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return ImageArtifacts.load(tmp_path)


def appliance(tmp_path, name="fl0"):
    return rig.Appliance(name, tmp_path, rig.Identity.generate(), metrics_port=40111, aggregator_port=40112)


def machine_for(*argv: str) -> rig.MachineConfig:
    parser = argparse.ArgumentParser(prog="flctl")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return cli.machine_from_args(parser.parse_args(["qemu", "run", *argv]), "tcg")


def value_after(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_the_netdev_is_named_and_carries_the_forwards(art, tmp_path):
    cmd = rig.qemu_command(art, appliance(tmp_path), machine_for())
    assert "-nic" not in cmd
    (netdev,) = value_after(cmd, "-netdev")
    opts = netdev.split(",")
    assert opts[:3] == ["user", "id=net0", "restrict=on"]
    assert "guestfwd=tcp:10.0.2.100:8080-cmd:socat - TCP:127.0.0.1:40112" in opts
    assert "hostfwd=tcp:127.0.0.1:40111-:9101" in opts
    assert "virtio-net-pci,netdev=net0" in value_after(cmd, "-device")


def test_options_after_the_double_dash_reach_each_guest_named_for_it(art, tmp_path):
    machine = machine_for("-n", "2", "--", "-object", CAPTURE)
    for name in ("fl0", "fl1"):
        cmd = rig.qemu_command(art, appliance(tmp_path, name), machine)
        at = cmd.index("-object")
        assert cmd[at + 1] == f"filter-dump,id=dump,netdev=net0,file=/tmp/cap-{name}.pcap"
        assert at > cmd.index("-netdev"), "the netdev must exist before an object refers to it"


def test_the_labgrid_environment_has_the_same_named_netdev_and_options(art, tmp_path):
    a = appliance(tmp_path)
    env = rig.labgrid_env(art, [a], machine_for("--", "-object", CAPTURE), tmp_path / "env.yaml")
    driver = yaml.safe_load(env.read_text())["targets"]["fl0"]["drivers"]["QEMUDriver"]
    assert "nic" not in driver, "labgrid's nic is a -nic: an anonymous netdev"
    extra = shlex.split(driver["extra_args"])
    assert value_after(extra, "-netdev")[0].startswith("user,id=net0,restrict=on,")
    assert value_after(extra, "-object") == ["filter-dump,id=dump,netdev=net0,file=/tmp/cap-fl0.pcap"]
    assert "-no-shutdown" in extra, "the boot tests tell a poweroff from a crash by QEMU's paused state"


def test_qemu_run_without_options_parses_and_keeps_the_host_clock(art, tmp_path):
    # --rtc-base's empty default once went through its date check and made every plain `flctl qemu run` fail.
    machine = machine_for()
    assert machine.rtc_base == "" and machine.qemu_args == ()
    assert "-rtc" not in rig.qemu_command(art, appliance(tmp_path), machine)
