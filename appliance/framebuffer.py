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

Two record kinds share the directory, each segment holding one kind of one shape:

- **counts** (format 2, magic b"FLF2"): a frame and its count label, for the counting classifier;
- **boxes** (format 3, magic b"FLF3"): the same plus the frame's pseudo-boxes (the motion labeller's blobs),
  for a detector. The camera recorder writes these; the count is still in each record, so a counting
  classifier trains on either kind, while a detector trains on box records only (`load_boxes`).

Segment files are `<sequence:012d>.fls` (the sequence grows, so name order is age order), each a run of
records of one size. A record, little-endian, is a 24-byte header, the pixels, then (format 3) the boxes:
    magic  4s  b"FLF2" or b"FLF3"
    label  u8  class index (the count, clipped)
    boxes  u8  format 2: 0; format 3: how many of the BOX_SLOTS box slots are used
    c,h,w  3 x u16  frame shape
    ts_ns  u64  capture time, ns since the epoch
    crc32  u32  zlib.crc32 of header bytes 4..20 (label to ts_ns), continued over the pixels and box slots
    pixels c*h*w uint8, row-major
    slots  format 3 only: BOX_SLOTS x 4 x u16, (x0, y0, x1, y1) in 1/16 frame pixels, unused slots 0
Format 2 segments written before boxes were stored stay readable (for counts); a version that knows only
format 2 skips format-3 records as unreadable. Format 1 (one fsynced `<sequence:012d>.flf` file per frame,
float32 pixels) is not read: the writer deletes such files in `recover()` and logs how many it dropped.
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

from appliance.storage_errors import storage_reason

log = logging.getLogger(__name__)

FORMAT = 3
MAGIC = b"FLF2"  # counts only
BOXES_MAGIC = b"FLF3"  # counts and pseudo-boxes
FORMAT_1_MAGIC = b"FLF1"
HEADER = struct.Struct("<4sBB3HQI")
BOX_SLOTS = 8  # boxes kept per frame (the largest): more blobs than this in a 32x32 frame are mostly noise
BOX_UNITS = 16  # box coordinates are stored in 1/16 pixel (the labeller's view is 2x the frame: exact)
BOX = struct.Struct("<4H")
SUFFIX = ".fls"
FORMAT_1_SUFFIX = ".flf"
TMP_PREFIX = ".tmp-"
BATCH_FRAMES = 64
BATCH_SECONDS = 60.0


class FrameFileError(ValueError):
    """A frame record that cannot be read back (wrong magic, truncated, checksum mismatch)."""


class CountsOnlyBuffer(ValueError):
    """A detector asked for pseudo-boxes, and the buffer holds frames with counts only."""


@dataclass(frozen=True)
class FrameBufferStats:
    frames: int
    bytes: int


@dataclass(frozen=True)
class _Segment:
    frames: int  # whole records in the file
    bytes: int
    shape: tuple[int, int, int] | None  # of its first record; None when that record is unreadable
    boxes: bool = False  # format 3 records (with pseudo-boxes)


@dataclass(frozen=True)
class FrameRecord:
    """One stored frame: pixels (c, h, w) uint8, its count label, capture time, and its pseudo-boxes (float32
    (k, 4) of (x0, y0, x1, y1) in frame pixels) or None for a counts-only record."""

    pixels: np.ndarray
    label: int
    timestamp_ns: int
    boxes: np.ndarray | None


# The frames the camera recorder writes (appliance.cameras.CaptureSettings.frame_shape): the reference model's input.
CAMERA_FRAME_SHAPE: tuple[int, int, int] = (1, 32, 32)


def record_size(shape: tuple[int, ...], boxes: bool = False) -> int:
    """Bytes of one stored frame of ``shape`` (c, h, w): header, uint8 pixels and (format 3) the box slots."""
    return HEADER.size + math.prod(shape) + (BOX_SLOTS * BOX.size if boxes else 0)


