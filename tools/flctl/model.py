"""`flctl model export|inspect|verify`: build, check and sign model packages on the host.

export: builds a reference model's training and inference graphs (flctl.refmodels), checks them against
PyTorch autograd on random batches of several sizes, and only then writes the signed package. A graph whose
loss, logits or any gradient differs from torch's (a gradient scaled by the batch size, a missing term) is
refused with the parameter and the error named.

verify: checks a package as a device would (signature against the aggregator key, digest, schema), then runs
its graphs in onnxruntime: a finite-difference check of the gradients, and the torch check again when the
package is a reference model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from appliance.identity import IdentityError, read_key_file
from appliance.modelpkg import ModelPackage, PackageError, load_package, write_package
from appliance.wire import ParamSpec
from flctl import refmodels

CHECK_BATCH_SIZES = (1, 3, 16, 64)
RTOL = 1e-3
ATOL = 1e-5


class GradientCheckError(Exception):
    """A graph's loss, logits or gradients differ from the reference: the package must not be written."""


@dataclass
class CheckReport:
    batch_sizes: tuple[int, ...]
    max_loss_error: float
    max_grad_error: dict[str, float]  # relative to the largest |gradient| of the parameter
    max_logit_error: float


def _session(graph: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


def check_against_torch(
    spec: refmodels.ModelSpec,
    training_graph: bytes,
    inference_graph: bytes,
    params: dict[str, np.ndarray],
    batch_sizes: tuple[int, ...] = CHECK_BATCH_SIZES,
    seed: int = 0,
) -> CheckReport:
    """Compare the graphs with torch autograd on random batches (with ``params`` as the weights).

    Raises GradientCheckError naming the first quantity that differs by more than ATOL + RTOL * scale.
    Several batch sizes, because a gradient wrongly scaled by the batch size agrees at batch size 1.
    """
    import torch

    model = refmodels.torch_module(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(params[name]))
    train, infer = _session(training_graph), _session(inference_graph)
    names = [name for name, _ in model.named_parameters()]
    if set(names) != set(params):
        raise GradientCheckError(f"parameters {sorted(params)} are not the model's {sorted(names)}")
    params = {n: params[n] for n in names}
    grad_outputs = [refmodels.GRAD_PREFIX + n for n in names]
    rng = np.random.default_rng(seed)
    max_loss, max_logit = 0.0, 0.0
    max_grad = dict.fromkeys(params, 0.0)
    for n in batch_sizes:
        x = rng.normal(0.0, 1.0, (n, *spec.input_shape)).astype(np.float32)
        y = rng.integers(0, spec.num_classes, n).astype(np.int64)
        model.zero_grad()
        logits_t = model(torch.from_numpy(x))
        loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(y))
        loss_t.backward()
        feeds = {refmodels.INPUT: x, refmodels.LABELS: y, **params}
        loss, *grads = train.run([refmodels.LOSS, *grad_outputs], feeds)
        (logits,) = infer.run([refmodels.LOGITS], {refmodels.INPUT: x, **params})
        ref_loss = float(loss_t.detach())
        err = abs(float(loss) - ref_loss)
        if err > ATOL + RTOL * abs(ref_loss):
            raise GradientCheckError(f"batch {n}: loss {float(loss):.6g} but torch says {ref_loss:.6g}")
        max_loss = max(max_loss, err)
        ref_logits = logits_t.detach().numpy()
        err = float(np.abs(logits - ref_logits).max())
        if err > ATOL + RTOL * float(np.abs(ref_logits).max()):
            raise GradientCheckError(f"batch {n}: inference logits differ from torch by {err:.3g}")
        max_logit = max(max_logit, err)
        for (name, p), g in zip(model.named_parameters(), grads, strict=True):
            ref = p.grad.numpy()
            scale = float(np.abs(ref).max())
            if g.shape != ref.shape:
                raise GradientCheckError(f"gradient of {name} has shape {g.shape}, torch's is {ref.shape}")
            err = float(np.abs(g - ref).max())
            if err > ATOL + RTOL * scale:
                ratio = float(np.abs(g).max()) / scale if scale > 0 else float("inf")
                raise GradientCheckError(
                    f"batch {n}: gradient of {name} differs from torch autograd by {err:.3g} "
                    f"(largest |grad| {scale:.3g}, graph/torch magnitude ratio {ratio:.3g})"
                )
            max_grad[name] = max(max_grad[name], err / scale if scale > 0 else err)
    return CheckReport(tuple(batch_sizes), max_loss, max_grad, max_logit)


