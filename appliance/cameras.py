"""Cameras: udev discovery and hotplug, V4L2 capture at a low rate, frames into the labelled buffer.

- Discovery: pyudev enumerates video4linux nodes; a node is a camera when udev says it captures
  (ID_V4L_CAPABILITIES contains ":capture:", set by systemd's v4l_id) or, when udev did not run v4l_id,
  when VIDIOC_QUERYCAP says so. FL_AGENT_CAMERA=0/1 (set by a udev rule) overrides both.
- Hotplug: a pyudev Monitor's socket sits in the asyncio loop (`loop.add_reader`, no thread). An added
  camera gets a capture task; a removed one has its task cancelled, whatever it was doing.
- Capture: each sample opens the node, negotiates a raw format, streams until a fresh frame arrives,
  and closes it again (unless `hold_open`), so between samples the camera is free: other programs can use
  it and its driver module can be unloaded. ENODEV/EIO mid-frame is a camera that went away, not a crash.
- Frames: grayscale, area-downscaled to the model's (1, 32, 32) and kept as captured, uint8 0..255; a
  second, larger view (float32 in [0, 1]) feeds the motion labeller. `FrameRecorder` labels them per
  camera and keeps the labelled ones in the bounded `FrameBuffer`, each with its count (the counting
  classifier's label) and its pseudo-boxes (the detector's). Frames never leave the device.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import functools
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from appliance.framebuffer import BOX_SLOTS, CAMERA_FRAME_SHAPE, FrameBuffer
from appliance.labels import MotionLabeller, MotionLabelSettings
from appliance.storage_errors import storage_reason
from appliance.v4l2 import (
    GRAY_CONVERTERS,
    KERNEL_IO,
    DeviceIO,
    FormatDesc,
    PixFormat,
    V4L2Device,
    area_resize,
    fourcc_str,
    to_gray,
)

log = logging.getLogger(__name__)

SUBSYSTEM = "video4linux"

# Low-cardinality reasons for fl_agent_camera_capture_errors_total{reason=...}.
ERROR_REASONS = ("disconnected", "timeout", "busy", "permission", "no_supported_format", "not_capture",
                 "bad_frame", "io_error", "handler", "udev")


# --- discovery -------------------------------------------------------------------------------------

class UdevDevice(Protocol):
    """The part of pyudev.Device this module reads (tests build these from recorded properties)."""

    @property
    def subsystem(self) -> str | None: ...
    @property
    def device_node(self) -> str | None: ...
    @property
    def sys_path(self) -> str: ...
    @property
    def action(self) -> str | None: ...
    @property
    def properties(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class CameraInfo:
    """A capture node as the agent sees it. `formats` are fourccs; filled when the node was opened."""

    path: str
    name: str
    driver: str = ""
    formats: tuple[str, ...] = ()
    error: str = ""          # why the node could not be queried, if it could not

    @property
    def label(self) -> str:
        return self.name or self.driver or "unknown"


def _is_capture_caps(value: str) -> bool:
    return ":capture:" in value


def capture_decision(device: UdevDevice, io: DeviceIO = KERNEL_IO) -> bool:
    """Is this udev device a camera the agent should capture from?"""
    if device.subsystem != SUBSYSTEM:
        return False
    props = device.properties
    node = device.device_node or props.get("DEVNAME")
    if not node or not os.path.basename(node).startswith("video"):
        return False  # vbi*, radio*, swradio*, v4l-subdev*, v4l-touch*: never frames for us
    override = props.get("FL_AGENT_CAMERA")
    if override in ("0", "1"):
        return override == "1"
    caps = props.get("ID_V4L_CAPABILITIES")
    if caps is not None:
        return _is_capture_caps(caps)
    # udev did not run v4l_id (a container, or no udevd): ask the driver.
    try:
        with V4L2Device(node, io) as dev:
            return dev.querycap().can_capture
    except OSError as exc:
        log.debug("cannot query %s: %s", node, exc)
        return False


def camera_from_udev(device: UdevDevice) -> CameraInfo:
    props = device.properties
    path = device.device_node or props.get("DEVNAME", "")
    name = props.get("ID_V4L_PRODUCT") or props.get("ID_MODEL_FROM_DATABASE") or props.get("ID_MODEL", "")
    return CameraInfo(path=path, name=name, driver=props.get("ID_USB_DRIVER", ""))


def probe(info: CameraInfo, io: DeviceIO = KERNEL_IO) -> CameraInfo:
    """Open the node briefly: driver, card name and offered formats (for `fl-agent cameras`)."""
    try:
        with V4L2Device(info.path, io) as dev:
            cap = dev.querycap()
            formats = tuple(f.fourcc for f in dev.formats())
    except OSError as exc:
        return CameraInfo(info.path, info.name, info.driver, info.formats,
                          error=os.strerror(exc.errno) if exc.errno else str(exc))
    return CameraInfo(info.path, info.name or cap.card, cap.driver or info.driver, formats)


def discover(context: Any = None, io: DeviceIO = KERNEL_IO) -> list[CameraInfo]:
    """The capture cameras present now (udev view only; see `list_cameras` for driver details)."""
    if context is None:
        import pyudev

        context = pyudev.Context()
    found = [camera_from_udev(d) for d in context.list_devices(subsystem=SUBSYSTEM) if capture_decision(d, io)]
    return sorted(found, key=lambda c: _node_sort_key(c.path))


def _node_sort_key(path: str) -> tuple[str, int]:
    base = path.rstrip("0123456789")
    digits = path[len(base):]
    return base, int(digits) if digits else -1


def list_cameras(context: Any = None, io: DeviceIO = KERNEL_IO) -> list[CameraInfo]:
    """Every capture camera with its driver and formats: what `fl-agent cameras` prints."""
    return [probe(c, io) for c in discover(context, io)]


def format_camera_table(cameras: Iterable[CameraInfo]) -> str:
    """A plain-text table (PATH NAME DRIVER FORMATS), or a sentence when there is none."""
    rows = [(c.path, c.label, c.driver or "-", " ".join(c.formats) if c.formats else f"({c.error or 'none'})")
            for c in cameras]
    if not rows:
        return "no capture cameras found (video4linux devices with capture capability)\n"
    header = ("PATH", "NAME", "DRIVER", "FORMATS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:3])) + "  " + r[3]
             for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines) + "\n"


# --- capture ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptureSettings:
    interval_s: float = 1.0                        # one sample per camera per interval
    frame_shape: tuple[int, int, int] = CAMERA_FRAME_SHAPE  # the model's input (channels, height, width)
    label_size: tuple[int, int] = (64, 64)         # the view the motion labeller works on
    request_size: tuple[int, int] = (320, 240)     # asked of the driver, which picks the nearest it has
    settle_frames: int = 1                         # frames dropped after STREAMON (exposure, stale data)
    frame_timeout_s: float = 5.0
    hold_open: bool = False                        # keep streaming between samples
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.frame_timeout_s <= 0:
            raise ValueError(f"interval_s and frame_timeout_s must be > 0, got {self.interval_s}, "
                             f"{self.frame_timeout_s}")
        if self.frame_shape[0] != 1 or min(self.frame_shape) < 1:
            raise ValueError(f"frame_shape must be (1, height, width) for grayscale, got {self.frame_shape}")
        if self.settle_frames < 0:
            raise ValueError(f"settle_frames must be >= 0, got {self.settle_frames}")


class CaptureError(Exception):
    """A capture problem with a stable, low-cardinality `reason` (one of ERROR_REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_GONE = {errno.ENODEV, errno.ENXIO, errno.EIO, errno.ENOENT, errno.ESHUTDOWN}


def error_reason(exc: BaseException) -> str:
    """Map an exception from capture to its metric reason."""
    if isinstance(exc, CaptureError):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        if exc.errno in _GONE:
            return "disconnected"
        if exc.errno == errno.EBUSY:
            return "busy"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission"
        return "io_error"
    if isinstance(exc, ValueError):
        return "bad_frame"
    return "io_error"


# Negotiation order: formats that give luma for free first.
PREFERRED_FORMATS = tuple(GRAY_CONVERTERS)


def choose_format(offered: list[FormatDesc]) -> FormatDesc:
    """The first raw format we can turn into grayscale; compressed-only devices are refused by name."""
    by_code = {f.pixelformat: f for f in offered}
    for code in PREFERRED_FORMATS:
        if code in by_code:
            return by_code[code]
    names = ", ".join(f.fourcc for f in offered) or "none"
    raise CaptureError("no_supported_format",
                       f"the device offers {names}; this agent reads raw GREY/YUYV/UYVY/NV12/YU12/RGB3/BGR3 "
                       "only (no JPEG/H.264 decoder on the device)")


async def wait_readable(fd: int, timeout: float) -> None:
    """Wait for `fd` to become readable in the running loop (epoll; no thread), or TimeoutError.

    A plain future with a timer, not asyncio.wait_for: on Python 3.11 wait_for can swallow a cancellation
    that arrives just as the fd becomes ready, and a removed camera's task would then go on capturing.
    """
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bool] = loop.create_future()

    def settle(value: bool) -> None:
        if not ready.done():
            ready.set_result(value)

    loop.add_reader(fd, settle, True)
    timer = loop.call_later(timeout, settle, False)
    try:
        if not await ready:
            raise TimeoutError(f"fd {fd} not readable within {timeout} s")
    finally:
        timer.cancel()
        loop.remove_reader(fd)


