"""The arm64 image, end to end, in one boot: built through qemu-user-static, provisioned and flashed like the
x86 one, booted in qemu-system-aarch64 (machine virt, TCG), where it runs the round that matters.

An emulated aarch64 CPU is several times slower than the x86 guest, so everything shares one boot of one
board, in order: the image is aarch64 through and through (no boot); `flctl provision` + `flctl flash` take it;
the flashed disk boots with no failed units and a read-only root; fl-agent is READY and the host scrapes its
metrics through the hostfwd; a round with the host aggregator is accepted; and the appliance's trainer gives
the same losses in the guest as on the host for the same package, data and seed (the ONNX training graphs and
the numpy optimiser are architecture-independent).

``FL_QEMU_ROUND_ARCHES=amd64,arm64`` runs the same module for both architectures in one session: the timings
it prints (build, boot to shell, fl-agent READY, one round) are the side-by-side table in docs/qemu.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

# The image build (emulated dpkg and pip when the cache is cold) is part of the first test's setup.
pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
ARCHES = os.environ.get("FL_QEMU_ROUND_ARCHES", "arm64").split(",")
BOARD = "edge-arm"
AGENT = "fl-agent.service"
SITE = "/opt/fl-agent/lib/python3.11/site-packages"
# Quick rounds on an emulated CPU, as the flash boot test sets them.
BOARD_SETTINGS = """poll_wait_seconds = 5.0
[data]
source = "synthetic"
samples_per_round = 64
[training]
max_threads = 1
"""
EPOCHS = 2
# Same graph, same data, same seed: only the kernels' summation order differs between NEON and AVX.
LOSS_RTOL = 1e-4
TIMINGS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", params=ARCHES)
def image(request, image_for):
    started = time.monotonic()
    art = image_for(request.param)
    took = time.monotonic() - started
    built = art.manifest.get("build_seconds")
    TIMINGS[art.arch.name] = {"image_ready_s": took, **({"build_s": built} if built is not None else {})}
    return art


@pytest.fixture(scope="module")
def host_aggregator(image, start_aggregator):
    """A running aggregator with one-device rounds, one for each architecture's board."""
    return start_aggregator()


@pytest.fixture(scope="module")
def flashed(image, host_aggregator, tmp_path_factory):
    """The image flashed to a disk file with board BOARD's identity, by `flctl provision` and `flctl flash`;
    the aggregator enrolled the board from the fleet's enrolment file."""
    from flash_images import PASSPHRASE, cli

    if host_aggregator.process is None:
        pytest.skip(host_aggregator.skip_reason)
    work = tmp_path_factory.mktemp(f"flash-{image.arch.name}")
    fleet = work / "fleet"
    mp = pytest.MonkeyPatch()
    mp.setenv("FLCTL_PASSPHRASE", PASSPHRASE)
    mp.setenv("FLCTL_KDF_LEVEL", "interactive")
    try:
        assert cli(["provision", "--fleet", str(fleet), "--names", BOARD, "--aggregator-url",
                    "http://10.0.2.100:8080", "--aggregator-state", str(host_aggregator.state)]) == 0  # fmt: skip
        toml = fleet / "boards" / BOARD / "agent.toml"
        toml.write_text(toml.read_text() + BOARD_SETTINGS)
        disk = work / f"{BOARD}.img"
        assert cli(["flash", str(image.disk), str(disk), "--board", BOARD, "--fleet", str(fleet), "--yes"]) == 0
        from flctl.provision import open_fleet

        key = open_fleet(fleet, None).device_key(BOARD)
    finally:
        mp.undo()
    subprocess.run(
        [str(Path(sys.executable).with_name("fl-aggregator")), "enroll", "--state", str(host_aggregator.state),
         "--from", str(fleet / "enroll.jsonl")],
        check=True, capture_output=True,
    )  # fmt: skip
    return disk, fleet, key


def train_like_a_device(python: str, files: str, pub_hex: str, runner) -> dict:  # type: ignore[no-untyped-def]
    """tests/device_training.py (copied into ``files`` with the package and the data): the appliance's Trainer
    over the data for EPOCHS epochs, seeds 0..EPOCHS-1; ``runner`` runs the command where it should run."""
    return runner([python, f"{files}/device_training.py", f"{files}/model.flpkg", pub_hex, f"{files}/data.npz",
                   str(EPOCHS)])  # fmt: skip


@pytest.fixture(scope="module")
def training_check(image, host_aggregator, tmp_path_factory):
    """A small read-only volume (LABEL=fl-check) with the round's model package, fixed data and the training
    script, and the losses the host computes from the same files."""
    from appliance.synthetic import evaluation_set
    from flctl.image.disk import MIB, make_ext4

    work = tmp_path_factory.mktemp(f"training-{image.arch.name}")
    files = work / "files"
    files.mkdir()
    shutil.copyfile(host_aggregator.package, files / "model.flpkg")
    shutil.copyfile(ROOT / "tests" / "device_training.py", files / "device_training.py")
    x, y = evaluation_set(64, sample_seed=2024)
    np.savez(files / "data.npz", x=x, y=y)
    volume = work / "check.ext4"
    make_ext4(volume, 16 * MIB, "fl-check", source=files, journal=False)

    def on_host(cmd: list[str]) -> dict:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    host = train_like_a_device(sys.executable, str(files), host_aggregator.public_key_hex, on_host)
    return volume, host


