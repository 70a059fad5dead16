"""Pseudo-labels for a fixed traffic camera, with no human: how many things are moving in view, and where.

Per camera, a background model (temporal median of the warm-up frames, then a running average) is
subtracted from each frame; pixels that differ by more than a threshold are foreground; a 3x3 opening and
closing clean the mask; connected components (8-connected) smaller than a minimum area are dropped; the
count of the rest, clipped at `max_count`, is the label (the reference task's classes 0, 1, 2, 3 = "3 or
more"). For the detector, the same components' bounding boxes are the pseudo-boxes (`update_boxes`).
numpy only: scipy is not on the device.

What this measures is "blobs that differ from the learnt background", which on a fixed road camera is
mostly vehicles; docs/cameras.md lists what else it counts and when it abstains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MotionLabelSettings:
    """Tuning for `MotionLabeller`. Intensities are on the [0, 1] scale; areas in labelling pixels."""

    warmup_frames: int = 15            # frames whose per-pixel median starts the background; no labels before
    learning_rate: float = 0.05        # background update where the frame is background
    foreground_rate: float = 0.01      # slower update under foreground: a vehicle parked long joins the background
    threshold: float = 0.10            # |frame - background| above this (after the global shift) is foreground
    min_area: int = 6                  # smaller components are noise
    max_foreground_fraction: float = 0.5  # above this the scene changed (lights, camera moved): abstain, re-learn
    max_count: int = 3                 # classes 0..max_count, the last meaning "max_count or more"

    def __post_init__(self) -> None:
        if self.warmup_frames < 1:
            raise ValueError(f"warmup_frames must be at least 1, got {self.warmup_frames}")
        for name in ("learning_rate", "foreground_rate", "max_foreground_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be within (0, 1), got {self.threshold}")
        if self.min_area < 1 or self.max_count < 1:
            raise ValueError(f"min_area and max_count must be at least 1, got {self.min_area}, {self.max_count}")


class MotionLabeller:
    """The label source for one camera: feed its frames in order; `update` returns a class or None.

    None means "no honest label for this frame": still warming up, or the scene changed as a whole.
    """

    def __init__(self, settings: MotionLabelSettings | None = None) -> None:
        self.settings = settings or MotionLabelSettings()
        self._background: np.ndarray | None = None
        self._warmup: list[np.ndarray] = []
        self.scene_changes = 0

    @property
    def ready(self) -> bool:
        return self._background is not None

    def reset(self) -> None:
        self._background = None
        self._warmup.clear()

    def update(self, frame: np.ndarray) -> int | None:
        """One grayscale frame (2-D, values in [0, 1]) -> label 0..max_count, or None (no label)."""
        boxes = self.update_boxes(frame)
        return None if boxes is None else min(len(boxes), self.settings.max_count)

    def update_boxes(self, frame: np.ndarray) -> np.ndarray | None:
        """One grayscale frame (2-D, values in [0, 1]) -> the bounding boxes of its moving blobs, float32 (k, 4)
        of (x0, y0, x1, y1) in the frame's pixels (ends exclusive), or None (no label). The detector's
        pseudo-boxes on a real camera; docs/models.md says how far they are from true boxes."""
        if frame.ndim != 2:
            raise ValueError(f"MotionLabeller takes a 2-D grayscale frame, got shape {frame.shape}")
        frame = frame.astype(np.float32, copy=False)
        if self._background is not None and self._background.shape != frame.shape:
            self.reset()  # the capture size changed: the old background means nothing
        if self._background is None:
            self._warmup.append(frame.copy())
            if len(self._warmup) >= self.settings.warmup_frames:
                self._background = np.median(np.stack(self._warmup), axis=0).astype(np.float32)
                self._warmup.clear()
            return None

        s = self.settings
        diff = frame - self._background
        diff -= np.median(diff)  # a uniform brightness change moves every pixel alike: not motion
        raw = np.abs(diff) > s.threshold
        if raw.mean() > s.max_foreground_fraction:
            self.scene_changes += 1
            self.reset()
            self._warmup.append(frame.copy())
            return None
        rate = np.where(raw, np.float32(s.foreground_rate), np.float32(s.learning_rate))
        self._background += rate * (frame - self._background)
        mask = open3(close3(raw))  # fill holes inside a vehicle first, then drop specks
        boxes = [blob.box for blob in blobs(mask) if blob.area >= s.min_area]
        return np.array(boxes, dtype=np.float32).reshape(-1, 4)


def _neighbourhood(mask: np.ndarray, pad_value: bool, reduce: np.ufunc) -> np.ndarray:
    padded = np.pad(mask, 1, mode="edge") if pad_value else np.pad(mask, 1, mode="constant", constant_values=False)
    h, w = mask.shape
    out = padded[1:1 + h, 1:1 + w].copy()
    for dy in range(3):
        for dx in range(3):
            reduce(out, padded[dy:dy + h, dx:dx + w], out=out)
    return out


def erode3(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion; the border is extended, so blobs touching the edge are not eaten away."""
    return _neighbourhood(mask.astype(bool), True, np.logical_and)


