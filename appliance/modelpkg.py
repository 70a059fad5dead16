"""Model packages: what a device needs to train and run one model, content-addressed and signed.

A package file is a COSE_Sign1 envelope (appliance.wire, signed by the aggregator key) followed by the
*content*: one CBOR map in deterministic encoding (RFC 8949 section 4.2) holding the training and inference
ONNX graphs, the ordered parameter specs, the initial parameters (a wire tensor section), the optimiser
and preprocessing specs, and the task description. The signed payload pins the SHA-256 of the content
bytes; that hash is the package's *digest*, its name everywhere (tasks, releases, the models/ directory).

Loading checks, in order: the envelope's signature against the pinned aggregator key, the payload type and
format, the content digest, that the content is in deterministic encoding (so equal packages have equal
digests), the schema of every field, and the initial parameters against the specs. Any failure is a
:class:`PackageError` naming the file and the problem. Nothing here imports torch or onnx: packages are made
by ``flctl model export`` on a host.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
from nacl.signing import SigningKey, VerifyKey

from appliance import wire
from appliance.detection import DetectionSpec
from appliance.durable import atomic_write
from appliance.errors import ProtocolError
from appliance.wire import ParamSpec

FORMAT_VERSION = 1
PAYLOAD_TYPE = "model-package"
SUFFIX = ".flpkg"
OPTIMIZERS = ("sgd", "momentum", "adamw")
MAX_PACKAGE_BYTES = 256 * 1024 * 1024

# Tensor names of the graphs' inputs and outputs (the convention flctl's exporter writes).
DEFAULT_IO = {"input": "input", "labels": "labels", "loss": "loss", "logits": "logits", "grad_prefix": "grad:"}
# Labels when a package does not say: one class index per sample (every package before the field existed).
DEFAULT_LABELS = {"dtype": "int64", "shape": []}
LABEL_DTYPES = ("int64", "float32")
# Where running statistics (batch norm) live: in ``params`` (sent with updates, averaged weighted by samples
# like the weights), or on the device only (FedBN).
BUFFER_POLICIES = ("aggregate", "local")
BUFFER_PREFIX = "new:"
# A detector's output layout (appliance.detection): centre heatmaps per class, box size and centre offset.
DETECTION_KINDS = ("centre-heatmap",)
# Bounds no real model reaches (docs/package.md, "Bounds"): a signed package past one would be kept and then fail
# every round in the trainer (an input of 2^62 values cannot be allocated; a weight decay of 1e19 overflows float32 at
# the second step), so it is refused where it is made (flctl model export) and where it is received.
MAX_SAMPLE_VALUES = 2**28  # values in one sample's input, or in one sample's labels (1 GiB as float32)
MAX_CLASSES = 2**24
MAX_DETECTION_STRIDE = 4096
MAX_LEARNING_RATE = wire.TASK_BOUNDS["learning_rate"]  # optimizer lr, as a Task's learning_rate
MAX_WEIGHT_DECAY = 1000.0
MAX_EPS = 1000.0
# Normalisation: |mean| and the input_range ends at most this; std in [1 / MAX_NORMALISATION, MAX_NORMALISATION].
MAX_NORMALISATION = 1e6


class PackageError(Exception):
    """A model package was refused or could not be written. ``reason`` is stable (``bad-signature``,
    ``digest-mismatch``, ``bad-content``...), the message is for the operator. ``digest``: the content's digest when
    the refusal is of content that matched its signed digest (so is refused again wherever it comes from), else b""."""

    def __init__(self, reason: str, detail: str, digest: bytes = b""):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.digest = digest


@dataclass(frozen=True)
class ModelPackage:
    """A verified model package. ``digest`` is the SHA-256 of its content (32 bytes)."""

    name: str
    param_specs: list[ParamSpec]
    initial_params: dict[str, np.ndarray]
    training_graph: bytes
    inference_graph: bytes
    optimizer: dict[str, Any]
    preprocessing: dict[str, Any]
    num_classes: int
    task: str = ""
    class_names: list[str] = field(default_factory=list)
    io: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_IO))
    format_version: int = FORMAT_VERSION
    digest: bytes = b""
    labels: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    # Running statistics the training graph updates (it outputs ``BUFFER_PREFIX + name`` for each): under the
    # "aggregate" policy they are among ``param_specs``; under "local" they are ``local_buffers`` (initial values).
    buffer_names: list[str] = field(default_factory=list)
    buffer_policy: str = "aggregate"
    local_buffers: dict[str, np.ndarray] = field(default_factory=dict)
    evaluation_graph: bytes = b""  # (input, labels, parameters) -> (loss, logits) in eval mode; optional
    # A detector says how its outputs and labels are laid out: {kind, stride, classes}; empty for other models.
    detection: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable_names(self) -> list[str]:
        """The parameters the optimiser updates: every parameter except running statistics."""
        stats = set(self.buffer_names)
        return [s.name for s in self.param_specs if s.name not in stats]

    @property
    def class_labels(self) -> bool:
        """True when labels are class indices 0..num_classes-1 (accuracy is meaningful)."""
        return self.labels["dtype"] == "int64"

    @property
    def label_shape(self) -> tuple[int, ...]:
        """Per-sample label shape: () for one class per sample, (H, W) for per-pixel classes, ..."""
        return tuple(self.labels["shape"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape (without the batch dimension)."""
        return tuple(self.preprocessing["input_shape"])

    def check_inputs(self, x: np.ndarray) -> np.ndarray:
        """``x`` as a C-contiguous float32 array (no copy when it already is one), shape checked."""
        arr = np.ascontiguousarray(x, dtype=np.float32)
        if arr.shape[1:] != self.input_shape:
            raise ValueError(
                f"{self.name}: inputs have per-sample shape {arr.shape[1:]}, the model needs {self.input_shape}"
            )
        return arr

    def preprocess_into(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Normalise ``x`` into ``out`` (which may be ``x`` itself): (x - mean) / std."""
        np.subtract(x, np.float32(self.preprocessing.get("mean", 0.0)), out=out)
        out *= np.float32(1.0 / self.preprocessing.get("std", 1.0))
        return out

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """Normalise inputs given in the package's ``input_range`` (frames scaled to [0, 1]) the way the
        model was trained: (x - mean) / std, as a new float32 array. Checks the per-sample shape."""
        arr = self.check_inputs(x)
        return self.preprocess_into(arr, np.empty_like(arr))

    def summary(self) -> dict[str, Any]:
        """What ``flctl model inspect`` prints."""
        return {
            "name": self.name,
            "digest": self.digest.hex(),
            "format": self.format_version,
            "task": self.task,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "parameters": sum(s.size for s in self.param_specs),
            "param_specs": [{"name": s.name, "shape": list(s.shape), "dtype": "float32"} for s in self.param_specs],
            "optimizer": dict(self.optimizer),
            "preprocessing": dict(self.preprocessing),
            "training_graph_bytes": len(self.training_graph),
            "inference_graph_bytes": len(self.inference_graph),
            "evaluation_graph_bytes": len(self.evaluation_graph),
            "labels": dict(self.labels),
            "buffers": {"policy": self.buffer_policy, "names": list(self.buffer_names)},
            **({"detection": dict(self.detection)} if self.detection else {}),
        }


# ------------------------------------------------------------------------------------------- content


def _content(pkg: ModelPackage) -> dict[str, Any]:
    specs = pkg.param_specs
    _check_params(pkg.name, specs, pkg.initial_params)
    ordered = {s.name: np.ascontiguousarray(pkg.initial_params[s.name], dtype=np.float32) for s in specs}
    content: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "name": pkg.name,
        "task": pkg.task,
        "class_names": list(pkg.class_names),
        "num_classes": pkg.num_classes,
        "graphs": {"training": bytes(pkg.training_graph), "inference": bytes(pkg.inference_graph)},
        "io": dict(pkg.io),
        "params": [{"name": s.name, "shape": list(s.shape), "dtype": "float32"} for s in specs],
        "initial_params": wire.encode_tensors(ordered, "float32"),
        "optimizer": dict(pkg.optimizer),
        "preprocessing": dict(pkg.preprocessing),
    }
    # The optional fields are written only when they differ from their defaults, so a package that does not
    # use them has the same bytes (and digest) as before they existed.
    if pkg.evaluation_graph:
        content["graphs"]["evaluation"] = bytes(pkg.evaluation_graph)
    labels = _check_labels(pkg.labels)
    _check_num_classes(pkg.num_classes, labels)
    if labels != DEFAULT_LABELS:
        content["labels"] = labels
    if pkg.buffer_names:
        content["buffers"] = _buffers_content(pkg)
    if pkg.detection:
        content["detection"] = _check_detection(pkg.detection)
    return content


def _buffers_content(pkg: ModelPackage) -> dict[str, Any]:
    buffers: dict[str, Any] = {"policy": pkg.buffer_policy, "names": list(pkg.buffer_names),
                               "output_prefix": BUFFER_PREFIX}
    if pkg.buffer_policy == "local":
        specs = [ParamSpec(n, tuple(pkg.local_buffers[n].shape)) for n in pkg.buffer_names]
        _check_params(pkg.name, specs, pkg.local_buffers, what="local buffers")
        buffers["specs"] = [{"name": s.name, "shape": list(s.shape), "dtype": "float32"} for s in specs]
        buffers["initial"] = wire.encode_tensors(
            {s.name: np.ascontiguousarray(pkg.local_buffers[s.name], dtype=np.float32) for s in specs}, "float32")
    _check_buffers(pkg.buffer_policy, pkg.buffer_names, [s.name for s in pkg.param_specs], pkg.local_buffers)
    return buffers


def _check_sample_values(field_name: str, shape: list | tuple) -> None:
    """PackageError unless the per-sample ``shape`` holds at most MAX_SAMPLE_VALUES values."""
    if math.prod(shape) > MAX_SAMPLE_VALUES:
        raise PackageError("bad-content", f"{field_name} {list(shape)} holds {math.prod(shape)} values per sample, "
                                          f"more than the {MAX_SAMPLE_VALUES} (2^28) a device trains on")


def _check_labels(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or spec.get("dtype") not in LABEL_DTYPES:
        raise PackageError("bad-content", f"labels.dtype must be one of {LABEL_DTYPES}, got {spec!r}")
    shape = spec.get("shape")
    if set(spec) != {"dtype", "shape"} or not (
        isinstance(shape, list | tuple) and all(type(d) is int and d > 0 for d in shape)
    ):
        raise PackageError("bad-content", f"labels must be {{dtype, shape: [positive ints]}}, got {spec!r}")
    _check_sample_values("labels.shape", shape)
    return {"dtype": spec["dtype"], "shape": list(shape)}


def _check_num_classes(num_classes: Any, labels: Mapping[str, Any]) -> None:
    """An integer (not a bool, not 3.0: the decoder refuses them, so a package made with one reaches no device) in
    the range the labels allow."""
    least = 2 if labels["dtype"] == "int64" else 1
    if type(num_classes) is not int or not least <= num_classes <= MAX_CLASSES:
        kind = "" if type(num_classes) is int else " (not an integer)"
        raise PackageError("bad-content", f"num_classes must be in [{least}, {MAX_CLASSES}] (2^24), got "
                                          f"{num_classes!r}{kind}")


def _check_detection(spec: Any) -> dict[str, Any]:
    if not (isinstance(spec, dict) and set(spec) == {"kind", "stride", "classes"}
            and spec["kind"] in DETECTION_KINDS
            and all(type(spec[k]) is int and spec[k] > 0 for k in ("stride", "classes"))):
        raise PackageError("bad-content", f"detection must be {{kind: one of {DETECTION_KINDS}, stride: positive "
                           f"int, classes: positive int}}, got {spec!r}")
    for key, most in (("stride", MAX_DETECTION_STRIDE), ("classes", MAX_CLASSES)):
        if spec[key] > most:
            raise PackageError("bad-content", f"detection field {key!r} must be at most {most}, got {spec[key]}")
    return {"kind": spec["kind"], "stride": spec["stride"], "classes": spec["classes"]}


def _check_buffers(policy: Any, names: Any, params: list[str], local: Mapping[str, Any]) -> None:
    if policy not in BUFFER_POLICIES:
        raise PackageError("bad-content", f"buffers.policy must be one of {BUFFER_POLICIES}, got {policy!r}")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names)):
        raise PackageError("bad-content", f"buffers.names must be a list of unique names, got {names!r}")
    if policy == "aggregate" and not set(names) <= set(params):
        raise PackageError("bad-content", f"aggregated buffers {sorted(set(names) - set(params))} are not in params")
    if policy == "local" and (set(names) & set(params) or set(names) != set(local)):
        raise PackageError("bad-content", "local buffers must be outside params, each with an initial value")


def _check_params(name: str, specs: list[ParamSpec], params: Mapping[str, np.ndarray],
                  what: str = "initial parameters") -> None:
    if not specs:
        raise PackageError("bad-content", f"{name}: a model needs at least one parameter")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise PackageError("bad-content", f"{name}: duplicate parameter names in {names}")
    if set(params) != set(names):
        missing, extra = sorted(set(names) - set(params)), sorted(set(params) - set(names))
        raise PackageError("bad-content", f"{name}: {what} missing {missing}, unexpected {extra}")
    for s in specs:
        if tuple(params[s.name].shape) != tuple(s.shape):
            raise PackageError(
                "bad-content", f"{name}: parameter {s.name} has shape {params[s.name].shape}, spec says {s.shape}"
            )


# float32's largest finite value: the device trains and normalises in float32.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# The optimiser members the trainer reads (appliance/trainer.py, Optimizer), and lr (the rate tools use).
_OPTIMIZER_MEMBERS = frozenset({"name", "lr", "momentum", "weight_decay", "eps", "max_grad_norm", "betas"})


def _in_range(value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> bool:
    """Whether ``value`` is a number (not a bool) in the range, finite in float32 (the device computes in it)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= _FLOAT32_MAX:
        return False  # NaN, infinities, and integers past float32 (or float64) included
    return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)


