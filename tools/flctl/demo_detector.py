"""The detector's part of `flctl demo --model detector`: its package, its held-out frames with true boxes, its
scores per round, and the picture of held-out frames with predicted and true boxes.

The package is exported by the general path (flctl.model.detector through flctl.model.build, checked against
torch autograd), so the demo needs torch on the host, as `flctl model export --torch` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from nacl.signing import SigningKey

from appliance.detection import SCORE_THRESHOLD, Detections, detect, quality
from appliance.modelpkg import write_package
from appliance.synthetic import SyntheticCamera, evaluation_set_with_boxes
from flctl.detection_eval import MAP_MIN_SCORE, coco_map
from flctl.model import export_reference_package

if TYPE_CHECKING:
    from flctl.model.build import PackageOptions

DETECTOR_INPUT = (1, 32, 32)
DETECTOR_NAME = "traffic-detector"
# Each training step's gradient is clipped to this L2 norm (docs/models.md, "Gradient clipping"). At the demo's lr
# 0.01 it trims only outliers (step norms: median 6.4, 99th percentile 18, max 29) and changes nothing measurable;
# at the package's own lr 0.05 unclipped steps reached norms of 336-2719 in the first rounds and left every heatmap
# dead (mAP@0.5 0.00 for 10 rounds), clipped to 20 the detector reached 0.94.
DETECTOR_MAX_GRAD_NORM = 20.0
PICTURE_FRAMES_PER_CAMERA = 2
# The headline and the other columns of the demo's tables: (key, title, format).
COLUMNS = (("map50", "mAP@0.5", "{:.3f}"), ("centre_f1", "centre F1", "{:.3f}"), ("count_mae", "count err", "{:.2f}"))


def export_detector_package(out: Path, key: SigningKey, seed: int = 0) -> bytes:
    """Export flctl.model.detector's network and loss (checked against torch autograd), sign, write; returns the
    digest. The same as `flctl model export --torch flctl.model.detector:centre_net ...` (docs/models.md)."""
    from flctl.model.build import build_torch_package, make_model
    from flctl.model.losses import resolve_loss

    model = make_model("flctl.model.detector:centre_net", seed)
    pkg, _, _ = build_torch_package(model, resolve_loss("flctl.model.detector:centre_net_loss"), DETECTOR_INPUT,
                                    detector_options())
    return write_package(out, pkg, key)


def detector_options() -> PackageOptions:
    """The reference detector's package fields: its name, class, normalisation and optimiser (SGD with momentum,
    each step's gradient clipped to DETECTOR_MAX_GRAD_NORM)."""
    from flctl.model.build import DEFAULT_OPTIMIZER, PackageOptions

    return PackageOptions(name=DETECTOR_NAME, class_names=["vehicle"], mean=0.4, std=0.25,
                          optimizer={**DEFAULT_OPTIMIZER, "max_grad_norm": DETECTOR_MAX_GRAD_NORM},
                          task="vehicle boxes on traffic cameras (synthetic truth in the demo)")


def export_demo_package(model: str, out: Path, key: SigningKey) -> bytes:
    """The package `flctl demo --model MODEL` trains: the detector, or a reference model (``cnn``)."""
    if model == "detector":
        return export_detector_package(out, key)
    return export_reference_package(model, out, key)


def held_out(cameras: int, per_camera: int, sample_seed: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Per camera, ``per_camera`` held-out frames and their true boxes (a stream no training seed uses)."""
    held = []
    for c in range(cameras):
        x, _, boxes = evaluation_set_with_boxes(per_camera, [c], sample_seed=sample_seed)
        held.append((x, boxes))
    return held


def scores(trainer: Any, params: dict[str, np.ndarray],
           per_camera: list[tuple[np.ndarray, list[np.ndarray]]]) -> tuple[dict[str, float], list[float]]:
    """(overall, per camera mAP@0.5): mAP@0.5 and @0.5:0.95 by pycocotools, centre F1 and the count's error
    over all cameras' held-out frames, decoded once."""
    found = [detect(trainer, params, x, threshold=MAP_MIN_SCORE) for x, _ in per_camera]
    per_device = [coco_map(f, b)[0] for f, (_, b) in zip(found, per_camera, strict=True)]
    every = [d for f in found for d in f]
    boxes = [b for _, camera_boxes in per_camera for b in camera_boxes]
    map50, map50_95 = coco_map(every, boxes)
    q = quality(every, boxes)
    overall = {"map50": map50, "map50_95": map50_95, "centre_f1": q.f1, "centre_precision": q.precision,
               "centre_recall": q.recall, "count_mae": q.count_mae}
    return overall, per_device


def write_picture(trainer: Any, params: dict[str, np.ndarray], per_camera: list[tuple[np.ndarray, list]],
                  out: Path, title: str) -> Path:
    """Held-out frames of every camera (two each) with true boxes (green) and detections scoring at least
    SCORE_THRESHOLD (red, with the score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = PICTURE_FRAMES_PER_CAMERA
    fig, axes = plt.subplots(n, len(per_camera), figsize=(2.0 * len(per_camera), 2.1 * n + 0.4), squeeze=False)
    for c, (x, boxes) in enumerate(per_camera):
        found: list[Detections] = detect(trainer, params, x[:n])
        for r in range(n):
            ax = axes[r][c]
            ax.imshow(x[r, 0], cmap="gray", vmin=0, vmax=1, extent=(0, x.shape[3], x.shape[2], 0))
            ax.set_xticks([])
            ax.set_yticks([])
            for x0, y0, x1, y1 in boxes[r]:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.2))
            kept = found[r].above(SCORE_THRESHOLD)
            for (x0, y0, x1, y1), score in zip(kept.boxes, kept.scores, strict=True):
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.0, ls="--"))
                ax.text(x0, y0 - 0.5, f"{score:.2f}", color="red", fontsize=6)
            if r == 0:
                night = " (night)" if SyntheticCamera(c).style.night else ""
                ax.set_title(f"camera {c}{night}", fontsize=8)
    fig.suptitle(f"{title}: true boxes green, detections (score >= {SCORE_THRESHOLD:g}) red", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
