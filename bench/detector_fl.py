"""The vehicle detector's mAP@0.5 per round: FedAvg across the non-IID synthetic cameras against a model trained
centrally on the union of their data (the upper bound), on the same frames.

Each round every camera draws fresh frames with true boxes, as an agent does (`SyntheticCamera(camera,
seed=round)`), and builds its training targets from them (appliance.detection.encode_targets):

* **FedAvg**: every camera trains the global model on its own frames with the package's training graph and
  optimiser (appliance.trainer.Trainer: ``--epochs`` local epochs, batch ``--batch``, learning rate ``--lr``),
  and the deltas go through the aggregator's own FedAvg (aggregator.strategies: ``add`` per camera weighted by
  its frames, ``aggregate``, ``apply``). In process, no HTTP or signatures: they do not change the numbers.
* **central**: one model trains on the union of the same round's frames of every camera, the same epochs,
  batch and learning rate: the same data and the same number of passes over it, without the split.

Both are evaluated after every round on the same held-out frames of every camera (150 each, a stream no
training seed uses) with the host's evaluation (flctl.detection_eval: mAP@0.5 by pycocotools on the device's
own decoding), plus centre F1. The package is exported first (torch, checked against autograd), or read with
``--package FILE --pub AGGREGATOR_PUB``.

    .venv/bin/python bench/detector_fl.py                        # 8 cameras, 10 rounds, 256 frames each
    .venv/bin/python bench/detector_fl.py --rounds 2 --frames 64 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from nacl.signing import SigningKey, VerifyKey

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]  # before bench/aggregator.py shadows the aggregator package

from aggregator.strategies import UpdateSet, make_strategy  # noqa: E402
from appliance.detection import DetectionSpec, encode_targets  # noqa: E402
from appliance.identity import read_key_file  # noqa: E402
from appliance.modelpkg import ModelPackage, load_package  # noqa: E402
from appliance.synthetic import SyntheticCamera  # noqa: E402
from appliance.trainer import Trainer  # noqa: E402
from flctl.demo_detector import export_detector_package, held_out  # noqa: E402
from flctl.detection_eval import evaluate_detector  # noqa: E402

HELD_OUT_PER_CAMERA = 150
HELD_OUT_SEED = 999


def _flat(params: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([params[n].ravel() for n in names]).astype(np.float32)


def _unflat(flat: np.ndarray, like: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for n in names:
        size = like[n].size
        out[n] = flat[start:start + size].reshape(like[n].shape).astype(np.float32)
        start += size
    return out


def round_frames(cameras: int, frames: int, round_id: int, spec: DetectionSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per camera, this round's frames and the targets built from their true boxes."""
    data = []
    for c in range(cameras):
        x, _, boxes = SyntheticCamera(c, seed=round_id).sample_with_boxes(frames)
        data.append((x, encode_targets(spec, boxes)))
    return data


def run(package: ModelPackage, cameras: int, rounds: int, frames: int, epochs: int, batch: int,
        lr: float) -> list[dict[str, float]]:
    """Per round (0 = the initial model): FedAvg's and central's held-out mAP@0.5, mAP@0.5:0.95, centre F1."""
    spec = DetectionSpec.from_package(package)
    trainer = Trainer(package, threads=1)
    names = [s.name for s in package.param_specs]
    evaluation = held_out(cameras, HELD_OUT_PER_CAMERA, HELD_OUT_SEED)
    eval_x = np.concatenate([x for x, _ in evaluation])
    eval_boxes = [b for _, boxes in evaluation for b in boxes]
    fedavg = {n: v.copy() for n, v in package.initial_params.items()}
    central = {n: v.copy() for n, v in package.initial_params.items()}
    strategy = make_strategy("fedavg")
    rows = []
    for round_id in range(rounds + 1):
        started = time.perf_counter()
        if round_id:
            data = round_frames(cameras, frames, round_id, spec)
            strategy.start_round(sum(s.size for s in package.param_specs))
            deltas, weights = [], []
            for c, (x, y) in enumerate(data):
                result = trainer.train(fedavg, x, y, epochs=epochs, batch_size=batch, lr=lr, seed=round_id * 100 + c,
                                       measure=False)
                delta = _flat(result.delta, names)
                strategy.add(delta, float(result.num_samples))
                deltas.append(delta)
                weights.append(result.num_samples)
            aggregated = strategy.aggregate(UpdateSet(deltas, np.array(weights)))
            fedavg = _unflat(strategy.apply(_flat(fedavg, names), aggregated), fedavg, names)
            x_all = np.concatenate([x for x, _ in data])
            y_all = np.concatenate([y for _, y in data])
            result = trainer.train(central, x_all, y_all, epochs=epochs, batch_size=batch, lr=lr, seed=round_id,
                                   measure=False)
            central = {n: central[n] + result.delta[n] for n in central}
        fed_q = evaluate_detector(trainer, fedavg, eval_x, eval_boxes)
        cen_q = evaluate_detector(trainer, central, eval_x, eval_boxes)
        rows.append({"round": round_id, "fedavg_map50": fed_q.map50, "central_map50": cen_q.map50,
                     "fedavg_map50_95": fed_q.map50_95, "central_map50_95": cen_q.map50_95,
                     "fedavg_centre_f1": fed_q.centre_f1, "central_centre_f1": cen_q.centre_f1,
                     "seconds": time.perf_counter() - started})
        r = rows[-1]
        print(f"{round_id:>5} | {r['fedavg_map50']:>11.3f} {r['central_map50']:>11.3f} | "
              f"{r['fedavg_map50_95']:>9.3f} {r['central_map50_95']:>9.3f} | "
              f"{r['fedavg_centre_f1']:>9.3f} {r['central_centre_f1']:>9.3f} | {r['seconds']:>5.0f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--frames", type=int, default=256, help="frames per camera per round")
    p.add_argument("--epochs", type=int, default=1, help="local epochs (and central epochs) per round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--package", type=Path, help="a detector package (default: export flctl.model.detector)")
    p.add_argument("--pub", help="the aggregator public key file of --package")
    p.add_argument("--json", type=Path, help="write the per-round figures here")
    args = p.parse_args()
    if args.package:
        if not args.pub:
            p.error("--package needs --pub AGGREGATOR_PUB")
        package = load_package(args.package, VerifyKey(read_key_file(Path(args.pub))))
    else:
        key = SigningKey.generate()
        path = Path("/tmp") / f"detector-bench-{time.time_ns()}.flpkg"
        export_detector_package(path, key)
        package = load_package(path, key.verify_key)
        path.unlink()
    print(f"{package.name}: FedAvg over {args.cameras} non-IID cameras vs central on their union; "
          f"{args.frames} frames per camera per round, {args.epochs} epochs, batch {args.batch}, lr {args.lr}")
    print("round |      mAP@0.5 (fedavg, central) | mAP@.5:.95 (fed, cen) | centre F1 (fed, cen) | s")
    rows = run(package, args.cameras, args.rounds, args.frames, args.epochs, args.batch, args.lr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