def _number(where: str, key: str, value: Any, low: float = -_FLOAT32_MAX, high: float = _FLOAT32_MAX, *,
            low_open: bool = False, high_open: bool = False) -> None:
    """PackageError naming ``where`` field ``key``, its range and ``value`` unless ``value`` is a finite number in
    the range. A signed package is checked all the same: a signature proves who made it, not that a device can train
    on it (one NaN or infinity poisons every step)."""
    if not _in_range(value, low, high, low_open=low_open, high_open=high_open):
        if (low, high) == (-_FLOAT32_MAX, _FLOAT32_MAX):
            what = "a finite number"
        elif high == _FLOAT32_MAX:
            what = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise PackageError("bad-content", f"{where} field {key!r} must be {what}, got {value!r}")


def _check_optimizer(spec: Any) -> dict[str, Any]:
    """The optimiser spec (docs/package.md, "optimizer"): every member a finite number in the range the trainer
    can use, members it does not know included."""
    if not isinstance(spec, dict) or spec.get("name") not in OPTIMIZERS:
        raise PackageError("bad-content", f"optimizer spec must name one of {OPTIMIZERS}, got {spec!r}")
    _number("optimizer", "lr", spec.get("lr", 0.05), 0.0, MAX_LEARNING_RATE, low_open=True)
    _number("optimizer", "momentum", spec.get("momentum", 0.0), 0.0, 1.0, high_open=True)
    _number("optimizer", "weight_decay", spec.get("weight_decay", 0.0), 0.0, MAX_WEIGHT_DECAY)
    _number("optimizer", "eps", spec.get("eps", 1e-8), 0.0, MAX_EPS, low_open=True)
    if spec.get("max_grad_norm") is not None:
        _number("optimizer", "max_grad_norm", spec["max_grad_norm"], 0.0, low_open=True)
    betas = spec.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2
            and all(_in_range(b, 0.0, 1.0, low_open=False, high_open=True) for b in betas)):
        raise PackageError("bad-content", f"optimizer field 'betas' must be two numbers in [0, 1), got {betas!r}")
    for key in sorted(spec.keys() - _OPTIMIZER_MEMBERS, key=str):
        _number("optimizer", key, spec[key])  # a member this agent does not use: a finite number all the same
    return dict(spec)


