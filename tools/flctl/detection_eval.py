"""Host-side detection quality: mAP computed by pycocotools (the COCO reference implementation), beside the
device's own cheap figures (centre F1, vehicle count), from the same decoded detections.

The detections are what the device decodes (appliance.detection.decode: sigmoid, 3x3 max-pool NMS, the 20 best
peaks), so the host measures exactly what a device would act on. Those scoring below 0.05 are left out of mAP,
as Detectron's evaluation does: they add recall only at precisions near zero, and cost COCOeval most of its
time (every peak of 8 cameras' 150 frames each took 2.5 s). mAP@0.5 is COCO's AP at IoU 0.5 over all areas
with up to 100 detections per image (101-point interpolated precision, averaged over classes); mAP@0.5:0.95 is
COCO's headline figure, for reference: on 32x32 frames with 3-6 pixel vehicles a one-pixel error already costs
IoU 0.75.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.detection import Detections, detect, quality

MAP_MIN_SCORE = 0.05


def _xywh(box: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_map(detections: Sequence[Detections], boxes: Sequence[np.ndarray],
             classes: Sequence[np.ndarray] | None = None) -> tuple[float, float]:
    """(mAP@0.5, mAP@0.5:0.95) of per-frame ``detections`` against true ``boxes`` (class indices per box,
    all 0 when ``classes`` is None), by pycocotools' COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(boxes):
        raise ValueError(f"{len(detections)} frames of detections but {len(boxes)} of boxes")
    annotations, categories = [], set()
    for image, frame_boxes in enumerate(boxes):
        frame_boxes = np.asarray(frame_boxes, np.float32).reshape(-1, 4)
        labels = np.zeros(len(frame_boxes), np.int64) if classes is None else np.asarray(classes[image])
        for box, label in zip(frame_boxes, labels, strict=True):
            xywh = _xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": image, "category_id": int(label) + 1,
                                "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
            categories.add(int(label) + 1)
    results = [{"image_id": image, "category_id": int(label) + 1, "bbox": _xywh(box), "score": float(score)}
               for image, det in enumerate(detections)
               for box, score, label in zip(det.boxes, det.scores, det.classes, strict=True)]
    if not annotations or not results:
        return 0.0, 0.0
    categories |= {r["category_id"] for r in results}
    truth = COCO()
    truth.dataset = {"images": [{"id": i} for i in range(len(boxes))], "annotations": annotations,
                     "categories": [{"id": c} for c in sorted(categories)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth.createIndex()
        found = truth.loadRes(results)
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # IoU x recall x class, all areas, 100 detections
    at_50 = precision[int(np.argmin(np.abs(evaluation.params.iouThrs - 0.5)))]

    def mean(p: np.ndarray) -> float:
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else 0.0

    return mean(at_50), mean(precision)


@dataclass(frozen=True)
class DetectorQuality:
    """A detector's quality on frames with true boxes: host-side mAP and the device's own figures."""

    map50: float
    map50_95: float
    centre_f1: float
    centre_precision: float
    centre_recall: float
    count_mae: float  # mean |detected - true| vehicles per frame
    frames: int

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def evaluate_detector(trainer: Any, params: dict[str, np.ndarray], x: np.ndarray,
                      boxes: Sequence[np.ndarray]) -> DetectorQuality:
    """mAP@0.5 (pycocotools), centre F1 and count error of ``params`` on frames ``x`` with true ``boxes``."""
    found = detect(trainer, params, x, threshold=MAP_MIN_SCORE)
    map50, map50_95 = coco_map(found, boxes)
    q = quality(found, boxes)
    return DetectorQuality(map50, map50_95, q.f1, q.precision, q.recall, q.count_mae, len(boxes))
