"""The aggregator survives power cuts: every update it acknowledged counts, exactly once, in the published model.

SIGKILL (tests/test_aggregator_durability.py) leaves the page cache intact; a power cut does not, so only a
power cut shows that a receipt is given after the update is on disk (the spool's fdatasync, SQLite's synced
commit; tests/test_aggregator_fsync.py records those calls on the host). Here a QEMU guest (tests/qemu_guest.py)
mounts an ext4 data disk and runs the real ``fl-aggregator serve`` on its loopback, with the state directory on
that disk, while a client in the guest uploads signed updates from simulated devices, four at a time, and prints
each update's digest on the serial console only once its receipt verified. A sysrq 'b' (an immediate reset
without syncing: everything not flushed to the virtual disk is lost) cuts the guest at a random moment. Each
boot first reports what the restarted aggregator holds in the open round: every update it committed, and
whether its spooled delta is byte for byte the one the device sent. A last boot has every other device deliver,
and checks the published model: the initial one plus the sample-weighted mean of every device's delta, so each
acknowledged update counted exactly once.
"""

from __future__ import annotations

import json
import random
import re
import subprocess

import pytest
import qemu_guest as guest

# Four boots under TCG: 8 minutes on 2 idle cores, 15 on busy ones (each boot is bounded by qemu_guest.BOOT_TIMEOUT).
pytestmark = [pytest.mark.qemu, pytest.mark.timeout(2400)]

CUTS = 3
DEVICES = 150  # more than the cut runs deliver (about ten receipts each): the round stays open until the last boot
PARAMETERS = 10_000

GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
ip link set lo up
for m in /lib/modules/*.ko; do insmod "$m"; done
mkdir -p /data
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
mount -t ext4 /dev/vda /data || echo "FL-GUEST-NO-DISK"
/usr/bin/python3 /app/guest.py $(cat /proc/cmdline)
echo "FL-GUEST-EXIT $?"
poweroff -f
"""

GUEST_SCRIPT = r'''
import asyncio, hashlib, json, random, subprocess, sys, threading, time, urllib.request
sys.path.insert(0, "/app")
from pathlib import Path

import aiohttp
import numpy as np
from nacl.signing import SigningKey, VerifyKey

from aggregator.models import Layout
from aggregator.simulate import SimulatedDevice, synthetic_package
from aggregator.store import Store
from appliance import wire

args = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith("fl."))
DEVICES, PARAMETERS = int(args["fl.devices"]), int(args["fl.parameters"])
STATE = Path("/data/state")
URL = "http://127.0.0.1:8080"
devices = [SimulatedDevice(SigningKey(hashlib.sha256(b"device %d" % i).digest())) for i in range(DEVICES)]
index = {d.device_id: i for i, d in enumerate(devices)}


def samples(i):
    return 1 + i % 7


def cli(*words):
    done = subprocess.run([sys.executable, "-m", "aggregator.cli", *words], cwd="/app", capture_output=True, text=True)
    assert done.returncode == 0, f"fl-aggregator {words[0]}: {done.stderr}"
    return done.stdout


def get(path):
    with urllib.request.urlopen(URL + path, timeout=120) as response:
        return response.status, response.read()


key = VerifyKey(bytes.fromhex(cli("keygen", "--state", str(STATE)).strip()))
fleet = Path("/tmp/fleet.jsonl")
fleet.write_text("".join(json.dumps({"device_id": d.device_id, "public_key": d.public_key_hex}) + "\n"
                         for d in devices))
cli("enroll", "--state", str(STATE), "--from", str(fleet))  # idempotent
log = open("/data/aggregator.log", "ab")
server = subprocess.Popen(
    [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(STATE), "--listen", "127.0.0.1:8080",
     "--synthetic-parameters", str(PARAMETERS), "--min-clients", str(DEVICES), "--goal-clients", str(DEVICES),
     "--round-timeout", "86400", "--workers", "1"],
    cwd="/app", stdout=log, stderr=subprocess.STDOUT)
for _ in range(1200):
    try:
        if get("/healthz")[0] == 200:
            break
    except OSError:
        pass
    assert server.poll() is None, "the aggregator exited during start-up"
    time.sleep(0.1)

task = wire.decode_task(get("/v1/task")[1], key)
base = wire.decode_model_release(get("/v1/models/0")[1], key)
layout = Layout(synthetic_package(PARAMETERS).info.param_specs)  # the model `serve --synthetic-parameters` serves


def delta(i):
    rng = np.random.default_rng(i)
    return {name: (rng.standard_normal(t.shape) * 0.01).astype(np.float32) for name, t in base.tensors.items()}


# What the restarted aggregator holds: each committed update, and whether its spooled delta is the one sent.
store = Store(STATE)
held = {}
for row in store.round_updates(task.round_id):
    i = index[row.device_id]
    try:
        intact = bool(np.array_equal(store.read_delta(row.round_id, row.offset, row.length), layout.flatten(delta(i)))
                      and row.num_samples == samples(i))
    except (OSError, ValueError):
        intact = False
    held[row.digest.hex()] = intact
print("FL-STATE " + json.dumps({"round": task.round_id, "model_version": task.model_version, "updates": held}),
      flush=True)
counted = {index[d] for d in store.round_devices(task.round_id)}
store.close()
todo = [i for i in range(DEVICES) if i not in counted]
rng = random.Random(int(args["fl.seed"]))


def cut():
    time.sleep(rng.uniform(0.2, 3.0))
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("b")  # reset now, no sync: the power cut


async def deliver(cutting):
    queue = asyncio.Queue()
    for i in todo:
        queue.put_nowait(i)
    started = []

    async def worker(session):
        while not queue.empty():
            i = queue.get_nowait()
            body = devices[i].update(task, delta(i), num_samples=samples(i))
            async with session.post(URL + "/v1/updates", data=body,
                                    headers={"Content-Type": wire.CONTENT_TYPE}) as response:
                answer = await response.read()
                assert response.status == 200, (response.status, answer[:300])
            receipt = wire.decode_receipt(answer, key)
            assert receipt.update_digest == wire.update_digest(body)
            print(f"FL-ACK {receipt.update_digest.hex()}", flush=True)
            if cutting and not started:  # the clock starts at the first receipt
                started.append(threading.Thread(target=cut, daemon=True))
                started[0].start()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(worker(session) for _ in range(4)))


asyncio.run(deliver(args["fl.mode"] == "cut"))
if args["fl.mode"] == "cut":
    time.sleep(30)
    print("FL-NOT-CUT", flush=True)
    sys.exit(1)

status, body = get(f"/v1/task?after={task.round_id}&wait=120")
following = wire.decode_task(body, key)
new = wire.decode_model_release(get(f"/v1/models/{following.model_version}")[1], key)
weights = np.array([samples(i) for i in range(DEVICES)], dtype=np.float64)
mean = sum(w * layout.flatten(delta(i)).astype(np.float64) for i, w in enumerate(weights)) / weights.sum()
expected = layout.flatten(base.tensors).astype(np.float64) + mean
error = float(np.max(np.abs(layout.flatten(new.tensors).astype(np.float64) - expected)))
rounds = json.loads(get("/v1/status")[1])["rounds"]
closed = next(r for r in rounds if r["round"] == task.round_id)
print("FL-PUBLISHED " + json.dumps({"version": new.version, "max_error": error, "status": closed["status"],
                                    "participants": closed["participants"], "samples": closed["samples"]}),
      flush=True)
server.terminate()
server.wait()
'''


def _state(console: str) -> dict:
    lines = guest.marked(console, "FL-STATE")
    assert len(lines) == 1, f"no state report from the guest; console tail:\n{console[-3000:]}"
    return json.loads(lines[0])


def test_aggregator_loses_no_acknowledged_update_in_power_cuts(tmp_path):
    guest_kernel = guest.kernel(("virtio_pci", "virtio_blk", "crc32c_generic", "ext4"))
    files = {
        **guest.python_packages("aggregator.cli", "aggregator.app", "aggregator.simulate", "aiohttp"),
        **guest.appliance_package(),
        "/app/aggregator": guest.REPO / "aggregator",
        "/app/guest.py": GUEST_SCRIPT,
    }
    initrd = guest.initramfs(tmp_path, GUEST_INIT, files, guest_kernel.modules)
    disk = tmp_path / "data.img"
    subprocess.run([guest.need("mkfs.ext4"), "-q", "-F", "-L", "fl-data", str(disk), "256M"], check=True,
                   stdout=subprocess.DEVNULL)
    drive = ["-drive", f"file={disk},format=raw,if=virtio,cache=writeback"]

    acknowledged: set[str] = set()  # a verified receipt came back
    rng = random.Random(2424)
    round_id = None
    for cut in range(CUTS + 1):
        mode = "cut" if cut < CUTS else "check"
        append = f"fl.mode={mode} fl.seed={rng.randrange(10**6)} fl.devices={DEVICES} fl.parameters={PARAMETERS}"
        console = guest.boot(guest_kernel, initrd, append=append, extra=drive, memory_mb=1536)
        assert "FL-GUEST-NO-DISK" not in console, console[-3000:]
        state = _state(console)
        held = state["updates"]
        round_id = round_id or state["round"]
        assert (state["round"], state["model_version"]) == (round_id, 0), "the round closed before the last boot"
        assert all(held.values()), f"after cut {cut}, spooled deltas differ from what was sent: {held}"
        assert acknowledged <= set(held), f"acknowledged but lost after cut {cut}: {acknowledged - set(held)}"
        # a line the reset cut short is not an acknowledgement the test can hold the aggregator to
        acks = {d for d in guest.marked(console, "FL-ACK") if re.fullmatch(r"[0-9a-f]{64}", d)}
        acknowledged |= acks
        print(f"boot {cut} ({mode}): {len(held)} updates held, {len(acks)} new receipts")
        if mode == "cut":
            assert acks, f"no receipt before cut {cut}; console tail:\n{console[-3000:]}"
            assert "FL-NOT-CUT" not in console and "FL-GUEST-EXIT" not in console, console[-3000:]
    published = guest.marked(console, "FL-PUBLISHED")
    assert published, f"no published model; console tail:\n{console[-3000:]}"
    result = json.loads(published[0])
    assert result["status"] == "published" and result["participants"] == DEVICES, result
    assert result["samples"] == sum(1 + i % 7 for i in range(DEVICES))
    assert result["max_error"] < 1e-5, result
    print(f"cuts={CUTS} receipts={len(acknowledged)} devices={DEVICES}")
