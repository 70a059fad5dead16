"""The compressed downlink: a model version sent as the steps from a version the device already holds.

The rounding happens at publication, not in transit. With ``fl-aggregator serve --downlink float16|int8|sparse``
the aggregator does not publish the parameters its strategy computed (the *target*); it publishes

    published(v) = published(v-1) + decode(encode(target(v) - published(v-1)))

computed with the very functions a device runs (:func:`decode_step`, :func:`apply_step`), so every step is
exact by construction: a device holding published(v-1) rebuilds published(v) bit for bit, and its SHA-256 is
the digest the full release, the task and the device's next update name. A device k versions behind applies
the k stored steps in order; one v-k -> v delta in a lossy encoding could not be exact.

The round engine keeps training from its own unrounded target, so what one publication leaves out is part of
the next step (error feedback): the published model stays within one step's rounding of the target however
many versions go by, instead of drifting away from it.

A step's encoding, per tensor, of the change c = target - base (float32):

- ``float16``: c rounded to binary16 (ties to even), -0 written as +0;
- ``int8``: the update rule of docs/protocol.md section 5 (scale max|c| / 127, q = round(c / scale));
- ``sparse``: the ceil(SPARSE_FRACTION x n) entries of largest |c| in int8 (scale from their maximum), the
  others 0 until a later step carries them.

Each tensor then goes dense or as a bitmap of its non-zero entries plus their values, whichever is smaller;
the values a device decodes are the same either way. docs/protocol.md section 6.5 has the bytes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np
from nacl.signing import SigningKey, VerifyKey

from appliance import cbor_reader, wire
from appliance.cbor_reader import Tagged
from appliance.errors import ProtocolError

DOWNLINK_ENCODINGS = ("full", "float16", "int8", "sparse")
# ``sparse`` sends this share of each tensor's entries per step (the largest changes).
SPARSE_FRACTION = 0.1
MESSAGE_TYPE = "model-delta"
# A ModelDelta carries at most this many steps; an aggregator keeps at most this many (docs/protocol.md 6.5).
MAX_STEPS = 64

_STEP_TAGS = frozenset({wire.TAG_MULTI_DIM, wire.TAG_SINT8, wire.TAG_FLOAT16_LE})
_VALUE_DTYPES = {wire.TAG_SINT8: np.dtype("i1"), wire.TAG_FLOAT16_LE: np.dtype("<f2")}
_MAX_INT8_SCALE = float(np.finfo(np.float32).max) / 128


class StepUnrepresentable(ValueError):
    """The change does not fit the encoding (a float16 overflow, or a non-finite result): publish in full."""


# --------------------------------------------------------------------------------------------- encoding


def _keep_largest(change: np.ndarray, fraction: float) -> np.ndarray:
    keep = math.ceil(fraction * change.size)
    if keep >= change.size:
        return change
    kept = np.zeros_like(change)
    largest = np.argpartition(np.abs(change), change.size - keep)[change.size - keep :]
    kept[largest] = change[largest]
    return kept


def _tensor_form(shape: tuple[int, ...], change: np.ndarray, encoding: str) -> Any:
    """One tensor of a step as the CBOR structure to encode: dense or bitmap + values, whichever is smaller."""
    scale: float | None = None
    if encoding == "float16":
        with np.errstate(over="ignore"):
            values = change.astype("<f2")
        if not np.isfinite(values).all():
            raise StepUnrepresentable("a change of magnitude 65520 or more does not fit float16")
        values[values == 0] = 0  # -0 as +0, so the dense and the sparse form decode to the same bits
        tag = wire.TAG_FLOAT16_LE
    else:
        values, scale = wire.quantise_int8(_keep_largest(change, SPARSE_FRACTION) if encoding == "sparse" else change)
        tag = wire.TAG_SINT8
    nonzero = values != 0
    count = int(nonzero.sum())
    dims = list(shape)
    if (values.size + 7) // 8 + count * values.itemsize < values.size * values.itemsize:
        mask = np.packbits(nonzero, bitorder="little").tobytes()
        kept = cbor2.CBORTag(tag, values[nonzero].tobytes())
        return [dims, mask, kept if scale is None else [kept, scale]]
    dense = cbor2.CBORTag(wire.TAG_MULTI_DIM, [dims, cbor2.CBORTag(tag, values.tobytes())])
    return dense if scale is None else [dense, scale]


def encode_step(
    base: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray], specs: Sequence[wire.ParamSpec], encoding: str
) -> bytes:
    """The step section from ``base`` towards ``target`` in ``encoding`` (float16, int8 or sparse)."""
    if encoding not in DOWNLINK_ENCODINGS[1:]:
        raise ValueError(f"unknown step encoding {encoding!r}; expected float16, int8 or sparse")
    forms = {}
    for spec in specs:
        change = np.subtract(target[spec.name], base[spec.name], dtype=np.float32).reshape(-1)
        if not np.isfinite(change).all():
            raise StepUnrepresentable(f"the change of {spec.name!r} is not finite")
        forms[spec.name] = _tensor_form(spec.shape, change, encoding)
    return cbor2.dumps(forms, canonical=True)


# --------------------------------------------------------------------------------------------- decoding


def _scale(value: Any, name: str) -> np.float32:
    if not isinstance(value, float) or not 0 < value <= _MAX_INT8_SCALE:
        raise ProtocolError("bad-tensor", f"tensor {name!r}: int8 data with a scale in (0, {_MAX_INT8_SCALE:.4g}]")
    return np.float32(value)


def _values(item: Any, name: str) -> np.ndarray:
    """A sparse tensor's values: ``84(bstr)`` or ``[72(bstr), scale]``, as float32."""
    scale = None
    if isinstance(item, list):
        if len(item) != 2:
            raise ProtocolError("bad-tensor", f"tensor {name!r}: int8 values are [72(bytes), scale]")
        item, scale = item[0], _scale(item[1], name)
    if not (isinstance(item, Tagged) and item.tag in _VALUE_DTYPES and isinstance(item.value, memoryview)):
        raise ProtocolError("bad-tensor", f"tensor {name!r}: values must be a float16 or int8 typed array")
    if (scale is None) != (item.tag == wire.TAG_FLOAT16_LE):
        raise ProtocolError("bad-tensor", f"tensor {name!r}: int8 values need a scale, float16 values none")
    dtype = _VALUE_DTYPES[item.tag]
    if len(item.value) % dtype.itemsize:
        raise ProtocolError("bad-tensor", f"tensor {name!r}: {len(item.value)} bytes are not whole float16 values")
    values = np.frombuffer(item.value, dtype=dtype).astype(np.float32)
    return values if scale is None else values * scale