def _check_preprocessing(spec: Any) -> dict[str, Any]:
    """The preprocessing spec (docs/package.md): the device feeds its graphs ``(x - mean) / std`` in float32, so
    ``mean`` and ``std`` are bounded (MAX_NORMALISATION): a std of 1e-38 or a mean of 1e38 makes every input
    overflow float32 in the first layer."""
    if not isinstance(spec, dict):
        raise PackageError("bad-content", "preprocessing spec must be a map")
    shape = spec.get("input_shape")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
        raise PackageError("bad-content", f"preprocessing.input_shape must be a list of positive ints, got {shape!r}")
    _check_sample_values("preprocessing.input_shape", shape)
    _number("preprocessing", "mean", spec.get("mean", 0.0), -MAX_NORMALISATION, MAX_NORMALISATION)
    _number("preprocessing", "std", spec.get("std", 1.0), 1 / MAX_NORMALISATION, MAX_NORMALISATION)
    bounds = spec.get("input_range", [0.0, 1.0])
    if not (isinstance(bounds, list) and len(bounds) == 2
            and all(_in_range(b, -MAX_NORMALISATION, MAX_NORMALISATION, low_open=False, high_open=False)
                    for b in bounds)
            and bounds[0] < bounds[1]):
        raise PackageError("bad-content", f"preprocessing field 'input_range' must be two numbers [low, high] in "
                                          f"[-{MAX_NORMALISATION:g}, {MAX_NORMALISATION:g}] with low < high, "
                                          f"got {bounds!r}")
    return dict(spec)


