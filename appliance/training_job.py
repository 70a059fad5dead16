"""One round's local training, as a picklable job the agent runs in the trainer's child cgroup.

The child process reads the training data itself (from the frame buffer, or the synthetic source in the
demo), so frames never pass through the agent process, and an out-of-memory kill takes the trainer, not the
agent. Everything the job needs travels in :class:`TrainJob`; the result is a plain
:class:`~appliance.training_result.TrainResult`.

A detector package (one with a ``detection`` field) trains on heatmap targets built here from boxes
(appliance.detection.encode_targets): the synthetic cameras' true boxes, or on real cameras the pseudo-boxes
the frame buffer stores with each frame. Its result carries the detection quality the device can measure
cheaply: centre F1 and the vehicle count's error, on the round's frames after training (against the
pseudo-boxes on real cameras).

onnxruntime is imported by the child only (the fork server preloads ``appliance.trainer``): the long-lived
agent process never runs a model, and importing the runtime there would cost it ~45 MB of resident memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nacl.signing import VerifyKey

from appliance.detection import DetectionSpec, detect, encode_targets, quality
from appliance.framebuffer import FrameBuffer, to_model_input
from appliance.modelpkg import ModelPackage, load_package
from appliance.synthetic import SyntheticCamera
from appliance.training_result import TrainResult

FRAMES_DIR = "frames"


@dataclass(frozen=True)
class TrainJob:
    package_path: str
    aggregator_key: bytes
    params: dict[str, np.ndarray]
    source: str  # "synthetic" or "cameras"
    state_dir: str
    samples: int
    synthetic_camera: int
    seed: int
    epochs: int
    batch_size: int
    learning_rate: float
    prox_mu: float
    threads: int


class NotEnoughData(Exception):
    """The frame buffer holds too few labelled frames to train this round."""


def training_data(job: TrainJob) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) for this round: fresh frames from the synthetic camera, or the newest labelled real frames.

    x is float32 in [0, 1]. The buffer stores frames as captured (uint8); they become float32 here, in the
    trainer's process, so the flash holds a quarter of the bytes and the uint8 copy is freed on return.
    """
    if job.source == "synthetic":
        return SyntheticCamera(job.synthetic_camera, seed=job.seed).sample(job.samples)
    frames = FrameBuffer(Path(job.state_dir) / FRAMES_DIR)
    if len(frames) < job.batch_size:
        raise NotEnoughData(f"{len(frames)} labelled frames in the buffer, need at least {job.batch_size}")
    stored, y = frames.load(limit=job.samples)
    if len(y) < job.batch_size:  # segments a failing card could not read were skipped: the card's failure, then
        raise NotEnoughData(f"{len(y)} readable labelled frames in the buffer, need at least {job.batch_size}") \
            from frames.read_error
    return to_model_input(stored), y


def detection_data(job: TrainJob, package: ModelPackage) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(x, targets, boxes) for a detector: frames, the training labels built from their boxes, the boxes.

    Boxes come from the synthetic camera's truth, or from the frame buffer: the motion labeller's pseudo-boxes
    (appliance.labels.MotionLabeller.update_boxes), stored with each frame. They carry no class, so a detector
    of more than one class cannot train on them: refused with the reason, as is a buffer of counts only
    (framebuffer.CountsOnlyBuffer).
    """
    spec = DetectionSpec.from_package(package)
    if job.source == "synthetic":
        x, _, boxes = SyntheticCamera(job.synthetic_camera, seed=job.seed).sample_with_boxes(job.samples)
        return x, encode_targets(spec, boxes), boxes
    if spec.classes != 1:
        raise ValueError(f"{package.name} detects {spec.classes} classes; the cameras' pseudo-boxes are moving "
                         "blobs with no class, so it trains with [data] source = \"synthetic\" only")
    frames = FrameBuffer(Path(job.state_dir) / FRAMES_DIR)
    stored, boxes = frames.load_boxes(limit=job.samples)
    if len(stored) < job.batch_size:
        raise NotEnoughData(f"{len(stored)} frames with pseudo-boxes in the buffer, need at least {job.batch_size}") \
            from frames.read_error
    return to_model_input(stored), encode_targets(spec, boxes), boxes


def run_train_job(job: TrainJob) -> TrainResult:
    """Entry point of the trainer child process."""
    from appliance.trainer import Trainer

    package = load_package(Path(job.package_path), VerifyKey(job.aggregator_key))
    boxes = None
    if package.detection:
        x, y, boxes = detection_data(job, package)
    else:
        x, y = training_data(job)
    trainer = Trainer(package, threads=job.threads)
    result = trainer.train(
        job.params,
        x,
        y,
        epochs=job.epochs,
        batch_size=job.batch_size,
        lr=job.learning_rate,
        prox_mu=job.prox_mu,
        seed=job.seed,
    )
    if boxes is not None:
        trained = {k: np.asarray(v, np.float32) + result.delta[k] for k, v in job.params.items()}
        result.metrics.update(quality(detect(trainer, trained, x, job.batch_size), boxes).as_metrics())
    return result