def _sparse(item: list[Any], spec: wire.ParamSpec) -> np.ndarray:
    dims, mask, values = item
    if not (isinstance(dims, list) and all(type(d) is int for d in dims) and tuple(dims) == spec.shape):
        raise ProtocolError("wrong-shape", f"tensor {spec.name!r} has dimensions {dims!r}, expected {list(spec.shape)}")
    size = spec.size
    if not (isinstance(mask, memoryview) and len(mask) == (size + 7) // 8):
        raise ProtocolError("bad-tensor", f"tensor {spec.name!r}: the bitmap must be {(size + 7) // 8} bytes")
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
    if bits[size:].any():
        raise ProtocolError("bad-tensor", f"tensor {spec.name!r}: bitmap bits past the last element are set")
    chosen = bits[:size].astype(bool)
    kept = _values(values, spec.name)
    if kept.size != int(chosen.sum()):
        raise ProtocolError("bad-tensor", f"tensor {spec.name!r}: {kept.size} values for {int(chosen.sum())} bits")
    change = np.zeros(size, dtype=np.float32)
    change[chosen] = kept
    return change.reshape(spec.shape)


def _dense(item: Any, spec: wire.ParamSpec, limits: wire.Limits) -> np.ndarray:
    scale = None
    if isinstance(item, list):
        if len(item) != 2:
            raise ProtocolError("bad-tensor", f"tensor {spec.name!r}: int8 form is [tensor, scale]")
        item, scale = item[0], _scale(item[1], spec.name)
    array, tag = wire.typed_array(item, spec.name, limits)
    if array.shape != spec.shape:
        raise ProtocolError("wrong-shape", f"tensor {spec.name!r} has shape {array.shape}, expected {spec.shape}")
    if (scale is None) != (tag == wire.TAG_FLOAT16_LE):  # tag 85 (float32) is refused while decoding
        raise ProtocolError("bad-tensor", f"tensor {spec.name!r}: a step holds float16, or int8 with a scale")
    change = array.astype(np.float32)
    return change if scale is None else change * scale


def step_changes(step: Any, specs: Sequence[wire.ParamSpec], limits: wire.Limits) -> dict[str, np.ndarray]:
    """The dense float32 change of every tensor in one decoded step map (sparse entries left out are +0)."""
    if not isinstance(step, dict) or not all(isinstance(k, str) for k in step):
        raise ProtocolError("bad-tensor", "a step must be a map of name -> tensor")
    expected = {s.name for s in specs}
    if set(step) != expected:
        missing, extra = sorted(expected - set(step)), sorted(set(step) - expected)
        raise ProtocolError("wrong-tensors", f"missing {missing}, unexpected {extra}")
    changes = {}
    for spec in specs:
        item = step[spec.name]
        sparse = isinstance(item, list) and len(item) == 3
        change = _sparse(item, spec) if sparse else _dense(item, spec, limits)
        if not np.isfinite(change).all():
            raise ProtocolError("not-finite", f"tensor {spec.name!r}: the change holds NaN or Inf")
        changes[spec.name] = change
    return changes


def _section_limits(limits: wire.Limits) -> wire.Limits:
    return wire.Limits(max_bytes=limits.max_bytes, max_depth=8, max_container_len=limits.max_container_len,
                       max_items=limits.max_items, max_tensor_elements=limits.max_tensor_elements)


def decode_step(
    section: bytes | memoryview, specs: Sequence[wire.ParamSpec], limits: wire.Limits
) -> dict[str, np.ndarray]:
    """One step section as dense float32 changes."""
    return step_changes(cbor_reader.loads(section, _section_limits(limits), _STEP_TAGS), specs, limits)


def apply_step(params: Mapping[str, np.ndarray], changes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``params + changes`` in float32, element by element (IEEE 754 round to nearest, ties to even): new arrays."""
    out = {}
    for name, change in changes.items():
        result = np.add(np.asarray(params[name], dtype=np.float32), change, dtype=np.float32)
        if not np.isfinite(result).all():
            raise ProtocolError("not-finite", f"tensor {name!r}: base + change overflows float32")
        out[name] = result
    return out


def publish_step(
    base: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray], specs: Sequence[wire.ParamSpec], encoding: str
) -> tuple[bytes, dict[str, np.ndarray]]:
    """(the step section, the parameters to publish): what a device holding ``base`` will rebuild from that
    section, computed with the device's own decoder so the two cannot differ."""
    section = encode_step(base, target, specs, encoding)
    limits = wire.Limits(max_bytes=len(section) + 1, max_tensor_elements=sum(s.size for s in specs))
    try:
        return section, apply_step(base, decode_step(section, specs, limits))
    except ProtocolError as exc:
        raise StepUnrepresentable(str(exc)) from None


# ---------------------------------------------------------------------------------------------- message


@dataclass(frozen=True)
class ModelDelta:
    """A signed "model-delta": how to go from ``base_version`` to ``version`` in ``len(steps)`` steps.
    ``steps`` are the decoded step maps (views of the received message), applied by :func:`apply_delta`."""

    version: int
    base_version: int
    base_digest: bytes
    model_digest: bytes
    package_digest: bytes
    created_at: int
    steps: list[Any]


def _array_head(count: int) -> bytes:
    return bytes([0x80 | count]) if count < 24 else bytes([0x98, count])


def encode_model_delta(
    *, version: int, base_version: int, base_digest: bytes, model_digest: bytes, package_digest: bytes,
    created_at: int, steps: Sequence[bytes], key: SigningKey,
) -> bytes:
    """The signed message: envelope || section, the section a CBOR array of the step sections, oldest first."""
    if not 1 <= len(steps) <= MAX_STEPS or len(steps) != version - base_version:
        raise ValueError(f"{len(steps)} steps cannot lead from version {base_version} to {version}")
    section = _array_head(len(steps)) + b"".join(steps)
    payload = {
        "v": wire.PROTOCOL_VERSION,
        "type": MESSAGE_TYPE,
        "version": version,
        "base_version": base_version,
        "base_digest": base_digest,
        "model_digest": model_digest,
        "package_digest": package_digest,
        "created_at": created_at,
        "section_sha256": hashlib.sha256(section).digest(),
    }
    return wire.sign(payload, key, wire.key_id(key.verify_key)) + section


def _uint(p: Mapping[str, Any], name: str) -> int:
    value = p.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError("bad-payload", f"field {name!r} missing or not an unsigned integer")
    return value


def _digest(p: Mapping[str, Any], name: str) -> bytes:
    value = p.get(name)
    if not isinstance(value, memoryview) or len(value) != 32:
        raise ProtocolError("bad-payload", f"field {name!r} missing or not a 32-byte digest")
    return bytes(value)


def delta_from_payload(verified: wire.Verified, limits: wire.Limits = wire.DEFAULT_LIMITS) -> ModelDelta:
    """A verified model-delta envelope and its section, checked against the signed digest and decoded."""
    p = verified.payload
    if p.get("type") != MESSAGE_TYPE:
        raise ProtocolError("wrong-type", f"expected a {MESSAGE_TYPE} message, got {p.get('type')!r}")
    version, base_version = _uint(p, "version"), _uint(p, "base_version")
    if not 1 <= version - base_version <= MAX_STEPS:
        raise ProtocolError("bad-payload", f"a delta from version {base_version} to {version} is not 1 to "
                                           f"{MAX_STEPS} versions forward")
    if hashlib.sha256(verified.rest).digest() != _digest(p, "section_sha256"):
        raise ProtocolError("digest-mismatch", "the steps do not match the signed digest")
    steps = cbor_reader.loads(verified.rest, _section_limits(limits), _STEP_TAGS)
    if not isinstance(steps, list) or len(steps) != version - base_version:
        raise ProtocolError("bad-tensor", f"the section must be an array of {version - base_version} steps")
    package_digest = p.get("package_digest")
    if not isinstance(package_digest, memoryview):
        raise ProtocolError("bad-payload", "field 'package_digest' missing or not a byte string")
    return ModelDelta(version, base_version, _digest(p, "base_digest"), _digest(p, "model_digest"),
                      bytes(package_digest), _uint(p, "created_at"), steps)


def apply_delta(
    base: wire.ModelRelease, delta: ModelDelta, specs: Sequence[wire.ParamSpec], limits: wire.Limits
) -> wire.ModelRelease:
    """The release ``delta`` leads to from ``base``, refused unless its SHA-256 is the signed ``model_digest``."""
    if base.version != delta.base_version or base.digest != delta.base_digest:
        raise ProtocolError("wrong-model", f"the delta starts from version {delta.base_version}, this device holds "
                                           f"version {base.version} (or another model of that number)")
    if base.package_digest != delta.package_digest:
        raise ProtocolError("wrong-model", "the delta belongs to another model package")
    params: Mapping[str, np.ndarray] = base.tensors
    for step in delta.steps:
        params = apply_step(params, step_changes(step, specs, limits))
    digest = wire.parameters_digest(params)
    if digest != delta.model_digest:
        raise ProtocolError("digest-mismatch", "the model rebuilt from the delta does not have the signed digest")
    return wire.ModelRelease(delta.version, delta.package_digest, params, digest, delta.created_at)


def decode_model_answer(
    message: bytes | memoryview,
    aggregator_key: VerifyKey,
    specs: Sequence[wire.ParamSpec],
    base: wire.ModelRelease | None,
    limits: wire.Limits = wire.DEFAULT_LIMITS,
) -> wire.ModelRelease:
    """What ``GET /v1/models/{version}`` answered, verified against the pinned key: a full ModelRelease, or a
    model-delta applied to ``base`` (the release the request named)."""
    verified = wire.verify(message, wire.pinned(aggregator_key), limits)
    if verified.payload.get("type") != MESSAGE_TYPE:
        return wire.release_from(verified, list(specs), limits)
    if base is None:
        raise ProtocolError("wrong-type", "a model delta answered a request that named no base")
    return apply_delta(base, delta_from_payload(verified, limits), specs, limits)
