"""An ordinary torch module and a loss -> a checked model package (``flctl model export --torch``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.modelpkg import BUFFER_POLICIES, ModelPackage
from appliance.wire import ParamSpec
from flctl.model.check import CheckReport, check_export
from flctl.model.errors import ExportError
from flctl.model.importing import load_object
from flctl.model.losses import Loss

DEFAULT_OPTIMIZER = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}


@dataclass
class PackageOptions:
    """What the package says beyond the graphs (the command line's optional flags)."""

    name: str
    task: str = ""
    class_names: list[str] = field(default_factory=list)
    buffer_policy: str = "aggregate"
    optimizer: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIMIZER))
    mean: float = 0.0
    std: float = 1.0
    detection: dict[str, Any] = field(default_factory=dict)  # a detector's output layout (appliance.detection)


def make_model(factory_ref: str, seed: int) -> Any:
    """Call the factory ``PACKAGE.MODULE:FACTORY`` (no arguments) with torch seeded: its own initialisation,
    reproducible."""
    import torch

    factory = load_object(factory_ref, "model factory")
    if not callable(factory):
        raise ExportError(f"model factory {factory_ref!r} is not callable")
    torch.manual_seed(seed)
    try:
        model = factory()
    except Exception as exc:
        raise ExportError(f"model factory {factory_ref!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"model factory {factory_ref!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_torch_package(model: Any, loss: Loss, input_shape: Sequence[int], options: PackageOptions,
                        trainable: Sequence[str] | None = None) -> tuple[ModelPackage, CheckReport, list[str]]:
    """Export ``model`` with ``loss``, check every graph against torch, and assemble the (unsigned) package.

    Returns the package, the check report and the frozen parameters' names. Raises ExportError (an op without
    a lowering, a graph that disagrees with torch, a bad option) and writes nothing.
    """
    from flctl.model.torch_export import export_graphs

    _check_options(options)
    if not options.detection and getattr(model, "detection", None):  # a detector declares its output layout
        options = replace(options, detection=dict(model.detection))
    shape = tuple(int(d) for d in input_shape)
    graphs = export_graphs(model, loss, shape, trainable)
    report = check_export(model, loss, graphs, shape)
    return package_from_graphs(graphs, loss, shape, options), report, graphs.frozen


def _check_options(options: PackageOptions) -> None:
    if options.buffer_policy not in BUFFER_POLICIES:
        raise ExportError(f"batch-norm statistics policy {options.buffer_policy!r}: expected one of "
                          f"{', '.join(BUFFER_POLICIES)}")
    if not options.std > 0:
        raise ExportError(f"--std must be positive, got {options.std}")


def package_from_graphs(graphs: Any, loss: Loss, input_shape: tuple[int, ...],
                        options: PackageOptions) -> ModelPackage:
    """The package of checked ``graphs`` (flctl.model.torch_export.ExportedGraphs): running statistics among
    the parameters ("aggregate") or beside them ("local")."""
    _check_options(options)
    classes = graphs.num_classes
    if options.detection:  # outputs: a heatmap per class, then box size (2) and centre offset (2)
        classes = graphs.num_classes - 4
        if classes != options.detection.get("classes"):
            raise ExportError(f"the detector declares {options.detection.get('classes')} class(es) but outputs "
                              f"{graphs.num_classes} channels (a heatmap per class, size, offset)")
    names = options.class_names or [str(i) for i in range(classes)]
    if len(names) != classes:
        raise ExportError(f"{len(names)} class names for {classes} output channels")
    if graphs.labels.dtype == "int64" and classes < 2:
        raise ExportError(f"cross-entropy needs at least 2 classes; the model outputs {classes} channel(s)")
    aggregate = options.buffer_policy == "aggregate"
    params = {**graphs.params, **(graphs.buffers if aggregate else {})}
    return ModelPackage(
        name=options.name,
        param_specs=[ParamSpec(n, tuple(v.shape)) for n, v in params.items()],
        initial_params=params,
        training_graph=graphs.training,
        inference_graph=graphs.inference,
        evaluation_graph=graphs.evaluation,
        optimizer=dict(options.optimizer),
        preprocessing={
            "input_shape": list(input_shape),
            "layout": "NCHW" if len(input_shape) == 3 else "NC",
            "input_range": [0.0, 1.0],
            "mean": float(options.mean),
            "std": float(options.std),
        },
        num_classes=classes,
        task=options.task or f"{options.name}, trained with the {loss.name} loss",
        class_names=names,
        labels=graphs.labels.as_dict(),
        buffer_names=list(graphs.buffers),
        buffer_policy=options.buffer_policy,
        local_buffers={} if aggregate else dict(graphs.buffers),
        detection=dict(options.detection),
    )
