"""Boot the development image in QEMU and check what a user of the appliance would notice.

Boots cost 30-60 s each under TCG, so the checks share boots: the tests of this module run in order on one
appliance (``fl0``) -- first boot: system invariants, the agent under systemd, security exposure, metrics,
camera hotplug, a round with the host aggregator; then a power cut while an update is being delivered and a
second boot that must find the data partition clean and deliver that update exactly once.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

# Generous: the first test may include the image build (when this module runs alone) and the first boot, the
# last one a second boot; a busy 2-core machine can triple TCG times.
pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(2400)]

AGENT = "fl-agent.service"
DATA_FSCK = r"systemd-fsck@dev-disk-by\\x2dlabel-fl\\x2ddata.service"
EXPOSURE_MAX = 2.5


@pytest.fixture(scope="module")
def rig_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rig")


@pytest.fixture(scope="module")
def fl0(dev_image, idle_aggregator, update_gate, rig_dir):
    """Appliance fl0: a device key enrolled with the host aggregator, provisioned onto its data partition."""
    from flctl.ports import free_port
    from flctl.qemu.rig import Appliance, Identity, provision_data_partition

    identity = Identity.generate()
    idle_aggregator.enroll(identity.public_key_hex)
    appliance = Appliance("fl0", rig_dir, identity, metrics_port=free_port(), aggregator_port=update_gate.port)
    provision_data_partition(dev_image, appliance.data_image, identity, idle_aggregator.public_key_hex)
    return appliance


@pytest.fixture(scope="module")
def first_boot(boot_appliance, fl0, rig_dir):
    booted = boot_appliance(fl0, rig_dir)
    yield booted
    if booted.qemu.status:
        booted.qemu.off()


def unit_props(guest, unit: str, *props: str) -> dict[str, str]:
    out = guest.check(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert r.status == 200
        return r.read().decode()


def scrape_quietly(port: int) -> str:
    """`scrape`, with a slow or refused scrape read as no metrics (for polling loops with their own deadline)."""
    try:
        return scrape(port)
    except OSError:
        return ""


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def wait_agent_active(guest, timeout: float = 300) -> dict[str, str]:
    guest.wait_for(f"systemctl is-active --quiet {AGENT}", timeout=timeout, interval=3)
    return unit_props(guest, AGENT, "ActiveState", "SubState", "MainPID", "NRestarts", "ActiveEnterTimestampMonotonic")


# --- first boot ---------------------------------------------------------------------------------------------


def test_system_running_without_failed_units_or_ordering_cycles(first_boot):
    _, state = first_boot.run("systemctl is-system-running --wait", timeout=300)
    failed = first_boot.check("systemctl --failed --no-legend --plain")
    assert state.strip() == "running", f"system state {state.strip()!r}; failed units:\n{failed}"
    assert failed.strip() == ""
    cycles = first_boot.check("journalctl -b --no-pager -o cat | grep -ci 'ordering cycle' || true")
    assert cycles.strip() == "0", "systemd found ordering cycles (journalctl -b | grep -i 'ordering cycle')"
    assert first_boot.check("cat /proc/sys/kernel/tainted").strip() == "0"
    print("\n[qemu] " + first_boot.check("systemd-analyze time --no-pager").strip())
    print("[qemu] slowest units:\n" + first_boot.check("systemd-analyze blame --no-pager | head -5"))


def test_root_is_read_only_and_data_partition_writable(first_boot):
    code, out = first_boot.run("touch /fl-probe")
    assert code != 0 and "Read-only file system" in out
    assert "ro" in first_boot.check("findmnt -no OPTIONS /").split(",")
    data = first_boot.check("findmnt -no SOURCE,FSTYPE,OPTIONS /data").split()
    assert data[1] == "ext4" and "rw" in data[2].split(",")
    assert first_boot.check(f"blkid -s LABEL -o value {data[0]}").strip() == "fl-data"
    first_boot.check("echo ok > /data/probe && sync /data/probe && cat /data/probe && rm /data/probe")
    # The agent's state dir is the data partition's fl-agent directory, bound into place.
    assert first_boot.check("findmnt -no SOURCE /var/lib/fl-agent").strip().endswith("[/fl-agent]")
    fsck = unit_props(first_boot, DATA_FSCK, "Result", "ActiveState")
    assert fsck == {"Result": "success", "ActiveState": "active"}


def test_agent_ready_as_its_own_user_in_its_cgroup_with_limits(first_boot, dev_image):
    props = wait_agent_active(first_boot)
    assert props["SubState"] == "running" and props["NRestarts"] == "0"
    ready_s = int(props["ActiveEnterTimestampMonotonic"]) / 1e6
    first_boot.notes["ready_s"] = ready_s
    print(f"\n[qemu] fl-agent READY {ready_s:.1f} s after kernel start")
    pid = props["MainPID"]
    status = first_boot.check(f"cat /proc/{pid}/status")
    uid = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1)
    groups = re.search(r"^Groups:\s*(.*)$", status, re.MULTILINE).group(1).split()
    assert int(uid) == dev_image.manifest["fl_agent_uid"]
    assert first_boot.check(f"ps -o user= -p {pid}").strip() == "fl-agent"
    assert str(dev_image.manifest["video_gid"]) in groups
    cgroup = first_boot.check(f"cat /proc/{pid}/cgroup").strip()
    assert cgroup.startswith("0::/system.slice/fl-agent.service"), cgroup
    cg = "/sys/fs/cgroup/system.slice/fl-agent.service"
    assert first_boot.check(f"cat {cg}/cpu.max").strip() == "100000 100000"  # CPUQuota=100%
    assert first_boot.check(f"cat {cg}/memory.max").strip() == str(512 * 2**20)
    assert first_boot.check(f"cat {cg}/memory.high").strip() == str(400 * 2**20)
    assert "default 50" in first_boot.check(f"cat {cg}/io.weight")
    # The defaults are overridable although / is read-only: a runtime drop-in changes the live limit.
    first_boot.check("systemctl set-property --runtime fl-agent.service MemoryMax=640M")
    assert first_boot.check(f"cat {cg}/memory.max").strip() == str(640 * 2**20)
    first_boot.check("systemctl set-property --runtime fl-agent.service MemoryMax=512M")
    assert first_boot.check(f"cat {cg}/memory.max").strip() == str(512 * 2**20)
    # Delegate=yes: the subtree belongs to fl-agent, so the agent can make the trainer's child cgroup even
    # though ProtectControlGroups= makes the rest of /sys/fs/cgroup read-only for it.
    assert first_boot.check(f"stat -c %U {cg}").strip() == "fl-agent"
    probe = f"nsenter -t {pid} -m setpriv --reuid fl-agent --regid fl-agent --clear-groups"
    first_boot.check(f"{probe} mkdir {cg}/rig-probe && {probe} rmdir {cg}/rig-probe")
    code, _ = first_boot.run(f"{probe} mkdir /sys/fs/cgroup/system.slice/rig-probe")
    assert code != 0, "the agent could write outside its own cgroup"


def test_security_exposure_at_most_2_5(first_boot):
    out = first_boot.check(f"systemd-analyze security --no-pager {AGENT}", timeout=120)
    m = re.search(r"Overall exposure level for fl-agent\.service: ([0-9.]+)", out)
    assert m, out[-2000:]
    exposure = float(m.group(1))
    print(f"\n[qemu] systemd-analyze security fl-agent.service: exposure {exposure}")
    assert exposure <= EXPOSURE_MAX


def test_host_scrapes_agent_metrics_through_hostfwd(first_boot, fl0):
    wait_agent_active(first_boot)
    text = scrape(fl0.metrics_port)
    assert metric(text, "fl_agent_budget_advisory") == 0.0, "the agent should see its systemd budget"
    assert metric(text, "fl_agent_budget_memory_bytes") == 512 * 2**20


def test_camera_hotplug_with_vivid(first_boot, fl0):
    wait_agent_active(first_boot)
    before = scrape(fl0.metrics_port)
    assert metric(before, "fl_agent_cameras_present") == 0.0
    since = first_boot.check("date +%s").strip()
    first_boot.check("modprobe vivid n_devs=1 node_types=0x1 num_inputs=1")
    added = time.monotonic()
    first_boot.wait_for(
        f"journalctl -u {AGENT} --since @{since} -o cat --no-pager | grep -q 'camera added'", timeout=120, interval=1
    )
    print(f"\n[qemu] camera added logged {time.monotonic() - added:.1f} s after modprobe vivid")
    deadline = time.monotonic() + 60
    while metric(scrape_quietly(fl0.metrics_port), "fl_agent_cameras_present") != 1.0:
        assert time.monotonic() < deadline, "fl_agent_cameras_present did not reach 1"
        time.sleep(1)
    # the agent opens the camera only for each sample: rmmod succeeds between samples (a sample under TCG on a
    # busy host can take most of the 1 s interval, so it may take a few tries)
    first_boot.wait_for("rmmod vivid", timeout=60, interval=0.2)
    first_boot.wait_for(
        f"journalctl -u {AGENT} --since @{since} -o cat --no-pager | grep -q 'camera removed'", timeout=120, interval=1
    )
    after = scrape(fl0.metrics_port)
    assert metric(after, "fl_agent_cameras_present") == 0.0
    props = unit_props(first_boot, AGENT, "ActiveState", "NRestarts")
    assert props == {"ActiveState": "active", "NRestarts": "0"}, "hotplug must not restart the agent"


def test_round_with_host_aggregator_is_accepted(first_boot, fl0, idle_aggregator, quick_rounds_toml):
    if idle_aggregator.skip_reason:
        pytest.skip(idle_aggregator.skip_reason)
    first_boot.check(
        f"printf '%s' '{quick_rounds_toml()}' > /tmp/agent.toml && "
        "install -o fl-agent -g fl-agent -m 0644 /tmp/agent.toml /var/lib/fl-agent/agent.toml"
    )
    first_boot.check(f"systemctl restart {AGENT}", timeout=300)
    idle_aggregator.start()  # round 1 opens now (guestfwd connects per guest connection: late start is fine)
    deadline = time.monotonic() + 900
    while True:
        rounds = {r["round"]: r for r in idle_aggregator.status()["rounds"]}
        if fl0.identity.device_id in (rounds.get(1, {}).get("devices") or []):
            break
        assert time.monotonic() < deadline, f"round 1 not completed by fl0: {rounds}"
        first_boot.run("true")  # keep reading the console
        time.sleep(3)
    assert rounds[1]["participants"] == 1
    # The training ran in the trainer's own child cgroup, under a tighter memory.max than the agent's: the
    # delegation works under the hardened unit.
    assert (metric(scrape(fl0.metrics_port), "fl_agent_trainer_memory_peak_bytes") or 0) > 0
    trainer_max = first_boot.check("cat /sys/fs/cgroup/system.slice/fl-agent.service/trainer/memory.max").strip()
    assert trainer_max.isdigit() and int(trainer_max) < 512 * 2**20, trainer_max


# --- power cut and second boot ------------------------------------------------------------------------------


def outbox_files(guest) -> list[str]:
    return [f for f in guest.check("ls -1 /var/lib/fl-agent/outbox").split() if f.endswith(".upd")]


def test_power_cut_during_delivery_then_clean_data_and_update_delivered_once(
    first_boot, boot_appliance, fl0, rig_dir, idle_aggregator, update_gate
):
    """Cut the power while round 2's update is being delivered; the next boot must deliver it exactly once."""
    from flctl.image.disk import fsck_clean

    if idle_aggregator.process is None:
        pytest.skip(idle_aggregator.skip_reason or "the round test did not start the aggregator")
    device = fl0.identity.device_id
    # Round 2 opened when round 1 closed; the agent trains it, puts the signed update in its outbox (fsync'd)
    # and uploads it. The gate holds that upload unanswered: the delivery is in flight.
    deadline = time.monotonic() + 900
    while not update_gate.held.wait(timeout=2):
        assert time.monotonic() < deadline, "the agent never tried to deliver round 2's update"
        first_boot.run("true")  # keep reading the console
    queued = outbox_files(first_boot)
    assert len(queued) == 1, queued
    first_boot.power_cut()
    update_gate.open()  # the held upload never reached the aggregator; later ones pass

    second = boot_appliance(fl0, rig_dir)
    try:
        second.run("systemctl is-system-running --wait", timeout=300)
        fsck = unit_props(second, DATA_FSCK, "Result", "ActiveState")
        assert fsck == {"Result": "success", "ActiveState": "active"}, "the data partition's check failed"
        print("\n[qemu] fsck after the power cut: " + second.check(f"journalctl -b -u {DATA_FSCK} -o cat | tail -3"))
        props = wait_agent_active(second)
        print(f"\n[qemu] second boot: fl-agent READY {int(props['ActiveEnterTimestampMonotonic']) / 1e6:.1f} s")
        second.wait_for("! ls -1 /var/lib/fl-agent/outbox | grep -q '[.]upd$'", timeout=600, interval=3)
        deadline = time.monotonic() + 120
        while True:
            rounds = {r["round"]: r for r in idle_aggregator.status(rounds=10)["rounds"]}
            if device in (rounds.get(2, {}).get("devices") or []):
                break
            assert time.monotonic() < deadline, f"round 2 has no update from fl0: {rounds.get(2)}"
            second.run("true")
            time.sleep(2)
        assert rounds[2]["devices"].count(device) == 1 and rounds[2]["participants"] == 1, rounds[2]
        print(
            "\n[qemu] agent after the cut: "
            + second.check(f"journalctl -b -u {AGENT} -o cat | grep -E 'round 2|acknowledged|refused' | tail -5")
        )
        second.poweroff()
    finally:
        if second.qemu.status:
            second.qemu.off()
    clean, report = fsck_clean(fl0.data_image)
    assert clean, f"e2fsck -fn on the data partition after a clean shutdown:\n{report}"
