"""The V4L2 ioctl layer and its pixel formats, with ctypes and fcntl only (no OpenCV, no linuxpy).

Only what a single-planar, memory-mapped capture needs: QUERYCAP, ENUM_FMT, G_FMT/S_FMT, REQBUFS,
QUERYBUF, QBUF/DQBUF, STREAMON/STREAMOFF. Struct layouts follow <linux/videodev2.h>; tests compare their
sizes, offsets and ioctl numbers with the values the kernel headers give on x86_64.

All system calls go through a `DeviceIO` object so tests can put a fake V4L2 device behind the same code.
The descriptor is opened non-blocking: DQBUF answers EAGAIN when no frame is ready, and the caller waits
for readability on `fileno()` (the asyncio loop does that in appliance.cameras).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# --- ioctl numbers (asm-generic/ioctl.h: dir<<30 | size<<16 | type<<8 | nr) -------------------------

_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("V") << 8) | nr


# --- constants -----------------------------------------------------------------------------------------

V4L2_CAP_VIDEO_CAPTURE = 0x00000001
V4L2_CAP_VIDEO_CAPTURE_MPLANE = 0x00001000
V4L2_CAP_META_CAPTURE = 0x00800000
V4L2_CAP_READWRITE = 0x01000000
V4L2_CAP_STREAMING = 0x04000000
V4L2_CAP_DEVICE_CAPS = 0x80000000

V4L2_BUF_TYPE_VIDEO_CAPTURE = 1
V4L2_MEMORY_MMAP = 1
V4L2_FIELD_ANY = 0
V4L2_FMT_FLAG_COMPRESSED = 0x0001
V4L2_BUF_FLAG_ERROR = 0x00000040


def fourcc(code: str) -> int:
    """'YUYV' -> 0x56595559, the little-endian packing V4L2 uses for pixel formats."""
    raw = code.encode("ascii")
    if len(raw) != 4:
        raise ValueError(f"a fourcc has 4 ASCII characters, got {code!r}")
    return raw[0] | raw[1] << 8 | raw[2] << 16 | raw[3] << 24


def fourcc_str(value: int) -> str:
    """0x56595559 -> 'YUYV'; bit 31 (big-endian variant) gives a '-BE' suffix, as v4l2-ctl prints it."""
    chars = [(value >> (8 * i)) & 0xFF for i in range(4)]
    chars[3] &= 0x7F
    text = "".join(chr(c) if 32 <= c < 127 else "?" for c in chars).rstrip()
    return f"{text}-BE" if value & (1 << 31) else text


# --- structs -----------------------------------------------------------------------------------------

class v4l2_capability(ctypes.Structure):
    _fields_ = [
        ("driver", ctypes.c_char * 16),
        ("card", ctypes.c_char * 32),
        ("bus_info", ctypes.c_char * 32),
        ("version", ctypes.c_uint32),
        ("capabilities", ctypes.c_uint32),
        ("device_caps", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 3),
    ]


class v4l2_fmtdesc(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("description", ctypes.c_char * 32),
        ("pixelformat", ctypes.c_uint32),
        ("mbus_code", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 3),
    ]


class v4l2_pix_format(ctypes.Structure):
    _fields_ = [
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("pixelformat", ctypes.c_uint32),
        ("field", ctypes.c_uint32),
        ("bytesperline", ctypes.c_uint32),
        ("sizeimage", ctypes.c_uint32),
        ("colorspace", ctypes.c_uint32),
        ("priv", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ycbcr_enc", ctypes.c_uint32),
        ("quantization", ctypes.c_uint32),
        ("xfer_func", ctypes.c_uint32),
    ]


class _v4l2_format_fmt(ctypes.Union):
    # The kernel union also holds struct v4l2_window, which has pointers: hence 8-byte alignment and
    # the union starting at offset 8. The c_void_p member reproduces that alignment.
    _fields_ = [
        ("pix", v4l2_pix_format),
        ("raw_data", ctypes.c_uint8 * 200),
        ("_align", ctypes.c_void_p),
    ]


class v4l2_format(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("fmt", _v4l2_format_fmt)]


class v4l2_requestbuffers(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("memory", ctypes.c_uint32),
        ("capabilities", ctypes.c_uint32),
        ("flags", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
    ]


class timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class v4l2_timecode(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("frames", ctypes.c_uint8),
        ("seconds", ctypes.c_uint8),
        ("minutes", ctypes.c_uint8),
        ("hours", ctypes.c_uint8),
        ("userbits", ctypes.c_uint8 * 4),
    ]


class _v4l2_buffer_m(ctypes.Union):
    _fields_ = [
        ("offset", ctypes.c_uint32),
        ("userptr", ctypes.c_ulong),
        ("planes", ctypes.c_void_p),
        ("fd", ctypes.c_int32),
    ]


class v4l2_buffer(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("bytesused", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("field", ctypes.c_uint32),
        ("timestamp", timeval),
        ("timecode", v4l2_timecode),
        ("sequence", ctypes.c_uint32),
        ("memory", ctypes.c_uint32),
        ("m", _v4l2_buffer_m),
        ("length", ctypes.c_uint32),
        ("reserved2", ctypes.c_uint32),
        ("request_fd", ctypes.c_int32),
    ]


VIDIOC_QUERYCAP = _ioc(_IOC_READ, 0, ctypes.sizeof(v4l2_capability))
VIDIOC_ENUM_FMT = _ioc(_IOC_READ | _IOC_WRITE, 2, ctypes.sizeof(v4l2_fmtdesc))
VIDIOC_G_FMT = _ioc(_IOC_READ | _IOC_WRITE, 4, ctypes.sizeof(v4l2_format))
VIDIOC_S_FMT = _ioc(_IOC_READ | _IOC_WRITE, 5, ctypes.sizeof(v4l2_format))
VIDIOC_REQBUFS = _ioc(_IOC_READ | _IOC_WRITE, 8, ctypes.sizeof(v4l2_requestbuffers))
VIDIOC_QUERYBUF = _ioc(_IOC_READ | _IOC_WRITE, 9, ctypes.sizeof(v4l2_buffer))
VIDIOC_QBUF = _ioc(_IOC_READ | _IOC_WRITE, 15, ctypes.sizeof(v4l2_buffer))
VIDIOC_DQBUF = _ioc(_IOC_READ | _IOC_WRITE, 17, ctypes.sizeof(v4l2_buffer))
VIDIOC_STREAMON = _ioc(_IOC_WRITE, 18, ctypes.sizeof(ctypes.c_int))
VIDIOC_STREAMOFF = _ioc(_IOC_WRITE, 19, ctypes.sizeof(ctypes.c_int))


# --- system call boundary ------------------------------------------------------------------------------

class Mapping(Protocol):
    """What a buffer mapping must offer: bytes through slicing, and close()."""

    def __getitem__(self, key: slice) -> bytes: ...
    def close(self) -> None: ...


class DeviceIO(Protocol):
    """The system calls a capture makes. `KernelIO` is the real one; tests provide a fake device."""

    def open(self, path: str) -> int: ...
    def ioctl(self, fd: int, request: int, arg: ctypes.Structure | ctypes.c_int) -> None: ...
    def mmap(self, fd: int, length: int, offset: int) -> Mapping: ...
    def close(self, fd: int) -> None: ...


class KernelIO:
    """Real device nodes: non-blocking open, in-place ioctls, read-only shared mappings."""

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure | ctypes.c_int) -> None:
        while True:
            try:
                fcntl.ioctl(fd, request, arg, True)
                return
            except InterruptedError:
                continue

    def mmap(self, fd: int, length: int, offset: int) -> Mapping:
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset)

    def close(self, fd: int) -> None:
        os.close(fd)


KERNEL_IO = KernelIO()


# --- results ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Capability:
    driver: str
    card: str
    bus_info: str
    capabilities: int
    device_caps: int

    @property
    def effective_caps(self) -> int:
        """The node's own capabilities (device_caps when the driver reports them), as v4l_id uses."""
        if self.capabilities & V4L2_CAP_DEVICE_CAPS:
            return self.device_caps
        return self.capabilities

    @property
    def can_capture(self) -> bool:
        """Single-planar video capture with streaming I/O: what this module can read."""
        caps = self.effective_caps
        return bool(caps & V4L2_CAP_VIDEO_CAPTURE) and bool(caps & V4L2_CAP_STREAMING)


