"""The reference models, each defined once as a list of layers and built two ways from it.

* :func:`torch_module` builds the PyTorch ``nn.Module`` (host side; torch is a tools dependency only).
* :func:`training_graph` / :func:`inference_graph` build standard ONNX graphs from the same layer list: the
  forward pass, a mean softmax cross-entropy loss, and the backward pass written out with explicit gradient
  formulas (Gemm/MatMul for dense layers, Conv with dilation for the convolution weight gradient,
  ConvTranspose for the input gradient, a Sign mask for ReLU). Parameters are graph *inputs*, not
  initializers, so the device feeds its current weights each step.

Why explicit formulas rather than an exporter: the stock onnxruntime has no training ops, the torch exporters
do not export autograd, and one export path is known to scale gradients by the batch size. Nothing here is
trusted on its own: ``flctl.model.check`` compares every graph against torch autograd before a
package is written.

The CNN uses *patch* convolutions (kernel == stride, no padding) and no max-pooling, on purpose: a patch
convolution is a reshape plus one matrix product, so its weight and input gradients are matrix products too
(no col2im, no scatter), which onnxruntime runs with its GEMM kernels. Overlapping convolutions and
max-pool backward in standard ONNX need dilated convolutions, ConvTranspose or scatters, and measured 25-40 %
slower than PyTorch here; patch convolutions are faster than PyTorch (see bench/training.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

OPSET = 17  # onnxruntime 1.18 runs up to opset 21; 17 keeps ReduceSum's axes-as-input form.
IR_VERSION = 8  # onnxruntime 1.18 reads IR <= 10; onnx 1.23 would otherwise write a newer one.
INPUT = "input"
LABELS = "labels"
LOSS = "loss"
LOGITS = "logits"
GRAD_PREFIX = "grad:"


@dataclass(frozen=True)
class Conv2d:
    in_channels: int
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0


@dataclass(frozen=True)
class ReLU:
    pass


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class Linear:
    in_features: int
    out_features: int


Layer = Conv2d | ReLU | Flatten | Linear


@dataclass(frozen=True)
class ModelSpec:
    """A reference model: its layers (named for their parameters) and what it is for."""

    name: str
    input_shape: tuple[int, ...]  # without the batch dimension
    layers: tuple[tuple[str, Layer], ...]
    num_classes: int
    task: str
    class_names: tuple[str, ...]
    preprocessing: dict
    optimizer: dict


CNN = ModelSpec(
    name="traffic-cnn",
    input_shape=(1, 32, 32),
    layers=(
        ("conv1", Conv2d(1, 32, 4, stride=4)),  # 32x32 -> 8x8 patches of 4x4 pixels
        ("relu1", ReLU()),
        ("conv2", Conv2d(32, 64, 2, stride=2)),  # 8x8 -> 4x4
        ("relu2", ReLU()),
        ("flatten", Flatten()),
        ("fc1", Linear(64 * 4 * 4, 64)),
        ("relu3", ReLU()),
        ("fc2", Linear(64, 4)),
    ),
    num_classes=4,
    task=(
        "Count the moving vehicles in view of a traffic camera, clipped to 0, 1, 2, 3+. On a real camera the "
        "labels are pseudo-labels from background subtraction (moving blobs of vehicle size); the fleet demo "
        "uses synthetic traffic frames (appliance.synthetic) labelled with the true count."
    ),
    class_names=("0 vehicles", "1 vehicle", "2 vehicles", "3 or more vehicles"),
    preprocessing={
        "input_shape": [1, 32, 32],
        "layout": "NCHW",
        "color": "grayscale",
        "input_range": [0.0, 1.0],
        "mean": 0.4,  # measured on appliance.synthetic frames
        "std": 0.25,
    },
    # max_grad_norm 5: without it about one demo run in three diverged at lr 0.05 (docs/models.md, "Gradient
    # clipping"); 1 held the demo's final held-out accuracy near 50 %.
    optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "max_grad_norm": 5.0},
)

MLP = ModelSpec(
    name="digits-mlp",
    input_shape=(64,),
    layers=(
        ("fc1", Linear(64, 128)),
        ("relu1", ReLU()),
        ("fc2", Linear(128, 10)),
    ),
    num_classes=10,
    task="Classify 8x8 handwritten digits (scikit-learn digits) into 0-9.",
    class_names=tuple(str(d) for d in range(10)),
    preprocessing={
        "input_shape": [64],
        "layout": "NC",
        "color": "grayscale",
        "input_range": [0.0, 1.0],  # sklearn digits pixel values 0..16 divided by 16
        "mean": 0.3,
        "std": 0.38,
    },
    optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
)

MODELS: dict[str, ModelSpec] = {"cnn": CNN, "mlp": MLP}


def param_shapes(spec: ModelSpec) -> OrderedDict[str, tuple[int, ...]]:
    """Parameter names (torch state_dict names) and shapes, in graph-input order."""
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for name, layer in spec.layers:
        if isinstance(layer, Conv2d):
            shapes[f"{name}.weight"] = (layer.out_channels, layer.in_channels, layer.kernel, layer.kernel)
            shapes[f"{name}.bias"] = (layer.out_channels,)
        elif isinstance(layer, Linear):
            shapes[f"{name}.weight"] = (layer.out_features, layer.in_features)
            shapes[f"{name}.bias"] = (layer.out_features,)
    return shapes


def torch_module(spec: ModelSpec):
    """The PyTorch definition of ``spec`` (imports torch lazily: only tools and tests need it)."""
    from torch import nn

    mods: OrderedDict[str, nn.Module] = OrderedDict()
    for name, layer in spec.layers:
        if isinstance(layer, Conv2d):
            mods[name] = nn.Conv2d(
                layer.in_channels, layer.out_channels, layer.kernel, stride=layer.stride, padding=layer.padding
            )
        elif isinstance(layer, ReLU):
            mods[name] = nn.ReLU()
        elif isinstance(layer, Flatten):
            mods[name] = nn.Flatten()
        elif isinstance(layer, Linear):
            mods[name] = nn.Linear(layer.in_features, layer.out_features)
        else:  # pragma: no cover - the Layer union is closed
            raise TypeError(f"unknown layer {layer!r}")
    return nn.Sequential(mods)


class _Builder:
    """Accumulates nodes and constant initializers of one graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def shape(self, values: list[int]) -> str:
        """An int64 constant (a Reshape target or reduction axes), shared between nodes."""
        key = ("i64", *values)
        if key not in self._consts:
            name = "const_" + "_".join(str(v).replace("-", "m") for v in values)
            self.inits.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
            self._consts[key] = name
        return self._consts[key]

    def scalar_f32(self, name: str, value: float) -> str:
        self.inits.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
        return name


