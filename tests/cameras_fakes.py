"""Test doubles for the camera code: a kernel-side fake V4L2 device, udev devices built from recorded
properties, and a udev monitor whose socket really sits in the asyncio loop.

The fake V4L2 device reads and writes the ioctl arguments as raw bytes at the offsets the kernel headers
give (x86_64), not through appliance.v4l2's ctypes field names, so a wrong struct layout fails the tests.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import v4l2

DATA = Path(__file__).parent / "data" / "udev"


# --- udev ------------------------------------------------------------------------------------------

@dataclass
class FakeUdevDevice:
    """Looks like pyudev.Device to appliance.cameras: built from a recorded property dict."""

    properties: dict[str, str]
    sys_path: str = ""
    action: str | None = None

    @property
    def subsystem(self) -> str | None:
        return self.properties.get("SUBSYSTEM")

    @property
    def device_node(self) -> str | None:
        return self.properties.get("DEVNAME")

    def with_action(self, action: str) -> FakeUdevDevice:
        return FakeUdevDevice(dict(self.properties), self.sys_path, action)

    def with_node(self, node: str) -> FakeUdevDevice:
        props = dict(self.properties, DEVNAME=node)
        return FakeUdevDevice(props, self.sys_path, self.action)


def recorded(name: str) -> FakeUdevDevice:
    """A device from tests/data/udev/<name>.json (the `python -m appliance.cameras record` format)."""
    data = json.loads((DATA / f"{name}.json").read_text())
    return FakeUdevDevice(dict(data["properties"]), data["sys_path"])


class FakeContext:
    def __init__(self, devices: list[FakeUdevDevice] | None = None) -> None:
        self.devices = list(devices or [])

    def list_devices(self, subsystem: str | None = None) -> list[FakeUdevDevice]:
        return [d for d in self.devices if subsystem is None or d.subsystem == subsystem]


class FakeMonitor:
    """A udev monitor over a socketpair: `emit()` queues an event and makes the socket readable, so
    CameraManager's loop.add_reader path runs exactly as with the netlink socket."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._events: collections.deque[Any] = collections.deque()
        self.filters: list[str] = []
        self.started = False
        self.fail_next_poll: OSError | None = None

    def filter_by(self, subsystem: str, device_type: str | None = None) -> None:
        self.filters.append(subsystem)

    def start(self) -> None:
        self.started = True

    def fileno(self) -> int:
        return self._reader.fileno()

    def emit(self, device: FakeUdevDevice) -> None:
        self._events.append(device)
        self._writer.send(b"x")

    def poll(self, timeout: float | None = None) -> FakeUdevDevice | None:
        assert timeout == 0, "the manager must never block in poll()"
        try:
            self._reader.recv(1)
        except BlockingIOError:
            return None
        if self.fail_next_poll is not None:
            exc, self.fail_next_poll = self.fail_next_poll, None
            raise exc
        return self._events.popleft() if self._events else None

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


# --- V4L2 ------------------------------------------------------------------------------------------

def yuyv_frame(luma: bytes | bytearray, width: int, height: int, stride: int | None = None) -> bytes:
    """Pack a (height*width) luma plane as YUYV with neutral chroma (128) and optional row padding."""
    stride = stride or width * 2
    out = bytearray(stride * height)
    for y in range(height):
        row = out[y * stride: y * stride + width * 2]
        row[0::2] = luma[y * width:(y + 1) * width]
        row[1::2] = bytes([128]) * width
        out[y * stride: y * stride + width * 2] = row
    return bytes(out)


@dataclass
class FakeCamera:
    path: str
    width: int = 64
    height: int = 48
    formats: list[tuple[str, str, int]] = field(default_factory=lambda: [("YUYV", "YUYV 4:2:2", 0)])
    card: str = "vivid"
    driver: str = "vivid"
    device_caps: int = v4l2.V4L2_CAP_VIDEO_CAPTURE | v4l2.V4L2_CAP_STREAMING | v4l2.V4L2_CAP_READWRITE
    stride_pad: int = 0
    luma: Callable[[int], bytes] | None = None  # frame sequence -> width*height luma bytes
    gone: bool = False
    busy: bool = False
    # state
    pixelformat: int = 0
    buffers: list[bytearray] = field(default_factory=list)
    queued: collections.deque[int] = field(default_factory=collections.deque)
    done: collections.deque[int] = field(default_factory=collections.deque)
    used: dict[int, int] = field(default_factory=dict)    # buffer index -> bytesused
    seqs: dict[int, int] = field(default_factory=dict)    # buffer index -> frame sequence
    streaming: bool = False
    sequence: int = 0
    dropped: int = 0
    streamons: int = 0

    @property
    def bytesperline(self) -> int:
        return self.width * 2 + self.stride_pad

    def frame_bytes(self, seq: int) -> bytes:
        luma = self.luma(seq) if self.luma else bytes((seq + x) % 256 for x in range(self.width * self.height))
        return yuyv_frame(luma, self.width, self.height, self.bytesperline)