@dataclass(frozen=True)
class FormatDesc:
    pixelformat: int
    description: str
    compressed: bool

    @property
    def fourcc(self) -> str:
        return fourcc_str(self.pixelformat)


@dataclass(frozen=True)
class PixFormat:
    width: int
    height: int
    pixelformat: int
    bytesperline: int
    sizeimage: int

    @property
    def fourcc(self) -> str:
        return fourcc_str(self.pixelformat)


@dataclass(frozen=True)
class DequeuedBuffer:
    index: int
    bytesused: int
    sequence: int
    flags: int

    @property
    def errored(self) -> bool:
        """The driver flagged the data as possibly corrupted (V4L2_BUF_FLAG_ERROR)."""
        return bool(self.flags & V4L2_BUF_FLAG_ERROR)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# --- the device ------------------------------------------------------------------------------------

class V4L2Device:
    """One open V4L2 capture node. Use as a context manager; `close()` never raises."""

    def __init__(self, path: str, io: DeviceIO = KERNEL_IO) -> None:
        self.path = path
        self._io = io
        self._fd: int | None = None
        self._maps: list[Mapping] = []
        self._streaming = False

    def __enter__(self) -> V4L2Device:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self._fd is None:
            self._fd = self._io.open(self.path)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is not open")
        return self._fd

    def _ioctl(self, request: int, arg: ctypes.Structure | ctypes.c_int) -> None:
        self._io.ioctl(self.fileno(), request, arg)

    def querycap(self) -> Capability:
        cap = v4l2_capability()
        self._ioctl(VIDIOC_QUERYCAP, cap)
        return Capability(
            driver=_text(cap.driver),
            card=_text(cap.card),
            bus_info=_text(cap.bus_info),
            capabilities=cap.capabilities,
            device_caps=cap.device_caps,
        )

    def formats(self) -> list[FormatDesc]:
        """Every pixel format the node offers for single-planar capture (ENUM_FMT until EINVAL)."""
        found: list[FormatDesc] = []
        for index in range(256):
            desc = v4l2_fmtdesc(index=index, type=V4L2_BUF_TYPE_VIDEO_CAPTURE)
            try:
                self._ioctl(VIDIOC_ENUM_FMT, desc)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    break
                raise
            found.append(FormatDesc(desc.pixelformat, _text(desc.description),
                                    bool(desc.flags & V4L2_FMT_FLAG_COMPRESSED)))
        return found

    def set_format(self, pixelformat: int, width: int, height: int) -> PixFormat:
        """S_FMT; the driver adjusts the size to one it supports, and we return what it chose."""
        fmt = v4l2_format(type=V4L2_BUF_TYPE_VIDEO_CAPTURE)
        fmt.fmt.pix.width = width
        fmt.fmt.pix.height = height
        fmt.fmt.pix.pixelformat = pixelformat
        fmt.fmt.pix.field = V4L2_FIELD_ANY
        self._ioctl(VIDIOC_S_FMT, fmt)
        pix = fmt.fmt.pix
        return PixFormat(pix.width, pix.height, pix.pixelformat, pix.bytesperline, pix.sizeimage)

    def start_streaming(self, count: int = 2) -> int:
        """REQBUFS(MMAP) + QUERYBUF/mmap/QBUF each buffer + STREAMON. Returns the buffer count granted."""
        req = v4l2_requestbuffers(count=count, type=V4L2_BUF_TYPE_VIDEO_CAPTURE, memory=V4L2_MEMORY_MMAP)
        self._ioctl(VIDIOC_REQBUFS, req)
        if req.count < 1:
            raise OSError(errno.ENOMEM, f"{self.path}: the driver granted no capture buffers")
        for index in range(req.count):
            buf = v4l2_buffer(index=index, type=V4L2_BUF_TYPE_VIDEO_CAPTURE, memory=V4L2_MEMORY_MMAP)
            self._ioctl(VIDIOC_QUERYBUF, buf)
            self._maps.append(self._io.mmap(self.fileno(), buf.length, buf.m.offset))
        for index in range(req.count):
            self.requeue(index)
        self._ioctl(VIDIOC_STREAMON, ctypes.c_int(V4L2_BUF_TYPE_VIDEO_CAPTURE))
        self._streaming = True
        return req.count

    def dequeue(self) -> DequeuedBuffer | None:
        """DQBUF: a filled buffer, or None when none is ready yet (EAGAIN on the non-blocking fd)."""
        buf = v4l2_buffer(type=V4L2_BUF_TYPE_VIDEO_CAPTURE, memory=V4L2_MEMORY_MMAP)
        try:
            self._ioctl(VIDIOC_DQBUF, buf)
        except BlockingIOError:
            return None
        return DequeuedBuffer(buf.index, buf.bytesused, buf.sequence, buf.flags)

    def buffer_bytes(self, buffer: DequeuedBuffer) -> bytes:
        """A copy of the frame data, so the buffer can go back to the driver at once."""
        return self._maps[buffer.index][: buffer.bytesused]

    def requeue(self, index: int) -> None:
        buf = v4l2_buffer(index=index, type=V4L2_BUF_TYPE_VIDEO_CAPTURE, memory=V4L2_MEMORY_MMAP)
        self._ioctl(VIDIOC_QBUF, buf)

    def close(self) -> None:
        """STREAMOFF, unmap, free buffers, close; errors are ignored (the device may be gone)."""
        if self._fd is None:
            return
        if self._streaming:
            with contextlib.suppress(OSError):
                self._ioctl(VIDIOC_STREAMOFF, ctypes.c_int(V4L2_BUF_TYPE_VIDEO_CAPTURE))
            self._streaming = False
        for mapping in self._maps:
            with contextlib.suppress(OSError, BufferError):
                mapping.close()
        if self._maps:
            self._maps.clear()
            with contextlib.suppress(OSError):
                self._ioctl(VIDIOC_REQBUFS, v4l2_requestbuffers(
                    count=0, type=V4L2_BUF_TYPE_VIDEO_CAPTURE, memory=V4L2_MEMORY_MMAP))
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            self._io.close(fd)


