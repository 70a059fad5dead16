"""`flctl model export|inspect|verify`: build, check and sign model packages on the host.

export: ``--torch PACKAGE.MODULE:FACTORY`` exports an ordinary torch module with a loss (flctl.model.build:
training, evaluation and inference graphs derived by torch.export/make_fx and lowered by torch.onnx);
``--model cnn|mlp`` builds a reference model's hand-written graphs (flctl.model.refmodels). Either way the
graphs are checked against torch autograd on random batches of several sizes, and only then is the signed
package written. A graph whose loss, outputs or any gradient differs from torch's is refused with the
quantity and the error named; so is a model with an op that has no ONNX lowering, with the op and module.

inspect: a verified package's fields, parameter counts and each graph's op set.

verify: checks a package as a device would (signature against the aggregator key, digest, schema), then runs
its graphs in onnxruntime: a finite-difference check of the gradients, and the torch check again when the
package is a reference model.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey

from appliance import modelpkg, strict_json
from appliance.identity import IdentityError, read_key_file
from appliance.modelpkg import BUFFER_POLICIES, ModelPackage, PackageError, load_package, write_package
from flctl.model import refmodels
from flctl.model.check import CheckReport, check_against_torch, check_finite_differences
from flctl.model.errors import ExportError, GradientCheckError
from flctl.model.reference import build_reference_package


def _verify_key(args: argparse.Namespace) -> VerifyKey | None:
    if getattr(args, "pub", None):
        return VerifyKey(read_key_file(Path(args.pub)))
    if getattr(args, "key", None):
        return SigningKey(read_key_file(Path(args.key))).verify_key
    return None


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected C,H,W (or F) as positive integers") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be a positive integer")
    if math.prod(shape) > modelpkg.MAX_SAMPLE_VALUES:
        raise argparse.ArgumentTypeError(f"{text!r}: {math.prod(shape)} values per sample, more than the "
                                         f"{modelpkg.MAX_SAMPLE_VALUES} (2^28) devices train on")
    return shape


def _finite(text: str) -> float:
    """A number for the package's optimiser or preprocessing: NaN or infinity is refused here, before the export,
    as every device would refuse the package (docs/package.md)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number (devices refuse a package with it)")
    return value


def _positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return value