class FakeMapping:
    def __init__(self, buf: bytearray) -> None:
        self._buf = buf
        self.closed = False

    def __getitem__(self, key: slice) -> bytes:
        if self.closed:
            raise ValueError("mmap closed or invalid")
        return bytes(self._buf[key])

    def close(self) -> None:
        self.closed = True


@dataclass
class _Handle:
    camera: FakeCamera
    wake_fd: int


class FakeV4L2IO:
    """appliance.v4l2.DeviceIO over FakeCameras. Each open() gets a real pipe fd that is readable while
    a filled buffer waits (or the device is gone), like poll() on a V4L2 node."""

    def __init__(self, *cameras: FakeCamera) -> None:
        self.cameras = {c.path: c for c in cameras}
        self.handles: dict[int, _Handle] = {}
        self.maps: list[FakeMapping] = []
        self.opens = 0
        self.ioctl_log: list[int] = []

    # -- the DeviceIO protocol --
    def open(self, path: str) -> int:
        cam = self.cameras.get(path)
        if cam is None or cam.gone:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if cam.busy:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.handles[r] = _Handle(cam, w)
        self.opens += 1
        return r

    def close(self, fd: int) -> None:
        handle = self.handles.pop(fd)
        os.close(fd)
        os.close(handle.wake_fd)

    def mmap(self, fd: int, length: int, offset: int) -> FakeMapping:
        cam = self._camera(fd)
        index = offset // 0x100000
        assert length == len(cam.buffers[index])
        mapping = FakeMapping(cam.buffers[index])
        self.maps.append(mapping)
        return mapping

    def ioctl(self, fd: int, request: int, arg: Any) -> None:
        cam = self._camera(fd)
        self.ioctl_log.append(request)
        mv = memoryview(arg).cast("B")
        if cam.gone:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        handler = {
            0x80685600: self._querycap, 0xC0405602: self._enum_fmt, 0xC0D05605: self._s_fmt,
            0xC0145608: self._reqbufs, 0xC0585609: self._querybuf, 0xC058560F: self._qbuf,
            0xC0585611: self._dqbuf, 0x40045612: self._streamon, 0x40045613: self._streamoff,
        }.get(request)
        if handler is None:
            raise OSError(errno.ENOTTY, f"fake V4L2: ioctl 0x{request:08x} not emulated")
        handler(cam, mv)
        self._signal(cam)

    # -- kernel side, offsets from <linux/videodev2.h> on x86_64 --
    def _querycap(self, cam: FakeCamera, mv: memoryview) -> None:
        struct.pack_into("<16s32s32sIII", mv, 0, cam.driver.encode(), cam.card.encode(),
                         b"platform:vivid-000", 0x060100, cam.device_caps | v4l2.V4L2_CAP_DEVICE_CAPS,
                         cam.device_caps)

    def _enum_fmt(self, cam: FakeCamera, mv: memoryview) -> None:
        index, buf_type = struct.unpack_from("<II", mv, 0)
        assert buf_type == 1
        if index >= len(cam.formats):
            raise OSError(errno.EINVAL, "no more formats")
        code, desc, flags = cam.formats[index]
        struct.pack_into("<I", mv, 8, flags)
        struct.pack_into("<32s", mv, 12, desc.encode())
        struct.pack_into("<I", mv, 44, v4l2.fourcc(code))

    def _s_fmt(self, cam: FakeCamera, mv: memoryview) -> None:
        assert struct.unpack_from("<I", mv, 0)[0] == 1
        requested = struct.unpack_from("<I", mv, 16)[0]
        offered = [v4l2.fourcc(c) for c, _, _ in cam.formats]
        cam.pixelformat = requested if requested in offered else offered[0]
        # like a fixed-size webcam: whatever size is asked, the driver answers with its own
        struct.pack_into("<IIII", mv, 8, cam.width, cam.height, cam.pixelformat, 1)
        struct.pack_into("<II", mv, 24, cam.bytesperline, cam.bytesperline * cam.height)

    def _reqbufs(self, cam: FakeCamera, mv: memoryview) -> None:
        count, buf_type, memory = struct.unpack_from("<III", mv, 0)
        assert (buf_type, memory) == (1, 1)
        if cam.streaming:
            raise OSError(errno.EBUSY, "streaming")
        count = min(count, 4)
        cam.buffers = [bytearray(cam.bytesperline * cam.height) for _ in range(count)]
        cam.queued.clear()
        cam.done.clear()
        struct.pack_into("<I", mv, 0, count)

    def _querybuf(self, cam: FakeCamera, mv: memoryview) -> None:
        index = struct.unpack_from("<I", mv, 0)[0]
        if index >= len(cam.buffers):
            raise OSError(errno.EINVAL, "bad index")
        struct.pack_into("<I", mv, 64, index * 0x100000)
        struct.pack_into("<I", mv, 72, len(cam.buffers[index]))

    def _qbuf(self, cam: FakeCamera, mv: memoryview) -> None:
        index, buf_type = struct.unpack_from("<II", mv, 0)
        memory = struct.unpack_from("<I", mv, 60)[0]
        assert (buf_type, memory) == (1, 1)
        if index >= len(cam.buffers) or index in cam.queued or index in cam.done:
            raise OSError(errno.EINVAL, "bad index")
        cam.queued.append(index)

    def _dqbuf(self, cam: FakeCamera, mv: memoryview) -> None:
        if not cam.done:
            raise BlockingIOError(errno.EAGAIN, "no buffer ready")
        index = cam.done.popleft()
        struct.pack_into("<IIII", mv, 0, index, 1, cam.used[index], 0)
        struct.pack_into("<I", mv, 56, cam.seqs[index])

    def _streamon(self, cam: FakeCamera, mv: memoryview) -> None:
        assert struct.unpack_from("<i", mv, 0)[0] == 1
        cam.streaming = True
        cam.streamons += 1

    def _streamoff(self, cam: FakeCamera, mv: memoryview) -> None:
        cam.streaming = False
        cam.queued.clear()
        cam.done.clear()

    # -- test controls --
    def _camera(self, fd: int) -> FakeCamera:
        handle = self.handles.get(fd)
        if handle is None:
            raise OSError(errno.EBADF, "bad fd")
        return handle.camera

    def _signal(self, cam: FakeCamera) -> None:
        for fd, handle in self.handles.items():
            if handle.camera is not cam:
                continue
            if cam.done or cam.gone:
                with contextlib.suppress(BlockingIOError):
                    os.write(handle.wake_fd, b"x")
            else:
                try:
                    while os.read(fd, 4096):
                        pass
                except BlockingIOError:
                    pass

    def tick(self) -> None:
        """One frame period: every streaming camera fills its next queued buffer (or drops a frame)."""
        for cam in self.cameras.values():
            if not cam.streaming or cam.gone:
                continue
            if not cam.queued:
                cam.dropped += 1
                cam.sequence += 1
                continue
            index = cam.queued.popleft()
            data = cam.frame_bytes(cam.sequence)
            cam.buffers[index][: len(data)] = data
            cam.used[index] = len(data)
            cam.seqs[index] = cam.sequence
            cam.sequence += 1
            cam.done.append(index)
            self._signal(cam)

    def unplug(self, path: str) -> None:
        """The device goes away: every later call answers ENODEV and waiting readers wake up."""
        cam = self.cameras[path]
        cam.gone = True
        cam.streaming = False
        self._signal(cam)

    def open_count(self) -> int:
        return len(self.handles)


def managers_over_fakes(monkeypatch: Any, dev: FakeUdevDevice, io: FakeV4L2IO,
                        on_made: Callable[[], None] | None = None) -> list[Any]:
    """Make ``appliance.cameras.CameraManager`` build its managers over fakes: a udev context holding ``dev``, a
    silent monitor and ``io``. Returns the list each manager made is added to; ``on_made()`` runs after each (in the
    agent's event loop, where camera_task makes its manager)."""
    from appliance import cameras

    made: list[Any] = []
    real = cameras.CameraManager

    def manager_with_fakes(settings: Any, on_frame: Any) -> Any:
        made.append(real(settings, on_frame, context=FakeContext([dev]), monitor=FakeMonitor(), io=io))
        if on_made is not None:
            on_made()
        return made[0]

    monkeypatch.setattr(cameras, "CameraManager", manager_with_fakes)
    return made
