"""Centre-heatmap detection on the device (numpy only): training targets from boxes, boxes from the model's
outputs, and the cheap quality figures a device can afford (centre F1, vehicle count).

A detector package says ``detection: {kind: centre-heatmap, stride, classes}`` (docs/models.md). Its model maps
a frame (c, H, W) to ``classes + 4`` maps on a grid of (H / stride, W / stride) cells, CenterNet-style
(Zhou et al. 2019, "Objects as Points"):

* channels ``0..classes-1``: one centre heatmap per class (logits; a sigmoid gives the score of "an object's
  centre is in this cell");
* ``classes``, ``classes+1``: the box's width and height, in input pixels;
* ``classes+2``, ``classes+3``: where the centre sits inside its cell (x, y, in cells, 0..1).

Its training graph takes labels of ``classes + 5`` maps on the same grid, built here from boxes by
:func:`encode_targets`: the heatmap targets (a Gaussian of sigma (2r+1)/6 cells around each centre, r the
CenterNet radius for a box of that size floored at one cell, exactly 1 at the centre cell), the size and offset
targets at centre cells, and a mask that is 1 at centre cells. The same decoding (:func:`decode`: sigmoid, a
3x3 max-pool as non-maximum suppression, top-k) runs on the device and on the host, where mAP is computed.

Boxes are float32 ``(k, 4)`` arrays of (x0, y0, x1, y1) in input pixels, pixel i spanning [i, i+1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

KIND = "centre-heatmap"
TOP_K = 20  # detections kept per frame before the score threshold (more than a frame of the demo ever holds)
SCORE_THRESHOLD = 0.3  # a detection counts (vehicle count, centre F1) from this score; mAP uses every score
CENTRE_RADIUS_PX = 2.0  # centre F1: a detection is right when its centre is this close to a true centre
MIN_OVERLAP = 0.7  # CenterNet's radius: a box shifted by r still overlaps the true one by this IoU


@dataclass(frozen=True)
class DetectionSpec:
    """How a detector package's outputs and labels are laid out (the package's ``detection`` field)."""

    stride: int
    classes: int
    input_shape: tuple[int, ...]  # (c, H, W)

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_shape[1] // self.stride, self.input_shape[2] // self.stride

    @property
    def output_channels(self) -> int:
        return self.classes + 4

    @property
    def label_channels(self) -> int:
        return self.classes + 5

    @classmethod
    def from_package(cls, package: Any) -> DetectionSpec:
        """The spec of a ``ModelPackage``; ValueError naming the problem when it is not a consistent detector."""
        head = package.detection
        if not head:
            raise ValueError(f"{package.name} is not a detector (its package has no detection field)")
        shape = tuple(package.input_shape)
        spec = cls(int(head["stride"]), int(head["classes"]), shape)
        if len(shape) != 3 or shape[1] % spec.stride or shape[2] % spec.stride:
            raise ValueError(f"{package.name}: input {shape} is not (c, H, W) with H, W multiples of the stride "
                             f"{spec.stride}")
        want = (spec.label_channels, *spec.grid)
        if package.labels.get("dtype") != "float32" or tuple(package.label_shape) != want:
            raise ValueError(f"{package.name}: a {KIND} detector with {spec.classes} class(es) and stride "
                             f"{spec.stride} takes float32 labels shaped {want}, the package says {package.labels}")
        return spec


def gaussian_radius(height: float, width: float, min_overlap: float = MIN_OVERLAP) -> float:
    """CenterNet's radius (in the units of ``height`` and ``width``): the largest shift of a corner pair that
    keeps IoU >= ``min_overlap`` with the true box, the smallest of its three cases."""
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 * b1 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 * b2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 * b3 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def encode_targets(spec: DetectionSpec, boxes: Sequence[np.ndarray],
                   classes: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Training labels (N, classes + 5, gh, gw) float32 for frames with ``boxes`` (and class indices per box,
    all 0 when ``classes`` is None). Boxes with no area are skipped; two centres in one cell: the last wins
    for size and offset, the heatmap keeps the maximum."""
    gh, gw = spec.grid
    c = spec.classes
    out = np.zeros((len(boxes), spec.label_channels, gh, gw), dtype=np.float32)
    ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float32)
    for i, frame_boxes in enumerate(boxes):
        b = np.asarray(frame_boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.zeros(len(b), np.int64) if classes is None else np.asarray(classes[i], np.int64)
        if len(labels) != len(b):
            raise ValueError(f"frame {i}: {len(b)} boxes but {len(labels)} classes")
        if len(labels) and (labels.min() < 0 or labels.max() >= c):
            raise ValueError(f"frame {i}: class indices must be in 0..{c - 1}, got {labels.tolist()}")
        for (x0, y0, x1, y1), k in zip(b, labels, strict=True):
            w, h = float(x1 - x0), float(y1 - y0)
            if not (w > 0 and h > 0):
                continue
            cx, cy = (x0 + x1) / 2 / spec.stride, (y0 + y1) / 2 / spec.stride  # in cells
            col, row = min(int(cx), gw - 1), min(int(cy), gh - 1)
            radius = max(1, int(gaussian_radius(h / spec.stride, w / spec.stride)))
            sigma = (2 * radius + 1) / 6
            blob = np.exp(-((xs - col) ** 2 + (ys - row) ** 2) / (2 * sigma * sigma))
            blob[np.abs(xs - col) > radius] = 0.0
            blob[np.abs(ys - row) > radius] = 0.0
            np.maximum(out[i, k], blob, out=out[i, k])
            out[i, k, row, col] = 1.0
            out[i, c:c + 5, row, col] = (w, h, cx - col, cy - row, 1.0)
    return out


@dataclass(frozen=True)
class Detections:
    """One frame's detections, best first: boxes (k, 4) in input pixels, scores (k,) in (0, 1), classes (k,)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def above(self, threshold: float) -> Detections:
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning for large |x|


def peaks(scores: np.ndarray) -> np.ndarray:
    """``scores`` (N, C, H, W) with every value that is not the maximum of its 3x3 neighbourhood set to 0:
    CenterNet's non-maximum suppression, a max-pool compared with its input."""
    n, c, h, w = scores.shape
    padded = np.full((n, c, h + 2, w + 2), -np.inf, dtype=scores.dtype)
    padded[:, :, 1:-1, 1:-1] = scores
    pooled = scores.copy()
    for dy in range(3):
        for dx in range(3):
            np.maximum(pooled, padded[:, :, dy:dy + h, dx:dx + w], out=pooled)
    return np.where(pooled == scores, scores, 0.0).astype(scores.dtype)


def decode(spec: DetectionSpec, outputs: np.ndarray, top_k: int = TOP_K,
           threshold: float = 0.0) -> list[Detections]:
    """The model's outputs (N, classes + 4, gh, gw) -> per frame, the ``top_k`` best peaks scoring at least
    ``threshold``, as boxes around (cell + offset) * stride with the predicted size, clipped to the frame."""
    outputs = np.asarray(outputs, dtype=np.float32)
    c = spec.classes
    if outputs.ndim != 4 or outputs.shape[1:] != (spec.output_channels, *spec.grid):
        raise ValueError(f"detector outputs must be (N, {spec.output_channels}, {spec.grid[0]}, {spec.grid[1]}), "
                         f"got {outputs.shape}")
    n, _, gh, gw = outputs.shape
    heat = peaks(_sigmoid(outputs[:, :c]))
    flat = heat.reshape(n, -1)
    k = min(top_k, flat.shape[1])
    best = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    height, width = spec.input_shape[1:]
    result = []
    for i in range(n):
        idx = best[i]
        score = flat[i, idx]
        keep = score >= max(threshold, np.finfo(np.float32).tiny)  # suppressed cells are exactly 0
        idx, score = idx[keep], score[keep]
        cls, rest = np.divmod(idx, gh * gw)
        row, col = np.divmod(rest, gw)
        w, h = outputs[i, c, row, col], outputs[i, c + 1, row, col]
        cx = (col + outputs[i, c + 2, row, col]) * spec.stride
        cy = (row + outputs[i, c + 3, row, col]) * spec.stride
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)
        boxes = np.clip(boxes, 0.0, [width, height, width, height]).astype(np.float32)
        result.append(Detections(boxes, score.astype(np.float32), cls.astype(np.int64)))
    return result


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` (k, 4) with every box in ``b`` (m, 4): (k, m)."""
    a = np.asarray(a, np.float32).reshape(-1, 4)[:, None]
    b = np.asarray(b, np.float32).reshape(-1, 4)[None]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0).astype(np.float32)


def match_by_iou(found: np.ndarray, true: np.ndarray) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching, highest IoU first: (found index, true index, IoU) for every pair that
    overlaps at all."""
    iou = box_iou(found, true)
    pairs = []
    while iou.size and iou.max() > 0:
        i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
        pairs.append((int(i), int(j), float(iou[i, j])))
        iou[i, :] = 0
        iou[:, j] = 0
    return pairs


def detect(trainer: Any, params: Mapping[str, np.ndarray], x: np.ndarray, batch_size: int = 128,
           threshold: float = 0.0) -> list[Detections]:
    """Decoded detections (scoring at least ``threshold``) on frames ``x`` (in the package's input range) of a
    detector package's ``appliance.trainer.Trainer`` with ``params``, batch by batch (the inference arena stays
    at that size)."""
    spec = DetectionSpec.from_package(trainer.package)
    found: list[Detections] = []
    for start in range(0, len(x), batch_size):
        found += decode(spec, trainer.outputs(params, x[start:start + batch_size]), threshold=threshold)
    return found


@dataclass(frozen=True)
class DetectionQuality:
    """What a device can measure cheaply: centre precision, recall and F1, and the vehicle count's error."""

    precision: float
    recall: float
    f1: float
    count_mae: float  # mean |detected - true| vehicles per frame
    true_count: float  # mean true vehicles per frame
    frames: int

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}centre_precision": self.precision, f"{prefix}centre_recall": self.recall,
                f"{prefix}centre_f1": self.f1, f"{prefix}count_mae": self.count_mae}


def centre_hits(found: np.ndarray, true: np.ndarray, radius: float = CENTRE_RADIUS_PX) -> int:
    """True positives of one frame: ``found`` boxes, best first, each taking the nearest unmatched true centre
    within ``radius`` pixels (classes ignored: the demo has one)."""
    true = np.asarray(true, np.float32).reshape(-1, 4)
    found = np.asarray(found, np.float32).reshape(-1, 4)
    if not len(true) or not len(found):
        return 0
    true_c = (true[:, :2] + true[:, 2:]) / 2
    free = np.ones(len(true), bool)
    hits = 0
    for p in (found[:, :2] + found[:, 2:]) / 2:
        d = np.hypot(*(true_c - p).T)
        d[~free] = np.inf
        j = int(np.argmin(d))
        if d[j] <= radius:
            free[j] = False
            hits += 1
    return hits


def quality(detections: Sequence[Detections], boxes: Sequence[np.ndarray],
            threshold: float = SCORE_THRESHOLD, radius: float = CENTRE_RADIUS_PX) -> DetectionQuality:
    """Centre F1 and count error of ``detections`` (those scoring at least ``threshold``) against true boxes."""
    if len(detections) != len(boxes):
        raise ValueError(f"{len(detections)} frames of detections but {len(boxes)} of boxes")
    tp = n_pred = n_true = 0
    count_err = 0.0
    for det, true in zip(detections, boxes, strict=True):
        kept = det.above(threshold)
        k = len(np.asarray(true).reshape(-1, 4))
        tp += centre_hits(kept.boxes, true, radius)
        n_pred += len(kept.scores)
        n_true += k
        count_err += abs(len(kept.scores) - k)
    precision = tp / n_pred if n_pred else float(n_true == 0)
    recall = tp / n_true if n_true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    frames = max(len(boxes), 1)
    return DetectionQuality(precision, recall, f1, count_err / frames, n_true / frames, len(boxes))