def frames_held(max_frames: int, max_bytes: int, shape: tuple[int, ...] = CAMERA_FRAME_SHAPE,
                boxes: bool = True) -> int:
    """How many frames of ``shape`` a buffer within ``max_frames`` and ``max_bytes`` holds at most: its frame limit,
    or fewer when their bytes reach its byte limit first. The defaults are what the camera recorder writes, whatever
    the model: 1x32x32 frames with their box slots, 1,112 bytes each (64 MiB hold 60,349)."""
    return min(max_frames, max_bytes // record_size(shape, boxes))


def _box_slots(boxes: np.ndarray, height: int, width: int) -> bytes:
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes are (k, 4) of (x0, y0, x1, y1), got shape {b.shape}")
    if len(b) > BOX_SLOTS:
        raise ValueError(f"{len(b)} boxes for one frame; at most {BOX_SLOTS} are stored (keep the largest)")
    limit = np.array([width, height, width, height])
    if (not np.isfinite(b).all() or (b < 0).any() or (b > limit).any()
            or (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any()):
        raise ValueError(f"boxes must lie in the {width}x{height} frame with x0 <= x1 and y0 <= y1, got {b.tolist()}")
    if max(width, height) * BOX_UNITS > 0xFFFF:
        raise ValueError(f"a {width}x{height} frame is too large for box coordinates in 1/{BOX_UNITS} pixel")
    slots = np.zeros((BOX_SLOTS, 4), "<u2")
    slots[:len(b)] = np.rint(b * BOX_UNITS)
    return slots.tobytes()


def encode_frame(pixels: np.ndarray, label: int, timestamp_ns: int, boxes: np.ndarray | None = None) -> bytes:
    """One frame record for uint8 ``pixels`` of shape (c, h, w): format 2 (count only) when ``boxes`` is None,
    format 3 with the pseudo-boxes (k, 4) in frame pixels otherwise."""
    if pixels.ndim != 3:
        raise ValueError(f"a frame is (channels, height, width), got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"frames are stored as captured, uint8 0..255; got {pixels.dtype} pixels")
    if not 0 <= label <= 255:
        raise ValueError(f"label must be a class index 0..255, got {label}")
    c, h, w = pixels.shape
    data = np.ascontiguousarray(pixels).tobytes()
    magic, used = MAGIC, 0
    if boxes is not None:
        data += _box_slots(boxes, h, w)
        magic, used = BOXES_MAGIC, len(boxes)
    fields = HEADER.pack(magic, label, used, c, h, w, timestamp_ns, 0)[4:20]
    return HEADER.pack(magic, label, used, c, h, w, timestamp_ns, zlib.crc32(data, zlib.crc32(fields))) + data


def decode_frame(blob: bytes, name: str = "frame") -> FrameRecord:
    """One record (format 2 or 3) -> FrameRecord; FrameFileError names what is wrong."""
    if len(blob) < HEADER.size:
        raise FrameFileError(f"{name}: {len(blob)} bytes, shorter than the {HEADER.size}-byte header")
    magic, label, used, c, h, w, ts, crc = HEADER.unpack_from(blob)
    if magic not in (MAGIC, BOXES_MAGIC):
        old = " (format 1, float32: no longer read)" if magic == FORMAT_1_MAGIC else ""
        raise FrameFileError(f"{name}: bad magic {magic!r}{old}, expected {MAGIC!r} or {BOXES_MAGIC!r}")
    has_boxes = magic == BOXES_MAGIC
    data = memoryview(blob)[HEADER.size:]
    want = record_size((c, h, w), has_boxes) - HEADER.size
    if len(data) != want:
        raise FrameFileError(f"{name}: {len(data)} pixel bytes{' and box slots' if has_boxes else ''}, shape "
                             f"{c}x{h}x{w} needs {want}")
    if has_boxes and used > BOX_SLOTS:
        raise FrameFileError(f"{name}: {used} boxes, more than the {BOX_SLOTS} slots")
    if zlib.crc32(data, zlib.crc32(blob[4:20])) != crc:
        raise FrameFileError(f"{name}: checksum mismatch")
    pixels = np.frombuffer(data[:c * h * w], dtype=np.uint8).reshape(c, h, w)
    boxes = None
    if has_boxes:
        slots = np.frombuffer(data[c * h * w:], dtype="<u2").reshape(BOX_SLOTS, 4)
        boxes = slots[:used].astype(np.float32) / np.float32(BOX_UNITS)
    return FrameRecord(pixels, label, ts, boxes)


def to_model_input(frames: np.ndarray) -> np.ndarray:
    """Stored uint8 frames -> float32 in [0, 1], the input range model packages are trained on."""
    if frames.dtype != np.uint8:
        raise ValueError(f"stored frames are uint8, got {frames.dtype}")
    out = np.empty(frames.shape, np.float32)
    np.divide(frames, np.float32(255), out=out)
    return out


def _first_header(path: Path) -> tuple[tuple[int, int, int], bool] | None:
    """(shape, has boxes) of a segment's first record, or None when it is unreadable (damaged, or the card fails
    to read it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER.size)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a card that fails to read it: its frames are skipped when read (FrameBuffer._records)
        if storage_reason(exc) is None:
            raise
        return None
    if len(head) < HEADER.size or head[:4] not in (MAGIC, BOXES_MAGIC):
        return None
    c, h, w = HEADER.unpack(head)[3:6]
    return (c, h, w), head[:4] == BOXES_MAGIC


class FrameBuffer:
    """Labelled frames in one directory, bounded by `max_frames` and `max_bytes` (oldest dropped first).

    One writer per directory (the agent's FrameRecorder: `recover()`, `append()`, `flush()`); any number
    of readers, which only read. Counts and reads cover frames written to segments, not those still
    waiting in the writer's memory.
    """

    def __init__(self, root: Path | str, *, max_frames: int = 5000, max_bytes: int = 64 * 1024 * 1024,
                 frame_shape: tuple[int, int, int] = CAMERA_FRAME_SHAPE, batch_frames: int = BATCH_FRAMES,
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
        largest = record_size(self.frame_shape, boxes=True)
        # A segment is at most 1/8 of either limit, so deleting whole segments keeps 7/8 of the buffer.
        self.batch_frames = max(1, min(batch_frames, max_frames // 8, max_bytes // (8 * largest)))
        self.batch_seconds = batch_seconds
        self.root.mkdir(parents=True, exist_ok=True)
        self._segments: dict[str, _Segment] = {}
        self._next_seq = 0
        self._pending: list[bytes] = []
        self._pending_since = 0.0
        self._recovered = False
        # The last read of a segment the card failed (EIO): a reader left short of frames names it as the cause.
        self.read_error: OSError | None = None
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
                head = _first_header(Path(entry.path))
                shape, boxes = head if head else (None, False)
                found[entry.name] = _Segment(size // record_size(shape or self.frame_shape, boxes), size, shape, boxes)
        self._segments = dict(sorted(found.items()))

    def _readable(self, boxes: bool | None = None) -> list[str]:
        """Segments of this buffer's shape: all of them, or only those with (True) or without (False) boxes."""
        return [name for name, seg in self._segments.items()
                if seg.shape in (self.frame_shape, None) and (boxes is None or seg.boxes == boxes)]

    def stats(self) -> FrameBufferStats:
        """Frames of this buffer's shape and bytes of all segments, as written to the directory."""
        return FrameBufferStats(len(self), sum(s.bytes for s in self._segments.values()))

    def __len__(self) -> int:
        return sum(self._segments[name].frames for name in self._readable())

    def frames_with_boxes(self) -> int:
        """Frames stored with their pseudo-boxes (format 3): what a detector can train on."""
        return sum(self._segments[name].frames for name in self._readable(boxes=True))

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

    @property
    def waiting(self) -> int:
        """Frames queued in memory, not yet written: what a failed write drops."""
        return len(self._pending)

    def append(self, pixels: np.ndarray, label: int, timestamp_ns: int | None = None,
               boxes: np.ndarray | None = None) -> Path | None:
        """Queue one labelled frame (uint8, as captured) with its pseudo-boxes in frame pixels (None: a count
        only); the batch is written when it is full or old. A segment holds one record kind, so a frame of the
        other kind first writes the waiting batch. Returns the last segment this call wrote (None: the frame waits in
        memory); a write that fails (see :meth:`flush`) raises, and drops the frames waiting and this one."""
        if tuple(pixels.shape) != self.frame_shape:
            raise ValueError(f"frame shape {tuple(pixels.shape)} does not match the buffer's {self.frame_shape}")
        blob = encode_frame(pixels, label, time.time_ns() if timestamp_ns is None else timestamp_ns, boxes)
        if len(blob) > self.max_bytes:
            raise ValueError(f"one frame ({len(blob)} bytes) exceeds the buffer's byte limit {self.max_bytes}")
        written = self.flush() if self._pending and len(self._pending[0]) != len(blob) else None
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(blob)
        if len(self._pending) >= self.batch_frames or time.monotonic() - self._pending_since >= self.batch_seconds:
            return self.flush()
        return written

    def flush(self) -> Path | None:
        """Write the waiting frames as one segment (no fsync), then drop the oldest segments beyond the
        limits. Returns the segment's path, or None when no frame was waiting. If the write fails (a full
        disk), or the recover step before the first write does (a leftover a read-only card will not let go), the
        batch is dropped with it, so a failing disk cannot grow the writer's memory."""
        if not self._pending:
            return None
        data = b"".join(self._pending)
        frames = len(self._pending)
        self._pending = []  # dropped if what follows fails, the recover step too
        if not self._recovered:
            self.recover()
        name = f"{self._next_seq:012d}{SUFFIX}"
        self._next_seq += 1
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
        boxes = data[:4] == BOXES_MAGIC
        self._segments[name] = _Segment(frames, len(data), self.frame_shape, boxes)
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
            try:
                os.unlink(self.root / oldest)
            except FileNotFoundError:
                pass
            except OSError as exc:
                # A failing card that will not remove it: the batch just written stays written, and retention goes
                # on with the next segment; this one is out of the writer's count (over the limit by at most one
                # segment each) until the next start finds it and tries again.
                if storage_reason(exc) is None:
                    raise
                log.warning("frame buffer %s: cannot remove %s (%s); it stays until the next start tries again",
                            self.root, oldest, exc.strerror or exc)

    # -- readers ------------------------------------------------------------------------------------

    def _read_segment(self, name: str) -> bytes | None:
        """The bytes of one segment; None when the writer dropped it since this buffer was opened, or when the card
        fails to read it (logged)."""
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if storage_reason(exc) is None:
                raise
            log.warning("skipping an unreadable segment: %s: %s", name, exc.strerror or exc)
            self.read_error = exc
            return None

    def _records(self, name: str) -> Iterator[FrameRecord]:
        """Every sound record of one segment; damaged ones are logged and skipped, and so is a segment the card fails
        to read (EIO): a failing card costs those frames, not the round."""
        blob = self._read_segment(name)
        if blob is None:
            return
        size = record_size(self.frame_shape, self._segments[name].boxes)
        whole, torn = divmod(len(blob), size)
        for i in range(whole):
            try:
                yield decode_frame(blob[i * size:(i + 1) * size], f"{name} frame {i}")
            except FrameFileError as exc:
                log.warning("skipping an unreadable frame: %s", exc)
        if torn:
            log.warning("skipping a torn frame: %s ends with %d bytes of a %d-byte record", name, torn, size)

    def _newest(self, names: list[str], limit: int | None) -> list[str]:
        """The newest of ``names`` that hold ``limit`` frames (all when None)."""
        if limit is None:
            return names
        held = 0
        for start in range(len(names) - 1, -1, -1):
            held += self._segments[names[start]].frames
            if held >= limit:
                return names[start:]
        return names if limit > 0 else []

    def _load(self, names: list[str], limit: int | None) -> tuple[np.ndarray, np.ndarray, list[FrameRecord]]:
        names = self._newest(names, limit) if limit is None or limit > 0 else []
        capacity = sum(self._segments[name].frames for name in names)
        x = np.empty((capacity, *self.frame_shape), np.uint8)
        y = np.empty(capacity, np.int64)
        records = []
        for name in names:
            for record in self._records(name):  # segments never grow: at most `frames` records
                x[len(records)], y[len(records)] = record.pixels, record.label
                records.append(record)
        n = len(records)
        first = 0 if limit is None else max(0, n - limit)
        return x[first:n], y[first:n], records[first:n]

    def load(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The newest `limit` frames (all when None), with or without boxes, as x (n, c, h, w) uint8 and
        y (n,) int64 count labels."""
        x, y, _ = self._load(self._readable(), limit)
        return x, y

    def load_boxes(self, limit: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """The newest `limit` frames stored with pseudo-boxes (all when None): x (n, c, h, w) uint8 and, per
        frame, its boxes float32 (k, 4) in frame pixels. CountsOnlyBuffer when the buffer holds frames but
        none with boxes (written by a version that stored counts only, or by a counts-only writer)."""
        names = self._readable(boxes=True)
        if not names and len(self):
            raise CountsOnlyBuffer(
                f"the frame buffer {self.root} holds {len(self)} frames with counts only and none with "
                "pseudo-boxes; a detector trains on boxes (frame format 3, which the camera recorder writes): "
                "they accumulate as the cameras record")
        x, _, records = self._load(names, limit)
        return x, [r.boxes for r in records]

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
        for name in self._readable():
            size = record_size(self.frame_shape, self._segments[name].boxes)
            blob = self._read_segment(name)
            if blob is None:
                continue
            for start in range(0, len(blob) - size + 1, size):
                if blob[start:start + 4] in (MAGIC, BOXES_MAGIC):
                    counts[blob[start + 4]] = counts.get(blob[start + 4], 0) + 1
        return counts
