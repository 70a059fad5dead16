"""Nothing is written unless it agrees with torch: the gradient checks of ``flctl model export`` and ``verify``.

* :func:`check_export` - an exported model's training, evaluation and inference graphs (onnxruntime) against
  the torch module itself: loss, outputs, every gradient and every running statistic after the step, on
  random batches of several sizes.
* :func:`check_against_torch` - the same for a hand-written reference graph (flctl.model.refmodels).
* :func:`check_finite_differences` - a package's gradients against finite differences of its own loss, with
  onnxruntime alone (what ``flctl model verify`` runs where torch is not installed).

Several batch sizes, because the known exporter bug (gradients of a summed loss next to a mean loss: every
gradient N times too large) is invisible at batch size 1. A mismatch raises GradientCheckError naming the
quantity, the batch size and the error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.modelpkg import BUFFER_PREFIX, ModelPackage
from flctl.model import refmodels
from flctl.model.errors import GradientCheckError

CHECK_BATCH_SIZES = (1, 3, 16, 64)
# Exported models: batch norm in training mode needs two samples, and size 2 still shows a batch-size scaling.
EXPORT_CHECK_BATCH_SIZES = (2, 3, 16)
RTOL = 1e-3
ATOL = 1e-5


@dataclass
class CheckReport:
    batch_sizes: tuple[int, ...]
    max_loss_error: float
    max_grad_error: dict[str, float]  # relative to the largest |gradient| of the parameter (at least 0.01)
    max_logit_error: float
    max_buffer_error: dict[str, float] = field(default_factory=dict)  # relative, as max_grad_error


def session(graph: bytes) -> Any:
    """A one-thread onnxruntime session of ``graph``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


