"""Any ordinary ``torch.nn.Module`` and loss -> the training, evaluation and inference ONNX graphs of a package.

The backward pass is derived, never written by hand:

1. **Forward**: ``torch.export`` traces ``loss(model(x), labels)`` in training mode with a symbolic batch
   dimension, and the forward ops listed in flctl.model.decompositions are decomposed (batch norm's in-place
   running-statistics update becomes an ordinary output; upsampling and adaptive pooling become ops whose
   backward lowers). Every node keeps the path of the module it came from, for error messages.
2. **Backward**: ``make_fx`` traces ``torch.func.grad_and_value`` of that forward graph over the trainable
   parameters: one joint ATen graph (loss, outputs, gradients, new running statistics), with core ATen
   decompositions and the per-op rewrites of flctl.model.decompositions applied to the backward ops.
3. **Lowering**: ``torch.onnx.export`` (onnxscript's ATen library) turns the joint graph into standard ONNX,
   opset 18, IR version 9, which onnxruntime 1.18 (Yocto scarthgap) and later run.

Trainable parameters and running statistics are graph *inputs*: the device feeds its current values every step.
Frozen parameters (``trainable`` leaves them out) and constant buffers are baked into the graphs as initializers,
so they are neither trained nor sent. Dropout modules are exported switched off (their train-mode output is
random; a graph checked against torch must be deterministic), and any other random op is refused.

The evaluation graph is the forward pass in eval mode with the loss (batch norm uses the running statistics);
the inference graph is the evaluation graph cut down to (input, parameters) -> outputs. Nothing here trusts the
result: flctl.model.check compares all three graphs with torch autograd before a package is written.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from appliance.modelpkg import BUFFER_PREFIX, DEFAULT_IO
from flctl.model import decompositions
from flctl.model.errors import ExportError, UnsupportedOpError
from flctl.model.losses import LabelSpec, Loss

OPSET = 18  # the lowest opset torch.onnx's exporter writes; onnxruntime 1.18 runs up to 21
IR_VERSION = 9  # the IR version of opset 18; onnxruntime 1.18 reads up to 10
_WRAPPED = "model."  # the attribute the traced wrapper holds the model under, stripped from names


@dataclass
class ExportedGraphs:
    """The three graphs and the tensors they take as inputs."""

    training: bytes
    evaluation: bytes
    inference: bytes
    params: dict[str, np.ndarray]  # trainable parameters, in the model's parameter order
    buffers: dict[str, np.ndarray]  # running statistics the training graph updates (outputs BUFFER_PREFIX + name)
    frozen: list[str]  # parameters baked into the graphs
    output_shape: tuple[int, ...]  # per sample
    labels: LabelSpec
    num_classes: int  # the output's channel axis (classes for cross-entropy)


# ------------------------------------------------------------------------------------------ preparation


def set_mode(module: nn.Module, training: bool) -> nn.Module:
    """``module.train(training)`` with dropout switched off (see the module docstring)."""
    module.train(training)
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return module


def _prepared(model: nn.Module) -> nn.Module:
    """A copy to trace: batch norm's ``num_batches_tracked`` counter dropped (only a momentum of None reads it,
    and an int64 counter has no place among float32 parameters)."""
    model = copy.deepcopy(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            if m.momentum is None:
                raise ExportError(f"{name} ({type(m).__name__}): momentum=None (a cumulative average over all "
                                  "batches ever seen) is not supported; give it a momentum such as 0.1")
            m.num_batches_tracked = None
    return model


def select_trainable(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Names of the parameters to train: all of them, or those matching a pattern (a parameter name, a module
    path such as ``head`` for ``head.*``, or a glob). A pattern that matches nothing is an error."""
    names = [n for n, _ in model.named_parameters()]
    if not names:
        raise ExportError("the model has no parameters")
    if not patterns:
        return names
    chosen = set()
    for pattern in patterns:
        hits = {n for n in names if n == pattern or n.startswith(pattern + ".") or fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ExportError(f"--trainable {pattern!r} matches no parameter; parameters are {', '.join(names)}")
        chosen |= hits
    return [n for n in names if n in chosen]


class _WithLoss(nn.Module):
    """``(x, labels) -> (loss, outputs)``: what torch.export traces."""

    def __init__(self, model: nn.Module, loss: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        if not isinstance(out, torch.Tensor):
            raise ExportError(f"the model returns a {type(out).__name__}; it must return one tensor (concatenate "
                              "several heads with torch.cat and split them in the loss)")
        return self.loss(out, labels), out


def _trace_batch(model: nn.Module, shapes: list[tuple[int, ...]]) -> int:
    """The example batch size of the traces: a size no dimension of a parameter, buffer, input or label has.

    make_fx gives equal input dimensions one symbol ("duck sizing"); a batch of 8 beside an 8-channel weight
    would be specialised to 8 by the first op that fixes the channel count.
    """
    taken = {d for shape in shapes for d in shape}
    taken |= {d for t in (*model.parameters(), *model.buffers()) for d in t.shape}
    batch = 3
    while batch in taken:
        batch += 1
    return batch


def _example_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    probe = set_mode(copy.deepcopy(model), False)
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception as exc:
        raise ExportError(f"the model fails on an input of shape {tuple(x.shape)}: {exc}") from None
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() < 2:
        raise ExportError("the model must return one float32 tensor shaped (N, ...), got "
                          f"{type(out).__name__} {getattr(out, 'dtype', '')} {tuple(getattr(out, 'shape', ()))}")
    return out


# ------------------------------------------------------------------------------------------ tracing


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    for path, kind in reversed(list(stack.values())):
        if path.startswith(_WRAPPED):
            name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
            return f"{path[len(_WRAPPED):]} ({name})"
        if path == "loss":
            return "the loss"
    return "the loss" if stack else "the model's forward code"


def _op_name(target: Any) -> str:
    return target.name().split("::")[-1] if isinstance(target, torch._ops.OpOverload) else str(target)


@functools.cache
def _onnx_registry() -> Any:
    # torch.onnx's registry of torchlib lowerings: private API, used only to name an unsupported op before
    # torch.onnx would fail on it with a long report.
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    with _quiet_registry():
        return ONNXRegistry.from_torchlib(OPSET)


@contextlib.contextmanager
def _quiet_registry() -> Iterator[None]:
    """Without the registry's warnings about torchvision ops (not installed, not needed)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# Ops torch.export inserts to assert shapes and dtypes while tracing; torch.onnx drops them.
_CHECKS_ONLY = ("_assert", "sym_constrain_range")


def _check_ops(gm: torch.fx.GraphModule, forward_nodes: list[torch.fx.Node], registry: Any) -> None:
    """Refuse random ops and ops without an ONNX lowering, naming the op and the modules that use it."""
    from torch._decomp import decomposition_table

    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        op = node.target
        name = _op_name(op)
        if torch.Tag.nondeterministic_seeded in op.tags:
            raise UnsupportedOpError(f"aten.{name}", [_module_path(node)], "random ops are not exported (a graph "
                                     "checked against torch must be deterministic); nn.Dropout modules are "
                                     "exported switched off")
        if registry.is_registered(op) or op in decomposition_table or name.startswith(_CHECKS_ONLY):
            continue
        if "nn_module_stack" in node.meta:
            modules = [_module_path(node)]
        else:  # a backward op: name the modules whose forward op it differentiates
            base = name.split(".")[0].removesuffix("_backward")
            modules = sorted({_module_path(n) for n in forward_nodes if _op_name(n.target).startswith(base)})
        raise UnsupportedOpError(f"aten.{name}", modules, "no ONNX lowering (docs/models.md lists the ops)")


@dataclass
class _Forward:
    """A forward trace: the graph, how to feed it from (x, labels, *tensors) and where its outputs are."""

    gm: torch.fx.GraphModule
    nodes: list[torch.fx.Node]
    feeds: list[int]  # per graph input: index into (x, labels, *tensors)
    loss_index: int
    output_index: int
    mutated: list[str]  # buffers whose new value the graph outputs, in output order
    mutated_index: list[int]

    def run(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        outs = self.gm(*(args[i] for i in self.feeds))
        return outs[self.loss_index], outs[self.output_index], [outs[i] for i in self.mutated_index]


def _export_forward(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor, training: bool,
                    tensor_names: list[str]) -> tuple[_Forward, dict[str, torch.Tensor]]:
    """torch.export of (x, labels) -> (loss, outputs) in the given mode, forward ops decomposed.

    Returns the trace and the values of its parameters, buffers and constants by name (names of the model's own
    tensors without the wrapper's prefix; the loss's own constant tensors keep a ``loss.`` prefix).
    """
    from torch.export import Dim
    from torch.export.graph_signature import InputKind, OutputKind

    wrapper = set_mode(_WithLoss(model, loss.fn), training)
    batch = Dim("N", min=1, max=1 << 20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(wrapper, (x, y), dynamic_shapes=({0: batch}, {0: batch}), strict=False)
            ep = ep.run_decompositions(decompositions.forward_table())
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.export cannot trace the model with its loss: {first}") from None
    values: dict[str, torch.Tensor] = {}
    feeds, user_inputs = [], 0
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:  # x, then labels
            feeds.append(user_inputs)
            user_inputs += 1
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise ExportError(f"torch.export produced an input of kind {spec.kind.name}, which is not supported")
        target = spec.target
        name = target[len(_WRAPPED):] if target.startswith(_WRAPPED) else target
        value = ep.state_dict[target] if target in ep.state_dict else ep.constants[target]
        values[name] = value.detach()
        if name not in tensor_names:
            tensor_names.append(name)
        feeds.append(2 + tensor_names.index(name))
    mutated, mutated_index, user = [], [], []
    for i, spec in enumerate(ep.graph_signature.output_specs):
        if spec.kind == OutputKind.BUFFER_MUTATION:
            name = spec.target[len(_WRAPPED):] if spec.target.startswith(_WRAPPED) else spec.target
            mutated.append(name)
            mutated_index.append(i)
        elif spec.kind == OutputKind.USER_OUTPUT:
            user.append(i)
        else:
            raise ExportError(f"the model mutates something torch.export reports as {spec.kind.name}; only batch "
                              "norm's running statistics may change during a step")
    nodes = [n for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    return _Forward(ep.graph_module, nodes, feeds, user[0], user[1], mutated, mutated_index), values


def _scalars_as_tensors(gm: torch.fx.GraphModule) -> None:
    """``aten.mul.Scalar(t, s)`` with a symbolic ``s`` (batch norm's n/(n-1) for a symbolic batch) becomes
    ``aten.mul.Tensor(t, scalar_tensor(s))``: torchlib lowers only constant Python scalars in the Scalar form."""
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        target = node.target
        if (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
                and target.overloadpacket in (aten.mul, aten.div, aten.add, aten.sub)
                and target._overloadname == "Scalar" and isinstance(node.args[1], torch.fx.Node)):
            with gm.graph.inserting_before(node):
                scalar = gm.graph.call_function(aten.scalar_tensor.default, (node.args[1],), {"dtype": torch.float32})
            node.target = target.overloadpacket.Tensor
            node.args = (node.args[0], scalar, *node.args[2:])
    gm.recompile()


class _Function(nn.Module):
    """An ``nn.Module`` around ``fn(x, labels, *tensors)`` for torch.onnx."""

    def __init__(self, fn: Callable[..., Any]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, labels: torch.Tensor, tensors: list[torch.Tensor]) -> Any:
        return self.fn(x, labels, *tensors)


def _lower(fn: Callable[..., Any], x: torch.Tensor, y: torch.Tensor, tensors: list[torch.Tensor],
           tensor_names: list[str], outputs: list[str], baked: dict[str, torch.Tensor],
           keep_inputs: list[str]) -> onnx.ModelProto:
    """ONNX model of ``fn`` with inputs (input, labels, *tensor_names) and the given outputs; the ``baked``
    tensors become initializers and only ``keep_inputs`` of the tensors stay inputs."""
    from torch.export import Dim

    batch = Dim("N", min=1, max=1 << 20)
    io_names = [DEFAULT_IO["input"], DEFAULT_IO["labels"], *tensor_names]
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stdout(log), redirect_stderr(log), _quiet_registry():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Function(fn), (x, y, list(tensors)), dynamo=True, opset_version=OPSET, input_names=io_names,
                output_names=outputs, dynamic_shapes=({0: batch}, {0: batch}, [None] * len(tensors)),
                optimize=True, verbose=False, report=False,
            )
    except Exception as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Error" in ln and "step" not in ln), lines[0] if lines else "")
        raise ExportError(f"torch.onnx cannot lower the graph: {detail.strip()}") from None
    model = program.model_proto
    graph = model.graph
    _name_batch_dimension(graph, x.shape[0])
    got = [o.name for o in graph.output]
    if got != outputs:
        raise ExportError(f"torch.onnx renamed the graph outputs: expected {outputs[:4]}..., got {got[:4]}...")
    keep = {DEFAULT_IO["input"], DEFAULT_IO["labels"], *keep_inputs}
    inputs = [i for i in graph.input if i.name in keep]
    del graph.input[:]
    graph.input.extend(inputs)
    for name, value in baked.items():
        graph.initializer.append(onnx.numpy_helper.from_array(value.detach().numpy(), name))
    _strip_metadata(model)
    model.ir_version = IR_VERSION
    model.producer_name, model.producer_version = "flctl", "2"
    onnx.checker.check_model(model, full_check=False)
    return model


def _name_batch_dimension(graph: onnx.GraphProto, traced: int) -> None:
    """Call the symbolic batch dimension ``N`` everywhere; refuse a graph whose batch size got fixed."""
    first = graph.input[0].type.tensor_type.shape.dim[0]
    if not first.dim_param:
        raise ExportError(f"the graph's batch size is fixed at {first.dim_value or traced}: some code of the model "
                          "or the loss uses the batch size as a constant (view or reshape with a literal batch; "
                          "write -1 or x.shape[0])")
    symbol = first.dim_param
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "N"


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop what makes bytes depend on the host (source paths and stack traces in metadata and doc strings)."""
    del model.metadata_props[:]
    model.doc_string = ""
    graph = model.graph
    graph.doc_string = ""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del value.metadata_props[:]
        value.doc_string = ""


def _subgraph(model: onnx.ModelProto, outputs: dict[str, str], drop_inputs: Sequence[str] = ()) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` (old name -> new name, in order), the other graph inputs
    kept (a device feeds every parameter to every graph) except ``drop_inputs``."""
    model = copy.deepcopy(model)
    graph = model.graph
    by_name = {o.name: o for o in graph.output}
    needed, nodes = set(outputs), []
    for node in reversed(list(graph.node)):
        if needed & set(node.output):
            nodes.append(node)
            needed |= set(node.input)
    nodes.reverse()
    # Rename old -> new, after moving any tensor already called ``new`` out of the way.
    mapping = {new: f"{new}__shadowed" for old, new in outputs.items() if old != new}
    mapping.update({old: new for old, new in outputs.items() if old != new})
    for node in nodes:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                names[i] = mapping.get(name, name)
    new_outputs = []
    for old, new in outputs.items():
        value = copy.deepcopy(by_name[old])
        value.name = new
        new_outputs.append(value)
    del graph.output[:]
    graph.output.extend(new_outputs)
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name not in drop_inputs]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=False)
    return model


# ------------------------------------------------------------------------------------------ export


def export_graphs(model: nn.Module, loss: Loss, input_shape: Sequence[int],
                  trainable: Sequence[str] | None = None) -> ExportedGraphs:
    """Trace, differentiate and lower ``model`` with ``loss`` (see the module docstring).

    ``trainable``: patterns of the parameters to train (:func:`select_trainable`); the rest are frozen.
    Raises ExportError (UnsupportedOpError for an op without a lowering) naming the problem.
    """
    from torch.func import grad_and_value
    from torch.fx.experimental.proxy_tensor import make_fx

    if not isinstance(model, nn.Module):
        raise ExportError(f"the factory returned a {type(model).__name__}, not a torch.nn.Module")
    trained = select_trainable(model, trainable)
    prepared = _prepared(model)
    gen = torch.Generator().manual_seed(0)
    out = _example_output(prepared, torch.randn((2, *input_shape), generator=gen))
    output_shape = tuple(out.shape[1:])
    labels = loss.label_spec(output_shape)
    classes = output_shape[0]
    batch = _trace_batch(prepared, [tuple(input_shape), output_shape, labels.shape])
    x = torch.randn((batch, *input_shape), generator=gen)
    y = loss.sample_labels(labels, classes, batch, gen)

    registry = _onnx_registry()
    names = list(trained)
    train_fwd, values = _export_forward(prepared, loss, x, y, True, names)
    _check_ops(train_fwd.gm, train_fwd.nodes, registry)
    eval_fwd, eval_values = _export_forward(prepared, loss, x, y, False, names)
    _check_ops(eval_fwd.gm, eval_fwd.nodes, registry)
    values = {**eval_values, **values}
    own = dict(prepared.named_parameters())
    values.update({n: own[n].detach() for n in trained if n not in values})  # unused by the forward: zero grad
    for name in train_fwd.mutated:
        if values[name].dtype != torch.float32:
            raise ExportError(f"buffer {name} ({values[name].dtype}) changes during a step; only float32 running "
                              "statistics may")
    buffers = list(train_fwd.mutated)
    # Input order of every graph: trainable parameters, running statistics, then what gets baked in.
    baked_names = [n for n in names if n not in trained and n not in buffers]
    order = [*trained, *buffers, *baked_names]
    for fwd in (train_fwd, eval_fwd):
        fwd.feeds = [f if f < 2 else 2 + order.index(names[f - 2]) for f in fwd.feeds]
    tensors = [values[n] for n in order]
    n_train = len(trained)

    def joint(x: torch.Tensor, labels: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One trace for both modes: training step (loss, outputs, gradients, new statistics), then eval."""

        def loss_of(params: list[torch.Tensor]) -> Any:
            loss_value, outputs, new_buffers = train_fwd.run([x, labels, *params, *tensors[n_train:]])
            return loss_value, (outputs, new_buffers)

        grads, (loss_value, (outputs, new_buffers)) = grad_and_value(loss_of, has_aux=True)(list(tensors[:n_train]))
        eval_loss, eval_outputs, _ = eval_fwd.run([x, labels, *tensors])
        return (loss_value, outputs, *grads, *new_buffers, eval_loss, eval_outputs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            joint_gm = make_fx(torch.func.functionalize(joint, remove="mutations"),
                               decomposition_table=decompositions.backward_table(),
                               tracing_mode="symbolic")(x, y, *tensors)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"differentiating the traced model failed: {str(exc).strip().splitlines()[0]}") from None
    _check_ops(joint_gm, train_fwd.nodes, registry)
    _scalars_as_tensors(joint_gm)
    loss_name, logits = DEFAULT_IO["loss"], DEFAULT_IO["logits"]
    train_outputs = [loss_name, logits, *(DEFAULT_IO["grad_prefix"] + n for n in trained),
                     *(BUFFER_PREFIX + n for n in buffers)]
    eval_loss, eval_logits = "eval:" + loss_name, "eval:" + logits
    both = _lower(joint_gm, x, y, tensors, order, [*train_outputs, eval_loss, eval_logits],
                  {n: values[n] for n in baked_names}, [*trained, *buffers])
    training = _subgraph(both, {n: n for n in train_outputs})
    evaluation = _subgraph(both, {eval_loss: loss_name, eval_logits: logits})
    inference = _subgraph(both, {eval_logits: logits}, drop_inputs=[DEFAULT_IO["labels"]])
    return ExportedGraphs(
        training=training.SerializeToString(),
        evaluation=evaluation.SerializeToString(),
        inference=inference.SerializeToString(),
        params={n: values[n].numpy().astype(np.float32).copy() for n in trained},
        buffers={n: values[n].numpy().astype(np.float32).copy() for n in buffers},
        frozen=[n for n, _ in model.named_parameters() if n not in trained],
        output_shape=output_shape,
        labels=labels,
        num_classes=classes,
    )
