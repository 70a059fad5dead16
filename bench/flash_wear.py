"""Flash wear: bytes an appliance writes to its data partition per day at the default settings, with one
camera, measured in the QEMU rig; and how long a 32 GB industrial card lasts at that rate.

    sudo .venv/bin/python bench/flash_wear.py                      # 3 minutes without a camera, 10 with one
    sudo .venv/bin/python bench/flash_wear.py --minutes 30 --idle-minutes 5
    sudo .venv/bin/python bench/flash_wear.py --image DIR          # an image built elsewhere (an older commit)
    sudo .venv/bin/python bench/flash_wear.py --tbw 64             # the card's life from a vendor TBW figure

What runs: the development image (`flctl image build`, from the cache when it is current) booted as
`flctl qemu run` boots one appliance: the shipped configuration (cameras as the data source, one sample a
second, the default buffer limits) plus the rig's plain-HTTP line, and no aggregator reachable, so no
rounds (a round adds its model and update, once per round). First a phase without a camera (the idle
agent, systemd, ext4), then `modprobe vivid` (one capture node) and, once the labeller has warmed up and
frames are being stored, a phase with the camera.

At each phase's ends the guest syncs and its counters of the data partition are read over the serial
console: /sys/fs/ext4/<dev>/lifetime_write_kbytes (what ext4 wrote: data, metadata, journal) and
/sys/block/<dev>/stat field 7 (sectors written to the block device: what a card would receive), with
QEMU's own count of bytes written to the data drive (QMP query-blockstats) as a cross-check. A day is
extrapolated linearly from each phase. An emulated CPU may not keep up with one sample a second; the
camera's share is then scaled to the default rate by the samples actually taken (per-frame costs scale;
for batched writes this overstates).

Card life = NAND writes the card endures / (host writes a day x write amplification). Assumed unless given:
a 32 GB industrial microSD/eMMC in MLC mode rated 3,000 P/E cycles (96 TB of NAND writes), and a write
amplification of 4 (small writes land in the card's larger flash pages and erase blocks; vendors quote 2-10
for such loads). `--tbw` takes a vendor's terabytes-written rating instead, which already includes the
vendor's write amplification for its reference load.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from nacl.signing import SigningKey  # noqa: E402

from flctl.image.build import ImageArtifacts, build_image  # noqa: E402
from flctl.ports import free_port  # noqa: E402
from flctl.qemu import rig  # noqa: E402

DAY = 86400.0
AGENT = "fl-agent.service"
VIVID = "modprobe vivid n_devs=1 node_types=0x1 num_inputs=1"
SAMPLE_INTERVAL_S = 1.0  # [cameras] sample_interval_seconds default (appliance/config.py)
FRAMES_DIR = "/var/lib/fl-agent/frames"


@dataclass(frozen=True)
class Counters:
    """The data partition's write counters at one moment."""

    uptime_s: float
    ext4_kb: int  # /sys/fs/ext4/<dev>/lifetime_write_kbytes
    sectors: int  # /sys/block/<dev>/stat field 7, 512-byte sectors written
    qemu_bytes: int  # QMP query-blockstats wr_bytes of the data drive
    captured: float  # fl_agent_camera_frames_captured_total
    stored: float  # fl_agent_camera_frames_labelled_total{outcome="labelled"}


@dataclass(frozen=True)
class Phase:
    name: str
    start: Counters
    end: Counters

    @property
    def seconds(self) -> float:
        return self.end.uptime_s - self.start.uptime_s

    def per_day(self, field: str, unit: int) -> float:
        """Bytes a day extrapolated from the phase, for one counter (``unit`` bytes per count)."""
        return (getattr(self.end, field) - getattr(self.start, field)) * unit / self.seconds * DAY

    @property
    def samples_per_s(self) -> float:
        return (self.end.captured - self.start.captured) / self.seconds

    @property
    def stored_per_s(self) -> float:
        return (self.end.stored - self.start.stored) / self.seconds


