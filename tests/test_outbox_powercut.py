"""The outbox survives power cuts: what put() acknowledged is there, what remove() acknowledged stays gone.

SIGKILL (tests/test_outbox_crash.py) leaves the page cache intact; a power cut does not. Here a QEMU guest
(tests/qemu_guest.py) mounts an ext4 data disk, puts and removes updates in a loop, printing each key on the
serial console only after the call returned (and the line has left the guest's UART: a line still in the tty
buffer is lost with the reset), and is cut off at a random moment by sysrq 'b' (an immediate
reset without syncing: everything not flushed to the virtual disk is lost, as in a power cut). The next boot
opens the outbox, reports what it finds, works on and is cut again; a last boot only reports. Every report
must hold: no acknowledged put missing, no acknowledged removal back, no torn or half-written update, no temp
file left after opening.
"""

from __future__ import annotations

import json
import random
import re
import subprocess

import pytest
import qemu_guest as guest

pytestmark = pytest.mark.qemu

CUTS = 3

GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
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
import hashlib, json, os, random, sys, termios, threading, time
sys.path.insert(0, "/app")
from pathlib import Path
from appliance.outbox import Outbox

args = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith("fl."))
directory = Path("/data/outbox")
leftovers = sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-")) if directory.exists() else []
outbox = Outbox(directory, max_messages=100_000, max_bytes=1 << 30)
pending = {}
for entry in outbox.pending():
    data = outbox.read(entry)
    pending[entry.key] = hashlib.sha256(data).hexdigest() == entry.key and len(data) == entry.size
print("FL-STATE " + json.dumps({"pending": pending, "temp_files_seen": len(leftovers),
      "temp_files_left": sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))}), flush=True)
if args.get("fl.mode") != "cut":
    sys.exit(0)

rng = random.Random(int(args["fl.seed"]))


def say(line):
    # tcdrain: return only once the line has left the UART, so the host has it before the next step starts. A
    # line still in the tty buffer at the reset is lost, and a lost FL-REMOVING would blame the outbox for an
    # update the guest was deleting on purpose.
    print(line, flush=True)
    termios.tcdrain(sys.stdout.fileno())
delay = rng.uniform(0.0, 2.0)


def cut():
    time.sleep(delay)
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("b")  # reset now, no sync: the power cut


i = 0
while True:
    message = f"update {args['fl.seed']}-{i} ".encode() + rng.randbytes(rng.randint(500, 300_000))
    key = outbox.put(message)
    say(f"FL-PUT {key}")
    if i == 0:  # the clock starts at the first acknowledged put: a slow disk cannot leave a run with none
        threading.Thread(target=cut, daemon=True).start()
    if outbox.depth > 3 and rng.random() < 0.4:
        victim = outbox.pending()[0].key
        say(f"FL-REMOVING {victim}")  # from here on the cut may or may not have taken it away
        outbox.remove(victim)
        say(f"FL-REMOVED {victim}")
    i += 1
'''


def _state(console: str) -> dict:
    lines = guest.marked(console, "FL-STATE")
    assert len(lines) == 1, f"no state report from the guest; console tail:\n{console[-3000:]}"
    return json.loads(lines[0])


def test_outbox_survives_power_cuts(tmp_path):
    guest_kernel = guest.kernel(("virtio_pci", "virtio_blk", "crc32c_generic", "ext4"))
    initrd = guest.initramfs(tmp_path, GUEST_INIT, {
        **guest.appliance_package(),
        "/app/guest.py": GUEST_SCRIPT,
    }, guest_kernel.modules)
    disk = tmp_path / "data.img"
    subprocess.run([guest.need("mkfs.ext4"), "-q", "-F", "-L", "fl-data", str(disk), "256M"], check=True,
                   stdout=subprocess.DEVNULL)
    drive = ["-drive", f"file={disk},format=raw,if=virtio,cache=writeback"]

    acknowledged: set[str] = set()  # put() returned
    removed: set[str] = set()  # remove() returned
    removing: set[str] = set()  # remove() was called: gone or still there, both are right
    rng = random.Random(4242)
    puts_total = 0
    for cut in range(CUTS + 1):
        mode = "cut" if cut < CUTS else "check"
        console = guest.boot(guest_kernel, initrd, append=f"fl.mode={mode} fl.seed={rng.randrange(10**6)}",
                             extra=drive)
        assert "FL-GUEST-NO-DISK" not in console, console[-3000:]
        state = _state(console)
        pending = state["pending"]
        # After opening: no temp file left, no torn update, everything acknowledged is there, nothing removed
        # is back. At most one update may be there unacknowledged: the put the cut interrupted after its rename.
        assert state["temp_files_left"] == []
        assert all(pending.values()), f"torn updates after cut {cut}: {pending}"
        lost = acknowledged - removing - set(pending)
        assert not lost, f"acknowledged, never removed, and lost after cut {cut}: {lost}"
        assert not removed & set(pending), f"removed updates came back after cut {cut}"
        assert len(set(pending) - acknowledged) <= 1
        acknowledged |= set(pending)
        # a line the reset cut short is not an acknowledgement the test can hold the outbox to
        new_puts = {key for key in guest.marked(console, "FL-PUT") if re.fullmatch(r"[0-9a-f]{64}", key)}
        acknowledged |= new_puts
        removed |= set(guest.marked(console, "FL-REMOVED"))
        removing |= set(guest.marked(console, "FL-REMOVING"))
        puts_total += len(new_puts)
        if mode == "cut":
            assert "FL-GUEST-EXIT" not in console, f"the guest was not cut: it finished by itself:\n{console[-3000:]}"
    assert puts_total >= CUTS, f"only {puts_total} acknowledged puts in {CUTS} runs: the cuts came too early"
    print(f"cuts={CUTS} acknowledged_puts={puts_total} removed={len(removed)} pending_at_end={len(pending)}")