def check_finite_differences(pkg: ModelPackage, batch_size: int = 16, seed: int = 0, trials: int = 3) -> float:
    """Directional-derivative check of the training graph with onnxruntime alone (no torch): for random
    directions d, (L(w + e d) - L(w - e d)) / 2e must match <grad, d>. Returns the worst relative error;
    raises GradientCheckError past 5 % (float32 graphs; a batch-size scaling error is 1600 %)."""
    train = _session(pkg.training_graph)
    io = pkg.io
    rng = np.random.default_rng(seed)
    shape = tuple(pkg.preprocessing["input_shape"])
    x = rng.normal(0.0, 1.0, (batch_size, *shape)).astype(np.float32)
    y = rng.integers(0, pkg.num_classes, batch_size).astype(np.int64)
    names = [s.name for s in pkg.param_specs]
    params = {k: v.astype(np.float32) for k, v in pkg.initial_params.items()}

    def loss_and_grads(p: dict[str, np.ndarray]) -> tuple[float, list[np.ndarray]]:
        loss, *grads = train.run(
            [io["loss"], *(io["grad_prefix"] + n for n in names)], {io["input"]: x, io["labels"]: y, **p}
        )
        return float(loss), grads

    _, grads = loss_and_grads(params)
    worst = 0.0
    eps = 1e-2
    for _ in range(trials):
        d = {n: rng.normal(0.0, 1.0, params[n].shape).astype(np.float32) for n in names}
        norm = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in d.values())))
        d = {n: v / norm for n, v in d.items()}
        analytic = sum(float((g.astype(np.float64) * d[n]).sum()) for n, g in zip(names, grads, strict=True))
        plus, _ = loss_and_grads({n: params[n] + eps * d[n] for n in names})
        minus, _ = loss_and_grads({n: params[n] - eps * d[n] for n in names})
        numeric = (plus - minus) / (2 * eps)
        rel = abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-3)
        worst = max(worst, rel)
        if rel > 0.05:
            raise GradientCheckError(
                f"directional derivative {analytic:.5g} from the graph's gradients, {numeric:.5g} by finite "
                f"differences (relative error {rel:.1%})"
            )
    return worst


def build_reference_package(model: str, seed: int = 0) -> tuple[ModelPackage, CheckReport]:
    """Build and check a reference model package (unsigned). Raises GradientCheckError on a mismatch."""
    import torch

    if model not in refmodels.MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(refmodels.MODELS)}")
    spec = refmodels.MODELS[model]
    torch.manual_seed(seed)
    module = refmodels.torch_module(spec)
    refmodels.init_parameters(module, seed)
    params = {k: v.detach().numpy().astype(np.float32).copy() for k, v in module.named_parameters()}
    training, inference = refmodels.training_graph(spec), refmodels.inference_graph(spec)
    report = check_against_torch(spec, training, inference, params, seed=seed)
    pkg = ModelPackage(
        name=spec.name,
        param_specs=[ParamSpec(n, tuple(s)) for n, s in refmodels.param_shapes(spec).items()],
        initial_params=params,
        training_graph=training,
        inference_graph=inference,
        optimizer=dict(spec.optimizer),
        preprocessing=dict(spec.preprocessing),
        num_classes=spec.num_classes,
        task=spec.task,
        class_names=list(spec.class_names),
    )
    return pkg, report


def export_reference_package(model: str, out: Path, key: SigningKey, seed: int = 0) -> bytes:
    """Build, check, sign with the aggregator ``key`` and write a reference package; returns its digest."""
    pkg, _ = build_reference_package(model, seed)
    return write_package(out, pkg, key)


# ------------------------------------------------------------------------------------------------ CLI


def _verify_key(args: argparse.Namespace) -> VerifyKey | None:
    if getattr(args, "pub", None):
        return VerifyKey(read_key_file(Path(args.pub)))
    if getattr(args, "key", None):
        return SigningKey(read_key_file(Path(args.key))).verify_key
    return None