# --- pixel formats -> grayscale ----------------------------------------------------------------------

def _rows(data: bytes, fmt: PixFormat, row_bytes: int, planes_rows: int | None = None) -> np.ndarray:
    stride = fmt.bytesperline or row_bytes
    rows = fmt.height if planes_rows is None else planes_rows
    needed = stride * (rows - 1) + row_bytes
    if len(data) < needed:
        raise ValueError(f"short {fmt.fourcc} frame: {len(data)} bytes, {fmt.width}x{fmt.height} "
                         f"with stride {stride} needs {needed}")
    buf = np.frombuffer(data, dtype=np.uint8, count=min(len(data), stride * rows))
    if buf.size < stride * rows:
        buf = np.concatenate([buf, np.zeros(stride * rows - buf.size, np.uint8)])
    return buf.reshape(rows, stride)[:, :row_bytes]


def _luma_rgb(rgb: np.ndarray, order: str) -> np.ndarray:
    r, g, b = (rgb[..., order.index(c)].astype(np.float32) for c in "RGB")
    return np.clip(0.299 * r + 0.587 * g + 0.114 * b + 0.5, 0, 255).astype(np.uint8)


def _gray_packed_yuv(y_offset: int):
    def convert(data: bytes, fmt: PixFormat) -> np.ndarray:
        return _rows(data, fmt, fmt.width * 2)[:, y_offset::2]
    return convert


