"""The fl-edge wire protocol, imported by the agent and the aggregator alike.

Every message is a COSE_Sign1 (RFC 9052, tag 18) signed with Ed25519 (alg EdDSA, -8), ``kid`` in the
protected header. The payload is a CBOR map in deterministic encoding with a protocol version ``v``.

Messages that carry tensors (Update, ModelRelease) are a CBOR sequence (RFC 8742) of two items::

    COSE_Sign1(payload = {... "tensors_sha256": h'...'})  ||  tensor section (a CBOR map)

The signature covers only the small payload, which pins the SHA-256 of the exact tensor-section bytes. The
receiver checks 64 bytes of signature, then hashes the tensor section (hashlib releases the GIL) and decodes
it straight into numpy views of the received buffer. docs/protocol.md has the byte-level specification.

Tensors are RFC 8746 typed arrays: ``40([dims, 85(h'..')])`` (float32, little-endian), ``40([dims,
84(h'..')])`` (float16) and, for int8 quantisation, ``[40([dims, 72(h'..')]), scale]`` where the value is
``int8 * scale``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
import numpy as np
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from appliance import cbor_reader
from appliance.cbor_reader import Limits, Tagged
from appliance.errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Limits",
    "ModelRelease",
    "ParamSpec",
    "ProtocolError",
    "Receipt",
    "Task",
    "Update",
    "Verified",
    "check_finite",
    "decode_model_release",
    "decode_receipt",
    "decode_task",
    "decode_tensors",
    "decode_update",
    "encode_model_release",
    "encode_receipt",
    "encode_task",
    "encode_tensors",
    "encode_update",
    "key_id",
    "pinned",
    "quantise_int8",
    "release_from",
    "sign",
    "typed_array",
    "update_from",
    "verify",
]

PROTOCOL_VERSION = 1

COSE_SIGN1_TAG = 18
COSE_ALG = 1
COSE_KID = 4
COSE_ALG_EDDSA = -8
TAG_MULTI_DIM = 40
TAG_SINT8 = 72
TAG_FLOAT16_LE = 84
TAG_FLOAT32_LE = 85

CONTENT_TYPE = "application/fl-edge+cbor-seq"

ENCODINGS = ("float32", "float16", "int8")
_DTYPE_TAG = {"float32": TAG_FLOAT32_LE, "float16": TAG_FLOAT16_LE}
_TAG_DTYPE = {TAG_FLOAT32_LE: np.dtype("<f4"), TAG_FLOAT16_LE: np.dtype("<f2"), TAG_SINT8: np.dtype("i1")}

_ENVELOPE_TAGS = frozenset({COSE_SIGN1_TAG})
_TENSOR_TAGS = frozenset({TAG_MULTI_DIM, TAG_SINT8, TAG_FLOAT16_LE, TAG_FLOAT32_LE})
# A COSE envelope and its small payload never need more than this, whatever the tensor limits are.
_ENVELOPE_MAX_BYTES = 64 * 1024
# The first bytes of a message that always hold its whole signed envelope, if it is valid at all: a receiver
# may verify who sent an upload from this prefix before reading the rest.
ENVELOPE_PREFIX_BYTES = _ENVELOPE_MAX_BYTES + 16
# Model parameters are at most 4-D (conv kernels); numpy itself stops at 32 (numpy 1.x) or 64 dimensions.
MAX_TENSOR_DIMS = 8
# int8 values are in [-128, 127]: a larger scale would overflow float32 when dequantised.
_MAX_INT8_SCALE = float(np.finfo(np.float32).max) / 128

DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------------------------- envelope


@dataclass(frozen=True)
class Verified:
    """A verified envelope: who signed it, its payload, and the bytes that followed it (the tensor section)."""

    kid: str
    payload: dict[str, Any]
    rest: memoryview
    #: SHA-256 of the envelope's bytes (the whole COSE_Sign1 item): how a Receipt names an update
    #: (:func:`update_digest`), known once the signature is checked, without a pass over the tensor section.
    digest: bytes


KeyLookup = Callable[[str], VerifyKey | None]


def _protected_header(kid: str) -> bytes:
    return cbor2.dumps({COSE_ALG: COSE_ALG_EDDSA, COSE_KID: kid.encode()}, canonical=True)


def _sig_structure(protected: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    return cbor2.dumps(["Signature1", bytes(protected), b"", bytes(payload)], canonical=True)


def key_id(key: VerifyKey) -> str:
    """The id of a key's holder: first 16 bytes of SHA-256 of the raw public key, as 32 hex characters."""
    return hashlib.sha256(bytes(key)).digest()[:16].hex()


