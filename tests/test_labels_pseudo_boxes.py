"""Pseudo-boxes for the detector on a real camera: the motion labeller's blobs, their bounding boxes, and how far
they are from the synthetic cameras' true boxes (bench/pseudo_boxes.py measures it; docs/models.md quotes it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from appliance.labels import MotionLabeller, blobs

BENCH = Path(__file__).resolve().parent.parent / "bench" / "pseudo_boxes.py"


def _bench():
    spec = importlib.util.spec_from_file_location("pseudo_boxes", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pseudo_boxes"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_blobs_have_the_bounding_box_of_their_pixels():
    mask = np.zeros((10, 12), bool)
    mask[1:4, 2:5] = True  # a 3x3 square
    mask[6:9, 7] = True  # a vertical bar joined diagonally to ...
    mask[9, 8:11] = True  # ... a horizontal one
    found = sorted((b.box, b.area) for b in blobs(mask))
    assert found == [((2, 1, 5, 4), 9), ((7, 6, 11, 10), 6)]
    assert blobs(np.zeros((4, 4), bool)) == []


def test_moving_rectangles_become_their_own_boxes():
    rng = np.random.default_rng(0)
    road = (0.4 + rng.normal(0, 0.01, (48, 48))).astype(np.float32)
    labeller = MotionLabeller()
    for t in range(30):
        frame = road + rng.normal(0, 0.01, road.shape).astype(np.float32)
        if t >= 15:  # after the warm-up: the background is the empty road
            frame[5:11, t + 1:t + 9] += 0.4  # bright, 8x6, moving right
            frame[30:34, 40 - t:45 - t] -= 0.3  # dark, 5x4, moving left
        boxes = labeller.update_boxes(np.clip(frame, 0, 1))
    assert boxes is not None
    order = np.argsort(boxes[:, 1])
    np.testing.assert_array_equal(boxes[order], [[30, 5, 38, 11], [11, 30, 16, 34]])
    assert labeller.update(np.clip(frame, 0, 1)) == 2  # the count is the number of boxes, as before


def test_pseudo_boxes_fit_day_vehicles_and_find_only_the_headlights_at_night():
    bench = _bench()
    day = bench.measure(4, 80)  # camera 4: day, one lane, moderate noise
    night = bench.measure(0, 80)  # camera 0: night, dark bodies with bright headlights
    assert not day.night and night.night
    assert day.frames == night.frames == 80 - 15  # no labels during the warm-up
    assert day.iou_recall > 0.9 and day.iou_precision > 0.9 and np.median(day.ious) > 0.65
    # At night the blob is the headlights: the centre is near, the box far too small for IoU 0.5.
    assert night.iou_recall < 0.1 and night.centre_recall > 0.7
    assert night.blob_size[0] * night.blob_size[1] < 0.4 * night.true_size[0] * night.true_size[1]
