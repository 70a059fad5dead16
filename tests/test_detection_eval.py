"""flctl.detection_eval: mAP by pycocotools on the device's decoded detections, with hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pycocotools", reason="pycocotools (a tools dependency) computes mAP")

from appliance.detection import Detections
from flctl.detection_eval import coco_map

TRUE = [np.array([[2, 2, 8, 6], [20, 20, 25, 24]], np.float32), np.zeros((0, 4), np.float32)]


def found(*pairs: tuple[list[float], float]) -> Detections:
    boxes = np.array([b for b, _ in pairs], np.float32).reshape(-1, 4)
    return Detections(boxes, np.array([s for _, s in pairs], np.float32), np.zeros(len(pairs), np.int64))


def test_perfect_detections_score_one():
    dets = [found((list(TRUE[0][0]), 0.9), (list(TRUE[0][1]), 0.8)), found()]
    assert coco_map(dets, TRUE) == (pytest.approx(1.0), pytest.approx(1.0))


def test_half_the_vehicles_found_gives_coco_interpolated_half():
    # One true positive ranked first, then a false positive: precision 1 up to recall 0.5, nothing beyond;
    # COCO averages interpolated precision at 101 recall points: 51 of them are 1.
    dets = [found((list(TRUE[0][0]), 0.9), ([10, 10, 14, 13], 0.8)), found()]
    map50, _ = coco_map(dets, TRUE)
    assert map50 == pytest.approx(51 / 101)


def test_a_false_positive_ranked_below_every_true_one_costs_nothing():
    dets = [found((list(TRUE[0][0]), 0.9), (list(TRUE[0][1]), 0.8)), found(([10, 10, 14, 13], 0.1))]
    assert coco_map(dets, TRUE)[0] == pytest.approx(1.0)


def test_boxes_off_by_more_than_half_their_overlap_do_not_count_at_iou_half():
    shifted = [found(([5, 2, 11, 6], 0.9), ([23, 20, 28, 24], 0.8)), found()]  # IoU 1/3 and 0.25
    assert coco_map(shifted, TRUE) == (0.0, 0.0)
    assert coco_map([found(), found()], TRUE) == (0.0, 0.0)
    with pytest.raises(ValueError, match="2 frames of detections but 1 of boxes"):
        coco_map([found(), found()], TRUE[:1])