def _gray_planar_y(data: bytes, fmt: PixFormat) -> np.ndarray:
    # YUV 4:2:0 (YU12, YV12, NV12, NV21): the first plane is the full-resolution Y plane.
    return _rows(data, fmt, fmt.width)


def _gray_rgb(order: str):
    def convert(data: bytes, fmt: PixFormat) -> np.ndarray:
        rows = _rows(data, fmt, fmt.width * 3)
        return _luma_rgb(rows.reshape(fmt.height, fmt.width, 3), order)
    return convert


# Preference order when negotiating: cheapest to turn into the model's grayscale first.
GRAY_CONVERTERS = {
    fourcc("GREY"): _gray_planar_y,
    fourcc("YUYV"): _gray_packed_yuv(0),
    fourcc("YVYU"): _gray_packed_yuv(0),
    fourcc("UYVY"): _gray_packed_yuv(1),
    fourcc("VYUY"): _gray_packed_yuv(1),
    fourcc("NV12"): _gray_planar_y,
    fourcc("NV21"): _gray_planar_y,
    fourcc("YU12"): _gray_planar_y,
    fourcc("YV12"): _gray_planar_y,
    fourcc("RGB3"): _gray_rgb("RGB"),
    fourcc("BGR3"): _gray_rgb("BGR"),
}


def to_gray(data: bytes, fmt: PixFormat) -> np.ndarray:
    """One frame in the negotiated format -> (height, width) uint8 luma (Y, or BT.601 luma from RGB)."""
    convert = GRAY_CONVERTERS.get(fmt.pixelformat)
    if convert is None:
        raise ValueError(f"no grayscale conversion for pixel format {fmt.fourcc!r}")
    return convert(data, fmt)


def _area_axis0(image: np.ndarray, n_out: int) -> np.ndarray:
    """Exact area average along axis 0. Output row i covers input rows [i*r, (i+1)*r) with r = n_in/n_out;
    each input row it touches is weighted by the length of the overlap. The loop runs over the at most
    ceil(r)+1 rows one output row touches (vectorised over all output rows), so the cost is about one
    pass over the image, with no n_out x n_in weight matrix."""
    n_in = image.shape[0]
    edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    lo = np.floor(edges[:-1]).astype(np.intp)
    span = int((np.ceil(edges[1:]) - lo).max())
    out = np.zeros((n_out, *image.shape[1:]), dtype=np.float32)
    for j in range(span):
        rows = lo + j
        weight = np.minimum(edges[1:], rows + 1) - np.maximum(edges[:-1], rows)
        weight = np.clip(weight, 0.0, None).astype(np.float32)
        out += weight[:, None] * image[np.minimum(rows, n_in - 1)]
    return out / np.diff(edges).astype(np.float32)[:, None]


def area_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize a 2-D image by area averaging (like OpenCV's INTER_AREA) -> float32, same value scale.

    The whole field of view is kept (the aspect ratio is not), so a vehicle anywhere in view stays in
    the model's input.
    """
    if image.ndim != 2 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"area_resize needs a non-empty 2-D image, got shape {image.shape}")
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {out_h}x{out_w}")
    rows = _area_axis0(image, out_h)
    return _area_axis0(np.ascontiguousarray(rows.T), out_w).T.astype(np.float32)
