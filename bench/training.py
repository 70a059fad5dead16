"""On-device training throughput and memory: our trainer (onnxruntime + numpy) against PyTorch.

Both sides train the same model from the same initial weights on the same data with the same optimiser (SGD,
momentum 0.9), thread count and batch size, in the same run. The models: the two hand-written reference graphs
(cnn, mlp) and two exported by the general path (`flctl model export --torch`): the vehicle detector
(flctl.model.detector:centre_net with its CenterNet loss, targets built from the synthetic cameras' boxes) and
the MobileNetV2-style classifier (flctl.model.examples:mobilenet_v2, cross-entropy on the cameras' counts).
PyTorch trains the same torch module eagerly. Each measurement runs in its own
subprocess so peak RSS (VmHWM) is that side's alone; our worker never imports torch, as on the device.
The sides alternate for --repeats rounds and the medians are compared. Samples per CPU-second (process CPU
time of all threads) are shown beside wall-clock samples/s: on a shared machine they are the steadier figure,
and on a device they are what the cgroup's CPU quota buys.

A second table: bytes of one update per wire encoding (float32/float16/int8) and the held-out accuracy an
in-process FedAvg over synthetic cameras reaches after the same rounds with each encoding.

    .venv/bin/python bench/training.py                 # all tables
    .venv/bin/python bench/training.py --quick         # fewer samples and repeats
    .venv/bin/python bench/training.py --models detector,mbv2 --no-encodings   # the exported models only
    .venv/bin/python bench/training.py --profile detector   # where onnxruntime's time goes, per op type
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LR = 0.05
REFERENCE = ("cnn", "mlp")  # hand-written graphs (flctl.model.refmodels)


@dataclass(frozen=True)
class Exported:
    """A model exported by the general path: its factory and loss, as `flctl model export --torch` names them."""

    factory: str
    loss: str
    input_shape: tuple[int, ...]
    lr: float
    target: float  # ours / torch samples per second the issue asks for


EXPORTED = {
    "detector": Exported("flctl.model.detector:centre_net", "flctl.model.detector:centre_net_loss", (1, 32, 32),
                         0.01, 1.0),
    "mbv2": Exported("flctl.model.examples:mobilenet_v2", "cross-entropy", (1, 32, 32), LR, 0.7),
}
MODELS = (*REFERENCE, *EXPORTED)


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. VmHWM belongs to the process's own address space, so
    unlike ru_maxrss it does not carry the parent's footprint over fork+exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_data(model: str, samples: int, package: object = None) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic camera frames (count labels; the detector's heatmap targets from their boxes) or sklearn digits
    tiled to ``samples`` (MLP). Made once by the parent and handed to both sides as a .npz, so neither side's RSS
    includes the data generator's imports."""
    if model == "detector":
        from appliance.detection import DetectionSpec, encode_targets
        from appliance.synthetic import SyntheticCamera

        per = -(-samples // 8)
        frames, boxes = [], []
        for c in range(8):
            x, _, b = SyntheticCamera(c, seed=42).sample_with_boxes(per)
            frames.append(x)
            boxes += b
        return np.concatenate(frames)[:samples], encode_targets(DetectionSpec.from_package(package), boxes[:samples])
    if model in ("cnn", "mbv2"):
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
    lr = EXPORTED[args.model].lr if args.model in EXPORTED else LR
    if args.side == "ours":
        from appliance.trainer import Trainer

        trainer = Trainer(pkg, threads=args.threads)
        opt = {"name": "momentum", "momentum": 0.9}
        trainer.train(pkg.initial_params, x[:warm], y[:warm], 1, args.batch, lr, optimizer=opt, measure=False)
        cpu0 = time.process_time()
        result = trainer.train(pkg.initial_params, x, y, args.epochs, args.batch, lr, seed=1, optimizer=opt,
                               measure=False)
        cpu = time.process_time() - cpu0
        sps = result.metrics["samples_per_second"]
        loss = result.metrics["train_loss"]
        assert "torch" not in sys.modules
    else:
        import torch

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
        model, loss_fn = _torch_model(args.model)
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name in pkg.initial_params:
                    t.copy_(torch.from_numpy(pkg.initial_params[name]))
        xt = torch.from_numpy(pkg.preprocess(x))
        yt = torch.from_numpy(y)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

        def epoch(n_samples: int, rng: np.random.Generator) -> float:
            order = torch.from_numpy(rng.permutation(n_samples))
            total = 0.0
            for start in range(0, n_samples, args.batch):
                idx = order[start : start + args.batch]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xt[idx]), yt[idx])
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


def _torch_model(model: str) -> tuple[object, object]:
    """The torch module and loss function the PyTorch side trains (train mode, the package's own module)."""
    import torch

    if model in EXPORTED:
        from flctl.model.build import make_model
        from flctl.model.losses import resolve_loss

        spec = EXPORTED[model]
        return make_model(spec.factory, seed=0).train(), resolve_loss(spec.loss).fn
    from flctl import refmodels

    return refmodels.torch_module(refmodels.MODELS[model]), torch.nn.functional.cross_entropy


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


