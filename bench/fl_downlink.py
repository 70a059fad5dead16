"""The compressed downlink, measured: bytes per device per round (up + down) and final accuracy, for
``bench/fl_quality.py --downlink``.

The federation, the participants of each round, local training and FedAvg are bench/fl_quality.py's (the same
seeds, so the float32 baseline is ``ours-fedavg-f32`` there). What changes is the wire:

* **up**: each device's signed update (``wire.encode_update``) in float32 or int8, decoded by the aggregator's
  own ``decode_delta``;
* **down**: the aggregator's ``ModelStore`` with ``--downlink full|float16|int8|sparse`` publishes each version
  (rounded to its step, the round engine keeping the unrounded parameters, as ``fl-aggregator serve`` does) and
  answers each participant as ``GET /v1/models/{v}?base=&base_digest=`` would: the signed steps from the version
  that device holds when it has one of the last 16 and the steps are smaller, else the full float32 release.
  A device that sat out rounds is k > 1 versions behind (half the clients train each round, so k is 2 on
  average); its first fetch is the full model. The device rebuilds the model with ``appliance.protocol.downlink``
  and checks its digest, as the agent does.

Bytes are the message bodies (no HTTP framing). Accuracy is the published model's, on the held-out set.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fl_quality import Run, Settings, client_seed, participants, signed_fleet

# name -> (update encoding, downlink); the first is today's wire: float32 updates, full float32 models.
DOWNLINK_METHODS = {
    "f32-up/full-down": ("float32", "full"),
    "int8-up/full-down": ("int8", "full"),
    "int8-up/f16-down": ("int8", "float16"),
    "int8-up/int8-down": ("int8", "int8"),
    "int8-up/sparse-down": ("int8", "sparse"),
}
BASELINE = "f32-up/full-down"
TARGET_RATIO = 4.0
TARGET_LOSS_POINTS = 1.0


def run_downlink(method: str, seed: int, fed: Any, settings: Settings, package: Any, trainer: Any) -> Run:
    """One method and seed; ``run.down_bytes`` per round is what its participants fetched."""

    from aggregator.models import ModelStore, ServedPackage
    from aggregator.strategies import UpdateSet, make_strategy
    from aggregator.verify import decode_delta
    from appliance import wire
    from appliance.protocol import downlink

    update_encoding, downlink_encoding = DOWNLINK_METHODS[method]
    fleet = signed_fleet(settings.clients, seed)
    key, device_keys, device_ids, registry = fleet.aggregator_key, fleet.device_keys, fleet.device_ids, fleet.registry
    limits = wire.Limits()
    strategy = make_strategy("fedavg")
    run = Run(method, seed)
    held: dict[int, wire.ModelRelease] = {}  # what each device holds: the base it names
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fl-downlink-") as directory:
        store = ModelStore(Path(directory), ServedPackage(package, b""), key, downlink_encoding)
        specs = store.layout.specs
        target = store.initial_params()  # what the round engine holds: the unrounded parameters
        store.write(0, target, 1)
        for round_no in range(1, settings.rounds + 1):
            version = round_no - 1
            strategy.start_round(store.layout.size)
            deltas, weights, up, down = [], [], 0, 0
            for c in participants(settings, seed, round_no):
                base = held.get(c)
                body = store.delta_bytes(base.version, base.digest, version) if base is not None else None
                if body is None:
                    body = store.release_bytes(version)
                assert body is not None
                down += len(body)
                release = downlink.decode_model_answer(body, key.verify_key, specs, base)
                held[c] = release
                idx = fed.clients[c]
                result = trainer.train(release.tensors, fed.x[idx], fed.y[idx], settings.epochs, settings.batch,
                                       settings.lr, seed=client_seed(seed, round_no, c), measure=False)
                update = wire.Update(device_ids[c], round_no, version, release.digest, result.num_samples,
                                     result.delta, dict(result.metrics), update_encoding)
                body = wire.encode_update(update, device_keys[c])
                up += len(body)
                decoded, flat, _ = decode_delta(body, registry.get, store.layout, limits)
                strategy.add(flat, float(decoded.num_samples))
                deltas.append(flat)
                weights.append(decoded.num_samples)
            target = strategy.apply(target, strategy.aggregate(UpdateSet(deltas, np.array(weights))))
            store.write(round_no, target, 1 + round_no)
            published = store.params(round_no)
            scores = trainer.evaluate(store.layout.unflatten(published), fed.x_test, fed.y_test)
            run.accuracy.append(scores["accuracy"])
            run.loss.append(scores["loss"])
            run.up_bytes.append(up)
            run.down_bytes.append(down)
        run.final = published
    run.seconds = time.perf_counter() - started
    return run


def run_all(make_federation: Callable[[int], Any], seeds: Sequence[int], settings: Settings, package: Any,
            trainer: Any, methods: Sequence[str]) -> list[Run]:
    runs = []
    for seed in seeds:
        fed = make_federation(seed)
        for method in methods:
            run = run_downlink(method, seed, fed, settings, package, trainer)
            runs.append(run)
            print(f"  seed {seed} {method:<20} final accuracy {run.accuracy[-1]:.4f}, "
                  f"{_per_device(run, settings, 'up') + _per_device(run, settings, 'down'):,.0f} B per device per "
                  f"round, {run.seconds:.1f} s", flush=True)
    return runs


def _per_device(run: Run, settings: Settings, direction: str) -> float:
    per_round = run.up_bytes if direction == "up" else run.down_bytes
    return statistics.fmean(per_round) / settings.per_round


def downlink_report(runs: Sequence[Run], settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """Print the table and the verdict; returns the figures for the JSON file."""
    methods = [m for m in DOWNLINK_METHODS if any(r.method == m for r in runs)]
    summary: dict[str, dict[str, float]] = {}
    for m in methods:
        mine = [r for r in runs if r.method == m]
        up = statistics.fmean(_per_device(r, settings, "up") for r in mine)
        down = statistics.fmean(_per_device(r, settings, "down") for r in mine)
        finals = [r.accuracy[-1] for r in mine]
        summary[m] = {"final_accuracy": statistics.fmean(finals), "final_accuracy_sd": statistics.pstdev(finals),
                      "up_bytes_per_device_round": up, "down_bytes_per_device_round": down, "total": up + down}
    base = summary.get(BASELINE)
    print(f"\nper device per round, mean of {len(seeds)} seed(s), {settings.rounds} rounds, {settings.per_round} of "
          f"{settings.clients} clients a round:")
    print(f"{'method':<20} {'final acc':>15} {'up':>9} {'down':>9} {'up+down':>9} {'vs f32':>7} {'acc loss':>9}")
    for m, s in summary.items():
        if base is not None:
            s["ratio"] = base["total"] / s["total"]
            s["loss_points"] = 100 * (base["final_accuracy"] - s["final_accuracy"])
        ratio = f"{s['ratio']:.2f}x" if "ratio" in s else "-"
        loss = f"{s['loss_points']:+.2f} pt" if "loss_points" in s else "-"
        print(f"{m:<20} {s['final_accuracy']:>8.4f}±{s['final_accuracy_sd']:.4f} "
              f"{s['up_bytes_per_device_round']:>9,.0f} {s['down_bytes_per_device_round']:>9,.0f} "
              f"{s['total']:>9,.0f} {ratio:>7} {loss:>9}")
    if base is not None:
        met = [m for m, s in summary.items()
               if s["ratio"] >= TARGET_RATIO and s["loss_points"] <= TARGET_LOSS_POINTS]
        print(f"\ntarget (>= {TARGET_RATIO:g}x fewer bytes up+down than {BASELINE}, <= {TARGET_LOSS_POINTS:g} point "
              f"lower final accuracy): {', '.join(met) if met else 'not met'}")
    return {"settings": settings.__dict__, "seeds": list(seeds), "summary": summary,
            "runs": [r.figures() for r in runs]}