def dilate3(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    return _neighbourhood(mask.astype(bool), False, np.logical_or)


def open3(mask: np.ndarray) -> np.ndarray:
    """Erode then dilate: removes specks smaller than 3x3."""
    return dilate3(erode3(mask))


def close3(mask: np.ndarray) -> np.ndarray:
    """Dilate then erode: fills one-pixel holes and cracks inside a blob."""
    return erode3(dilate3(mask))


@dataclass(frozen=True)
class Blob:
    """One 8-connected component: its pixel count and bounding box (x0, y0, x1, y1), ends exclusive."""

    area: int
    box: tuple[int, int, int, int]


def component_areas(mask: np.ndarray) -> list[int]:
    """Pixel counts of the 8-connected components of a 2-D boolean mask."""
    return [blob.area for blob in blobs(mask)]


def blobs(mask: np.ndarray) -> list[Blob]:
    """The 8-connected components of a 2-D boolean mask, with their areas and bounding boxes.

    Run-length labelling: each row's runs of True are found with numpy, runs touching a run of the row
    above (diagonals included) are merged with union-find. The Python work is per run, not per pixel.
    """
    if mask.ndim != 2:
        raise ValueError(f"blobs takes a 2-D mask, got shape {mask.shape}")
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask.astype(bool)
    edges = np.diff(padded, axis=1)
    starts_r, starts_c = np.nonzero(edges == 1)
    _, ends_c = np.nonzero(edges == -1)  # row-major order pairs each start with its end
    n = len(starts_c)
    if n == 0:
        return []
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows = starts_r.tolist()
    starts = starts_c.tolist()
    ends = ends_c.tolist()  # exclusive
    prev_lo = prev_hi = 0  # run indices [prev_lo, prev_hi) are the previous row's runs
    i = 0
    while i < n:
        row = rows[i]
        j = i
        while j < n and rows[j] == row:
            j += 1
        if prev_hi > prev_lo and rows[prev_lo] == row - 1:
            p = prev_lo
            for k in range(i, j):
                # skip runs above that end before this run's diagonal reach
                while p < prev_hi and ends[p] < starts[k]:
                    p += 1
                q = p
                while q < prev_hi and starts[q] <= ends[k]:
                    a, b = find(k), find(q)
                    if a != b:
                        parent[a] = b
                    q += 1
        prev_lo, prev_hi = i, j
        i = j
    found: dict[int, list[int]] = {}  # root -> [area, x0, y0, x1, y1]
    for k in range(n):
        root = find(k)
        run = ends[k] - starts[k]
        if root not in found:
            found[root] = [run, starts[k], rows[k], ends[k], rows[k] + 1]
            continue
        blob = found[root]
        blob[0] += run
        blob[1], blob[2] = min(blob[1], starts[k]), min(blob[2], rows[k])
        blob[3], blob[4] = max(blob[3], ends[k]), max(blob[4], rows[k] + 1)
    return [Blob(area, (x0, y0, x1, y1)) for area, x0, y0, x1, y1 in found.values()]
