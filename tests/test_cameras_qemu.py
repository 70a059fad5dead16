"""The V4L2 capture code against the kernel's real vivid driver, in a small QEMU guest.

This host has no V4L2 devices and cannot load modules, so the ioctl layer, the conversions and the "camera
gone" handling are checked in a guest: the Debian kernel the image ships, booted directly with an
initramfs of busybox, the host's python3.11 (with numpy copied from the venv) and appliance's camera
modules; vivid and its dependencies are insmod-ed from the kernel package. No udevd runs there (the
QEMU rig of the full image covers udev hotplug); discovery uses the QUERYCAP fallback and a socketpair
monitor fed with the events the test itself causes.

What the guest checks and reports:
- QUERYCAP/ENUM_FMT on /dev/video0; a frame through CaptureSession (GREY preferred) and one through a
  hand-set YUYV format: vivid's colour bars must come out as 8 bands of falling luma, both paths alike;
- while the agent streams (hold_open), `rmmod vivid` fails (the open file holds the module); after the
  session closes it succeeds - why capture releases the device between samples by default;
- CameraManager with per-sample sessions: frames flow; `rmmod vivid` while it runs succeeds in a gap
  between samples; the remove event stops the camera; no error is counted;
- CameraManager streaming (hold_open) when the driver is unbound from sysfs mid-capture: counted as
  "disconnected", the device is closed, nothing raises.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import qemu_guest as guest

pytestmark = pytest.mark.qemu

GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "FL-GUEST-START"
/usr/bin/python3 /app/guest.py
echo "FL-GUEST-EXIT $?"
poweroff -f
"""

