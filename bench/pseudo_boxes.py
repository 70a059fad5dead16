"""How noisy are the detector's pseudo-boxes? The motion labeller's blobs (appliance.labels) against the synthetic
cameras' true boxes, per camera.

Each synthetic camera's frames go through a `MotionLabeller` in order, as a real camera's would: the first
15 frames (warm-up) get no label. The labeller sees each frame upscaled 2x (nearest), as on a real camera,
where it works on a 64x64 view of a frame stored at 32x32 (appliance.cameras); its boxes are scaled back to
the 32x32 frame. Per camera:

* recall and precision of blobs against true boxes at IoU >= 0.5 (greedy one-to-one matching by IoU), and of
  blob centres within 2 pixels of a true centre (what the detector's centre heatmap is trained on);
* the IoU of matched pairs (median and 10th/90th percentiles), and the mean blob and true box size.

    .venv/bin/python bench/pseudo_boxes.py                 # 8 cameras x 300 frames
    .venv/bin/python bench/pseudo_boxes.py --frames 100 --scale 1
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from appliance.detection import centre_hits, match_by_iou
from appliance.labels import MotionLabeller
from appliance.synthetic import SyntheticCamera

IOU = 0.5


@dataclass(frozen=True)
class PseudoBoxNoise:
    camera: int
    night: bool
    frames: int  # labelled (after the warm-up)
    true_boxes: int
    blobs: int
    iou_recall: float  # true boxes with a blob of IoU >= 0.5
    iou_precision: float  # blobs with a true box of IoU >= 0.5
    centre_recall: float  # true centres with a blob centre within 2 px
    centre_precision: float
    ious: np.ndarray  # IoU of every matched (overlapping) pair
    blob_size: tuple[float, float]  # mean (w, h) in pixels of the 32x32 frame
    true_size: tuple[float, float]


def measure(camera: int, frames: int, seed: int = 0, scale: int = 2) -> PseudoBoxNoise:
    """Run the labeller over ``frames`` frames of ``camera`` and compare its blobs with the true boxes."""
    x, _, boxes = SyntheticCamera(camera, seed=seed).sample_with_boxes(frames)
    labeller = MotionLabeller()
    labelled = n_true = n_blobs = iou_true = iou_found = centre = 0
    ious: list[float] = []
    blob_sizes, true_sizes = [], []
    for frame, true in zip(x[:, 0], boxes, strict=True):
        view = np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)
        found = labeller.update_boxes(view)
        if found is None:
            continue
        found = found / scale
        labelled += 1
        n_true += len(true)
        n_blobs += len(found)
        pairs = match_by_iou(found, true)
        ious += [iou for _, _, iou in pairs]
        good = sum(1 for _, _, iou in pairs if iou >= IOU)
        iou_true += good
        iou_found += good
        centre += centre_hits(found, true)
        blob_sizes += [(b[2] - b[0], b[3] - b[1]) for b in found]
        true_sizes += [(b[2] - b[0], b[3] - b[1]) for b in true]

    def mean_size(sizes: list) -> tuple[float, float]:
        return tuple(np.mean(sizes, axis=0).tolist()) if sizes else (0.0, 0.0)

    return PseudoBoxNoise(
        camera=camera, night=SyntheticCamera(camera).style.night, frames=labelled, true_boxes=n_true,
        blobs=n_blobs, iou_recall=iou_true / max(n_true, 1), iou_precision=iou_found / max(n_blobs, 1),
        centre_recall=centre / max(n_true, 1), centre_precision=centre / max(n_blobs, 1),
        ious=np.array(ious, np.float32), blob_size=mean_size(blob_sizes), true_size=mean_size(true_sizes),
    )  # fmt: skip


def _row(r: PseudoBoxNoise) -> str:
    q = np.percentile(r.ious, [10, 50, 90]) if len(r.ious) else [float("nan")] * 3
    return (f"{r.camera:>3} {'night' if r.night else 'day':>5} {r.frames:>6} {r.true_boxes:>5} {r.blobs:>5} | "
            f"{r.iou_recall:>6.2f} {r.iou_precision:>6.2f} | {r.centre_recall:>6.2f} {r.centre_precision:>6.2f} | "
            f"{q[0]:>4.2f} {q[1]:>4.2f} {q[2]:>4.2f} | {r.blob_size[0]:>4.1f}x{r.blob_size[1]:<4.1f} "
            f"{r.true_size[0]:>4.1f}x{r.true_size[1]:<4.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=2, help="upscale factor of the labeller's view (default 2)")
    args = p.parse_args()
    results = [measure(c, args.frames, args.seed, args.scale) for c in range(args.cameras)]
    print(f"pseudo-boxes (motion blobs) against true boxes: {args.frames} frames per camera, labeller view "
          f"{32 * args.scale}x{32 * args.scale}")
    print("cam light frames  true blobs | IoU>=0.5 rec  prec | centre rec  prec | IoU p10  p50  p90 | "
          "blob size  true size")
    for r in results:
        print(_row(r))
    day = [r for r in results if not r.night]
    for name, group in (("day", day), ("night", [r for r in results if r.night]), ("all", results)):
        if not group:
            continue
        t, b = sum(r.true_boxes for r in group), sum(r.blobs for r in group)
        rec = sum(r.iou_recall * r.true_boxes for r in group) / max(t, 1)
        prec = sum(r.iou_precision * r.blobs for r in group) / max(b, 1)
        crec = sum(r.centre_recall * r.true_boxes for r in group) / max(t, 1)
        cprec = sum(r.centre_precision * r.blobs for r in group) / max(b, 1)
        ious = np.concatenate([r.ious for r in group])
        med = float(np.median(ious)) if len(ious) else float("nan")
        print(f"{name:>5}: IoU>=0.5 recall {rec:.2f} precision {prec:.2f}; centre recall {crec:.2f} precision "
              f"{cprec:.2f}; median IoU of matched pairs {med:.2f}")


if __name__ == "__main__":
    main()