def content_digest(content_bytes: bytes) -> bytes:
    return hashlib.sha256(content_bytes).digest()


# ------------------------------------------------------------------------------------------ write / load


def encode_package(pkg: ModelPackage, key: SigningKey) -> tuple[bytes, bytes]:
    """(file bytes, digest): the signed envelope followed by the deterministic CBOR content."""
    _check_optimizer(pkg.optimizer)
    _check_preprocessing(pkg.preprocessing)
    body = cbor2.dumps(_content(pkg), canonical=True)
    _check_detector_layout(pkg)
    digest = content_digest(body)
    payload = {
        "v": wire.PROTOCOL_VERSION,
        "type": PAYLOAD_TYPE,
        "format": FORMAT_VERSION,
        "name": pkg.name,
        "content_sha256": digest,
        "content_bytes": len(body),
    }
    return wire.sign(payload, key, wire.key_id(key.verify_key)) + body, digest


def write_package(path: Path | str, pkg: ModelPackage, key: SigningKey) -> bytes:
    """Sign ``pkg`` with the aggregator ``key`` and write it atomically to ``path``; returns the digest."""
    data, digest = encode_package(pkg, key)
    atomic_write(path, data)
    return digest


def decode_package(data: bytes | memoryview, aggregator_key: VerifyKey, origin: str = "package") -> ModelPackage:
    """Verify and decode package bytes (see the module docstring for what is checked)."""
    if len(data) > MAX_PACKAGE_BYTES:
        raise PackageError("too-large", f"{origin}: {len(data)} bytes exceeds {MAX_PACKAGE_BYTES}")
    try:
        verified = wire.verify(data, wire.pinned(aggregator_key), wire.Limits(max_bytes=MAX_PACKAGE_BYTES))
    except ProtocolError as exc:
        hint = " (not signed by the pinned aggregator key)" if exc.reason in ("unknown-key", "bad-signature") else ""
        raise PackageError(exc.reason, f"{origin}: refused: {exc}{hint}") from None
    p = verified.payload
    if p.get("type") != PAYLOAD_TYPE:
        raise PackageError("wrong-type", f"{origin}: signed message is a {p.get('type')!r}, not a model package")
    if p.get("format") != FORMAT_VERSION:
        raise PackageError("unsupported-format", f"{origin}: package format {p.get('format')!r}, expected 1")
    pinned = p.get("content_sha256")
    body = bytes(verified.rest)
    digest = content_digest(body)
    if not isinstance(pinned, memoryview | bytes) or bytes(pinned) != digest:
        raise PackageError("digest-mismatch", f"{origin}: content does not match the signed digest (tampered?)")
    try:
        content = cbor2.loads(body)
    except MemoryError:  # the device's, not the content's: a refusal naming the digest would never be downloaded again
        raise
    except Exception as exc:
        raise PackageError("bad-content", f"{origin}: content is not CBOR: {exc}", digest) from None
    if cbor2.dumps(content, canonical=True) != body:
        raise PackageError("bad-content", f"{origin}: content is not in deterministic CBOR encoding", digest)
    if _holds_bignum(content):
        raise PackageError("bad-content", f"{origin}: content holds an integer past 64 bits (a CBOR bignum), which no "
                                          "field of a package is", digest)
    try:
        return _from_content(content, digest)
    except PackageError as exc:
        raise PackageError(exc.reason, f"{origin}: {exc.detail}", digest) from None