class Guest:
    """One appliance under labgrid: its serial shell, its QEMU monitor and its metrics port."""

    def __init__(self, art: ImageArtifacts, workdir: Path) -> None:
        from labgrid import Environment

        identity = rig.Identity.generate()
        aggregator_pub = bytes(SigningKey.generate().verify_key).hex()  # pinned, never reached
        self.appliance = rig.Appliance("wear", workdir, identity, metrics_port=free_port(), aggregator_port=None)
        rig.provision_data_partition(art, self.appliance.data_image, identity, aggregator_pub)
        machine = rig.MachineConfig(accel=rig.choose_accelerator(str(art.vmlinux), str(art.initrd)))
        self.accel = machine.accel
        env = Environment(str(rig.labgrid_env(art, [self.appliance], machine, workdir / "env.yaml")))
        target = env.get_target(self.appliance.name)
        self.qemu = target.get_driver("QEMUDriver")
        self.qemu.on()
        self.shell = target.get_driver("ShellDriver")
        self.device = ""

    def run(self, cmd: str, timeout: float = 120) -> str:
        out, _, code = self.shell.run(cmd, timeout=timeout)
        if code != 0:
            raise RuntimeError(f"`{cmd}` exited {code} in the guest: {' '.join(out)}")
        return "\n".join(out)

    def wait_for(self, what: str, check, timeout: float, interval: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not reached within {timeout:.0f} s")
            time.sleep(interval)

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.appliance.metrics_port}/metrics", timeout=30) as r:
                return r.read().decode()
        except OSError:
            return ""

    def qemu_written(self) -> int:
        image = str(self.appliance.data_image)
        drives = {b["device"] or b["qdev"]: b.get("inserted", {}).get("file", "")
                  for b in self.qemu.monitor_command("query-block")}
        for stats in self.qemu.monitor_command("query-blockstats"):
            if image in drives.get(stats["device"] or stats.get("qdev", ""), ""):
                return int(stats["stats"]["wr_bytes"])
        raise RuntimeError(f"QEMU reports no drive for {image}")

    def counters(self) -> Counters:
        self.run("sync")
        dev = self.device
        out = self.run(f"cat /proc/uptime /sys/fs/ext4/{dev}/lifetime_write_kbytes /sys/block/{dev}/stat")
        uptime, kbytes, stat = out.strip().splitlines()[-3:]
        text = self.metrics()
        return Counters(float(uptime.split()[0]), int(kbytes), int(stat.split()[6]), self.qemu_written(),
                        metric(text, "fl_agent_camera_frames_captured_total"),
                        metric(text, "fl_agent_camera_frames_labelled_total", 'outcome="labelled"'))

    def off(self) -> None:
        if self.qemu.status:
            self.qemu.off()


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}" + (rf"\{{{re.escape(labels)}\}}" if labels else "") + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def measure(guest: Guest, idle_minutes: float, minutes: float) -> tuple[Phase, Phase, str]:
    guest.wait_for("fl-agent active", lambda: guest.shell.run(f"systemctl is-active --quiet {AGENT}")[2] == 0, 300)
    guest.device = Path(guest.run("findmnt -no SOURCE /data").strip().splitlines()[-1]).name
    print(f"[wear] agent active; data partition /dev/{guest.device}; idle phase {idle_minutes:g} min", flush=True)
    start = guest.counters()
    time.sleep(idle_minutes * 60)
    idle = Phase("no camera", start, guest.counters())
    guest.run(VIVID)
    # fl-agent.service's DeviceAllow=char-video4linux is resolved from /proc/devices when the unit starts,
    # and that group exists only once videodev is loaded: a first camera that appears after boot cannot be
    # opened (EPERM) until the agent restarts. On a device the camera is there at boot; here, restart.
    guest.run(f"systemctl restart {AGENT}", timeout=300)
    guest.wait_for("frames stored", lambda: metric(guest.metrics(), "fl_agent_camera_frames_labelled_total",
                                                   'outcome="labelled"') > 0, 300)
    print(f"[wear] vivid capturing and frames labelled; camera phase {minutes:g} min", flush=True)
    start = guest.counters()
    time.sleep(minutes * 60)
    camera = Phase("camera", start, guest.counters())
    files = guest.run(f"ls -la {FRAMES_DIR} | tail -n 4; du -sk {FRAMES_DIR}; ls {FRAMES_DIR} | wc -l")
    return idle, camera, files


