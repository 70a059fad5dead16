"""The bounded frame buffer on the data partition (`<state_dir>/frames/`): labelled frames for training.

On an SD card or eMMC this buffer is the appliance's largest writer, so it writes little and seldom:

- frames are stored as captured, one byte per pixel (uint8 luma, 0..255); the trainer makes the model's
  float32 input in [0, 1] when it reads them (`to_model_input`);
- frames wait in memory and are written together, one segment file per batch: when `batch_frames` (64)
  are waiting or, as a frame arrives, the oldest has waited `batch_seconds` (60 s), and on `flush()`;
- nothing is fsynced. A segment is written under a temporary name and renamed, so a reader sees whole
  segments. A power cut loses the batch in memory and what the kernel had not yet written back (ext4
  commits every 5 s); a segment cut short is caught by each record's length and CRC, and those frames
  are skipped. Losing a minute of training frames costs nothing; an fsync per frame cost a journal
  commit per frame.

Retention keeps the newest frames within a count and a byte limit by deleting whole segments, oldest
first; a segment holds at most an eighth of either limit. Frames never leave the device: nothing here
talks to the network, and the trainer reads (x, y) from this directory.

Format 2: segment files `<sequence:012d>.fls` (the sequence grows, so name order is age order), each a
run of frame records of one shape. A record, little-endian, is a 24-byte header then the pixels:
    magic  4s  b"FLF2"
    label  u8  class index
    rsv    u8  0
    c,h,w  3 x u16  frame shape
    ts_ns  u64  capture time, ns since the epoch
    crc32  u32  zlib.crc32 of header bytes 4..20 (label to ts_ns), continued over the pixels
    pixels c*h*w uint8, row-major
Format 1 (one fsynced `<sequence:012d>.flf` file per frame, float32 pixels) is not read: the writer
deletes such files in `recover()` and logs how many it dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 2
MAGIC = b"FLF2"
FORMAT_1_MAGIC = b"FLF1"
HEADER = struct.Struct("<4sBB3HQI")
SUFFIX = ".fls"
FORMAT_1_SUFFIX = ".flf"
TMP_PREFIX = ".tmp-"
BATCH_FRAMES = 64
BATCH_SECONDS = 60.0


class FrameFileError(ValueError):
    """A frame record that cannot be read back (wrong magic, truncated, checksum mismatch)."""


@dataclass(frozen=True)
class FrameBufferStats:
    frames: int
    bytes: int


@dataclass(frozen=True)
class _Segment:
    frames: int  # whole records in the file
    bytes: int
    shape: tuple[int, int, int] | None  # of its first record; None when that record is unreadable


def record_size(shape: tuple[int, ...]) -> int:
    """Bytes of one stored frame of ``shape`` (c, h, w): header and uint8 pixels."""
    return HEADER.size + math.prod(shape)


def encode_frame(pixels: np.ndarray, label: int, timestamp_ns: int) -> bytes:
    """One frame record (format 2) for uint8 ``pixels`` of shape (c, h, w)."""
    if pixels.ndim != 3:
        raise ValueError(f"a frame is (channels, height, width), got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"frames are stored as captured, uint8 0..255; got {pixels.dtype} pixels")
    if not 0 <= label <= 255:
        raise ValueError(f"label must be a class index 0..255, got {label}")
    data = np.ascontiguousarray(pixels).tobytes()
    c, h, w = pixels.shape
    fields = HEADER.pack(MAGIC, label, 0, c, h, w, timestamp_ns, 0)[4:20]
    return HEADER.pack(MAGIC, label, 0, c, h, w, timestamp_ns, zlib.crc32(data, zlib.crc32(fields))) + data


def decode_frame(blob: bytes, name: str = "frame") -> tuple[np.ndarray, int, int]:
    """One record -> (pixels (c, h, w) uint8, label, timestamp_ns); FrameFileError names what is wrong."""
    if len(blob) < HEADER.size:
        raise FrameFileError(f"{name}: {len(blob)} bytes, shorter than the {HEADER.size}-byte header")
    magic, label, _, c, h, w, ts, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        old = " (format 1, float32: no longer read)" if magic == FORMAT_1_MAGIC else ""
        raise FrameFileError(f"{name}: bad magic {magic!r}{old}, expected {MAGIC!r}")
    data = memoryview(blob)[HEADER.size:]
    if len(data) != c * h * w:
        raise FrameFileError(f"{name}: {len(data)} pixel bytes, shape {c}x{h}x{w} needs {c * h * w}")
    if zlib.crc32(data, zlib.crc32(blob[4:20])) != crc:
        raise FrameFileError(f"{name}: checksum mismatch")
    return np.frombuffer(data, dtype=np.uint8).reshape(c, h, w), label, ts


def to_model_input(frames: np.ndarray) -> np.ndarray:
    """Stored uint8 frames -> float32 in [0, 1], the input range model packages are trained on."""
    if frames.dtype != np.uint8:
        raise ValueError(f"stored frames are uint8, got {frames.dtype}")
    out = np.empty(frames.shape, np.float32)
    np.divide(frames, np.float32(255), out=out)
    return out


def _first_shape(path: Path) -> tuple[int, int, int] | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER.size)
    except FileNotFoundError:
        return None
    if len(head) < HEADER.size or head[:4] != MAGIC:
        return None
    c, h, w = HEADER.unpack(head)[3:6]
    return c, h, w


class FrameBuffer:
    """Labelled frames in one directory, bounded by `max_frames` and `max_bytes` (oldest dropped first).

    One writer per directory (the agent's FrameRecorder: `recover()`, `append()`, `flush()`); any number
    of readers, which only read. Counts and reads cover frames written to segments, not those still
    waiting in the writer's memory.
    """

    def __init__(self, root: Path | str, *, max_frames: int = 5000, max_bytes: int = 64 * 1024 * 1024,
                 frame_shape: tuple[int, int, int] = (1, 32, 32), batch_frames: int = BATCH_FRAMES,
                 batch_seconds: float = BATCH_SECONDS) -> None:
        if max_frames < 1 or max_bytes < 1:
            raise ValueError(f"frame buffer limits must be positive, got {max_frames} frames, {max_bytes} bytes")
        if len(frame_shape) != 3 or min(frame_shape) < 1:
            raise ValueError(f"frame_shape is (channels, height, width), got {frame_shape}")
        if batch_frames < 1 or batch_seconds < 0:
            raise ValueError(f"batch_frames must be >= 1 and batch_seconds >= 0, got {batch_frames}, {batch_seconds}")
        self.root = Path(root)
        self.frame_shape = tuple(frame_shape)
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.record_bytes = record_size(self.frame_shape)
        # A segment is at most 1/8 of either limit, so deleting whole segments keeps 7/8 of the buffer.
        self.batch_frames = max(1, min(batch_frames, max_frames // 8, max_bytes // (8 * self.record_bytes)))
        self.batch_seconds = batch_seconds
        self.root.mkdir(parents=True, exist_ok=True)
        self._segments: dict[str, _Segment] = {}
        self._next_seq = 0
        self._pending: list[bytes] = []
        self._pending_since = 0.0
        self._recovered = False
        self._scan()

    def _scan(self) -> None:
        found: dict[str, _Segment] = {}
        for entry in os.scandir(self.root):
            stem, suffix = os.path.splitext(entry.name)
            if suffix not in (SUFFIX, FORMAT_1_SUFFIX) or not stem.isdigit() or not entry.is_file():
                continue  # also skips ".tmp-..." files: a write in progress, or one cut short
            self._next_seq = max(self._next_seq, int(stem) + 1)
            if suffix == SUFFIX:
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:  # the writer dropped it meanwhile
                    continue
                shape = _first_shape(Path(entry.path))
                found[entry.name] = _Segment(size // record_size(shape or self.frame_shape), size, shape)
        self._segments = dict(sorted(found.items()))

    def _readable(self) -> list[str]:
        return [name for name, seg in self._segments.items() if seg.shape in (self.frame_shape, None)]

    def stats(self) -> FrameBufferStats:
        """Frames of this buffer's shape and bytes of all segments, as written to the directory."""
        return FrameBufferStats(len(self), sum(s.bytes for s in self._segments.values()))

    def __len__(self) -> int:
        return sum(self._segments[name].frames for name in self._readable())

    # -- the writer ---------------------------------------------------------------------------------

    def recover(self) -> None:
        """Make the directory the writer's: remove temporary files of writes a crash or power cut
        interrupted (never renamed, so never frames), drop format-1 frames left by an earlier version,
        and apply the limits. `append` calls it before the first write if the writer has not."""
        dropped = 0
        for entry in os.scandir(self.root):
            stem, suffix = os.path.splitext(entry.name)
            old = suffix == FORMAT_1_SUFFIX and stem.isdigit()
            if old or entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    dropped += old
        if dropped:
            log.info("frame buffer %s: dropped %d frames of format 1 (float32, one file per frame) left by an "
                     "earlier version; format %d keeps uint8 frames, and the buffer refills from the cameras",
                     self.root, dropped, FORMAT)
        self._enforce()
        self._recovered = True

    def append(self, pixels: np.ndarray, label: int, timestamp_ns: int | None = None) -> None:
        """Queue one labelled frame (uint8, as captured); the batch is written when it is full or old."""
        if tuple(pixels.shape) != self.frame_shape:
            raise ValueError(f"frame shape {tuple(pixels.shape)} does not match the buffer's {self.frame_shape}")
        blob = encode_frame(pixels, label, time.time_ns() if timestamp_ns is None else timestamp_ns)
        if len(blob) > self.max_bytes:
            raise ValueError(f"one frame ({len(blob)} bytes) exceeds the buffer's byte limit {self.max_bytes}")
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(blob)
        if len(self._pending) >= self.batch_frames or time.monotonic() - self._pending_since >= self.batch_seconds:
            self.flush()

    def flush(self) -> Path | None:
        """Write the waiting frames as one segment (no fsync), then drop the oldest segments beyond the
        limits. Returns the segment's path, or None when no frame was waiting. If the write fails (a full
        disk) the batch is dropped with it, so a failing disk cannot grow the writer's memory."""
        if not self._pending:
            return None
        if not self._recovered:
            self.recover()
        name = f"{self._next_seq:012d}{SUFFIX}"
        self._next_seq += 1
        data = b"".join(self._pending)
        frames = len(self._pending)
        self._pending = []
        final = self.root / name
        tmp = self.root / f"{TMP_PREFIX}{name}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self._segments[name] = _Segment(frames, len(data), self.frame_shape)
        self._enforce()
        return final

    def _enforce(self) -> None:
        frames = sum(s.frames for s in self._segments.values())
        total = sum(s.bytes for s in self._segments.values())
        while self._segments and (frames > self.max_frames or total > self.max_bytes):
            oldest = next(iter(self._segments))
            seg = self._segments.pop(oldest)
            frames -= seg.frames
            total -= seg.bytes
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / oldest)

    # -- readers ------------------------------------------------------------------------------------

    def _records(self, name: str) -> Iterator[tuple[np.ndarray, int]]:
        """(pixels, label) of every sound record of one segment; damaged ones are logged and skipped."""
        try:
            blob = (self.root / name).read_bytes()
        except FileNotFoundError:  # the writer dropped it since this buffer was opened
            return
        size = self.record_bytes
        whole, torn = divmod(len(blob), size)
        for i in range(whole):
            try:
                pixels, label, _ = decode_frame(blob[i * size:(i + 1) * size], f"{name} frame {i}")
            except FrameFileError as exc:
                log.warning("skipping an unreadable frame: %s", exc)
                continue
            yield pixels, label
        if torn:
            log.warning("skipping a torn frame: %s ends with %d bytes of a %d-byte record", name, torn, size)

    def load(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The newest `limit` frames (all when None) as x (n, c, h, w) uint8 and y (n,) int64."""
        names = self._readable()
        if limit is not None:
            if limit <= 0:
                names = []
            else:  # the newest segments that hold `limit` frames
                held = 0
                for start in range(len(names) - 1, -1, -1):
                    held += self._segments[names[start]].frames
                    if held >= limit:
                        names = names[start:]
                        break
        capacity = sum(self._segments[name].frames for name in names)
        x = np.empty((capacity, *self.frame_shape), np.uint8)
        y = np.empty(capacity, np.int64)
        n = 0
        for name in names:
            for pixels, label in self._records(name):  # segments never grow: at most `frames` records
                x[n], y[n] = pixels, label
                n += 1
        first = 0 if limit is None else max(0, n - limit)
        return x[first:n], y[first:n]

    def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A random batch (without replacement; fewer when the buffer holds fewer) as (x, y)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        x, y = self.load()
        rng = rng or np.random.default_rng()
        picked = np.sort(rng.choice(len(y), size=min(batch_size, len(y)), replace=False))
        return x[picked], y[picked]

    def label_counts(self) -> dict[int, int]:
        """How many stored frames carry each label (headers only: checksums are not verified)."""
        counts: dict[int, int] = {}
        size = self.record_bytes
        for name in self._readable():
            try:
                blob = (self.root / name).read_bytes()
            except FileNotFoundError:
                continue
            for start in range(0, len(blob) - size + 1, size):
                if blob[start:start + 4] == MAGIC:
                    counts[blob[start + 4]] = counts.get(blob[start + 4], 0) + 1
        return counts
