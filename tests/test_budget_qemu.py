"""The trainer's OOM kill contained by a real cgroup v2, in a QEMU guest.

This host keeps the memory controller on cgroup v1 (hybrid layout, see RIG-FACTS.md), so the kernel behaviour
the budget module relies on is checked in a small guest: the Debian kernel the image ships, booted directly
with an initramfs made of busybox, the host's Python 3 and appliance/budget.py. Its init mounts cgroup v2 with
every controller, makes ``/fl-agent.service`` with MemoryMax/CPUQuota-like limits and delegates it to uid 1000
the way systemd's Delegate=yes does (chown of the directory, cgroup.procs, cgroup.subtree_control,
cgroup.threads). An unprivileged "agent" in it reads its budget, sets up the agent/trainer leaves, runs a
trainer that allocates past its memory.max (killed, OOM recognised from memory.events), then a smaller one
(succeeds), and reports. The test asserts on that report.
"""

from __future__ import annotations

import json
import re

import pytest
import qemu_guest as guest

MiB = 1024 * 1024

pytestmark = pytest.mark.qemu

GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /tmp
echo "FL-GUEST-START"
/usr/bin/python3 /app/guest.py
echo "FL-GUEST-EXIT $?"
poweroff -f
"""

GUEST_SCRIPT = r'''
import json, os, sys, traceback
sys.path.insert(0, "/app")
from pathlib import Path
from appliance import budget as b

MiB = 1024 * 1024
ROOT = Path("/sys/fs/cgroup")
BASE = ROOT / "fl-agent.service"
UID = 1000


def allocate(nbytes):
    data = b"\x01" * nbytes  # touches every page
    return len(data)


def agent(report):
    """Runs as uid 1000 inside the delegated cgroup, like fl-agent under systemd."""
    budget = b.read_budget()
    report["budget"] = dict(cpu=budget.cpu_quota, threads=budget.threads, memory_max=budget.memory_max,
                            delegated=budget.delegated, advisory=budget.advisory, reason=budget.reason,
                            base=str(budget.base))
    for method in ("spawn", "forkserver"):
        sandbox = b.TrainerSandbox(budget, memory_max=64 * MiB, start_method=method)
        result = {}
        try:
            result["big"] = sandbox.run(allocate, 256 * MiB, timeout=120)
        except b.TrainerKilled as exc:
            result["killed"] = dict(oom=exc.oom, signal=exc.signal_number, evidence=exc.evidence)
        result["small"] = sandbox.run(allocate, 8 * MiB, timeout=120)
        result["oom_kills"] = sandbox.oom_kills
        report[method] = result
    report["own_cgroup"] = Path("/proc/self/cgroup").read_text().strip()
    report["subtree_control"] = (BASE / "cgroup.subtree_control").read_text().strip()
    report["trainer_memory_max"] = (BASE / "trainer" / "memory.max").read_text().strip()
    report["trainer_oom_group"] = (BASE / "trainer" / "memory.oom.group").read_text().strip()
    report["base_procs"] = (BASE / "cgroup.procs").read_text().split()
    report["trainer_events"] = (BASE / "trainer" / "memory.events").read_text()
    usage = b.read_usage(BASE)
    report["usage"] = dict(memory_current=usage.memory_current, cpu_usage_usec=usage.cpu_usage_usec,
                           pressure=usage.memory_pressure_some_avg10, trainer_oom_kills=usage.trainer_oom_kills,
                           trainer_peak=usage.trainer_memory_peak)


def main():
    (ROOT / "cgroup.subtree_control").write_text("+cpu +memory +pids")
    BASE.mkdir()
    (BASE / "memory.max").write_text(str(200 * MiB))  # MemoryMax=200M
    (BASE / "cpu.max").write_text("50000 100000")  # CPUQuota=50%
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):  # Delegate=yes
        os.chown(BASE / name if name else BASE, UID, UID)
    ready_r, ready_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_w); os.close(out_r)
        os.read(ready_r, 1)  # wait until the parent has put us into the unit's cgroup
        os.setgid(UID); os.setuid(UID)
        os.environ["HOME"] = "/tmp"
        report = {}
        try:
            agent(report)
        except BaseException:
            report["error"] = traceback.format_exc()
        os.write(out_w, json.dumps(report).encode())
        os._exit(0)
    os.close(ready_r); os.close(out_w)
    (BASE / "cgroup.procs").write_text(str(pid))
    os.write(ready_w, b"x")
    chunks = []
    while chunk := os.read(out_r, 65536):
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    report = json.loads(b"".join(chunks) or b"{}")
    report["agent_exit_status"] = status
    print("FL-REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
'''


def test_trainer_oom_is_contained_by_a_real_delegated_cgroup_v2(tmp_path):
    guest_kernel = guest.kernel()
    initrd = guest.initramfs(tmp_path, GUEST_INIT, {**guest.appliance_package(), "/app/guest.py": GUEST_SCRIPT})
    console = guest.boot(guest_kernel, initrd)
    lines = guest.marked(console, "FL-REPORT")
    print(lines[-1] if lines else "")
    assert lines, f"no report from the guest; console tail:\n{console[-3000:]}"
    report = json.loads(lines[-1])
    assert "error" not in report, report.get("error")
    assert report["agent_exit_status"] == 0  # the agent survived its trainers' OOM kills

    budget = report["budget"]
    assert budget["delegated"] and not budget["advisory"], budget["reason"]
    assert budget["base"] == "/sys/fs/cgroup/fl-agent.service"
    assert budget["memory_max"] == 200 * MiB and budget["cpu"] == 0.5 and budget["threads"] == 1

    for method in ("spawn", "forkserver"):
        result = report[method]
        assert "big" not in result, f"{method}: 256 MiB fitted in a 64 MiB trainer cgroup"
        killed = result["killed"]
        assert killed["oom"] and killed["signal"] == 9, killed
        assert re.search(r"memory.events oom_kill \+[1-9]", killed["evidence"]), killed
        assert result["small"] == 8 * MiB  # the retry with a smaller batch works
        assert result["oom_kills"] == 1

    assert report["own_cgroup"] == "0::/fl-agent.service/agent"  # the agent moved into its leaf
    assert report["base_procs"] == []  # no internal processes
    assert set(report["subtree_control"].split()) == {"cpu", "memory", "pids"}
    assert report["trainer_memory_max"] == str(64 * MiB) and report["trainer_oom_group"] == "1"
    usage = report["usage"]
    assert usage["trainer_oom_kills"] >= 2 and usage["memory_current"] > 0 and usage["cpu_usage_usec"] > 0
    assert usage["pressure"] is not None
    assert 8 * MiB < usage["trainer_peak"] <= 64 * MiB  # the peak a run reached, within the trainer limit