class CaptureSession:
    """One open, streaming V4L2 node. `grab()` returns the next fresh frame as (h, w) uint8 luma."""

    def __init__(self, path: str, settings: CaptureSettings, io: DeviceIO = KERNEL_IO) -> None:
        self.path = path
        self.settings = settings
        self._device = V4L2Device(path, io)
        self.format: PixFormat | None = None
        self.errored_buffers = 0

    def open(self) -> PixFormat:
        dev = self._device
        try:
            dev.open()
            cap = dev.querycap()
            if not cap.can_capture:
                raise CaptureError("not_capture", f"{self.path} ({cap.card}) has no single-planar streaming "
                                                  f"capture (device caps 0x{cap.effective_caps:08x})")
            chosen = choose_format(dev.formats())
            width, height = self.settings.request_size
            fmt = dev.set_format(chosen.pixelformat, width, height)
            if fmt.pixelformat not in GRAY_CONVERTERS:
                raise CaptureError("no_supported_format",
                                   f"asked for {chosen.fourcc}, the driver set {fourcc_str(fmt.pixelformat)}")
            dev.start_streaming(count=2)
        except BaseException:
            dev.close()
            raise
        self.format = fmt
        return fmt

    def _drain(self) -> None:
        """Give back frames captured while we were not looking: the next one we take is fresh."""
        for _ in range(64):
            buf = self._device.dequeue()
            if buf is None:
                return
            self._device.requeue(buf.index)

    async def grab(self) -> np.ndarray:
        if self.format is None:
            raise RuntimeError("grab() before open()")
        self._drain()
        skip = self.settings.settle_frames
        deadline = time.monotonic() + self.settings.frame_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CaptureError("timeout", f"no frame from {self.path} in {self.settings.frame_timeout_s} s")
            try:
                await wait_readable(self._device.fileno(), remaining)
            except TimeoutError:
                raise CaptureError("timeout",
                                   f"no frame from {self.path} in {self.settings.frame_timeout_s} s") from None
            buf = self._device.dequeue()
            if buf is None:
                continue  # spurious wake-up
            try:
                if buf.errored:
                    self.errored_buffers += 1
                    continue
                if skip > 0:
                    skip -= 1
                    continue
                data = self._device.buffer_bytes(buf)
            finally:
                self._device.requeue(buf.index)
            return to_gray(data, self.format)

    def close(self) -> None:
        self._device.close()


