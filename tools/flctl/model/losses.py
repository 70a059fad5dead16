"""The losses a package can train with, and what their labels look like.

A loss is any function ``loss(outputs, labels) -> scalar tensor`` made of ordinary torch ops: it is traced and
differentiated with the model. Four are built in; ``PACKAGE.MODULE:NAME`` names your own. Labels are described
per sample (a :class:`LabelSpec`) so the device can check what it feeds the graph:

============== ============================================ ==============================================
``--loss``     labels (per sample)                          loss
============== ============================================ ==============================================
cross-entropy  int64 class index, the output's shape without mean softmax cross-entropy; outputs (N, C) or
               its channel axis (``[]`` or ``[H, W]``)      (N, C, H, W) for per-pixel classes
bce            float32 in [0, 1], the output's shape        mean binary cross-entropy on logits
mse            float32, the output's shape                  mean squared error
focal          float32 in [0, 1], the output's shape        mean sigmoid focal loss (alpha 0.25, gamma 2)
============== ============================================ ==============================================

A loss of your own may say what its labels are with attributes on the function (all optional):
``label_dtype`` (``"float32"``, the default, or ``"int64"``), ``label_shape`` (a per-sample shape, or a function
of the output's per-sample shape; default: the output's shape) and ``sample_labels(n, generator)`` or
``sample_labels(n, generator, shape)`` (a tensor of ``n`` plausible labels of per-sample ``shape`` for the
gradient check; default: uniform in [0, 1), or class indices for int64).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flctl.model.errors import ExportError
from flctl.model.importing import load_object

LABEL_DTYPES = ("int64", "float32")
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


@dataclass(frozen=True)
class LabelSpec:
    """What one sample's label is: ``int64`` class indices (in ``0..classes-1``) or ``float32`` targets."""

    dtype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Loss:
    """A loss function and how to describe and sample its labels, given the model's per-sample output shape."""

    name: str
    fn: Callable[..., Any]
    label_spec: Callable[[tuple[int, ...]], LabelSpec]
    sampler: Callable[[int, Any], Any] | None = None  # (n, torch.Generator) -> labels; None: by the spec

    def sample_labels(self, spec: LabelSpec, classes: int, n: int, generator: Any) -> Any:
        """``n`` random labels matching ``spec`` (for tracing and for the gradient check)."""
        import torch

        if self.sampler is not None:
            takes_shape = len(inspect.signature(self.sampler).parameters) >= 3
            labels = self.sampler(n, generator, spec.shape) if takes_shape else self.sampler(n, generator)
            want = (n, *spec.shape)
            if tuple(labels.shape) != want or str(labels.dtype).removeprefix("torch.") != spec.dtype:
                raise ExportError(f"loss {self.name}: sample_labels gave {tuple(labels.shape)} {labels.dtype}, "
                                  f"the label spec says {want} {spec.dtype}")
            return labels
        if spec.dtype == "int64":
            return torch.randint(0, classes, (n, *spec.shape), generator=generator)
        return torch.rand((n, *spec.shape), generator=generator)


def _cross_entropy(outputs, labels):
    import torch.nn.functional as F

    return F.cross_entropy(outputs, labels)


def _bce(outputs, labels):
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(outputs, labels)


def _mse(outputs, labels):
    import torch.nn.functional as F

    return F.mse_loss(outputs, labels)


def _focal(outputs, labels):
    """Sigmoid focal loss (Lin et al. 2017, as torchvision.ops.sigmoid_focal_loss), averaged over elements."""
    import torch
    import torch.nn.functional as F

    p = torch.sigmoid(outputs)
    ce = F.binary_cross_entropy_with_logits(outputs, labels, reduction="none")
    p_t = p * labels + (1 - p) * (1 - labels)
    alpha_t = FOCAL_ALPHA * labels + (1 - FOCAL_ALPHA) * (1 - labels)
    return (alpha_t * ce * (1 - p_t) ** FOCAL_GAMMA).mean()


def _class_indices(output_shape: tuple[int, ...]) -> LabelSpec:
    if not output_shape:
        raise ExportError("cross-entropy needs outputs with a class axis: (N, C) or (N, C, ...)")
    return LabelSpec("int64", tuple(output_shape[1:]))


def _same_shape(output_shape: tuple[int, ...]) -> LabelSpec:
    return LabelSpec("float32", tuple(output_shape))


BUILTIN: dict[str, Loss] = {
    "cross-entropy": Loss("cross-entropy", _cross_entropy, _class_indices),
    "bce": Loss("bce", _bce, _same_shape),
    "mse": Loss("mse", _mse, _same_shape),
    "focal": Loss("focal", _focal, _same_shape),
}


def resolve_loss(ref: str) -> Loss:
    """A built-in loss by name, or ``PACKAGE.MODULE:NAME`` (a function or an ``nn.Module`` without parameters)."""
    if ref in BUILTIN:
        return BUILTIN[ref]
    if ":" not in ref:
        raise ExportError(f"unknown loss {ref!r}: expected one of {', '.join(BUILTIN)} or PACKAGE.MODULE:NAME")
    fn = load_object(ref, "loss")
    if not callable(fn):
        raise ExportError(f"loss {ref!r} is not callable")
    if any(True for _ in getattr(fn, "parameters", lambda: ())()):
        raise ExportError(f"loss {ref!r} has parameters; a loss is a fixed function of outputs and labels")
    dtype = getattr(fn, "label_dtype", "float32")
    if dtype not in LABEL_DTYPES:
        raise ExportError(f"loss {ref!r}: label_dtype must be one of {LABEL_DTYPES}, got {dtype!r}")
    shape_attr = getattr(fn, "label_shape", None)

    def spec(output_shape: tuple[int, ...]) -> LabelSpec:
        shape = shape_attr(output_shape) if callable(shape_attr) else shape_attr
        return LabelSpec(dtype, tuple(int(d) for d in (output_shape if shape is None else shape)))

    return Loss(ref, fn, spec, getattr(fn, "sample_labels", None))
