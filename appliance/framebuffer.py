"""The bounded frame buffer on the data partition (`<state_dir>/frames/`): labelled frames for training.

One file per frame, written atomically (temporary file, fsync, rename, fsync of the directory), so a power
cut leaves either the whole frame or nothing. Retention keeps the newest frames within a count and a byte
limit. Frames never leave the device: nothing here talks to the network, and the trainer reads
(x, y) batches from this directory.

File format, little-endian, 24-byte header then the pixels:
    magic  4s  b"FLF1"
    label  u8  class index
    rsv    u8  0
    c,h,w  3 x u16  frame shape
    ts_ns  u64  capture time, ns since the epoch
    crc32  u32  zlib.crc32 of the pixel bytes
    pixels c*h*w float32 in [0, 1], row-major
File names are `<sequence:012d>.flf`; the sequence grows, so name order is age order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.durable import fsync_dir

log = logging.getLogger(__name__)

MAGIC = b"FLF1"
HEADER = struct.Struct("<4sBB3HQI")
SUFFIX = ".flf"


class FrameFileError(ValueError):
    """A frame file that cannot be read back (wrong magic, truncated, checksum mismatch)."""


@dataclass(frozen=True)
class FrameBufferStats:
    frames: int
    bytes: int


def encode_frame(pixels: np.ndarray, label: int, timestamp_ns: int) -> bytes:
    if pixels.ndim != 3:
        raise ValueError(f"a frame is (channels, height, width), got shape {pixels.shape}")
    if not 0 <= label <= 255:
        raise ValueError(f"label must be a class index 0..255, got {label}")
    data = np.ascontiguousarray(pixels, dtype="<f4").tobytes()
    c, h, w = pixels.shape
    return HEADER.pack(MAGIC, label, 0, c, h, w, timestamp_ns, zlib.crc32(data)) + data


def decode_frame(blob: bytes, name: str = "frame") -> tuple[np.ndarray, int, int]:
    """bytes -> (pixels (c, h, w) float32, label, timestamp_ns); FrameFileError names what is wrong."""
    if len(blob) < HEADER.size:
        raise FrameFileError(f"{name}: {len(blob)} bytes, shorter than the {HEADER.size}-byte header")
    magic, label, _, c, h, w, ts, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise FrameFileError(f"{name}: bad magic {magic!r}, expected {MAGIC!r}")
    data = blob[HEADER.size:]
    if len(data) != 4 * c * h * w:
        raise FrameFileError(f"{name}: {len(data)} pixel bytes, shape {c}x{h}x{w} needs {4 * c * h * w}")
    if zlib.crc32(data) != crc:
        raise FrameFileError(f"{name}: checksum mismatch")
    return np.frombuffer(data, dtype="<f4").reshape(c, h, w).astype(np.float32), label, ts


class FrameBuffer:
    """Labelled frames in one directory, bounded by `max_frames` and `max_bytes` (oldest dropped first).

    Opening only reads the directory: the limits are applied by the writer, on its first `append`.
    """

    def __init__(self, root: Path | str, *, max_frames: int = 5000, max_bytes: int = 64 * 1024 * 1024,
                 frame_shape: tuple[int, int, int] = (1, 32, 32)) -> None:
        if max_frames < 1 or max_bytes < 1:
            raise ValueError(f"frame buffer limits must be positive, got {max_frames} frames, {max_bytes} bytes")
        if len(frame_shape) != 3 or min(frame_shape) < 1:
            raise ValueError(f"frame_shape is (channels, height, width), got {frame_shape}")
        self.root = Path(root)
        self.frame_shape = tuple(frame_shape)
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[str, int] = {}
        self._next_seq = 0
        self._recovered = False
        self._scan()

    def _scan(self) -> None:
        for entry in os.scandir(self.root):
            if not entry.name.endswith(SUFFIX) or not entry.is_file():
                continue
            stem = entry.name[: -len(SUFFIX)]
            if not stem.isdigit():  # also skips ".tmp-..." files: a write in progress, or one cut short
                continue
            self._sizes[entry.name] = entry.stat().st_size
            self._next_seq = max(self._next_seq, int(stem) + 1)
        self._sizes = dict(sorted(self._sizes.items()))

    def stats(self) -> FrameBufferStats:
        return FrameBufferStats(len(self._sizes), sum(self._sizes.values()))

    def __len__(self) -> int:
        return len(self._sizes)

    def _recover(self) -> None:
        """Before the first write: remove temporary files of writes a crash or power cut interrupted
        (never renamed, so never frames) and apply the limits. Only the writer (the agent) does this;
        readers (the trainer, `len()`) open the same directory without changing it."""
        for entry in os.scandir(self.root):
            if entry.name.startswith(".tmp-"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        self._enforce()
        self._recovered = True

    def append(self, pixels: np.ndarray, label: int, timestamp_ns: int | None = None) -> Path:
        """Store one labelled frame durably, then drop the oldest frames beyond the limits.

        One writer per directory (the agent's FrameRecorder); any number of readers.
        """
        if not self._recovered:
            self._recover()
        if tuple(pixels.shape) != self.frame_shape:
            raise ValueError(f"frame shape {tuple(pixels.shape)} does not match the buffer's {self.frame_shape}")
        blob = encode_frame(pixels, label, time.time_ns() if timestamp_ns is None else timestamp_ns)
        if len(blob) > self.max_bytes:
            raise ValueError(f"one frame ({len(blob)} bytes) exceeds the buffer's byte limit {self.max_bytes}")
        name = f"{self._next_seq:012d}{SUFFIX}"
        self._next_seq += 1
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        fsync_dir(self.root)
        self._sizes[name] = len(blob)
        self._enforce()
        return final

    def _enforce(self) -> None:
        total = sum(self._sizes.values())
        while self._sizes and (len(self._sizes) > self.max_frames or total > self.max_bytes):
            oldest = next(iter(self._sizes))
            total -= self._sizes.pop(oldest)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / oldest)

    def names(self) -> list[str]:
        """Frame file names, oldest first."""
        return list(self._sizes)

    def _read(self, name: str) -> tuple[np.ndarray, int] | None:
        try:
            pixels, label, _ = decode_frame((self.root / name).read_bytes(), name)
        except FileNotFoundError:
            self._sizes.pop(name, None)
            return None
        except FrameFileError as exc:
            log.warning("dropping unreadable frame: %s", exc)
            self._sizes.pop(name, None)
            (self.root / name).unlink(missing_ok=True)
            return None
        if pixels.shape != self.frame_shape:
            log.debug("skipping %s: shape %s, buffer holds %s", name, pixels.shape, self.frame_shape)
            return None
        return pixels, label

    def iter_frames(self) -> Iterator[tuple[np.ndarray, int]]:
        """(pixels, label) for every readable frame, oldest first."""
        for name in self.names():
            item = self._read(name)
            if item is not None:
                yield item

    def load(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The newest `limit` frames (all when None) as x (n, c, h, w) float32 and y (n,) int64."""
        names = self.names()
        if limit is not None:
            names = names[-limit:] if limit > 0 else []
        return self._stack(names)

    def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A random batch (without replacement; fewer when the buffer holds fewer) as (x, y)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        names = self.names()
        rng = rng or np.random.default_rng()
        picked = rng.choice(len(names), size=min(batch_size, len(names)), replace=False) if names else []
        return self._stack([names[i] for i in sorted(picked)])

    def _stack(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs: list[np.ndarray] = []
        ys: list[int] = []
        for name in names:
            item = self._read(name)
            if item is not None:
                xs.append(item[0])
                ys.append(item[1])
        if not xs:
            return np.zeros((0, *self.frame_shape), np.float32), np.zeros((0,), np.int64)
        return np.stack(xs), np.asarray(ys, dtype=np.int64)

    def label_counts(self) -> dict[int, int]:
        """How many stored frames carry each label (reads the 24-byte headers only)."""
        counts: dict[int, int] = {}
        for name in self.names():
            try:
                with open(self.root / name, "rb") as fh:
                    head = fh.read(HEADER.size)
            except FileNotFoundError:
                continue
            if len(head) == HEADER.size and head[:4] == MAGIC:
                label = head[4]
                counts[label] = counts.get(label, 0) + 1
        return counts