def cmd_export(args: argparse.Namespace) -> int:
    try:
        key = SigningKey(read_key_file(Path(args.key)))
        pkg, report = build_reference_package(args.model, args.seed)
    except (IdentityError, ValueError, GradientCheckError) as exc:
        print(f"flctl model export: {exc}", file=sys.stderr)
        print("flctl model export: no package written", file=sys.stderr)
        return 1
    try:
        digest = write_package(args.out, pkg, key)
    except OSError as exc:
        print(f"flctl model export: {args.out}: cannot write: {exc.strerror}", file=sys.stderr)
        return 1
    worst = max(report.max_grad_error.values())
    print(f"{args.out}: {pkg.name}, {sum(s.size for s in pkg.param_specs)} parameters, digest {digest.hex()}")
    print(f"checked against torch autograd at batch sizes {list(report.batch_sizes)}: "
          f"max loss error {report.max_loss_error:.2g}, max relative gradient error {worst:.2g}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        key = _verify_key(args)
        if key is None:
            print("flctl model inspect: give --pub AGGREGATOR_PUB or --key AGGREGATOR_KEY to verify and read "
                  "the package", file=sys.stderr)
            return 2
        pkg = load_package(args.package, key)
    except (IdentityError, PackageError) as exc:
        print(f"flctl model inspect: {exc}", file=sys.stderr)
        return 1
    summary: dict[str, Any] = pkg.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['name']}  digest {summary['digest']}  (signature verified)")
    print(f"  task: {summary['task']}")
    print(f"  classes ({summary['num_classes']}): {', '.join(summary['class_names'])}")
    print(f"  parameters: {summary['parameters']}")
    for p in summary["param_specs"]:
        print(f"    {p['name']:<16} {'x'.join(map(str, p['shape'])):<14} {p['dtype']}")
    print(f"  optimizer: {json.dumps(summary['optimizer'])}")
    print(f"  preprocessing: {json.dumps(summary['preprocessing'])}")
    print(f"  graphs: training {summary['training_graph_bytes']} B, inference {summary['inference_graph_bytes']} B")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        key = _verify_key(args)
        if key is None:
            print("flctl model verify: --pub AGGREGATOR_PUB or --key AGGREGATOR_KEY is required", file=sys.stderr)
            return 2
        pkg = load_package(args.package, key)
        print(f"{args.package}: signature and digest OK ({pkg.name}, {pkg.digest.hex()})")
        worst = check_finite_differences(pkg)
        print(f"gradients match finite differences (worst relative error {worst:.2%})")
        spec = next((s for s in refmodels.MODELS.values() if s.name == pkg.name), None)
        if spec is not None and not args.no_torch:
            try:
                import torch  # noqa: F401
            except ImportError:
                print("torch not installed: reference check skipped")
            else:
                report = check_against_torch(spec, pkg.training_graph, pkg.inference_graph, pkg.initial_params)
                worst = max(report.max_grad_error.values())
                print(f"matches the torch reference {spec.name} (max relative gradient error {worst:.2g})")
    except (IdentityError, PackageError, GradientCheckError) as exc:
        print(f"flctl model verify: {exc}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser("model", help="model packages: export, inspect, verify",
                       description="Build, check, sign and inspect model packages.")
    msub = p.add_subparsers(dest="model_command", required=True)

    e = msub.add_parser("export", help="export a reference model as a signed package",
                        description="Build a reference model's training and inference graphs, check them "
                                    "against PyTorch autograd, and write the package signed by the aggregator key.")
    e.add_argument("--model", required=True, choices=sorted(refmodels.MODELS), help="reference model")
    e.add_argument("--out", required=True, type=Path, metavar="FILE", help="package file to write (.flpkg)")
    e.add_argument("--key", required=True, metavar="AGGREGATOR_KEY", help="aggregator key file (64 hex chars)")
    e.add_argument("--seed", type=int, default=0, help="seed of the initial parameters (default 0)")
    e.set_defaults(func=cmd_export)

    for name, func, helptext in (
        ("inspect", cmd_inspect, "verify a package and print what it holds"),
        ("verify", cmd_verify, "verify a package's signature, digest and gradients"),
    ):
        c = msub.add_parser(name, help=helptext, description=helptext)
        c.add_argument("package", type=Path, metavar="FILE")
        c.add_argument("--pub", metavar="AGGREGATOR_PUB", help="aggregator public key file (64 hex chars)")
        c.add_argument("--key", metavar="AGGREGATOR_KEY", help="or the aggregator key file itself")
        if name == "inspect":
            c.add_argument("--json", action="store_true", help="print JSON")
        else:
            c.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference check")
        c.set_defaults(func=func)
    return p