def _compare(what: str, got: np.ndarray, ref: np.ndarray, batch: int) -> float:
    """Error of ``got`` relative to the largest |ref| (or to ATOL / RTOL when that is smaller: a quantity that is
    zero in exact arithmetic, such as the bias gradient of a layer followed by batch norm, has no meaningful
    relative error); GradientCheckError past ATOL + RTOL * scale."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        raise GradientCheckError(f"batch {batch}: {what} has shape {got.shape}, torch's is {ref.shape}")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    err = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
    if not err <= ATOL + RTOL * scale:  # also catches NaN
        ratio = float(np.abs(got).max()) / scale if scale > 0 else float("inf")
        raise GradientCheckError(
            f"batch {batch}: {what} differs from torch autograd by {err:.3g} "
            f"(largest |value| {scale:.3g}, graph/torch magnitude ratio {ratio:.3g})"
        )
    return err / max(scale, ATOL / RTOL)


def check_export(model: Any, loss: Any, graphs: Any, input_shape: tuple[int, ...],
                 batch_sizes: tuple[int, ...] = EXPORT_CHECK_BATCH_SIZES, seed: int = 0) -> CheckReport:
    """Compare ``graphs`` (flctl.model.torch_export.ExportedGraphs of ``model`` and ``loss``) with torch.

    Per batch size: the training graph's loss, outputs, gradients and new running statistics against one
    training-mode step of a fresh copy of ``model``; then the evaluation graph's loss and outputs, and the
    inference graph's outputs, against that copy in eval mode (with the statistics the step produced, so
    eval-mode batch norm is tested with values other than its initial ones).
    """
    import torch

    from flctl.model.torch_export import set_mode

    train, evaluate, infer = session(graphs.training), session(graphs.evaluation), session(graphs.inference)
    trained = list(graphs.params)
    buffers = list(graphs.buffers)
    outputs = ["loss", "logits", *("grad:" + n for n in trained), *(BUFFER_PREFIX + n for n in buffers)]
    gen = torch.Generator().manual_seed(seed)
    max_loss = max_logit = 0.0
    max_grad = dict.fromkeys(trained, 0.0)
    max_buf = dict.fromkeys(buffers, 0.0)
    for n in batch_sizes:
        x = torch.randn((n, *input_shape), generator=gen)
        y = loss.sample_labels(graphs.labels, graphs.num_classes, n, gen)
        ref = set_mode(copy.deepcopy(model), True)
        params = dict(ref.named_parameters())
        out = ref(x)
        value = loss.fn(out, y)
        grads = torch.autograd.grad(value, [params[k] for k in trained], allow_unused=True)
        feeds = {"input": x.numpy(), "labels": y.numpy(), **graphs.params, **graphs.buffers}
        got = dict(zip(outputs, train.run(outputs, feeds), strict=True))
        max_loss = max(max_loss, _compare("training loss", got["loss"], value.detach().numpy(), n))
        max_logit = max(max_logit, _compare("training outputs", got["logits"], out.detach().numpy(), n))
        for name, g in zip(trained, grads, strict=True):
            want = np.zeros_like(graphs.params[name]) if g is None else g.numpy()
            max_grad[name] = max(max_grad[name], _compare(f"gradient of {name}", got["grad:" + name], want, n))
        state = dict(ref.named_buffers())
        for name in buffers:
            new = got[BUFFER_PREFIX + name]
            max_buf[name] = max(max_buf[name], _compare(f"running statistic {name}", new, state[name].numpy(), n))
        set_mode(ref, False)
        with torch.no_grad():
            out = ref(x)
            value = loss.fn(out, y)
        stats = {name: state[name].numpy() for name in buffers}
        eval_loss, eval_out = evaluate.run(["loss", "logits"], {**feeds, **stats})
        max_loss = max(max_loss, _compare("evaluation loss", eval_loss, value.numpy(), n))
        max_logit = max(max_logit, _compare("evaluation outputs", eval_out, out.numpy(), n))
        (inferred,) = infer.run(["logits"], {"input": feeds["input"], **graphs.params, **stats})
        max_logit = max(max_logit, _compare("inference outputs", inferred, out.numpy(), n))
    return CheckReport(tuple(batch_sizes), max_loss, max_grad, max_logit, max_buf)


def check_against_torch(
    spec: refmodels.ModelSpec,
    training_graph: bytes,
    inference_graph: bytes,
    params: dict[str, np.ndarray],
    batch_sizes: tuple[int, ...] = CHECK_BATCH_SIZES,
    seed: int = 0,
) -> CheckReport:
    """Compare a reference model's graphs with torch autograd on random batches (with ``params`` as the weights).

    Raises GradientCheckError naming the first quantity that differs by more than ATOL + RTOL * scale.
    """
    import torch

    model = refmodels.torch_module(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(params[name]))
    train, infer = session(training_graph), session(inference_graph)
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
            max_grad[name] = max(max_grad[name], _compare(f"gradient of {name}", g, p.grad.numpy(), n))
    return CheckReport(tuple(batch_sizes), max_loss, max_grad, max_logit)


def _random_labels(pkg: ModelPackage, n: int, rng: np.random.Generator) -> np.ndarray:
    shape = (n, *pkg.label_shape)
    if pkg.class_labels:
        return rng.integers(0, pkg.num_classes, shape).astype(np.int64)
    return rng.random(shape, dtype=np.float32)


def check_finite_differences(pkg: ModelPackage, batch_size: int = 16, seed: int = 0, trials: int = 3) -> float:
    """Directional-derivative check of the training graph with onnxruntime alone (no torch): for random
    directions d over the trainable parameters, (L(w + e d) - L(w - e d)) / 2e must match <grad, d>. Returns
    the worst relative error; raises GradientCheckError past 5 % (float32 graphs; a batch-size scaling error is
    1600 %)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf

    try:
        train = session(pkg.training_graph)
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf) as exc:
        raise GradientCheckError(f"the training graph does not load in onnxruntime: {exc}") from None
    io = pkg.io
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (batch_size, *pkg.input_shape)).astype(np.float32)
    y = _random_labels(pkg, batch_size, rng)
    names = pkg.trainable_names
    params = {k: v.astype(np.float32) for k, v in pkg.initial_params.items()}
    fixed = {**{k: params[k] for k in pkg.buffer_names if k in params}, **pkg.local_buffers}

    def loss_and_grads(p: dict[str, np.ndarray]) -> tuple[float, list[np.ndarray]]:
        loss, *grads = train.run(
            [io["loss"], *(io["grad_prefix"] + n for n in names)], {io["input"]: x, io["labels"]: y, **p, **fixed}
        )
        return float(loss), grads

    trainable = {n: params[n] for n in names}
    _, grads = loss_and_grads(trainable)
    worst = 0.0
    eps = 1e-2
    for _ in range(trials):
        d = {n: rng.normal(0.0, 1.0, trainable[n].shape).astype(np.float32) for n in names}
        norm = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in d.values())))
        d = {n: v / norm for n, v in d.items()}
        analytic = sum(float((g.astype(np.float64) * d[n]).sum()) for n, g in zip(names, grads, strict=True))
        plus, _ = loss_and_grads({n: trainable[n] + eps * d[n] for n in names})
        minus, _ = loss_and_grads({n: trainable[n] - eps * d[n] for n in names})
        numeric = (plus - minus) / (2 * eps)
        rel = abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-3)
        worst = max(worst, rel)
        if rel > 0.05:
            raise GradientCheckError(
                f"directional derivative {analytic:.5g} from the graph's gradients, {numeric:.5g} by finite "
                f"differences (relative error {rel:.1%})"
            )
    return worst
