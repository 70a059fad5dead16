"""`flctl qemu run` as docs/qemu.md tells a user to run it, with a packet capture added after `--`.

The aggregator runs with the options of the page's `fl-aggregator serve` line and the appliance with the
page's agent.toml, so the documented path is the one tested: one appliance completes round 1. Then SIGTERM
(what `timeout`, systemd or a CI runner sends) must power the guest off cleanly (QMP system_powerdown: the
console log ends with the kernel's "reboot: Power down"), leave no QEMU running, and `flctl qemu run` exits
0. The capture, written by `-object filter-dump,netdev=net0,...` on the rig's named netdev, must hold the
appliance's TCP traffic to the aggregator (10.0.2.100:8080).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(2400)]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "qemu.md"
AGGREGATOR_IP = bytes([10, 0, 2, 100])


def documented_commands() -> tuple[list[str], str]:
    """The `fl-aggregator serve` options of docs/qemu.md's "Run appliances" block (all but state, listen and
    model, which the test's aggregator has its own of) and the agent.toml the block writes."""
    section = DOCS.read_text().split("## Run appliances", 1)[1]
    block = section.split("```", 2)[1].replace("\\\n", " ")
    serve = next(line for line in block.splitlines() if "fl-aggregator serve" in line)
    words = shlex.split(serve.rstrip("& "))[2:]
    options = []
    while words:
        word = words.pop(0)
        if word in ("--state", "--listen", "--model"):
            words.pop(0)
        else:
            options.append(word)
    toml = re.search(r"<<'EOF'\n(.*?)\nEOF\n", block, re.DOTALL)
    assert toml, "the page's block writes no agent.toml"
    return options, toml.group(1) + "\n"


def tcp_to(pcap: Path, ip: bytes, port: int) -> int:
    """Ethernet/IPv4/TCP packets in a pcap file (as filter-dump writes it) addressed to ip:port."""
    data = pcap.read_bytes()
    assert data[:4] == b"\xd4\xc3\xb2\xa1", "not a little-endian pcap file"
    count, at = 0, 24
    while at + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, at + 8)[0]
        frame = data[at + 16 : at + 16 + caplen]
        at += 16 + caplen
        if len(frame) < 38 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        ihl = (frame[14] & 0x0F) * 4
        if frame[30:34] == ip and struct.unpack_from(">H", frame, 14 + ihl + 2)[0] == port:
            count += 1
    return count


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_documented_run_completes_a_round_is_captured_and_powers_off_on_sigterm(
    dev_image, idle_aggregator, tmp_path
):
    if idle_aggregator.skip_reason:
        pytest.skip(idle_aggregator.skip_reason)
    options, agent_toml = documented_commands()
    assert "--min-clients" in options and "--goal-clients" in options, options
    idle_aggregator.args = options
    idle_aggregator.start()
    toml = tmp_path / "synthetic.toml"
    toml.write_text(agent_toml)
    workdir = tmp_path / "rig"
    flctl = Path(sys.executable).with_name("flctl")
    cmd = [str(flctl), "qemu", "run", "--image", str(dev_image.directory), "--workdir", str(workdir),
           "--aggregator-port", str(idle_aggregator.port), "--aggregator-state", str(idle_aggregator.state),
           "--agent-toml", str(toml), "--shutdown-timeout", "600",
           "--", "-object", f"filter-dump,id=dump,netdev=net0,file={tmp_path}/{{name}}.pcap"]  # fmt: skip
    log = tmp_path / "flctl.log"
    with open(log, "wb") as out:
        run = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        key = workdir / "fl0-device.key"
        deadline = time.monotonic() + 1500
        while not key.exists():
            assert run.poll() is None, f"flctl qemu run exited ({run.returncode}):\n{log.read_text()[-3000:]}"
            time.sleep(1)
        from flctl.qemu.rig import Identity

        device = Identity.load_or_generate(key).device_id
        while True:
            assert run.poll() is None, f"flctl qemu run exited ({run.returncode}):\n{log.read_text()[-3000:]}"
            rounds = {r["round"]: r for r in idle_aggregator.status()["rounds"]}
            if device in (rounds.get(1, {}).get("devices") or []):
                break
            assert time.monotonic() < deadline, f"round 1 not completed by fl0: {rounds}; console {workdir}"
            time.sleep(3)
        qemu_pids = [p for p in children(run.pid) if "qemu-system" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(qemu_pids) == 1, f"expected one QEMU under flctl, found {qemu_pids}"

        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    said = log.read_text()
    assert code == 0, said[-3000:]
    assert "fl0: powered off" in said, said[-3000:]
    console = (workdir / "fl0-console.log").read_text(errors="replace")
    assert "reboot: Power down" in console, console[-3000:]
    assert not [p for p in qemu_pids if alive(p)], "QEMU outlived flctl qemu run"
    pcap = tmp_path / "fl0.pcap"
    sent = tcp_to(pcap, AGGREGATOR_IP, 8080)
    print(f"\n[qemu] capture: {sent} packets from fl0 to the aggregator in {os.path.getsize(pcap)} bytes")
    assert sent > 0, "the capture holds no packet from the appliance to 10.0.2.100:8080"