def pinned(key: VerifyKey) -> KeyLookup:
    """A key lookup that knows exactly one signer: how devices accept only their pinned aggregator."""
    kid = key_id(key)
    return lambda candidate: key if candidate == kid else None


def sign(payload: Mapping[str, Any], key: SigningKey, kid: str) -> bytes:
    """COSE_Sign1 over ``payload`` (encoded deterministically), signed by ``key``, naming ``kid``."""
    body = cbor2.dumps(dict(payload), canonical=True)
    protected = _protected_header(kid)
    signature = key.sign(_sig_structure(protected, body)).signature
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, body, signature]), canonical=True)


def _bstr_size(length: int) -> int:
    """Bytes a byte string of ``length`` bytes takes in deterministic CBOR: its shortest head, then the bytes."""
    head = 1 if length < 24 else 2 if length < 0x100 else 3 if length < 0x10000 else 5 if length < 2**32 else 9
    return head + length


def verify(message: bytes | memoryview, key_for_kid: KeyLookup, limits: Limits = DEFAULT_LIMITS) -> Verified:
    """Check the COSE_Sign1 at the start of ``message`` and return its decoded payload.

    ``key_for_kid`` returns the public key enrolled for a ``kid``, or None when it is unknown (refused with
    ``unknown-key``). Anything after the envelope is returned untouched as ``rest``.
    """
    if len(message) > limits.max_bytes:
        raise ProtocolError("too-large", f"{len(message)} bytes exceeds the limit of {limits.max_bytes}")
    head = memoryview(message)[:ENVELOPE_PREFIX_BYTES]
    envelope_limits = _envelope_limits(limits)
    reader = cbor_reader.Reader(head, envelope_limits, _ENVELOPE_TAGS)
    try:
        item = reader.read_item()
    except ProtocolError as exc:
        if exc.reason == "truncated" and len(head) < len(message):
            # The envelope runs past the bytes we are willing to read for it: it is too big, not cut short.
            raise ProtocolError("too-large", f"signed envelope exceeds {_ENVELOPE_MAX_BYTES} bytes") from None
        raise
    end = reader.pos
    if end > _ENVELOPE_MAX_BYTES:
        raise ProtocolError("too-large", f"signed envelope of {end} bytes exceeds {_ENVELOPE_MAX_BYTES}")
    if not (isinstance(item, Tagged) and item.tag == COSE_SIGN1_TAG):
        raise ProtocolError("not-signed", "message is not a COSE_Sign1 (tag 18)")
    parts = item.value
    if not (isinstance(parts, list) and len(parts) == 4):
        raise ProtocolError("malformed", "COSE_Sign1 must be an array of 4 items")
    protected_raw, unprotected, payload_raw, signature = parts
    if not all(isinstance(p, memoryview) for p in (protected_raw, payload_raw, signature)):
        raise ProtocolError("malformed", "COSE_Sign1 protected header, payload and signature must be bstr")
    if not isinstance(unprotected, dict):
        raise ProtocolError("malformed", "COSE_Sign1 unprotected header must be a map")
    # The unprotected header and the CBOR heads around the three byte strings are not signed. Unless they are
    # exactly the deterministic encoding, one signed update could be re-wrapped into other bytes with another
    # envelope digest, the digest that names an update for idempotency and receipts (docs/protocol.md section 8).
    # Every part has one shortest encoding, so the envelope is deterministic iff it is no longer than their sum.
    if unprotected or end != 2 + 1 + sum(_bstr_size(len(p)) for p in (protected_raw, payload_raw, signature)):
        raise ProtocolError("malformed", "COSE_Sign1 envelope not in deterministic encoding (shortest heads, "
                            "empty unprotected header)")
    protected = cbor_reader.loads(protected_raw, envelope_limits)
    if not isinstance(protected, dict) or protected.get(COSE_ALG) != COSE_ALG_EDDSA:
        raise ProtocolError("bad-algorithm", "protected header must name alg EdDSA (-8)")
    kid_raw = protected.get(COSE_KID)
    if not isinstance(kid_raw, memoryview):
        raise ProtocolError("malformed", "protected header has no kid")
    try:
        kid = str(kid_raw, "ascii")
    except UnicodeDecodeError:
        raise ProtocolError("malformed", "kid is not ASCII") from None
    key = key_for_kid(kid)
    if key is None:
        raise ProtocolError("unknown-key", f"no enrolled key for kid {kid!r}")
    if len(signature) != 64:
        raise ProtocolError("bad-signature", "Ed25519 signatures are 64 bytes")
    try:
        key.verify(_sig_structure(protected_raw, payload_raw), bytes(signature))
    except BadSignatureError:
        raise ProtocolError("bad-signature", f"signature does not verify with the key of {kid!r}") from None
    payload = cbor_reader.loads(payload_raw, envelope_limits)
    if not isinstance(payload, dict):
        raise ProtocolError("bad-payload", "payload must be a CBOR map")
    version = payload.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # true == 1 in Python
        raise ProtocolError("unsupported-version", f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    digest = hashlib.sha256(head[:end]).digest()
    return Verified(kid=kid, payload=payload, rest=memoryview(message)[end:], digest=digest)


def _envelope_limits(limits: Limits) -> Limits:
    return Limits(max_bytes=_ENVELOPE_MAX_BYTES, max_depth=limits.max_depth, max_container_len=limits.max_container_len)


# ----------------------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class ParamSpec:
    """One named parameter tensor of a model: what every update and release must match exactly."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


_TAG_HEAD = {  # the two-byte heads of tags 40, 72, 84 and 85
    TAG_MULTI_DIM: b"\xd8\x28",
    TAG_SINT8: b"\xd8\x48",
    TAG_FLOAT16_LE: b"\xd8\x54",
    TAG_FLOAT32_LE: b"\xd8\x55",
}


def cbor_head(major: int, argument: int) -> bytes:
    """The shortest CBOR head of a major type with an argument (a length, here)."""
    if argument < 24:
        return bytes([major << 5 | argument])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if argument < 1 << (8 * size):
            return bytes([major << 5 | info]) + argument.to_bytes(size, "big")
    raise ValueError(f"CBOR argument {argument} does not fit 64 bits")


def _section_parts(tensors: Mapping[str, np.ndarray], encoding: str) -> list[bytes | np.ndarray]:
    """The tensor section as a list of pieces whose concatenation is its canonical CBOR encoding.

    The big pieces are the arrays themselves (as flat uint8 views), so the section can be hashed and joined
    to the envelope with a single copy of the data. tests/test_wire_tensors.py checks the bytes against
    cbor2's canonical encoding.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    entries = []
    for name, array in tensors.items():
        array = np.asarray(array)
        dims = cbor2.dumps(list(array.shape), canonical=True)
        if encoding == "int8":
            data, scale = quantise_int8(array)
            prefix = b"\x82" + _TAG_HEAD[TAG_MULTI_DIM] + b"\x82" + dims + _TAG_HEAD[TAG_SINT8]
            suffix = cbor2.dumps(scale, canonical=True)
        else:
            data = np.ascontiguousarray(array, dtype=np.dtype(encoding).newbyteorder("<"))
            prefix = _TAG_HEAD[TAG_MULTI_DIM] + b"\x82" + dims + _TAG_HEAD[_DTYPE_TAG[encoding]]
            suffix = b""
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        entries.append((cbor2.dumps(name, canonical=True), prefix + cbor_head(2, flat.size), flat, suffix))
    # Core deterministic order: by the encoded key's bytes (for text keys: shorter first, then bytewise).
    entries.sort(key=lambda entry: entry[0])
    parts: list[bytes | np.ndarray] = [cbor_head(5, len(entries))]
    for entry in entries:
        parts.extend(entry)
    return parts


def quantise_int8(array: np.ndarray) -> tuple[np.ndarray, float]:
    """The int8 rule of docs/protocol.md section 5: (q as a flat int8 array, the binary64 scale to send)."""
    values = np.asarray(array, dtype=np.float32).ravel()  # 1-D even for a scalar, so out= works
    peak = max(float(values.max()), -float(values.min())) if values.size else 0.0
    scale = peak / 127.0  # sent as this float64; q is computed with it rounded to float32
    if not np.float32(scale) > 0:  # all zero, or so small that max|x| / 127 is 0 in float32
        scale = 1.0
    scaled = values / np.float32(scale)  # one temporary, rounded (half to even) and clipped in place
    np.rint(scaled, out=scaled)
    np.clip(scaled, -127, 127, out=scaled)
    return scaled.astype(np.int8), scale


def parameters_section_parts(tensors: Mapping[str, np.ndarray]) -> list[bytes | np.ndarray]:
    """:func:`encode_tensors` of ``tensors`` in float32, as pieces whose big ones are the arrays' own bytes: how a
    model is written to a file without joining it into a second buffer."""
    return _section_parts(tensors, "float32")


def _digest_parts(parts: list[bytes | np.ndarray]) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


def encode_tensors(tensors: Mapping[str, np.ndarray], encoding: str = "float32") -> bytes:
    """The tensor section: a CBOR map name -> RFC 8746 typed array, in deterministic key order."""
    return b"".join(_section_parts(tensors, encoding))


def typed_array(item: Any, name: str, limits: Limits) -> tuple[np.ndarray, int]:
    """A decoded ``40([dims, typed array])`` as a numpy view of its bytes, and its element tag (72, 84, 85)."""
    if not (isinstance(item, Tagged) and item.tag == TAG_MULTI_DIM):
        raise ProtocolError("bad-tensor", f"tensor {name!r} is not a tag-40 multi-dimensional array")
    value = item.value
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], list)):
        raise ProtocolError("bad-tensor", f"tensor {name!r}: tag 40 must hold [dims, typed array]")
    dims, typed = value
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ProtocolError("bad-tensor", f"tensor {name!r}: dimensions must be non-negative integers")
    if len(dims) > MAX_TENSOR_DIMS:
        raise ProtocolError("bad-tensor", f"tensor {name!r}: {len(dims)} dimensions exceed {MAX_TENSOR_DIMS}")
    # Checked per dimension too: [2**64, 0] holds no elements, yet no array can have that shape.
    if any(d > limits.max_tensor_elements for d in dims) or math.prod(dims) > limits.max_tensor_elements:
        raise ProtocolError("tensor-too-large", f"tensor {name!r}: dimensions {dims} exceed the element limit")
    if not (isinstance(typed, Tagged) and typed.tag in _TAG_DTYPE and isinstance(typed.value, memoryview)):
        raise ProtocolError("bad-tensor", f"tensor {name!r}: data must be a typed array (tag 72, 84 or 85)")
    dtype = _TAG_DTYPE[typed.tag]
    count = math.prod(dims)
    if len(typed.value) != count * dtype.itemsize:
        raise ProtocolError(
            "bad-tensor", f"tensor {name!r}: {len(typed.value)} bytes do not hold {dims} of {dtype.name}"
        )
    return np.frombuffer(typed.value, dtype=dtype).reshape(dims), typed.tag