@pytest.fixture(scope="module")
def guest(image, boot_image, flashed, training_check, host_aggregator, tmp_path_factory):
    """The flashed board booted (its disk the guest's first drive, the check volume its second)."""
    from flctl.ports import free_port
    from flctl.qemu import rig as qemu_rig

    disk, _fleet, key = flashed
    volume, _host = training_check
    work = tmp_path_factory.mktemp(f"rig-{image.arch.name}")
    appliance = qemu_rig.Appliance(BOARD, work, qemu_rig.Identity(key), metrics_port=free_port(),
                                   aggregator_port=host_aggregator.port)  # fmt: skip
    drives = ["-drive", f"file={disk},format=raw,if=virtio,discard=unmap",
              "-drive", f"file={volume},format=raw,if=virtio,readonly=on"]  # fmt: skip
    mp = pytest.MonkeyPatch()
    mp.setattr(qemu_rig, "drive_args", lambda art, a: drives)
    try:
        booted = boot_image(image, appliance, work)
    finally:
        mp.undo()
    TIMINGS[image.arch.name]["shell_s"] = booted.boot_seconds
    yield booted
    if booted.qemu.status:
        booted.qemu.off()
    print(f"\n[qemu] timings {image.arch.name}: " + json.dumps({k: round(v, 1) for k, v in
                                                            TIMINGS[image.arch.name].items()}))  # fmt: skip


def dump(volume, path: str, dest: Path) -> Path:  # type: ignore[no-untyped-def]
    data = volume.read(path)
    assert data is not None, f"{path} is not in the image's root"
    dest.write_bytes(data)
    return dest


