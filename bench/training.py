"""On-device training throughput and memory: our trainer (onnxruntime + numpy) against PyTorch.

Both sides train the same reference model from the same initial weights on the same data with the same
optimiser (SGD, momentum 0.9), thread count and batch size, in the same run. Each measurement runs in its own
subprocess so peak RSS (VmHWM) is that side's alone; our worker never imports torch, as on the device.
The sides alternate for --repeats rounds and the medians are compared. Samples per CPU-second (process CPU
time of all threads) are shown beside wall-clock samples/s: on a shared machine they are the steadier figure,
and on a device they are what the cgroup's CPU quota buys.

A second table: bytes of one update per wire encoding (float32/float16/int8) and the held-out accuracy an
in-process FedAvg over synthetic cameras reaches after the same rounds with each encoding.

    .venv/bin/python bench/training.py                 # all tables
    .venv/bin/python bench/training.py --quick         # fewer samples and repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LR = 0.05


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. VmHWM belongs to the process's own address space, so
    unlike ru_maxrss it does not carry the parent's footprint over fork+exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_data(model: str, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic camera frames (CNN) or sklearn digits tiled to ``samples`` (MLP). Made once by the parent
    and handed to both sides as a .npz, so neither side's RSS includes the data generator's imports."""
    if model == "cnn":
        from appliance.synthetic import SyntheticCamera

        per = -(-samples // 8)
        xs, ys = zip(*(SyntheticCamera(c, seed=42).sample(per) for c in range(8)), strict=True)
        return np.concatenate(xs)[:samples], np.concatenate(ys)[:samples]
    from sklearn.datasets import load_digits

    d = load_digits()
    reps = -(-samples // len(d.target))
    x = np.tile((d.data / 16.0).astype(np.float32), (reps, 1))[:samples]
    return x, np.tile(d.target.astype(np.int64), reps)[:samples]


def worker(args: argparse.Namespace) -> dict:
    """One side's measurement, in its own process. Prints one JSON line."""
    from nacl.signing import VerifyKey

    from appliance.modelpkg import load_package

    pkg = load_package(args.package, VerifyKey(bytes.fromhex(args.pub)))
    with np.load(args.data) as data:
        x, y = data["x"], data["y"]
    rss_ready = _status_mb("VmRSS")
    warm = min(len(y), args.batch * 20)
    if args.side == "ours":
        from appliance.trainer import Trainer

        trainer = Trainer(pkg, threads=args.threads)
        opt = {"name": "momentum", "momentum": 0.9}
        trainer.train(pkg.initial_params, x[:warm], y[:warm], 1, args.batch, LR, optimizer=opt, measure=False)
        cpu0 = time.process_time()
        result = trainer.train(pkg.initial_params, x, y, args.epochs, args.batch, LR, seed=1, optimizer=opt,
                               measure=False)
        cpu = time.process_time() - cpu0
        sps = result.metrics["samples_per_second"]
        loss = result.metrics["train_loss"]
        assert "torch" not in sys.modules
    else:
        import torch

        from flctl import refmodels

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
        spec = refmodels.MODELS[args.model]
        model = refmodels.torch_module(spec)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.from_numpy(pkg.initial_params[name]))
        xt = torch.from_numpy(pkg.preprocess(x))
        yt = torch.from_numpy(y)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

        def epoch(n_samples: int, rng: np.random.Generator) -> float:
            order = torch.from_numpy(rng.permutation(n_samples))
            total = 0.0
            for start in range(0, n_samples, args.batch):
                idx = order[start : start + args.batch]
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                total += float(loss) * len(idx)
            return total / n_samples

        epoch(warm, np.random.default_rng(0))
        rng = np.random.default_rng(1)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(args.epochs):
            loss = epoch(len(y), rng)
        sps = len(y) * args.epochs / (time.perf_counter() - t0)
        cpu = time.process_time() - cpu0
    peak = _status_mb("VmHWM")
    return {"samples_per_second": sps, "samples_per_cpu_second": len(y) * args.epochs / cpu,
            "peak_rss_mb": peak, "rss_with_data_mb": rss_ready, "train_loss": loss}


def _run_worker(side: str, model: str, threads: int, batch: int, data: Path, epochs: int,
                package: Path, pub: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tools"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--threads", str(threads),
           "--batch", str(batch), "--data", str(data), "--epochs", str(epochs),
           "--package", str(package), "--pub", pub]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput_table(configs: list[tuple[str, int, int]], data: dict[str, Path], epochs: int, repeats: int,
                     packages: dict[str, Path], pub: str) -> list[dict]:
    rows = []
    for model, threads, batch in configs:
        runs: dict[str, list[dict]] = {"ours": [], "torch": []}
        for _ in range(repeats):
            for side in ("ours", "torch"):
                runs[side].append(_run_worker(side, model, threads, batch, data[model], epochs, packages[model], pub))
        row = {"model": model, "threads": threads, "batch": batch}
        for side, rs in runs.items():
            row[f"{side}_sps"] = statistics.median(r["samples_per_second"] for r in rs)
            row[f"{side}_spc"] = statistics.median(r["samples_per_cpu_second"] for r in rs)
            row[f"{side}_rss"] = max(r["peak_rss_mb"] for r in rs)
            row[f"{side}_loss"] = statistics.median(r["train_loss"] for r in rs)
        row["speed_ratio"] = row["ours_sps"] / row["torch_sps"]
        row["cpu_ratio"] = row["ours_spc"] / row["torch_spc"]
        row["rss_ratio"] = row["ours_rss"] / row["torch_rss"]
        rows.append(row)
    return rows


def encoding_table(package: Path, pub: str, rounds: int, cameras: int, samples: int) -> list[dict]:
    """FedAvg over ``cameras`` synthetic cameras for ``rounds`` rounds, once per update encoding."""
    from nacl.signing import VerifyKey

    from appliance import wire
    from appliance.modelpkg import load_package
    from appliance.synthetic import SyntheticCamera, evaluation_set
    from appliance.trainer import Trainer

    pkg = load_package(package, VerifyKey(bytes.fromhex(pub)))
    trainer = Trainer(pkg, threads=1)
    xe, ye = evaluation_set(800, cameras=range(cameras))
    start_acc = trainer.evaluate(pkg.initial_params, xe, ye)["accuracy"]
    rows = []
    for encoding in wire.ENCODINGS:
        params = {k: v.copy() for k, v in pkg.initial_params.items()}
        update_bytes = 0
        for rnd in range(rounds):
            total = {k: np.zeros_like(v) for k, v in params.items()}
            count = 0
            for cam in range(cameras):
                x, y = SyntheticCamera(cam, seed=1000 * rnd + cam).sample(samples)
                result = trainer.train(params, x, y, epochs=2, batch_size=32, lr=LR, seed=rnd, measure=False)
                section = wire.encode_tensors(result.delta, encoding)
                update_bytes = len(section)
                decoded, _ = wire.decode_tensors(section, pkg.param_specs)
                for k, v in decoded.items():
                    total[k] += v * result.num_samples
                count += result.num_samples
            for k in params:
                params[k] += total[k] / count
        held_out = trainer.evaluate(params, xe, ye)
        rows.append({"encoding": encoding, "update_bytes": update_bytes, "accuracy": held_out["accuracy"],
                     "loss": held_out["loss"], "start": start_acc})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--model", default="cnn", help=argparse.SUPPRESS)
    ap.add_argument("--package", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--pub", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--samples", type=int, default=2400, help="training samples per measurement")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per side (median reported)")
    ap.add_argument("--max-threads", type=int, default=2, help="thread counts 1..N are measured for the CNN")
    ap.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    ap.add_argument("--no-encodings", action="store_true", help="skip the update-encoding table")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = ap.parse_args()
    if args.worker:
        args.side = args.worker
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        args.samples, args.epochs, args.repeats = 800, 2, 1

    sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
    from nacl.signing import SigningKey

    from appliance.modelpkg import write_package
    from flctl.model import build_reference_package

    key = SigningKey.generate()
    pub = bytes(key.verify_key).hex()
    tmp = Path(tempfile.mkdtemp(prefix="bench-training-"))
    packages, data = {}, {}
    for model in ("cnn", "mlp"):
        pkg, _ = build_reference_package(model)
        packages[model] = tmp / f"{model}.flpkg"
        write_package(packages[model], pkg, key)
        x, y = make_data(model, args.samples)
        data[model] = tmp / f"{model}-data.npz"
        np.savez(data[model], x=x, y=y)

    configs = [("cnn", t, args.batch) for t in range(1, args.max_threads + 1)] + [("mlp", 1, args.batch)]
    print(f"training throughput: {args.samples} samples x {args.epochs} epochs, SGD momentum, "
          f"median of {args.repeats} alternating runs per side, cpus={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = throughput_table(configs, data, args.epochs, args.repeats, packages, pub)
    head = (f"{'model':<6}{'thr':>4}{'batch':>6} | {'ours samp/s':>12}{'torch samp/s':>13}{'ratio':>7} | "
            f"{'ours /CPU-s':>12}{'torch /CPU-s':>13}{'ratio':>7} | "
            f"{'ours RSS MB':>12}{'torch RSS MB':>13}{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<6}{r['threads']:>4}{r['batch']:>6} | {r['ours_sps']:>12.0f}{r['torch_sps']:>13.0f}"
              f"{r['speed_ratio']:>6.2f}x | {r['ours_spc']:>12.0f}{r['torch_spc']:>13.0f}{r['cpu_ratio']:>6.2f}x"
              f" | {r['ours_rss']:>12.1f}{r['torch_rss']:>13.1f}{r['rss_ratio']:>6.2f}x")
    cnn = [r for r in rows if r["model"] == "cnn"]
    print(f"targets: ours >= 1.0x torch samples/s: {'met' if all(r['speed_ratio'] >= 1 for r in cnn) else 'MISSED'};"
          f" ours peak RSS <= 100 MB (CNN): {'met' if all(r['ours_rss'] <= 100 for r in cnn) else 'MISSED'}")

    enc_rows = []
    if not args.no_encodings:
        rounds, cams, per = (2, 3, 200) if args.quick else (4, 4, 400)
        enc_rows = encoding_table(packages["cnn"], pub, rounds, cams, per)
        print()
        print(f"update encodings: CNN, FedAvg of {cams} synthetic cameras x {per} frames, {rounds} rounds, "
              f"2 epochs each; held-out accuracy from {enc_rows[0]['start']:.3f}")
        print(f"{'encoding':<10}{'update bytes':>14}{'vs float32':>12}{'held-out acc':>14}{'held-out loss':>15}")
        base = enc_rows[0]["update_bytes"]
        for r in enc_rows:
            print(f"{r['encoding']:<10}{r['update_bytes']:>14}{r['update_bytes'] / base:>11.2f}x"
                  f"{r['accuracy']:>14.3f}{r['loss']:>15.4f}")
    if args.json:
        args.json.write_text(json.dumps({"throughput": rows, "encodings": enc_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
