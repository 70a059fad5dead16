"""appliance.detection: targets built from boxes decode back to the same boxes; peaks, top-k, centre F1 and the
vehicle count behave as a user reading the demo's figures expects. numpy only, no model."""

from __future__ import annotations

import re

import numpy as np
import pytest
from nacl.signing import SigningKey
from test_model_package import signed_content

from appliance import modelpkg
from appliance.detection import (
    Detections,
    DetectionSpec,
    decode,
    encode_targets,
    peaks,
    quality,
)
from appliance.modelpkg import ModelPackage, PackageError, decode_package, encode_package, load_package, write_package
from appliance.synthetic import SyntheticCamera
from appliance.wire import ParamSpec

SPEC = DetectionSpec(stride=2, classes=1, input_shape=(1, 32, 32))


def perfect_outputs(spec: DetectionSpec, labels: np.ndarray) -> np.ndarray:
    """What a model that had learnt the targets exactly would output: heatmap logits, size, offset."""
    c = spec.classes
    heat = np.clip(labels[:, :c], 1e-6, 1 - 1e-6)
    return np.concatenate([np.log(heat / (1 - heat)), labels[:, c:c + 4]], axis=1)


def test_targets_of_synthetic_boxes_decode_back_to_the_same_boxes():
    _, _, boxes = SyntheticCamera(4, seed=2).sample_with_boxes(40)
    labels = encode_targets(SPEC, boxes)
    assert labels.shape == (40, 6, 16, 16) and labels.dtype == np.float32
    found = decode(SPEC, perfect_outputs(SPEC, labels), threshold=0.5)
    assert sum(len(b) for b in boxes) > 40
    for det, true in zip(found, boxes, strict=True):
        order = np.lexsort(true.T[::-1])
        got = det.boxes[np.lexsort(det.boxes.T[::-1])]
        np.testing.assert_allclose(got, true[order], atol=1e-4)
    q = quality(found, boxes)
    assert (q.precision, q.recall, q.f1, q.count_mae) == (1.0, 1.0, 1.0, 0.0)


def test_each_centre_is_exactly_one_with_a_gaussian_around_it_and_a_mask():
    labels = encode_targets(SPEC, [np.array([[10.0, 6.0, 15.0, 9.0]], np.float32)])[0]
    heat, mask = labels[0], labels[5]
    row, col = 3, 6  # centre (12.5, 7.5) px -> cell (6.25, 3.75)
    assert heat[row, col] == 1.0 and (heat == 1.0).sum() == 1
    assert 0.0 < heat[row, col + 1] < 1.0 and heat[row, col + 3] == 0.0
    assert mask.sum() == 1.0 and mask[row, col] == 1.0
    np.testing.assert_allclose(labels[1:5, row, col], [5.0, 3.0, 0.25, 0.75])


def test_peaks_keep_only_local_maxima():
    scores = np.zeros((1, 1, 5, 5), np.float32)
    scores[0, 0, 1, 1], scores[0, 0, 1, 2] = 0.9, 0.8  # neighbours: only the larger survives
    scores[0, 0, 4, 4] = 0.3  # alone in its corner
    kept = peaks(scores)[0, 0]
    assert kept[1, 1] == pytest.approx(0.9) and kept[1, 2] == 0.0 and kept[4, 4] == pytest.approx(0.3)
    assert np.count_nonzero(kept) == 2


def test_decode_keeps_the_top_k_above_the_threshold_best_first():
    outputs = np.zeros((1, 5, 16, 16), np.float32)
    outputs[:, 0] = -10.0
    outputs[:, 1:3] = 4.0
    for i, logit in enumerate([3.0, 1.0, -0.5, 2.0]):  # four separate peaks
        outputs[0, 0, 2 + 4 * i, 8] = logit
    (det,) = decode(SPEC, outputs, top_k=3, threshold=0.8)  # sigmoid: 0.95, 0.73, 0.38, 0.88
    assert len(det.scores) == 2 and np.all(np.diff(det.scores) <= 0)
    (det,) = decode(SPEC, outputs, top_k=3)
    assert len(det.scores) == 3  # the fourth is past top_k
    with pytest.raises(ValueError, match=r"detector outputs must be \(N, 5, 16, 16\)"):
        decode(SPEC, outputs[:, :4])