def _holds_bignum(content: Any) -> bool:
    """Whether ``content`` holds an integer outside CBOR's 64-bit major types anywhere. One past Python's 4,300 digits
    cannot even be shown in an error (ValueError from its repr, where a PackageError is due)."""
    items = [content]
    while items:  # iterative: the nesting is the sender's to choose
        item = items.pop()
        if isinstance(item, int) and not -(1 << 64) <= item < 1 << 64:
            return True
        if isinstance(item, dict):
            items.extend(item)
            items.extend(item.values())
        elif isinstance(item, list):
            items.extend(item)
    return False


def _get(content: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = content.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PackageError("bad-content", f"field {key!r} missing or of the wrong type")
    return value


def _from_content(content: Any, digest: bytes) -> ModelPackage:
    if not isinstance(content, dict):
        raise PackageError("bad-content", "content must be a CBOR map")
    if content.get("format") != FORMAT_VERSION:
        raise PackageError("unsupported-format", f"content format {content.get('format')!r}, expected 1")
    specs = []
    for item in _get(content, "params", list):
        if not isinstance(item, dict) or item.get("dtype") != "float32":
            raise PackageError("bad-content", f"parameter spec {item!r}: only float32 parameters are supported")
        shape = item.get("shape")
        if not (isinstance(item.get("name"), str) and isinstance(shape, list)
                and all(type(d) is int and d > 0 for d in shape)):
            raise PackageError("bad-content", f"parameter spec {item!r} needs a name and a list of positive dims")
        specs.append(ParamSpec(item["name"], tuple(shape)))
    try:
        tensors, _ = wire.decode_tensors(
            _get(content, "initial_params", bytes), specs,
            wire.Limits(max_bytes=MAX_PACKAGE_BYTES, max_tensor_elements=sum(math.prod(s.shape) for s in specs)),
        )
    except ProtocolError as exc:
        raise PackageError("bad-content", f"initial parameters: {exc}") from None
    _check_params(content.get("name", "?"), specs, tensors)
    graphs = _get(content, "graphs", dict)
    labels = _check_labels(content.get("labels", DEFAULT_LABELS))
    num_classes = content.get("num_classes")
    _check_num_classes(num_classes, labels)
    io = _get(content, "io", dict)
    if set(io) != set(DEFAULT_IO) or not all(isinstance(v, str) for v in io.values()):
        raise PackageError("bad-content", f"io must map {sorted(DEFAULT_IO)} to tensor names")
    evaluation = graphs.get("evaluation", b"")
    if not isinstance(evaluation, bytes):
        raise PackageError("bad-content", "field 'evaluation' missing or of the wrong type")
    policy, buffer_names, local = _buffers_from_content(content.get("buffers"), [s.name for s in specs])
    package = ModelPackage(
        name=_get(content, "name", str),
        param_specs=specs,
        initial_params={s.name: np.array(tensors[s.name], dtype=np.float32) for s in specs},
        training_graph=_get(graphs, "training", bytes),
        inference_graph=_get(graphs, "inference", bytes),
        optimizer=_check_optimizer(content.get("optimizer")),
        preprocessing=_check_preprocessing(content.get("preprocessing")),
        num_classes=num_classes,
        task=_get(content, "task", str),
        class_names=[str(c) for c in _get(content, "class_names", list)],
        io=dict(io),
        format_version=FORMAT_VERSION,
        digest=digest,
        labels=labels,
        buffer_names=buffer_names,
        buffer_policy=policy,
        local_buffers=local,
        evaluation_graph=evaluation,
        detection=_check_detection(content["detection"]) if "detection" in content else {},
    )
    _check_detector_layout(package)
    return package


def _check_detector_layout(pkg: ModelPackage) -> None:
    """A detector's input, stride and labels must fit together (appliance.detection): H and W multiples of the
    stride, float32 labels of [classes + 5, H / stride, W / stride]. Each field alone in range, a stride of 3 on a
    32x32 input failed every round in the trainer."""
    if pkg.detection:
        try:
            DetectionSpec.from_package(pkg)
        except ValueError as exc:
            raise PackageError("bad-content", f"detection: {exc}") from None


def _buffers_from_content(buffers: Any, params: list[str]) -> tuple[str, list[str], dict[str, np.ndarray]]:
    """(policy, names, local initial values) of the optional ``buffers`` field."""
    if buffers is None:
        return "aggregate", [], {}
    if not isinstance(buffers, dict) or buffers.get("output_prefix") != BUFFER_PREFIX:
        raise PackageError("bad-content", f"buffers must be a map with output_prefix {BUFFER_PREFIX!r}")
    policy, names = buffers.get("policy"), buffers.get("names")
    local: dict[str, np.ndarray] = {}
    if policy == "local":
        specs = []
        for item in buffers.get("specs") or []:
            if not (isinstance(item, dict) and item.get("dtype") == "float32" and isinstance(item.get("name"), str)
                    and isinstance(item.get("shape"), list) and all(type(d) is int and d > 0 for d in item["shape"])):
                raise PackageError("bad-content", f"buffer spec {item!r} needs a name, positive dims and float32")
            specs.append(ParamSpec(item["name"], tuple(item["shape"])))
        try:
            tensors, _ = wire.decode_tensors(
                _get(buffers, "initial", bytes), specs,
                wire.Limits(max_bytes=MAX_PACKAGE_BYTES, max_tensor_elements=sum(math.prod(s.shape) for s in specs)),
            )
        except ProtocolError as exc:
            raise PackageError("bad-content", f"local buffers: {exc}") from None
        local = {s.name: np.array(tensors[s.name], dtype=np.float32) for s in specs}
        if names != [s.name for s in specs]:
            raise PackageError("bad-content", "buffers.names must list the local buffer specs in order")
    _check_buffers(policy, names, params, local)
    return policy, list(names), local


def load_package(path: Path | str, aggregator_key: VerifyKey) -> ModelPackage:
    """Read and verify a package file; refuses unsigned, tampered or malformed packages (PackageError)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PACKAGE_BYTES:
            raise PackageError("too-large", f"{path}: {size} bytes exceeds {MAX_PACKAGE_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise PackageError("unreadable", f"{path}: cannot read model package: {exc.strerror}") from None
    return decode_package(data, aggregator_key, origin=str(path))
