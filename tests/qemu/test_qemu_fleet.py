"""Two appliances at once: one shared read-only root image, a data partition each, one round together.

The guests run as plain QEMU processes with their serial consoles in files (`flctl qemu run`'s way: a file
never blocks a guest, while labgrid's single-threaded console would let the second guest freeze while the
first one is being read). Everything is observed from the host, as an operator would: the aggregator's
status and each appliance's metrics through its forwarded port.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(1800)]



def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def test_two_appliances_share_the_root_and_complete_a_round(
    dev_image, machine, fleet_aggregator, tmp_path, quick_rounds_toml
):
    from flctl.ports import free_port
    from flctl.qemu.rig import Appliance, Identity, provision_data_partition, qemu_command

    if fleet_aggregator.skip_reason:
        pytest.skip(fleet_aggregator.skip_reason)
    appliances = []
    for i in range(2):
        identity = Identity.generate()
        fleet_aggregator.enroll(identity.public_key_hex)
        a = Appliance(f"fleet{i}", tmp_path, identity, metrics_port=free_port(), aggregator_port=fleet_aggregator.port)
        provision_data_partition(
            dev_image, a.data_image, identity, fleet_aggregator.public_key_hex, agent_toml=quick_rounds_toml(camera=i)
        )
        appliances.append(a)

    procs = [subprocess.Popen(qemu_command(dev_image, a, machine), stdin=subprocess.DEVNULL) for a in appliances]
    try:
        # Both guests boot from the one image file (root attached readonly=on; QEMU's image locking would stop
        # the second guest if either wanted to write it).
        started = time.monotonic()
        deadline = started + 1200
        ready: dict[str, float] = {}
        while True:
            for a, p in zip(appliances, procs, strict=True):
                assert p.poll() is None, f"{a.name}'s QEMU exited ({p.returncode}); console {a.console_log}"
                if a.name not in ready and scrape(a.metrics_port):
                    ready[a.name] = time.monotonic() - started
            rounds = {r["round"]: r for r in fleet_aggregator.status()["rounds"]}
            devices = rounds.get(1, {}).get("devices") or []
            if len(devices) == 2:
                break
            assert time.monotonic() < deadline, f"round 1 not completed by both: {rounds.get(1)}; up: {ready}"
            time.sleep(2)
        print(f"\n[qemu] two appliances: metrics up after {ready}; round 1 done {time.monotonic() - started:.0f} s")
        assert sorted(devices) == sorted(a.identity.device_id for a in appliances)
        assert rounds[1]["participants"] == 2
        for a in appliances:
            text = scrape(a.metrics_port) or ""
            rounds_done = re.search(r"^fl_agent_rounds_total ([0-9.]+)$", text, re.MULTILINE)
            assert rounds_done and float(rounds_done.group(1)) >= 1, f"{a.name} reports no round"
            console = a.console_log.read_text(errors="replace")
            assert "Welcome to" in console and "Debian GNU/Linux 12" in console
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