def decode_tensors(
    section: bytes | memoryview,
    specs: list[ParamSpec] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    dequantise: bool = True,
    into: np.ndarray | None = None,
    finite: bool = True,
) -> tuple[dict[str, np.ndarray], str]:
    """Decode a tensor section into float32 arrays (views of ``section`` for float32), and its encoding.

    With ``specs`` the names and shapes must match exactly (``wrong-tensors``, ``wrong-shape``); all values must
    be finite (``not-finite``). With ``into`` too (a contiguous float32 vector of the specs' total size), each
    tensor is written straight into its slice of it, in specs order and dequantised on the way, and the arrays
    returned are views of it: one pass over the data instead of a conversion and then a copy.

    ``finite=False`` leaves the finiteness check to a caller that reads every value anyway (the aggregator's
    norm of the delta is NaN or infinite when a value is; it then calls :func:`check_finite`): one pass less.
    """
    tensor_limits = Limits(
        max_bytes=limits.max_bytes,
        max_depth=6,
        max_container_len=limits.max_container_len,
        max_items=limits.max_items,
    )
    raw = cbor_reader.loads(section, tensor_limits, _TENSOR_TAGS)
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ProtocolError("bad-tensor", "tensor section must be a map of name -> tensor")
    if specs is not None:
        expected = {s.name for s in specs}
        if set(raw) != expected:
            missing, extra = sorted(expected - set(raw)), sorted(set(raw) - expected)
            raise ProtocolError("wrong-tensors", f"missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    encodings: set[str] = set()
    total = 0
    for name, item in raw.items():
        if isinstance(item, list):
            if len(item) != 2 or not isinstance(item[1], float):
                raise ProtocolError("bad-tensor", f"tensor {name!r}: quantised form is [tensor, scale]")
            array, tag = typed_array(item[0], name, limits)
            scale = item[1]
            if tag != TAG_SINT8 or not 0 < scale <= _MAX_INT8_SCALE:
                raise ProtocolError(
                    "bad-tensor", f"tensor {name!r}: int8 data with a scale in (0, {_MAX_INT8_SCALE:.4g}]"
                )
            scales[name] = scale
        else:
            array, tag = typed_array(item, name, limits)
            if tag == TAG_SINT8:
                raise ProtocolError("bad-tensor", f"tensor {name!r}: int8 data needs a scale")
        # Counted before any conversion, so the limit bounds what dequantising allocates.
        total += array.size
        if total > limits.max_tensor_elements:
            raise ProtocolError("tensor-too-large", f"more than {limits.max_tensor_elements} elements")
        encodings.add("int8" if tag == TAG_SINT8 else "float16" if tag == TAG_FLOAT16_LE else "float32")
        out[name] = array
    if specs is not None:
        for spec in specs:
            if out[spec.name].shape != spec.shape:
                raise ProtocolError(
                    "wrong-shape", f"tensor {spec.name!r} has shape {out[spec.name].shape}, expected {spec.shape}"
                )
    if into is not None:
        if specs is None or into.dtype != np.float32 or into.shape != (total,) or not into.flags.c_contiguous:
            raise ValueError(f"decoding into needs the specs and a contiguous float32 vector of {total} values")
        start = 0
        for spec in specs:
            target = into[start : start + spec.size].reshape(spec.shape)
            start += spec.size
            _dequantise(out[spec.name], scales.get(spec.name), target)
            out[spec.name] = target
        # int8 times a scale checked above is always finite; float16 and float32 data may hold NaN or Inf. One
        # pass over the whole vector; the tensor is named only when there is one to name.
        if finite and encodings != {"int8"} and not np.isfinite(into).all():
            check_finite(out)
    else:
        if dequantise:
            out = {name: _dequantise(array, scales.get(name)) for name, array in out.items()}
        if finite:
            check_finite(out)
    if len(encodings) > 1:
        raise ProtocolError("bad-tensor", f"mixed encodings {sorted(encodings)} in one message")
    return out, (encodings.pop() if encodings else "float32")


def _dequantise(array: np.ndarray, scale: float | None, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of a decoded typed array: int8 times its scale (rounded once, in float32), float16
    widened, float32 as it is (copied only into ``out``)."""
    if scale is not None:
        return np.multiply(array, np.float32(scale), out=out, dtype=np.float32)
    if out is None:
        return array.astype(np.float32) if array.dtype != np.float32 else array
    np.copyto(out, array)
    return out


def check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    """``not-finite`` naming the first tensor that holds a NaN or an infinity."""
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise ProtocolError("not-finite", f"tensor {name!r} holds NaN or Inf")


def tensors_digest(section: bytes | memoryview) -> bytes:
    """SHA-256 of the exact tensor-section bytes: what the signed payload pins, and a model version's digest."""
    return hashlib.sha256(section).digest()


def parameters_digest(tensors: Mapping[str, np.ndarray]) -> bytes:
    """:func:`tensors_digest` of ``tensors``' float32 section, hashed piece by piece from the arrays: the
    section is never joined into one buffer (a model's worth of memory and a copy less)."""
    return _digest_parts(_section_parts(tensors, "float32"))


# ---------------------------------------------------------------------------------------------- messages


def _field(payload: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = payload.get(name)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ProtocolError("bad-payload", f"field {name!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


def _type(payload: Mapping[str, Any], expected: str) -> None:
    if payload.get("type") != expected:
        raise ProtocolError("wrong-type", f"expected a {expected} message, got {payload.get('type')!r}")


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > 32:
        raise ProtocolError("bad-payload", "metrics must be a map of at most 32 entries")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float):
            raise ProtocolError("bad-payload", "metrics map text names to numbers")
        if not math.isfinite(v):
            raise ProtocolError("bad-payload", f"metric {k!r} is not finite")
        out[k] = float(v)
    return out


def _aggregator_payload(message: bytes | memoryview, aggregator_key: VerifyKey, kind: str) -> dict[str, Any]:
    """The payload of a tensor-free message signed by the pinned aggregator key."""
    verified = verify(message, pinned(aggregator_key))
    _type(verified.payload, kind)
    if len(verified.rest):
        raise ProtocolError("trailing-bytes", f"a {kind} carries no tensor section")
    return verified.payload


def _check_section(verified: Verified) -> memoryview:
    pinned = _field(verified.payload, "tensors_sha256", memoryview)
    section = verified.rest
    if hashlib.sha256(section).digest() != bytes(pinned):
        raise ProtocolError("digest-mismatch", "tensor section does not match the signed digest")
    return section


@dataclass(frozen=True)
class Update:
    """A device's contribution to one round: the parameter delta from ``base_digest``'s model."""

    device_id: str
    round_id: int
    model_version: int
    base_digest: bytes
    num_samples: int
    tensors: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    encoding: str = "float32"
    nonce: bytes = field(default_factory=lambda: os.urandom(16))
    created_at: int = field(default_factory=lambda: int(time.time()))


def encode_update(update: Update, key: SigningKey) -> bytes:
    """The full upload body: signed metadata followed by the tensor section."""
    parts = _section_parts(update.tensors, update.encoding)
    payload = {
        "v": PROTOCOL_VERSION,
        "type": "update",
        "device": update.device_id,
        "round": update.round_id,
        "model_version": update.model_version,
        "base_digest": update.base_digest,
        "num_samples": update.num_samples,
        "metrics": update.metrics,
        "encoding": update.encoding,
        "nonce": update.nonce,
        "created_at": update.created_at,
        "tensors_sha256": _digest_parts(parts),
    }
    return b"".join([sign(payload, key, update.device_id), *parts])


def decode_update(
    body: bytes | memoryview,
    key_for_kid: KeyLookup,
    specs: list[ParamSpec] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    into: np.ndarray | None = None,
) -> Update:
    """Verify and decode an upload body. The signer must be the device the update names.

    ``into``: see :func:`decode_tensors` (the tensors land in one flat float32 vector, in specs order).
    """
    return update_from(verify(body, key_for_kid, limits), specs, limits, into=into)


def update_from(
    verified: Verified,
    specs: list[ParamSpec] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    into: np.ndarray | None = None,
    finite: bool = True,
) -> Update:
    """:func:`decode_update` of an envelope already verified by :func:`verify` (its signature is not checked
    again): the payload's fields, then the tensor section against the signed digest, then the tensors
    (``into`` and ``finite``: see :func:`decode_tensors`)."""
    p = verified.payload
    _type(p, "update")
    device = _field(p, "device", str)
    if device != verified.kid:
        raise ProtocolError("kid-mismatch", f"update names device {device!r} but is signed by {verified.kid!r}")
    section = _check_section(verified)
    num_samples = _field(p, "num_samples", int)
    if num_samples <= 0:
        raise ProtocolError("bad-payload", "num_samples must be positive")
    nonce = bytes(_field(p, "nonce", memoryview))
    if len(nonce) < 8:
        raise ProtocolError("bad-payload", "nonce must be at least 8 bytes")
    declared = _field(p, "encoding", str)
    if declared not in ENCODINGS:
        raise ProtocolError("bad-payload", f"unknown encoding {declared!r}")
    tensors, encoding = decode_tensors(section, specs, limits, into=into, finite=finite)
    if tensors and encoding != declared:
        raise ProtocolError("bad-tensor", f"tensor section is {encoding} but the signed payload says {declared}")
    return Update(
        device_id=device,
        round_id=_field(p, "round", int),
        model_version=_field(p, "model_version", int),
        base_digest=bytes(_field(p, "base_digest", memoryview)),
        num_samples=num_samples,
        tensors=tensors,
        metrics=_metrics(p.get("metrics", {})),
        encoding=encoding,
        nonce=nonce,
        created_at=_field(p, "created_at", int),
    )


@dataclass(frozen=True)
class Task:
    """What the aggregator asks devices to do in one round."""

    round_id: int
    model_version: int
    model_digest: bytes
    package_digest: bytes
    deadline: int
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    prox_mu: float = 0.0
    encoding: str = "float32"
    clip_norm: float = 0.0
    issued_at: int = field(default_factory=lambda: int(time.time()))
    # The round is a secure-aggregation round (docs/protocol.md section 12); sent only when true.
    secure_aggregation: bool = False


def encode_task(task: Task, key: SigningKey) -> bytes:
    payload = {
        "v": PROTOCOL_VERSION,
        "type": "task",
        "round": task.round_id,
        "model_version": task.model_version,
        "model_digest": task.model_digest,
        "package_digest": task.package_digest,
        "deadline": task.deadline,
        "epochs": task.epochs,
        "batch_size": task.batch_size,
        "learning_rate": float(task.learning_rate),
        "prox_mu": float(task.prox_mu),
        "encoding": task.encoding,
        "clip_norm": float(task.clip_norm),
        "issued_at": task.issued_at,
    }
    if task.secure_aggregation:
        payload["secagg"] = True
    return sign(payload, key, key_id(key.verify_key))


# The aggregator's round ids and model versions (and other counters it stores): what SQLite's INTEGER holds.
MAX_ID = 2**63 - 1


def _id(p: Mapping[str, Any], name: str) -> int:
    """Field ``name``, a round id or a model version: an integer in [0, 2^63 - 1]. One outside it (signed all the
    same) named a model the device then reported in every heartbeat, which the fleet view refused."""
    value = _field(p, name, int)
    if not 0 <= value <= MAX_ID:
        raise ProtocolError("bad-payload", f"field {name!r} must be an integer in [0, 2^63 - 1], got {value}")
    return value


# What a round's plan may ask of a device (docs/protocol.md, the Task): far past any real training, and short of what
# fails every round in the trainer (2^40 epochs run into the deadline; a learning rate or FedProx mu of 1e300
# overflows float32 at the first step). The aggregator's plan (aggregator/rounds.py) and the device's decoder both
# hold a task to them.
TASK_BOUNDS: dict[str, float] = {"epochs": 1000, "batch_size": 65536, "learning_rate": 1000.0, "prox_mu": 1000.0}


def _at_least(p: Mapping[str, Any], name: str, kind: type, low: float, *, above: bool = False) -> Any:
    """Field ``name`` of kind ``kind``, finite, at least ``low`` (above it with ``above``) and at most its
    :data:`TASK_BOUNDS` entry: what an aggregator's round plan allows. A signature proves who sent a task, not that a
    device can train on it: a NaN learning rate, 0 epochs or a batch of 2^40 would fail every round in the trainer,
    counted as a trainer failure."""
    value = _field(p, name, kind)
    high = TASK_BOUNDS.get(name, math.inf)
    if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
        most = f" and <= {high:g}" if high < math.inf else ""
        raise ProtocolError("bad-payload", f"field {name!r} must be a finite {kind.__name__} "
                                           f"{'>' if above else '>='} {low:g}{most}, got {value!r}")
    return value


def decode_task(message: bytes | memoryview, aggregator_key: VerifyKey) -> Task:
    """Verify a task against the pinned aggregator key; anything else signed is refused, and so is a task no
    device can train on (see :func:`_at_least`)."""
    p = _aggregator_payload(message, aggregator_key, "task")
    encoding = _field(p, "encoding", str)
    if encoding not in ENCODINGS:
        raise ProtocolError("bad-payload", f"unknown encoding {encoding!r}")
    secure = p.get("secagg", False)
    if not isinstance(secure, bool):
        raise ProtocolError("bad-payload", "field 'secagg' is not a boolean")
    return Task(
        round_id=_id(p, "round"),
        model_version=_id(p, "model_version"),
        model_digest=bytes(_field(p, "model_digest", memoryview)),
        package_digest=bytes(_field(p, "package_digest", memoryview)),
        deadline=_field(p, "deadline", int),
        epochs=_at_least(p, "epochs", int, 1),
        batch_size=_at_least(p, "batch_size", int, 1),
        learning_rate=_at_least(p, "learning_rate", float, 0.0, above=True),
        prox_mu=_at_least(p, "prox_mu", float, 0.0),
        encoding=encoding,
        clip_norm=_at_least(p, "clip_norm", float, 0.0),
        issued_at=_field(p, "issued_at", int),
        secure_aggregation=secure,
    )


@dataclass(frozen=True)
class ModelRelease:
    """A global model version: full parameters, signed by the aggregator. ``digest`` is the SHA-256 of the
    tensor section and is what updates name as their ``base_digest``."""

    version: int
    package_digest: bytes
    tensors: dict[str, np.ndarray]
    digest: bytes = b""
    created_at: int = field(default_factory=lambda: int(time.time()))
    # Differential privacy spent up to and including this version (docs/privacy.md): epsilon, delta,
    # noise_multiplier, rounds, and "mode": "distributed" for distributed DP (absent: central). None: the version
    # was not trained with DP (the payload has no "dp" field).
    privacy: dict[str, float | int | str] | None = None


_DP_FIELDS = {"epsilon": float, "delta": float, "noise_multiplier": float, "rounds": int}
_DP_MODES = ("distributed",)  # central DP, the first mode, has no "mode" entry


def _privacy(value: Any) -> dict[str, float | int | str]:
    if not isinstance(value, dict) or not set(_DP_FIELDS) <= set(value) <= {*_DP_FIELDS, "mode"}:
        raise ProtocolError("bad-payload", f"'dp' must be a map of exactly {', '.join(_DP_FIELDS)} (and 'mode')")
    out: dict[str, float | int | str] = {}
    if "mode" in value:
        if value["mode"] not in _DP_MODES:
            raise ProtocolError("bad-payload", "'dp' field 'mode' must be \"distributed\" when present")
        out["mode"] = value["mode"]
    for name, kind in _DP_FIELDS.items():
        item = value[name]
        if isinstance(item, bool) or not isinstance(item, kind) or not math.isfinite(item) or item < 0:
            raise ProtocolError("bad-payload", f"'dp' field {name!r} must be a finite non-negative {kind.__name__}")
        out[name] = item
    return out


def encode_model_release(release: ModelRelease, key: SigningKey) -> tuple[bytes, bytes]:
    """Returns (message, digest of its parameters)."""
    parts = _section_parts(release.tensors, "float32")
    digest = _digest_parts(parts)
    payload = {
        "v": PROTOCOL_VERSION,
        "type": "model",
        "version": release.version,
        "package_digest": release.package_digest,
        "created_at": release.created_at,
        "tensors_sha256": digest,
    }
    if release.privacy is not None:
        payload["dp"] = _privacy(release.privacy)
    return b"".join([sign(payload, key, key_id(key.verify_key)), *parts]), digest


def decode_model_release(
    message: bytes | memoryview,
    aggregator_key: VerifyKey,
    specs: list[ParamSpec] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ModelRelease:
    """Verify a model release against the pinned aggregator key and decode its parameters."""
    return release_from(verify(message, pinned(aggregator_key), limits), specs, limits)


def release_from(
    verified: Verified, specs: list[ParamSpec] | None = None, limits: Limits = DEFAULT_LIMITS
) -> ModelRelease:
    """:func:`decode_model_release` of an envelope already verified against the pinned aggregator key by
    :func:`verify` (how a device reads ``GET /v1/models`` answers, which may be a release or a model-delta): the
    tensor section against the signed digest, then the parameters, numpy views of the message's buffer."""
    p = verified.payload
    _type(p, "model")
    section = _check_section(verified)
    tensors, encoding = decode_tensors(section, specs, limits)
    if encoding != "float32":
        raise ProtocolError("bad-tensor", "model releases carry float32 parameters")
    return ModelRelease(
        version=_field(p, "version", int),
        package_digest=bytes(_field(p, "package_digest", memoryview)),
        tensors=tensors,
        digest=bytes(_field(p, "tensors_sha256", memoryview)),
        created_at=_field(p, "created_at", int),
        privacy=_privacy(p["dp"]) if "dp" in p else None,
    )


@dataclass(frozen=True)
class Receipt:
    """The aggregator's acknowledgement: the update is on its disk and counts in ``round_id``."""

    device_id: str
    round_id: int
    update_digest: bytes  # the update's name: :func:`update_digest`, the SHA-256 of its signed envelope
    accepted_at: int = field(default_factory=lambda: int(time.time()))


def encode_receipt(receipt: Receipt, key: SigningKey) -> bytes:
    payload = {
        "v": PROTOCOL_VERSION,
        "type": "receipt",
        "device": receipt.device_id,
        "round": receipt.round_id,
        "update_digest": receipt.update_digest,
        "accepted_at": receipt.accepted_at,
    }
    return sign(payload, key, key_id(key.verify_key))


def decode_receipt(message: bytes | memoryview, aggregator_key: VerifyKey) -> Receipt:
    p = _aggregator_payload(message, aggregator_key, "receipt")
    return Receipt(
        device_id=_field(p, "device", str),
        round_id=_field(p, "round", int),
        update_digest=bytes(_field(p, "update_digest", memoryview)),
        accepted_at=_field(p, "accepted_at", int),
    )


def update_digest(message: bytes | memoryview) -> bytes:
    """How a Receipt names an update (or a masked input), and the aggregator's idempotency key: the SHA-256 of
    its signed envelope, the message's first CBOR item (docs/protocol.md section 8).

    The envelope's signed payload pins the SHA-256 of the exact bytes that follow it (``tensors_sha256``), so
    once a receiver has checked those bytes against it, the envelope's digest names the whole message; the
    tensor bytes are hashed once, not twice. The envelope is found, not verified: a device names its own
    messages with this; the aggregator takes :attr:`Verified.digest` from the envelope it verified.
    """
    head = memoryview(message)[:ENVELOPE_PREFIX_BYTES]
    reader = cbor_reader.Reader(head, _envelope_limits(DEFAULT_LIMITS), _ENVELOPE_TAGS)
    reader.read_item()
    return hashlib.sha256(head[: reader.pos]).digest()