def card_life_years(bytes_per_day: float, card_gb: float, pe_cycles: int, waf: float, tbw: float | None) -> float:
    endurance = tbw * 1e12 if tbw is not None else card_gb * 1e9 * pe_cycles / waf
    return endurance / bytes_per_day / 365.25


def report(idle: Phase, camera: Phase, args: argparse.Namespace, image: str, accel: str) -> None:
    mb = 1e6
    print(f"\nflash wear of the data partition: image {image}, {accel.upper()}, default settings, "
          f"no aggregator (no rounds)")
    print(f"{'phase':<10} {'minutes':>7} {'samples/s':>9} {'stored/s':>8} {'ext4 MB/day':>11} "
          f"{'block MB/day':>12} {'QEMU MB/day':>11}")
    for p in (idle, camera):
        print(f"{p.name:<10} {p.seconds / 60:>7.1f} {p.samples_per_s:>9.2f} {p.stored_per_s:>8.2f} "
              f"{p.per_day('ext4_kb', 1024) / mb:>11.1f} {p.per_day('sectors', 512) / mb:>12.1f} "
              f"{p.per_day('qemu_bytes', 1) / mb:>11.1f}")
    idle_day = idle.per_day("sectors", 512)
    camera_share = camera.per_day("sectors", 512) - idle_day
    rate = camera.samples_per_s * SAMPLE_INTERVAL_S
    at_default = idle_day + (camera_share / rate if 0 < rate < 1 else camera_share)
    stored = camera.end.stored - camera.start.stored
    per_frame = camera_share * camera.seconds / DAY / stored if stored else float("nan")
    print(f"camera's share: {camera_share / mb:.1f} MB/day at {rate:.2f} of the default sample rate "
          f"({per_frame / 1024:.1f} kB written per stored frame)")
    print(f"projected at one sample a second: {at_default / 1e9:.3f} GB/day to the data partition "
          f"(target <= 1 GB/day)")
    if args.tbw is not None:
        basis = f"a vendor rating of {args.tbw:g} TBW"
    else:
        basis = (f"{args.card_gb:g} GB x {args.pe_cycles:,} P/E cycles = {args.card_gb * args.pe_cycles / 1000:g} TB "
                 f"of NAND writes, write amplification {args.waf:g}")
    years = card_life_years(at_default, args.card_gb, args.pe_cycles, args.waf, args.tbw)
    print(f"card life: {years:,.0f} years ({basis})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the phase with a camera")
    parser.add_argument("--idle-minutes", type=float, default=3.0, help="length of the phase without one")
    parser.add_argument("--image", type=Path, help="a built image directory (default: build or take from the cache)")
    parser.add_argument("--workdir", type=Path, help="keep the data partition and console log here")
    parser.add_argument("--card-gb", type=float, default=32.0)
    parser.add_argument("--pe-cycles", type=int, default=3000, help="rated program/erase cycles (MLC: 3,000)")
    parser.add_argument("--waf", type=float, default=4.0, help="write amplification assumed inside the card")
    parser.add_argument("--tbw", type=float, help="the card's rated terabytes written (replaces the three above)")
    args = parser.parse_args(argv)
    if args.minutes < 5 or args.idle_minutes <= 0:
        parser.error("--minutes must be >= 5 (the frame buffer writes a batch a minute; a shorter phase "
                     "measures when the batches fall, not their rate) and --idle-minutes > 0")
    art = ImageArtifacts.load(args.image) if args.image else build_image()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fl-wear-"))
    workdir.mkdir(parents=True, exist_ok=True)
    guest = Guest(art, workdir)
    try:
        idle, camera, files = measure(guest, args.idle_minutes, args.minutes)
    except RuntimeError as exc:
        print(f"flash_wear: {exc}; the agent's last log lines:", file=sys.stderr)
        print(guest.shell.run(f"journalctl -u {AGENT} -n 25 -o cat --no-pager")[0], file=sys.stderr)
        return 1
    finally:
        guest.off()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{FRAMES_DIR} at the end:\n{files}")
    report(idle, camera, args, art.manifest.get("key", art.directory.name), guest.accel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