def frame_views(gray: np.ndarray, settings: CaptureSettings) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) uint8 luma -> (model-sized frame (1, H, W) uint8 0..255 as stored, labelling view float32 in
    [0, 1]). The stored frame keeps the camera's 8 bits: a quarter of float32's bytes on the flash."""
    _, h, w = settings.frame_shape
    vh, vw = settings.label_size
    luma = area_resize(gray, vh, vw)
    if vh % h == 0 and vw % w == 0:
        # an area average of equal area averages is the area average: reuse the label view
        small = luma.reshape(h, vh // h, w, vw // w).mean(axis=(1, 3))
    else:
        small = area_resize(gray, h, w)
    pixels = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    view = np.clip(luma * np.float32(1 / 255), 0.0, 1.0).astype(np.float32)
    return pixels[None], view


@dataclass(frozen=True)
class CapturedFrame:
    camera: CameraInfo
    timestamp_ns: int
    pixels: np.ndarray      # (1, 32, 32) uint8 0..255: the model's input as stored
    label_view: np.ndarray  # (64, 64) float32 in [0, 1]: what the labeller looks at


FrameHandler = Callable[[CapturedFrame], Awaitable[None] | None]


# --- the manager -----------------------------------------------------------------------------------

@dataclass
class CameraStats:
    """Counters behind the fl_agent_camera* metrics."""

    cameras_present: int = 0
    frames_captured_total: int = 0
    cameras_added_total: int = 0
    cameras_removed_total: int = 0
    capture_errors_total: collections.Counter[str] = field(default_factory=collections.Counter)


class CameraManager:
    """Runs in the agent's loop: follows udev, keeps one capture task per camera, hands frames on.

    Frames go to `on_frame` (sync or async callable) when given, else into `self.frames`, an
    asyncio.Queue that drops its oldest frame when full (a slow consumer must not stall capture).
    """

    def __init__(self, settings: CaptureSettings | None = None, on_frame: FrameHandler | None = None, *,
                 context: Any = None, monitor: Any = None, io: DeviceIO = KERNEL_IO,
                 queue_size: int = 64) -> None:
        self.settings = settings or CaptureSettings()
        self._on_frame = on_frame
        self._context = context
        self._monitor = monitor
        self._io = io
        self.frames: asyncio.Queue[CapturedFrame] = asyncio.Queue(maxsize=queue_size)
        self.stats = CameraStats()
        self._cameras: dict[str, CameraInfo] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_fd: int | None = None

    @property
    def cameras(self) -> dict[str, CameraInfo]:
        return dict(self._cameras)

    async def start(self) -> None:
        """Start watching udev, then pick up the cameras already present."""
        self._loop = asyncio.get_running_loop()
        if self._context is None:
            import pyudev

            self._context = pyudev.Context()
        if self._monitor is None:
            import pyudev

            self._monitor = pyudev.Monitor.from_netlink(self._context)
        self._monitor.filter_by(SUBSYSTEM)
        self._monitor.start()
        # Listening before enumerating: a camera plugged in between is seen at least once (duplicates
        # are harmless, a node is tracked once).
        self._reader_fd = self._monitor.fileno()
        self._loop.add_reader(self._reader_fd, self._on_udev_readable)
        self._resync()

    async def stop(self) -> None:
        """Stop watching and stop every capture (each closes its device)."""
        if self._loop is not None and self._reader_fd is not None:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = None
        for path in list(self._cameras):
            self._remove(path, reason="agent stopping", count=False)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    def _on_udev_readable(self) -> None:
        while True:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as exc:
                # ENOBUFS: the kernel dropped events because we were slow; re-read the whole state.
                self.stats.capture_errors_total["udev"] += 1
                log.warning("udev monitor error (%s); re-enumerating cameras", exc)
                self._resync()
                return
            if device is None:
                return
            self.handle_event(device.action, device)

    def _resync(self) -> None:
        present = {}
        for device in self._context.list_devices(subsystem=SUBSYSTEM):
            if capture_decision(device, self._io):
                info = camera_from_udev(device)
                present[info.path] = info
        for path in list(self._cameras):
            if path not in present:
                self._remove(path, reason="no longer present")
        for info in present.values():
            self._add(info)

    def handle_event(self, action: str | None, device: UdevDevice) -> None:
        """One udev event: add, remove or change of a video4linux device."""
        path = device.device_node or device.properties.get("DEVNAME")
        if not path:
            return
        if action == "remove":
            if path in self._cameras:
                self._remove(path, reason="removed")
            return
        if action not in (None, "add", "change", "online"):
            return  # bind/unbind/move: the node's capture ability did not change
        if capture_decision(device, self._io):
            self._add(camera_from_udev(device))
        elif path in self._cameras:
            self._remove(path, reason="no longer a capture device")

    def _add(self, info: CameraInfo) -> None:
        if info.path in self._cameras:
            return
        self._cameras[info.path] = info
        self.stats.cameras_added_total += 1
        self.stats.cameras_present = len(self._cameras)
        log.info("camera added: %s (%s)", info.path, info.label)
        self._tasks[info.path] = asyncio.get_running_loop().create_task(
            self._capture_loop(info), name=f"capture {info.path}")

    def _remove(self, path: str, reason: str, count: bool = True) -> None:
        info = self._cameras.pop(path, None)
        task = self._tasks.pop(path, None)
        self.stats.cameras_present = len(self._cameras)
        if info is None:
            return
        if count:
            self.stats.cameras_removed_total += 1
        log.info("camera removed: %s (%s): %s", path, info.label, reason)
        if task is not None and not task.done():
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _deliver(self, frame: CapturedFrame) -> None:
        if self._on_frame is None:
            if self.frames.full():
                self.frames.get_nowait()
            self.frames.put_nowait(frame)
            return
        try:
            result = self._on_frame(frame)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.capture_errors_total["handler"] += 1
            log.exception("frame handler failed for %s", frame.camera.path)

    async def _capture_loop(self, info: CameraInfo) -> None:
        settings = self.settings
        backoff = settings.retry_min_s
        session: CaptureSession | None = None
        announced = False
        me = asyncio.current_task()
        try:
            while self._tasks.get(info.path) is me:  # a removed camera's task ends even if a cancel was lost
                started = time.monotonic()
                try:
                    if session is None:
                        session = CaptureSession(info.path, settings, self._io)
                        fmt = session.open()
                        if not announced:
                            log.info("camera %s capturing %s %dx%d every %.1f s", info.path, fmt.fourcc,
                                     fmt.width, fmt.height, settings.interval_s)
                            announced = True
                    gray = await session.grab()
                    if not settings.hold_open:
                        session.close()
                        session = None
                    pixels, view = frame_views(gray, settings)
                    self.stats.frames_captured_total += 1
                    await self._deliver(CapturedFrame(info, time.time_ns(), pixels, view))
                    backoff = settings.retry_min_s
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if session is not None:
                        session.close()
                        session = None
                    reason = error_reason(exc)
                    self.stats.capture_errors_total[reason] += 1
                    if reason == "disconnected" and not os.path.exists(info.path):
                        log.info("camera %s went away during capture (%s); waiting for udev", info.path, exc)
                        return
                    if reason in ("no_supported_format", "not_capture"):
                        log.warning("camera %s cannot be used: %s", info.path, exc)
                        return
                    log.warning("capture from %s failed (%s): %s; retrying in %.0f s",
                                info.path, reason, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, settings.retry_max_s)
                    continue
                await asyncio.sleep(max(0.0, settings.interval_s - (time.monotonic() - started)))
        finally:
            if session is not None:
                session.close()


# --- labels + buffer -------------------------------------------------------------------------------

def frame_boxes(view_boxes: np.ndarray, view_shape: tuple[int, int], frame_shape: tuple[int, ...]) -> np.ndarray:
    """The labeller's boxes on its view -> boxes in the stored frame's pixels, at most BOX_SLOTS of them
    (the largest by area, in the labeller's order; the smaller blobs of a frame with more are mostly noise)."""
    scale = np.array([frame_shape[-1] / view_shape[1], frame_shape[-2] / view_shape[0]] * 2, np.float32)
    boxes = np.asarray(view_boxes, np.float32).reshape(-1, 4) * scale
    if len(boxes) > BOX_SLOTS:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        boxes = boxes[np.sort(np.argsort(-area, kind="stable")[:BOX_SLOTS])]
    return boxes


class FrameRecorder:
    """The frame handler the agent gives CameraManager: labels each camera's frames in order and
    keeps the labelled ones in the buffer, with the count (clipped, as the classifier's label) and the
    pseudo-boxes (for a detector) of their moving blobs. Frames without an honest label (warm-up, scene
    change) are counted and dropped.

    A write the data partition refuses (full, read-only, failing: appliance/storage_errors.py) drops the frames it
    held and capture goes on: the frames are for training, and a card that has no room now may have some later.
    It is counted (``on_storage_error(reason)``: the agent's ``fl_agent_storage_errors_total``) and logged once
    when the refusals start and once when a write succeeds again, not at every write: a full card would otherwise
    fill the journal, which often lives on the same card. Any other error of a write is a fault of the code or the
    image and still raises.
    """

    def __init__(self, buffer: FrameBuffer, label_settings: MotionLabelSettings | None = None,
                 on_storage_error: Callable[[str], None] | None = None) -> None:
        self.buffer = buffer
        self.label_settings = label_settings or MotionLabelSettings()
        self.on_storage_error = on_storage_error
        self._labellers: dict[str, MotionLabeller] = {}
        self._lock = asyncio.Lock()
        self.frames_labelled_total = 0
        self.frames_unlabelled_total = 0
        self.labels_total: collections.Counter[int] = collections.Counter()
        self._dropped_since_refused: int | None = None  # None while the buffer's writes go through

    def labeller(self, camera_path: str) -> MotionLabeller:
        """Per device node. Another camera taking over the node looks like a scene change to the
        labeller (most pixels differ at once), which then re-learns its background."""
        if camera_path not in self._labellers:
            self._labellers[camera_path] = MotionLabeller(self.label_settings)
        return self._labellers[camera_path]

    def record(self, frame: CapturedFrame) -> int | None:
        """Label and store one frame (blocking file I/O when a batch is written); returns the label or None."""
        view_boxes = self.labeller(frame.camera.path).update_boxes(frame.label_view)
        if view_boxes is None:
            self.frames_unlabelled_total += 1
            return None
        label = min(len(view_boxes), self.label_settings.max_count)
        boxes = frame_boxes(view_boxes, frame.label_view.shape, frame.pixels.shape)
        self.write(functools.partial(self.buffer.append, frame.pixels, label, frame.timestamp_ns, boxes),
                   frames=self.buffer.waiting + 1)
        self.frames_labelled_total += 1
        self.labels_total[label] += 1
        return label

    def write(self, attempt: Callable[[], Path | None], frames: int) -> None:
        """Run one of the buffer's writes (``attempt`` returns the segment it wrote, or None), which holds
        ``frames`` frames; a refusal of the data partition is counted and logged as the class docstring says."""
        try:
            written = attempt()
        except OSError as exc:
            reason = storage_reason(exc)
            if reason is None:
                raise
            if self.on_storage_error is not None:
                self.on_storage_error(reason)
            if self._dropped_since_refused is None:
                self._dropped_since_refused = 0
                log.error("frame buffer %s: cannot write frames (%s: %s); dropping them and capturing on until the "
                          "data partition takes writes again", self.buffer.root, reason, exc.strerror or exc)
            self._dropped_since_refused += frames
            return
        if written is not None and self._dropped_since_refused is not None:
            log.info("frame buffer %s: writing frames again; %d frames were dropped meanwhile", self.buffer.root,
                     self._dropped_since_refused)
            self._dropped_since_refused = None

    async def _writing(self, func: Callable[..., object], *args: Any) -> None:
        """``func(*args)`` in a worker thread (file writes run off the loop), one at a time: the lock is held until
        the thread ends, even when the caller is cancelled meanwhile (a capture stopped or unplugged), since a thread
        cannot be stopped and the buffer has one writer."""
        async with self._lock:
            work = asyncio.ensure_future(asyncio.to_thread(func, *args))
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                while not work.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait({work})
                raise

    async def __call__(self, frame: CapturedFrame) -> None:
        await self._writing(self.record, frame)

    async def recover(self) -> None:
        """Make the buffer's directory the recorder's (:meth:`FrameBuffer.recover`) before the first capture; on a
        partition that refuses it, the first write tries again."""
        await self._writing(self.write, self.buffer.recover, 0)

    async def flush(self) -> None:
        """Write the frames the buffer holds in memory (when capture stops)."""
        await self._writing(lambda: self.write(self.buffer.flush, self.buffer.waiting))


# --- metrics ---------------------------------------------------------------------------------------

class CameraCollector:
    """A prometheus_client collector over a CameraManager (and optionally its FrameRecorder).

    Register with `prometheus_client.REGISTRY.register(CameraCollector(manager, recorder))`.
    """

    def __init__(self, manager: CameraManager, recorder: FrameRecorder | None = None) -> None:
        self.manager = manager
        self.recorder = recorder

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.manager.stats
        yield GaugeMetricFamily("fl_agent_cameras_present", "Capture cameras currently present",
                                value=stats.cameras_present)
        yield CounterMetricFamily("fl_agent_camera_frames_captured_total", "Frames captured from cameras",
                                  value=stats.frames_captured_total)
        errors = CounterMetricFamily("fl_agent_camera_capture_errors_total",
                                     "Capture errors by reason", labels=["reason"])
        for reason in ERROR_REASONS:
            errors.add_metric([reason], stats.capture_errors_total.get(reason, 0))
        yield errors
        events = CounterMetricFamily("fl_agent_camera_events_total", "Cameras added and removed",
                                     labels=["action"])
        events.add_metric(["add"], stats.cameras_added_total)
        events.add_metric(["remove"], stats.cameras_removed_total)
        yield events
        if self.recorder is not None:
            labelled = CounterMetricFamily("fl_agent_camera_frames_labelled_total",
                                           "Frames by pseudo-label outcome", labels=["outcome"])
            labelled.add_metric(["labelled"], self.recorder.frames_labelled_total)
            labelled.add_metric(["unlabelled"], self.recorder.frames_unlabelled_total)
            yield labelled
            buf = self.recorder.buffer.stats()
            yield GaugeMetricFamily("fl_agent_frame_buffer_frames", "Frames in the buffer", value=buf.frames)
            yield GaugeMetricFamily("fl_agent_frame_buffer_bytes", "Bytes in the buffer", value=buf.bytes)


def record_udev_properties(context: Any = None) -> list[dict[str, Any]]:
    """Every video4linux device as {sys_path, properties}: the recorded form tests/data/udev uses."""
    if context is None:
        import pyudev

        context = pyudev.Context()
    return [{"sys_path": d.sys_path, "properties": dict(d.properties),
             "provenance": f"recorded with `python -m appliance.cameras record` on {os.uname().nodename}"}
            for d in context.list_devices(subsystem=SUBSYSTEM)]


# --- the agent's entry point -----------------------------------------------------------------------

BUFFER_RETRY_SECONDS = 60.0  # a frame buffer directory the card fails to list is tried again this often


async def _open_frame_buffer(root: Path, cams: Any, on_storage_error: Callable[[str], None] | None) -> FrameBuffer:
    """The frame buffer in ``root`` within the [cameras] limits ``cams``. Opening it lists the directory; while a
    failing card refuses that, it is tried again every BUFFER_RETRY_SECONDS: each refusal is counted like a refused
    write, the first is logged, and so is the success after them. Ending the camera task instead would end the
    agent, which systemd restarts into the same error, with no heartbeat meanwhile."""
    refused = False
    while True:
        try:
            buffer = await asyncio.to_thread(FrameBuffer, root, max_frames=cams.buffer_max_frames,
                                             max_bytes=cams.buffer_max_bytes)
        except OSError as exc:
            reason = storage_reason(exc)
            if reason is None:
                raise
            if on_storage_error is not None:
                on_storage_error(reason)
            if not refused:
                refused = True
                log.error("frame buffer %s: cannot read it (%s: %s); no frames are kept until it can, tried again "
                          "every %.0f s", root, reason, exc.strerror or exc, BUFFER_RETRY_SECONDS)
            await asyncio.sleep(BUFFER_RETRY_SECONDS)
            continue
        if refused:
            log.info("frame buffer %s: readable again; keeping frames", root)
        return buffer


async def camera_task(config: Any, registry: Any = None,
                      on_storage_error: Callable[[str], None] | None = None) -> None:
    """What `fl-agent run` adds to its loop when [data] source = "cameras": follow udev, capture, label,
    keep frames in `<state_dir>/frames/` within the [cameras] limits. Runs until cancelled.

    `config` is appliance.config.Config; `registry` a prometheus_client CollectorRegistry (or anything
    with `.register`, e.g. AgentMetrics.registry) to expose the fl_agent_camera* metrics;
    `on_storage_error(reason)` is told of each frame write the data partition refused (see FrameRecorder), and of
    each try to open a buffer whose directory the card fails to list (see _open_frame_buffer).
    """
    cams = config.cameras
    buffer = await _open_frame_buffer(Path(config.agent.state_dir) / "frames", cams, on_storage_error)
    recorder = FrameRecorder(buffer, on_storage_error=on_storage_error)
    await recorder.recover()
    manager = CameraManager(CaptureSettings(interval_s=cams.sample_interval_seconds), recorder)
    if registry is not None:
        registry.register(CameraCollector(manager, recorder))
    await manager.start()
    log.info("cameras: watching udev; %d present; frames kept in %s (at most %d frames, %d bytes)",
             len(manager.cameras), buffer.root, buffer.max_frames, buffer.max_bytes)
    try:
        await asyncio.Event().wait()
    finally:
        await manager.stop()
        await recorder.flush()


# --- command line (the QEMU rig and `fl-agent cameras`) ----------------------------------------------

async def _watch(state_dir: Path, seconds: float, settings: CaptureSettings) -> CameraStats:
    buffer = FrameBuffer(state_dir / "frames")
    recorder = FrameRecorder(buffer)
    manager = CameraManager(settings, recorder)
    await manager.start()
    try:
        end = time.monotonic() + seconds
        last = None
        while time.monotonic() < end:
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
            now = (manager.stats.cameras_present, manager.stats.frames_captured_total,
                   recorder.frames_labelled_total)
            if now != last:
                print(f"cameras={now[0]} frames={now[1]} labelled={now[2]} "
                      f"errors={dict(manager.stats.capture_errors_total)}", flush=True)
                last = now
    finally:
        await manager.stop()
        await recorder.flush()
    return manager.stats


def main(argv: list[str] | None = None) -> int:
    """`python -m appliance.cameras [list|watch]`: the camera table, or a timed capture run."""
    parser = argparse.ArgumentParser(prog="python -m appliance.cameras", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("list", help="print the capture cameras and their formats (default)")
    watch = sub.add_parser("watch", help="follow udev and capture into <state-dir>/frames for a while")
    watch.add_argument("--state-dir", type=Path, required=True)
    watch.add_argument("--seconds", type=float, default=30.0)
    watch.add_argument("--interval", type=float, default=1.0)
    sub.add_parser("record", help="print every video4linux device's udev properties as JSON (test data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "watch":
        stats = asyncio.run(_watch(args.state_dir, args.seconds, CaptureSettings(interval_s=args.interval)))
        return 0 if not stats.capture_errors_total.get("handler") else 1
    if args.command == "record":
        sys.stdout.write(json.dumps(record_udev_properties(), indent=2, sort_keys=True) + "\n")
        return 0
    sys.stdout.write(format_camera_table(list_cameras()))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