def _at_most(high: float, low: float = -math.inf) -> Callable[[str], float]:
    """A finite number in [low, high] (positive when ``low`` is 0): the bounds a device holds a package to
    (docs/package.md, "Bounds"), refused here before the export."""
    def parse(text: str) -> float:
        value = _finite(text) if low < 0 else _positive(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [{low:g}, {high:g}] (devices refuse a "
                                             "package past it)")
        return value
    return parse


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _build_torch(args: argparse.Namespace) -> tuple[ModelPackage, CheckReport, list[str]]:
    from flctl.model.build import PackageOptions, build_torch_package, make_model
    from flctl.model.losses import resolve_loss

    if args.input_shape is None:
        raise ExportError("--input-shape C,H,W is required with --torch")
    loss = resolve_loss(args.loss)
    model = make_model(args.torch, args.seed)
    factory = args.torch.rpartition(":")[2]
    options = PackageOptions(
        name=args.name or factory.replace("_", "-").lower(),
        task=args.task or "",
        class_names=_names(args.classes) if args.classes else [],
        buffer_policy=args.bn_stats,
        optimizer={"name": args.optimizer, "lr": args.lr, **({"momentum": 0.9} if args.optimizer == "sgd" else {}),
                   **({"max_grad_norm": args.max_grad_norm} if args.max_grad_norm is not None else {})},
        mean=args.mean,
        std=args.std,
    )
    return build_torch_package(model, loss, args.input_shape, options,
                               _names(args.trainable) if args.trainable else None)


def cmd_export(args: argparse.Namespace) -> int:
    frozen: list[str] = []
    try:
        key = SigningKey(read_key_file(Path(args.key)))
        if args.model:
            pkg, report = build_reference_package(args.model, args.seed)
        else:
            pkg, report, frozen = _build_torch(args)
    except (IdentityError, ValueError, ExportError, PackageError) as exc:
        print(f"flctl model export: {exc}", file=sys.stderr)
        print("flctl model export: no package written", file=sys.stderr)
        return 1
    try:
        digest = write_package(args.out, pkg, key)
    except PackageError as exc:
        print(f"flctl model export: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"flctl model export: {args.out}: cannot write: {exc.strerror}", file=sys.stderr)
        return 1
    worst = max(report.max_grad_error.values())
    trained = sum(s.size for s in pkg.param_specs if s.name in set(pkg.trainable_names))
    print(f"{args.out}: {pkg.name}, {trained} trained parameters, digest {digest.hex()}")
    if pkg.buffer_names:
        where = "sent in updates" if pkg.buffer_policy == "aggregate" else "kept on each device"
        print(f"running statistics: {len(pkg.buffer_names)} tensors, {pkg.buffer_policy} ({where})")
    if frozen:
        print(f"frozen (baked into the graphs, not sent): {', '.join(frozen)}")
    print(f"checked against torch autograd at batch sizes {list(report.batch_sizes)}: "
          f"max loss error {report.max_loss_error:.2g}, max relative gradient error {worst:.2g}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from flctl.model.inspect import GraphError, describe, format_text

    try:
        key = _verify_key(args)
        if key is None:
            print("flctl model inspect: give --pub AGGREGATOR_PUB or --key AGGREGATOR_KEY to verify and read "
                  "the package", file=sys.stderr)
            return 2
        pkg = load_package(args.package, key)
        description = describe(pkg)
    except (IdentityError, PackageError) as exc:
        print(f"flctl model inspect: {exc}", file=sys.stderr)
        return 1
    except GraphError as exc:
        print(f"flctl model inspect: {args.package}: {exc}", file=sys.stderr)
        return 1
    print(strict_json.dumps_as_found(description, indent=2) if args.json else format_text(description))
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

    e = msub.add_parser(
        "export", help="export a torch module (or a reference model) as a signed package",
        description="Export a torch module and its loss (or a reference model) as training, evaluation and "
                    "inference graphs, check them against PyTorch autograd, and write the package signed by the "
                    "aggregator key. docs/models.md explains how to bring a model.")
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--torch", metavar="PACKAGE.MODULE:FACTORY",
                        help="a function returning the torch.nn.Module to export (called with no arguments)")
    source.add_argument("--model", choices=sorted(refmodels.MODELS), help="a reference model")
    e.add_argument("--input-shape", type=_input_shape, metavar="C,H,W", help="one sample's shape (with --torch)")
    e.add_argument("--loss", default="cross-entropy", metavar="LOSS",
                   help="cross-entropy (default), bce, mse, focal or PACKAGE.MODULE:LOSS")
    e.add_argument("--trainable", metavar="NAMES",
                   help="comma-separated parameters to train (names, module paths or globs); the rest are frozen, "
                        "baked into the graphs and not sent in updates (default: all)")
    e.add_argument("--bn-stats", choices=BUFFER_POLICIES, default="aggregate",
                   help="batch-norm running statistics: aggregate (sent with updates, averaged by sample count; "
                        "default) or local (kept on each device, FedBN)")
    e.add_argument("--name", help="package name (default: the factory's name)")
    e.add_argument("--task", help="what the model is for and where its labels come from")
    e.add_argument("--classes", metavar="NAMES", help="comma-separated names of the output channels / classes")
    e.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="on-device optimiser (sgd: with momentum 0.9; default sgd)")
    e.add_argument("--lr", type=_at_most(modelpkg.MAX_LEARNING_RATE, 0.0), default=0.05,
                   help="learning rate tools use (default 0.05)")
    e.add_argument("--max-grad-norm", type=_positive, metavar="NORM",
                   help="clip each training step's gradient to this L2 norm on the device (default: no clipping)")
    e.add_argument("--mean", type=_at_most(modelpkg.MAX_NORMALISATION, -modelpkg.MAX_NORMALISATION), default=0.0,
                   help="input normalisation: (x - mean) / std (default 0)")
    e.add_argument("--std", type=_at_most(modelpkg.MAX_NORMALISATION, 1 / modelpkg.MAX_NORMALISATION), default=1.0,
                   help="input normalisation std (default 1)")
    e.add_argument("--out", required=True, type=Path, metavar="FILE", help="package file to write (.flpkg)")
    e.add_argument("--key", required=True, metavar="AGGREGATOR_KEY", help="aggregator key file (64 hex chars)")
    e.add_argument("--seed", type=int, default=0, help="seed of the initial parameters (default 0)")
    e.set_defaults(func=cmd_export)

    for name, func, helptext in (
        ("inspect", cmd_inspect, "verify a package and print what it holds: parameters, labels, op sets"),
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