GUEST_SCRIPT = r'''
import asyncio, json, logging, os, subprocess, sys, time, traceback
sys.path.insert(0, "/app")
import numpy as np
from appliance import v4l2
from appliance.cameras import (CameraManager, CaptureSession, CaptureSettings, format_camera_table,
                               list_cameras)

logging.basicConfig(level=logging.INFO, format="guest %(levelname)s %(name)s: %(message)s")
MODS = [line.split() for line in open("/app/modules.txt").read().splitlines() if line]
VIVID_ARGS = ["n_devs=1", "node_types=0x1", "num_inputs=1"]


def sh(*cmd):
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    return done.returncode, (done.stdout + done.stderr).strip()


def load_vivid():
    for name, path in MODS:
        args = VIVID_ARGS if name == "vivid" else []
        sh("insmod", path, *args)
    for _ in range(100):
        if os.path.exists("/dev/video0"):
            return True
        time.sleep(0.1)
    return False


def fds_on_video():
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/video"):
                found.append(fd)
        except OSError:
            pass
    return found


class Dev:
    """A pyudev-like device for the discovery code: kernel uevent keys only (no udevd here)."""
    def __init__(self, action=None):
        self.action = action
        self.subsystem = "video4linux"
        self.device_node = "/dev/video0"
        self.sys_path = "/sys/class/video4linux/video0"
        self.properties = {"DEVNAME": "/dev/video0", "SUBSYSTEM": "video4linux"}


class Context:
    def list_devices(self, subsystem=None):
        return [Dev()] if os.path.exists("/dev/video0") else []


class Monitor:
    def __init__(self):
        import socket, collections
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.events = collections.deque()
    def filter_by(self, subsystem, device_type=None): pass
    def start(self): pass
    def fileno(self): return self.r.fileno()
    def emit(self, dev):
        self.events.append(dev); self.w.send(b"x")
    def poll(self, timeout=None):
        try:
            self.r.recv(1)
        except BlockingIOError:
            return None
        return self.events.popleft() if self.events else None


def bands(gray):
    # bottom quarter only: vivid writes its status text over the top of the picture
    cols = gray[-gray.shape[0] // 4:].astype(float).mean(axis=0)
    w = len(cols)
    return [round(float(cols[int((i + 0.5) * w / 8)]), 1) for i in range(8)]


async def grab_once(settings):
    session = CaptureSession("/dev/video0", settings)
    fmt = session.open()
    try:
        gray = await session.grab()
    finally:
        session.close()
    return fmt, gray


def grab_yuyv():
    dev = v4l2.V4L2Device("/dev/video0")
    with dev:
        fmt = dev.set_format(v4l2.fourcc("YUYV"), 320, 240)
        dev.start_streaming(2)
        import select
        for _ in range(3):  # skip two, keep the third
            select.select([dev.fileno()], [], [], 5)
            buf = dev.dequeue()
            data = dev.buffer_bytes(buf)
            dev.requeue(buf.index)
    return fmt, v4l2.to_gray(data, fmt)


async def manager_run(report, hold_open, removal):
    monitor = Monitor()
    frames = []
    # per-sample sessions get a 1 s interval: the camera is free only for what is left of the interval after
    # a sample, and one sample (open, format, stream, settle, grab, close) can take most of 0.3 s under TCG
    settings = CaptureSettings(interval_s=1.0 if not hold_open else 0.2, hold_open=hold_open,
                               frame_timeout_s=10)
    manager = CameraManager(settings, frames.append, context=Context(), monitor=monitor)
    await manager.start()
    t0 = time.monotonic()
    while len(frames) < 3 and time.monotonic() - t0 < 60:
        await asyncio.sleep(0.1)
    out = {"frames_before": len(frames), "present_before": manager.stats.cameras_present}
    if removal == "rmmod":
        attempts, rc, msg, t1 = 0, 1, "", time.monotonic()
        while rc != 0 and time.monotonic() - t1 < 30:
            attempts += 1
            rc, msg = await asyncio.to_thread(sh, "rmmod", "vivid")
            if rc != 0:
                await asyncio.sleep(0.05)
        out.update(rmmod_rc=rc, rmmod_attempts=attempts, rmmod_msg=msg,
                   rmmod_seconds=round(time.monotonic() - t1, 2))
        monitor.emit(Dev("remove"))   # what udev would send
    else:
        rc, msg = await asyncio.to_thread(sh, "sh", "-c", "echo vivid.0 > /sys/bus/platform/drivers/vivid/unbind")
        out.update(unbind_rc=rc, unbind_msg=msg)
        t1 = time.monotonic()
        while not manager.stats.capture_errors_total.get("disconnected") and time.monotonic() - t1 < 20:
            await asyncio.sleep(0.1)
        monitor.emit(Dev("remove"))
    t1 = time.monotonic()
    while manager.stats.cameras_present and time.monotonic() - t1 < 10:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    out.update(present_after=manager.stats.cameras_present, frames=manager.stats.frames_captured_total,
               errors=dict(manager.stats.capture_errors_total), fds_open=fds_on_video())
    await manager.stop()
    out["pixels_shape"] = list(frames[0].pixels.shape) if frames else None
    out["pixels_range"] = [float(frames[0].pixels.min()), float(frames[0].pixels.max())] if frames else None
    report[f"manager_{removal}"] = out


def main():
    report = {}
    report["vivid_loaded"] = load_vivid()
    dev = v4l2.V4L2Device("/dev/video0")
    with dev:
        cap = dev.querycap()
        report["cap"] = dict(driver=cap.driver, card=cap.card, bus=cap.bus_info,
                             device_caps=cap.device_caps, can_capture=cap.can_capture)
        report["formats"] = [f.fourcc for f in dev.formats()]
    report["table"] = format_camera_table(list_cameras(context=Context()))
    fmt, gray = asyncio.run(grab_once(CaptureSettings(settle_frames=2)))
    report["session"] = dict(fourcc=fmt.fourcc, width=fmt.width, height=fmt.height,
                             bytesperline=fmt.bytesperline, shape=list(gray.shape), bands=bands(gray))
    fmt2, gray2 = grab_yuyv()
    report["yuyv"] = dict(fourcc=fmt2.fourcc, width=fmt2.width, height=fmt2.height,
                          bytesperline=fmt2.bytesperline, shape=list(gray2.shape), bands=bands(gray2))

    # rmmod while streaming vs after close
    async def hold():
        session = CaptureSession("/dev/video0", CaptureSettings())
        session.open()
        await session.grab()
        rc_open = sh("rmmod", "vivid")
        session.close()
        rc_closed = sh("rmmod", "vivid")
        return rc_open, rc_closed
    (rc_open, msg_open), (rc_closed, msg_closed) = asyncio.run(hold())
    report["rmmod_while_open"] = [rc_open, msg_open]
    report["rmmod_after_close"] = [rc_closed, msg_closed, os.path.exists("/dev/video0")]

    report["reloaded_1"] = load_vivid()
    asyncio.run(manager_run(report, hold_open=False, removal="rmmod"))
    report["reloaded_2"] = load_vivid()
    asyncio.run(manager_run(report, hold_open=True, removal="unbind"))
    print("FL-REPORT " + json.dumps(report), flush=True)


try:
    main()
except BaseException:
    print("FL-REPORT " + json.dumps({"error": traceback.format_exc()}), flush=True)
'''


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import numpy

    guest.need("cpio")
    kernel = guest.kernel(("vivid",))
    numpy_dir = Path(numpy.__file__).parent
    files: dict[str, str | Path] = {"/app/numpy": numpy_dir, **guest.appliance_package(), "/app/guest.py": GUEST_SCRIPT}
    if (numpy_dir.parent / "numpy.libs").exists():
        files["/app/numpy.libs"] = numpy_dir.parent / "numpy.libs"
    names = [module.name.split(".")[0].replace("-", "_") for module in kernel.modules]
    files["/app/modules.txt"] = "".join(f"{name} {path}\n" for name, path in
                                        zip(names, guest.guest_module_paths(kernel.modules), strict=True))
    initrd = guest.initramfs(tmp_path_factory.mktemp("guest"), GUEST_INIT, files, kernel.modules)
    console = guest.boot(kernel, initrd, memory_mb=1024)
    lines = guest.marked(console, "FL-REPORT")
    assert lines, f"no report from the guest; console tail:\n{console[-3000:]}"
    data = json.loads(lines[-1])
    assert "error" not in data, data.get("error")
    print("guest report:", json.dumps(data, indent=1))
    data["console"] = console
    return data