def build_package(model: str) -> object:
    """The model's package: a reference model's hand-written graphs, or an export by the general path (torch
    traced in this parent process only; the workers load the written package)."""
    if model in REFERENCE:
        from flctl.model import build_reference_package

        return build_reference_package(model)[0]
    from flctl.model.build import PackageOptions, build_torch_package, make_model
    from flctl.model.losses import resolve_loss

    spec = EXPORTED[model]
    options = PackageOptions(name=model, mean=0.4, std=0.25)
    pkg, _, _ = build_torch_package(make_model(spec.factory, seed=0), resolve_loss(spec.loss), spec.input_shape,
                                    options)
    return pkg


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets, met or missed, per measured row."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    cnn = [r for r in rows if r["model"] == "cnn"]
    if cnn:
        lines.append(f"targets: cnn >= 1.0x torch samples/s: {verdict(all(r['speed_ratio'] >= 1 for r in cnn))}; "
                     f"cnn peak RSS <= 100 MB: {verdict(all(r['ours_rss'] <= 100 for r in cnn))}")
    for r in rows:
        if r["model"] not in EXPORTED:
            continue
        want = EXPORTED[r["model"]].target
        text = (f"target: {r['model']} ({r['threads']} thr) >= {want:.1f}x torch samples/s: "
                f"{r['speed_ratio']:.2f}x {verdict(r['speed_ratio'] >= want)}")
        if r["model"] == "detector":
            text += f"; peak RSS <= 0.5x torch's: {r['rss_ratio']:.2f}x {verdict(r['rss_ratio'] <= 0.5)}"
        lines.append(text)
    return lines


def profile_table(pkg: object, x: np.ndarray, y: np.ndarray, batch: int, threads: int, top: int = 12) -> str:
    """Run the package's training graph under onnxruntime's profiler for every full batch of ``x`` and sum the
    kernels' time per op type (and per node for the largest ones): where a step's time goes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="bench-profile-")) / "ort")
    sess = ort.InferenceSession(pkg.training_graph, so, providers=["CPUExecutionProvider"])
    tensors = {**pkg.initial_params, **getattr(pkg, "local_buffers", {})}
    feeds = {i.name: tensors[i.name] for i in sess.get_inputs() if i.name in tensors}
    xp = pkg.preprocess(x)
    steps = len(x) // batch
    for s in range(steps):
        feeds.update(input=xp[s * batch:(s + 1) * batch], labels=y[s * batch:(s + 1) * batch])
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    by_node: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        op = ev["args"].get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + ev["dur"]
        node = f"{op} {ev['name'][:-len('_kernel_time')]}"
        by_node[node] = by_node.get(node, 0.0) + ev["dur"]
    total = sum(by_op.values())
    lines = [f"{pkg.name}: onnxruntime kernel time per training step (batch {batch}, {threads} thread, "
             f"{steps} steps): {total / steps / 1000:.2f} ms",
             f"{'op type':<28}{'ms/step':>9}{'share':>8}"]
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{op:<28}{us / steps / 1000:>9.3f}{us / total:>7.0%}")
    lines.append("largest nodes:")
    for node, us in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {node[:70]:<70}{us / steps / 1000:>9.3f}{us / total:>7.0%}")
    return "\n".join(lines)


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
    ap.add_argument("--max-threads", type=int, default=2,
                    help="thread counts 1..N are measured for every model but the MLP")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--profile", choices=list(EXPORTED),
                    help="instead of the tables: onnxruntime's time per op type in the model's training graph")
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
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")

    sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
    from nacl.signing import SigningKey

    from appliance.modelpkg import write_package

    key = SigningKey.generate()
    pub = bytes(key.verify_key).hex()
    tmp = Path(tempfile.mkdtemp(prefix="bench-training-"))
    if args.profile:
        pkg = build_package(args.profile)
        x, y = make_data(args.profile, args.batch * 40, pkg)
        print(profile_table(pkg, x, y, args.batch, threads=1))
        return 0
    packages, data = {}, {}
    for model in dict.fromkeys([*models, *(() if args.no_encodings else ("cnn",))]):
        pkg = build_package(model)
        packages[model] = tmp / f"{model}.flpkg"
        write_package(packages[model], pkg, key)
        x, y = make_data(model, args.samples, pkg)
        data[model] = tmp / f"{model}-data.npz"
        np.savez(data[model], x=x, y=y)

    configs = [(m, t, args.batch) for m in models for t in (range(1, 2) if m == "mlp" else
                                                            range(1, args.max_threads + 1))]
    print(f"training throughput: {args.samples} samples x {args.epochs} epochs, SGD momentum, "
          f"median of {args.repeats} alternating runs per side, cpus={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = throughput_table(configs, data, args.epochs, args.repeats, packages, pub)
    head = (f"{'model':<9}{'thr':>4}{'batch':>6} | {'ours samp/s':>12}{'torch samp/s':>13}{'ratio':>7} | "
            f"{'ours /CPU-s':>12}{'torch /CPU-s':>13}{'ratio':>7} | "
            f"{'ours RSS MB':>12}{'torch RSS MB':>13}{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<9}{r['threads']:>4}{r['batch']:>6} | {r['ours_sps']:>12.0f}{r['torch_sps']:>13.0f}"
              f"{r['speed_ratio']:>6.2f}x | {r['ours_spc']:>12.0f}{r['torch_spc']:>13.0f}{r['cpu_ratio']:>6.2f}x"
              f" | {r['ours_rss']:>12.1f}{r['torch_rss']:>13.1f}{r['rss_ratio']:>6.2f}x")
    for line in target_lines(rows):
        print(line)

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