def listing(volume, directory: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Names in ``directory`` (debugfs ``ls -p``: /inode/mode/uid/gid/name/size/ per entry)."""
    out = volume.debugfs([f"ls -p {directory}"])
    return [f[5] for f in (line.split("/") for line in out.splitlines()) if len(f) >= 7 and f[5] not in (".", "..")]


def test_image_is_of_its_architecture_through_and_through(image, tmp_path):
    """`file` on the image's binaries names its architecture, the Python wheels are built for it, and the
    root partition has the architecture's GPT type."""
    from flctl.flash import gpt
    from flctl.flash.ext4image import Ext4Volume

    if shutil.which("file") is None:
        pytest.skip("file is not installed")
    arch = image.arch
    elf = {"x86_64": "x86-64", "aarch64": "ARM aarch64"}[arch.machine]
    with open(image.disk, "rb") as f:
        root = gpt.read_table(gpt.file_reader(f), image.disk.stat().st_size).by_name("fl-root")
    assert root is not None and root.type_guid.upper() == arch.gpt_root_type
    volume = Ext4Volume(image.disk, root.offset, root.size)
    capi = f"{SITE}/onnxruntime/capi"
    binaries = {
        "python": "/usr/bin/python3.11",
        "onnxruntime": f"{capi}/" + next(n for n in listing(volume, capi) if n.startswith("onnxruntime_pybind11")),
    }
    for what, path in binaries.items():
        described = subprocess.run(["file", "-b", str(dump(volume, path, tmp_path / what))], capture_output=True,
                                   text=True, check=True).stdout  # fmt: skip
        assert "ELF 64-bit" in described and elf in described, f"{what} ({path}): {described}"
    wheels = {}
    for dist in (n for n in listing(volume, SITE) if n.endswith(".dist-info")):
        text = (volume.read(f"{SITE}/{dist}/WHEEL") or b"").decode()
        wheels[dist] = re.findall(r"^Tag: (\S+)$", text, re.MULTILINE)
    compiled = {d: tags for d, tags in wheels.items() if not any(t.endswith("-any") for t in tags)}
    assert any(d.startswith("onnxruntime-") for d in compiled) and any(d.startswith("numpy-") for d in compiled)
    wrong = {d: tags for d, tags in compiled.items() if not all(t.endswith(f"_{arch.machine}") for t in tags)}
    assert not wrong, f"wheels not built for {arch.machine}: {wrong}"


def test_flash_and_provision_take_the_image(flashed, image):
    """The flashed disk keeps the image's root partition and has the board's identity on its data partition."""
    from flash_images import data_volume

    disk, fleet, _key = flashed
    volume = data_volume(disk)
    pinned = volume.read("fl-agent/identity/aggregator.pub")
    assert pinned is not None and pinned.decode().strip() == (fleet / "aggregator.pub").read_text().strip()
    owner = volume.stat("fl-agent/identity/device.key")
    assert owner is not None and owner[1] == image.manifest["fl_agent_uid"]


def test_boots_its_architecture_with_no_failed_units_and_a_read_only_root(guest, image):
    assert guest.check("uname -m").strip() == image.arch.machine
    _, state = guest.run("systemctl is-system-running --wait", timeout=600)
    failed = guest.check("systemctl --failed --no-legend --plain", timeout=120)
    assert state.strip() == "running", f"system state {state.strip()!r}; failed units:\n{failed}"
    assert failed.strip() == ""
    code, out = guest.run("touch /fl-probe")
    assert code != 0 and "Read-only file system" in out
    assert "ro" in guest.check("findmnt -no OPTIONS /").split(",")
    data = guest.check("findmnt -no SOURCE,FSTYPE,OPTIONS /data").split()
    assert data[0] == "/dev/vda2" and data[1] == "ext4" and "rw" in data[2].split(",")
    print("\n[qemu] " + guest.check("systemd-analyze time --no-pager", timeout=120).strip())


def test_agent_ready_and_metrics_scraped_through_the_hostfwd(guest, image):
    guest.wait_for(f"systemctl is-active --quiet {AGENT}", timeout=600, interval=3)
    props = dict(
        line.split("=", 1)
        for line in guest.check(f"systemctl show {AGENT} -p NRestarts -p ActiveEnterTimestampMonotonic").splitlines()
    )
    assert props["NRestarts"] == "0"
    TIMINGS[image.arch.name]["ready_s"] = int(props["ActiveEnterTimestampMonotonic"]) / 1e6
    print(f"\n[qemu] {image.arch.name}: fl-agent READY {TIMINGS[image.arch.name]['ready_s']:.1f} s after kernel start")
    port = guest.appliance.metrics_port
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                text = r.read().decode()
            break
        except OSError:
            assert time.monotonic() < deadline, "the agent's metrics were not reachable through the hostfwd"
            guest.run("true")
            time.sleep(2)
    assert re.search(r"^fl_agent_budget_advisory 0\.0$", text, re.MULTILINE), "the agent sees its systemd budget"


def test_round_with_the_host_aggregator_is_accepted(guest, image, host_aggregator):
    device = guest.appliance.identity.device_id
    started = time.monotonic()
    deadline = started + 1500
    while True:
        rounds = {r["round"]: r for r in host_aggregator.status()["rounds"]}
        if device in (rounds.get(1, {}).get("devices") or []):
            break
        if time.monotonic() > deadline:
            _, journal = guest.run(f"journalctl -b -u {AGENT} --no-pager -n 60", timeout=120)
            pytest.fail(f"round 1 not completed by {BOARD}: {rounds}\nfl-agent journal:\n{journal}")
        guest.run("true")  # keep reading the console
        time.sleep(3)
    assert rounds[1]["participants"] == 1
    TIMINGS[image.arch.name]["round_s"] = time.monotonic() - started
    print(f"\n[qemu] {image.arch.name}: round 1 accepted {TIMINGS[image.arch.name]['round_s']:.1f} s after READY")


def test_training_in_the_guest_gives_the_hosts_losses(guest, training_check, host_aggregator):
    """Same package, data and seeds: the guest's Trainer (its architecture's onnxruntime and numpy) matches the
    host's losses within float tolerance."""
    _volume, host = training_check
    guest.check(f"systemctl stop {AGENT}", timeout=300)  # its later rounds would share the one emulated CPU
    guest.check("mkdir -p /run/check && mount -o ro LABEL=fl-check /run/check")

    def in_guest(cmd: list[str]) -> dict:
        out = guest.check(" ".join(cmd) + " 2>/dev/null", timeout=900)
        return json.loads(out.strip().splitlines()[-1])

    started = time.monotonic()
    result = train_like_a_device("/opt/fl-agent/bin/python", "/run/check", host_aggregator.public_key_hex, in_guest)
    print(f"\n[qemu] training {EPOCHS} epochs of 64 samples in the guest: {time.monotonic() - started:.1f} s; "
          f"losses guest {result['losses']} host {host['losses']}")  # fmt: skip
    assert not result["torch_imported"]
    np.testing.assert_allclose(result["losses"], host["losses"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(result["evaluation"]["loss"], host["evaluation"]["loss"], rtol=LOSS_RTOL)


def test_the_power_button_powers_the_guest_off(guest):
    """QMP system_powerdown presses the machine's power button (the ACPI button on q35, a gpio-keys key on
    virt): systemd-logind shuts the system down, as `flctl qemu run` relies on for Ctrl-C and SIGTERM."""
    guest.qemu.monitor_command("system_powerdown")
    deadline = time.monotonic() + 300
    while True:
        try:
            guest.shell.console.expect("reboot: Power down", timeout=5)
            break
        except Exception:
            if guest.qemu.monitor_command("query-status").get("status") == "shutdown":
                break
            assert time.monotonic() < deadline, "the guest did not power off within 300 s of the power button"
    guest.qemu.off()