@dataclass
class _Act:
    """An activation: its tensor name and layout.

    ``nchw``: the graph input (N, C, H, W); ``rows``: channel-last rows (N*h*w, C) ordered (n, y, x), what
    patch convolutions produce; ``flat``: (N, F).
    """

    name: str
    layout: str
    chw: tuple[int, ...]


def init_parameters(module, seed: int) -> None:
    """LeCun-normal weights (std 1/sqrt(fan_in)) and zero biases, from ``seed``.

    torch's default init (uniform, a third of that variance) left the traffic CNN on a loss plateau for the
    first 3-4 FedAvg rounds of the demo (held-out accuracy 0.25 after 2 rounds of 4 cameras x 400 frames at
    lr 0.05); with this init it is 0.42 after the same 2 rounds. He init (twice the variance) diverged at lr
    0.05.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".weight"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            else:
                p.zero_()


def _check_layers(spec: ModelSpec) -> None:
    for name, layer in spec.layers:
        if isinstance(layer, Conv2d) and (layer.kernel != layer.stride or layer.padding != 0):
            raise ValueError(
                f"{spec.name}.{name}: only patch convolutions (kernel == stride, padding 0) are supported; "
                "they make every convolution gradient a plain matrix product"
            )


def _forward(b: _Builder, spec: ModelSpec, logits_name: str) -> list[tuple[_Act, _Act]]:
    """Adds the forward nodes; returns (input, output) activations of each layer."""
    _check_layers(spec)
    layout = "nchw" if len(spec.input_shape) == 3 else "flat"
    act = _Act(INPUT, layout, tuple(spec.input_shape))
    trace = []
    last = len(spec.layers) - 1
    for i, (name, layer) in enumerate(spec.layers):
        out_name = logits_name if i == last else f"{name}.out"
        if isinstance(layer, Conv2d):
            c, h, w = act.chw
            k = layer.kernel
            if act.layout == "nchw" and c != 1:
                src = b.op("Transpose", [act.name], f"{name}.nhwc", perm=[0, 2, 3, 1])
            else:  # (N, 1, H, W) and rows (N*H*W, C) are both (N, H, W, C) in memory
                src = act.name
            p6 = b.op("Reshape", [src, b.shape([-1, h // k, k, w // k, k, c])], f"{name}.p6")
            pt = b.op("Transpose", [p6], f"{name}.pt", perm=[0, 1, 3, 2, 4, 5])
            patches = b.op("Reshape", [pt, b.shape([-1, k * k * c])], f"{name}.patches")
            # torch weight (O, C, k, k) -> (O, k*k*C) in the patch's (ky, kx, c) order
            wt = b.op("Transpose", [f"{name}.weight"], f"{name}.w_t", perm=[0, 2, 3, 1])
            wm = b.op("Reshape", [wt, b.shape([layer.out_channels, k * k * c])], f"{name}.w_mat")
            b.op("Gemm", [patches, wm, f"{name}.bias"], out_name, transB=1)
            new = _Act(out_name, "rows", (layer.out_channels, h // k, w // k))
            trace.append((_Act(patches, "patches", act.chw), new))
        elif isinstance(layer, ReLU):
            b.op("Relu", [act.name], out_name)
            new = _Act(out_name, act.layout, act.chw)
            trace.append((act, new))
        elif isinstance(layer, Flatten):
            size = 1
            for d in act.chw:
                size *= d
            if act.layout == "rows":  # back to torch's (c, y, x) flattening order
                c, h, w = act.chw
                r3 = b.op("Reshape", [act.name, b.shape([-1, h * w, c])], f"{name}.r3")
                t3 = b.op("Transpose", [r3], f"{name}.t3", perm=[0, 2, 1])
                b.op("Reshape", [t3, b.shape([-1, size])], out_name)
            else:
                b.op("Reshape", [act.name, b.shape([-1, size])], out_name)
            new = _Act(out_name, "flat", (size,))
            trace.append((act, new))
        elif isinstance(layer, Linear):
            b.op("Gemm", [act.name, f"{name}.weight", f"{name}.bias"], out_name, transB=1)
            new = _Act(out_name, "flat", (layer.out_features,))
            trace.append((act, new))
        act = new
    return trace


def _io(spec: ModelSpec) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    data = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", *spec.input_shape])]
    params = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in param_shapes(spec).items()]
    return data, params


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="flctl", producer_version="1"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def inference_graph(spec: ModelSpec) -> bytes:
    """(input, parameters...) -> logits, with a dynamic batch dimension."""
    b = _Builder()
    _forward(b, spec, LOGITS)
    data, params = _io(spec)
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", spec.num_classes])]
    return _model(helper.make_graph(b.nodes, f"{spec.name}-inference", data + params, outputs, b.inits))


def training_graph(spec: ModelSpec) -> bytes:
    """(input, labels, parameters...) -> (loss, grad:<param> for each parameter), dynamic batch dimension.

    loss is the mean softmax cross-entropy over the batch, so the gradients are divided by the batch size
    exactly once (in ``dlogits``).
    """
    b = _Builder()
    trace = _forward(b, spec, LOGITS)

    # loss = -mean(log softmax(logits)[label])
    logp = b.op("LogSoftmax", [LOGITS], "logp", axis=1)
    lab = b.op("Unsqueeze", [LABELS, b.shape([1])], "labels_col")
    picked = b.op("GatherElements", [logp, lab], "picked", axis=1)
    b.op("Neg", [b.op("ReduceMean", [picked], "mean_logp", keepdims=0)], LOSS)

    # dloss/dlogits = (softmax - onehot) / N
    prob = b.op("Exp", [logp], "prob")
    onehot_values = helper.make_tensor("onehot_values", TensorProto.FLOAT, [2], [0.0, 1.0])
    b.inits.append(onehot_values)
    onehot = b.op("OneHot", [LABELS, b.shape([spec.num_classes]), "onehot_values"], "onehot", axis=1)
    diff = b.op("Sub", [prob, onehot], "prob_minus_onehot")
    n_i = b.op("Gather", [b.op("Shape", [LOGITS], "logits_shape"), b.shape([0])], "batch_i64")
    n_f = b.op("Cast", [n_i], "batch_f32", to=TensorProto.FLOAT)
    g = b.op("Div", [diff, n_f], "dlogits")
    zero = b.scalar_f32("zero_f32", 0.0)

    for idx in range(len(spec.layers) - 1, -1, -1):
        name, layer = spec.layers[idx]
        x, y = trace[idx]
        need_dx = idx > 0
        if isinstance(layer, Linear):
            b.op("Gemm", [g, x.name], f"{GRAD_PREFIX}{name}.weight", transA=1)
            b.op("ReduceSum", [g, b.shape([0])], f"{GRAD_PREFIX}{name}.bias", keepdims=0)
            if need_dx:
                g = b.op("MatMul", [g, f"{name}.weight"], f"d_{name}.in")
        elif isinstance(layer, ReLU):
            # Greater+Cast+Mul measured faster in onnxruntime than Sign+Mul or Where.
            active = b.op("Greater", [y.name, zero], f"{name}.active")
            mask = b.op("Cast", [active], f"{name}.mask", to=TensorProto.FLOAT)
            g = b.op("Mul", [g, mask], f"d_{name}.in")
        elif isinstance(layer, Flatten):
            if x.layout == "rows":
                c, h, w = x.chw
                r3 = b.op("Reshape", [g, b.shape([-1, c, h * w])], f"d_{name}.r3")
                t3 = b.op("Transpose", [r3], f"d_{name}.t3", perm=[0, 2, 1])
                g = b.op("Reshape", [t3, b.shape([-1, c])], f"d_{name}.in")
            else:
                g = b.op("Reshape", [g, b.shape([-1, *x.chw])], f"d_{name}.in")
        elif isinstance(layer, Conv2d):
            c, h, w = x.chw
            k, o = layer.kernel, layer.out_channels
            dwm = b.op("Gemm", [g, x.name], f"{name}.dw_mat", transA=1)  # (O, k*k*C)
            dw4 = b.op("Reshape", [dwm, b.shape([o, k, k, c])], f"{name}.dw4")
            b.op("Transpose", [dw4], f"{GRAD_PREFIX}{name}.weight", perm=[0, 3, 1, 2])
            b.op("ReduceSum", [g, b.shape([0])], f"{GRAD_PREFIX}{name}.bias", keepdims=0)
            if need_dx:
                dp = b.op("MatMul", [g, f"{name}.w_mat"], f"d_{name}.patches")  # (N*h'*w', k*k*C)
                d6 = b.op("Reshape", [dp, b.shape([-1, h // k, w // k, k, k, c])], f"d_{name}.p6")
                dt = b.op("Transpose", [d6], f"d_{name}.pt", perm=[0, 1, 3, 2, 4, 5])
                # Inner layers only see 'rows' (the graph input never needs a gradient).
                g = b.op("Reshape", [dt, b.shape([-1, c])], f"d_{name}.in")

    data, params = _io(spec)
    inputs = [*data, helper.make_tensor_value_info(LABELS, TensorProto.INT64, ["N"]), *params]
    outputs = [helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, [])]
    outputs += [
        helper.make_tensor_value_info(f"{GRAD_PREFIX}{n}", TensorProto.FLOAT, list(s))
        for n, s in param_shapes(spec).items()
    ]
    return _model(helper.make_graph(b.nodes, f"{spec.name}-training", inputs, outputs, b.inits))