def test_centre_f1_and_count_error_of_a_detector_that_misses_one_and_invents_one():
    true = [np.array([[0, 0, 4, 4], [10, 10, 14, 14]], np.float32), np.zeros((0, 4), np.float32)]
    hit = np.array([[0.5, 0.5, 4.5, 4.5]], np.float32)  # centre 0.5 px off the first vehicle
    ghost = np.array([[20, 20, 24, 24]], np.float32)
    found = [Detections(hit, np.array([0.9], np.float32), np.zeros(1, np.int64)),
             Detections(ghost, np.array([0.8], np.float32), np.zeros(1, np.int64))]
    q = quality(found, true)
    assert (q.precision, q.recall) == (0.5, 0.5) and q.f1 == pytest.approx(0.5)
    assert q.count_mae == 1.0 and q.true_count == 1.0  # one vehicle missed in frame 0, one invented in frame 1
    assert quality(found, true, threshold=0.95).recall == 0.0  # below the score threshold: not detections


def test_a_package_that_is_not_a_consistent_detector_is_named():
    class Pkg:
        name, detection, input_shape, labels, label_shape = "cnn", {}, (1, 32, 32), {"dtype": "int64"}, ()

    with pytest.raises(ValueError, match="cnn is not a detector"):
        DetectionSpec.from_package(Pkg)
    Pkg.detection = {"kind": "centre-heatmap", "stride": 2, "classes": 1}
    Pkg.labels, Pkg.label_shape = {"dtype": "float32"}, (6, 8, 8)
    with pytest.raises(ValueError, match=r"takes float32 labels shaped \(6, 16, 16\)"):
        DetectionSpec.from_package(Pkg)


def _detector_package(detection: dict) -> ModelPackage:
    return ModelPackage(
        name="detector", param_specs=[ParamSpec("w", (2,))], initial_params={"w": np.zeros(2, np.float32)},
        training_graph=b"graph", inference_graph=b"graph", optimizer={"name": "sgd", "lr": 0.05},
        preprocessing={"input_shape": [1, 32, 32]}, num_classes=1, class_names=["vehicle"],
        labels={"dtype": "float32", "shape": [6, 16, 16]}, detection=detection,
    )  # fmt: skip


def test_the_package_keeps_its_detection_layout_and_refuses_an_unknown_one(tmp_path):
    key = SigningKey(bytes(range(32)))
    path = tmp_path / "detector.flpkg"
    write_package(path, _detector_package({"kind": "centre-heatmap", "stride": 2, "classes": 1}), key)
    loaded = load_package(path, key.verify_key)
    assert DetectionSpec.from_package(loaded) == SPEC
    with pytest.raises(PackageError, match="detection must be"):
        write_package(path, _detector_package({"kind": "anchors", "stride": 2, "classes": 1}), key)


@pytest.mark.parametrize("detection, problem", [
    ({"kind": "centre-heatmap", "stride": 3, "classes": 1}, "input (1, 32, 32) is not (c, H, W) with H, W multiples"),
    ({"kind": "centre-heatmap", "stride": 4, "classes": 1}, "takes float32 labels shaped (6, 8, 8)"),
    ({"kind": "centre-heatmap", "stride": 2, "classes": 2}, "takes float32 labels shaped (7, 16, 16)"),
])
def test_a_detector_whose_input_stride_and_labels_do_not_fit_is_refused_where_made_and_where_received(
        detection, problem):
    """Each field alone in range, together no layout: every round failed in the trainer (DetectionSpec.from_package),
    counted trainer-failed. Now refused by flctl's writer and by a device's reader, naming the mismatch."""
    key = SigningKey(bytes(range(32)))
    pkg = _detector_package(detection)
    with pytest.raises(PackageError, match=re.escape("detection: detector: ") + ".*" + re.escape(problem)):
        encode_package(pkg, key)
    with pytest.raises(PackageError, match=re.escape(problem)) as refused:
        decode_package(signed_content(modelpkg._content(pkg), key), key.verify_key)
    assert refused.value.reason == "bad-content" and refused.value.digest