def _falling(bands: list[float]) -> bool:
    return all(a > b for a, b in itertools.pairwise(bands))


def test_vivid_is_queried_and_listed(report: dict) -> None:
    assert report["vivid_loaded"]
    cap = report["cap"]
    assert cap["driver"] == "vivid" and cap["card"] == "vivid" and cap["can_capture"]
    assert {"YUYV", "GREY"} <= set(report["formats"])
    row = report["table"].splitlines()[1]
    assert row.startswith("/dev/video0") and "vivid" in row and "YUYV" in row


def test_frames_from_vivid_show_its_colour_bars(report: dict) -> None:
    session, yuyv = report["session"], report["yuyv"]
    assert session["fourcc"] == "GREY"  # preferred: luma without conversion
    assert session["shape"] == [session["height"], session["width"]]
    assert yuyv["fourcc"] == "YUYV" and yuyv["bytesperline"] >= 2 * yuyv["width"]
    # vivid's default pattern, 75% colour bars: white, yellow, cyan, green, magenta, red, blue, black. The
    # white band's bottom is drawn over in this mode, so the check starts at yellow: luma falls band by band.
    assert _falling(session["bands"][1:]), session
    assert _falling(yuyv["bands"][1:]), yuyv
    # GREY is full range (black 0), YUYV limited range (black 16): both arrive unscaled
    assert session["bands"][-1] <= 3 and abs(yuyv["bands"][-1] - 16) <= 3


def test_an_open_stream_pins_the_module_and_closing_releases_it(report: dict) -> None:
    rc_open, msg_open = report["rmmod_while_open"]
    # kmod says "Module vivid is in use", busybox "Resource temporarily unavailable" (EAGAIN)
    assert rc_open != 0 and ("in use" in msg_open or "temporarily unavailable" in msg_open), msg_open
    rc_closed, _msg, node_still_there = report["rmmod_after_close"]
    assert rc_closed == 0 and not node_still_there


def test_rmmod_while_the_manager_samples(report: dict) -> None:
    out = report["manager_rmmod"]
    print({k: v for k, v in out.items()})
    assert out["frames_before"] >= 3 and out["present_before"] == 1
    assert out["pixels_shape"] == [1, 32, 32] and 0 <= out["pixels_range"][0] <= out["pixels_range"][1] <= 255
    assert out["rmmod_rc"] == 0, out
    assert out["present_after"] == 0 and out["fds_open"] == []
    assert not {k: v for k, v in out["errors"].items() if k != "disconnected"}, out["errors"]


def test_driver_unbound_mid_stream_is_a_clean_disconnect(report: dict) -> None:
    out = report["manager_unbind"]
    print({k: v for k, v in out.items()})
    assert out["unbind_rc"] == 0 and out["frames_before"] >= 3
    assert out["errors"].get("disconnected") == 1, out["errors"]
    assert out["present_after"] == 0 and out["fds_open"] == []
    assert "Traceback" not in report["console"]
