"""Property tests: whatever arrives, the decoders answer with a ProtocolError or a valid result, nothing else."""

from __future__ import annotations

import math
from collections.abc import Mapping

import cbor2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance import cbor_reader, wire
from appliance.cbor_reader import Limits, Tagged
from appliance.errors import ProtocolError

KEY = SigningKey(b"\x41" * 32)
KID = wire.key_id(KEY.verify_key)
LOOKUP = wire.pinned(KEY.verify_key)
SPECS = [wire.ParamSpec("w", (2, 3)), wire.ParamSpec("b", (3,))]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Each example signs twice and runs every decoder: fewer examples, still well past the first shrink.
FUZZ_SIGNED = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL_TAGS = frozenset(range(0, 300)) | {2**16, 2**32, 2**63}


def only_protocol_errors(fn, *args, **kwargs):
    """Run a decoder; a ProtocolError is an answer, any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except ProtocolError as exc:
        assert exc.reason and isinstance(exc.reason, str)
        return None


def every_decoder(data: bytes) -> None:
    only_protocol_errors(cbor_reader.loads, data, Limits())
    only_protocol_errors(cbor_reader.loads, data, Limits(), ALL_TAGS)
    only_protocol_errors(wire.verify, data, LOOKUP)
    only_protocol_errors(wire.decode_update, data, LOOKUP)
    only_protocol_errors(wire.decode_update, data, LOOKUP, SPECS)
    only_protocol_errors(wire.decode_tensors, data)
    only_protocol_errors(wire.decode_tensors, data, SPECS)
    only_protocol_errors(wire.decode_task, data, KEY.verify_key)
    only_protocol_errors(wire.decode_receipt, data, KEY.verify_key)
    only_protocol_errors(wire.decode_model_release, data, KEY.verify_key)


# ------------------------------------------------------------------------------------------ raw bytes


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data):
    every_decoder(data)


@FUZZ
@given(
    major=st.integers(0, 7),
    info=st.sampled_from([24, 25, 26, 27, 28, 29, 30, 31]),
    arg=st.integers(0, 2**64 - 1),
    tail=st.binary(max_size=64),
    prefix=st.sampled_from([b"", b"\xd2", b"\xd2\x84", b"\xa1\x61w\xd8\x28\x82", b"\xa1\x61w\xd8\x28\x82\x81\x01"]),
)
def test_huge_declared_lengths_and_arguments(major, info, arg, tail, prefix):
    size = {24: 1, 25: 2, 26: 4, 27: 8}.get(info, 0)
    head = (
        bytes([major << 5 | info]) + (arg % (1 << (8 * size))).to_bytes(size, "big")
        if size
        else bytes([major << 5 | info])
    )
    every_decoder(prefix + head + tail)


# ------------------------------------------------------------------ well-formed CBOR of the wrong shape


def cbor_values(allow_tags: bool = True) -> st.SearchStrategy:
    leaves = (
        st.integers(-(2**64), 2**64 - 1)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=20)
        | st.binary(max_size=40)
        | st.booleans()
        | st.none()
    )

    def extend(children):
        containers = st.lists(children, max_size=6) | st.dictionaries(
            st.integers(-30, 30) | st.text(max_size=8), children, max_size=6
        )
        if allow_tags:
            tags = st.sampled_from([0, 1, 2, 18, 24, 40, 64, 72, 84, 85, 86, 1040, 55799]) | st.integers(0, 2**64 - 1)
            containers = containers | st.builds(cbor2.CBORTag, tags, children)
        return containers

    return st.recursive(leaves, extend, max_leaves=40)


def tensor_like() -> st.SearchStrategy:
    """Values near the tensor grammar, so decode_tensors gets past its first checks."""
    dims = st.lists(st.integers(-2, 2**64 - 1) | st.integers(0, 4) | st.booleans(), max_size=10)
    data = st.binary(max_size=48)
    typed = st.builds(cbor2.CBORTag, st.sampled_from([72, 84, 85, 86, 40]), data | st.integers())
    multi = st.builds(lambda d, t: cbor2.CBORTag(40, [d, t]), dims, typed)
    quantised = st.builds(lambda m, s: [m, s], multi, st.floats() | st.integers())
    return st.dictionaries(st.text(max_size=4), multi | quantised | cbor_values(), max_size=4)


@FUZZ
@given(cbor_values())
def test_arbitrary_cbor_values(value):
    every_decoder(cbor2.dumps(value))


@FUZZ
@given(tensor_like())
def test_arbitrary_tensor_sections(section):
    data = cbor2.dumps(section)
    result = only_protocol_errors(wire.decode_tensors, data)
    if result is not None:
        tensors, encoding = result
        assert encoding in wire.ENCODINGS
        for array in tensors.values():
            assert isinstance(array, np.ndarray) and np.isfinite(array).all()
    only_protocol_errors(wire.decode_tensors, data, SPECS)


@FUZZ
@given(st.integers(0, 20), cbor_values())
def test_deep_nesting(depth, leaf):
    value = leaf
    for i in range(depth):
        value = [value] if i % 3 else ({"k": value} if i % 2 else cbor2.CBORTag(40, value))
    every_decoder(cbor2.dumps(value))


# -------------------------------------------------------- correctly signed payloads of the wrong shape

PAYLOAD_FIELDS = [
    "v",
    "type",
    "device",
    "round",
    "model_version",
    "base_digest",
    "num_samples",
    "metrics",
    "encoding",
    "nonce",
    "created_at",
    "tensors_sha256",
    "model_digest",
    "package_digest",
    "deadline",
    "epochs",
    "batch_size",
    "learning_rate",
    "prox_mu",
    "clip_norm",
    "issued_at",
    "version",
    "update_digest",
    "accepted_at",
]


@FUZZ_SIGNED
@given(
    fields=st.dictionaries(st.sampled_from(PAYLOAD_FIELDS), cbor_values(allow_tags=False), max_size=24),
    kind=st.sampled_from(["update", "task", "model", "receipt", "other"]),
    tail=st.binary(max_size=64) | tensor_like().map(cbor2.dumps),
)
def test_signed_payloads_of_the_wrong_shape(fields, kind, tail):
    """The signature verifies, so every field check after it is exercised with hostile values."""
    payload = {**fields, "v": 1, "type": kind}
    if "device" not in fields:
        payload["device"] = KID
    try:
        message = wire.sign(payload, KEY, KID)
    except (ValueError, TypeError, OverflowError):
        return  # cbor2 cannot encode this payload; nothing to send
    for pinned_digest in (False, True):
        if pinned_digest:
            payload["tensors_sha256"] = wire.tensors_digest(tail)
            message = wire.sign(payload, KEY, KID)
        body = message + tail
        only_protocol_errors(wire.decode_update, body, LOOKUP)
        only_protocol_errors(wire.decode_update, body, LOOKUP, SPECS)
        only_protocol_errors(wire.decode_task, message, KEY.verify_key)
        only_protocol_errors(wire.decode_receipt, message, KEY.verify_key)
        only_protocol_errors(wire.decode_model_release, body, KEY.verify_key)


VALID_BODY = wire.encode_update(
    wire.Update(KID, 1, 1, b"\x00" * 32, 3, {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}),
    KEY,
)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_BODY)), st.integers(0, 3), st.binary(max_size=4)), max_size=4))
def test_mutated_valid_update(edits):
    """Random inserts, deletes and overwrites of a valid body: refused, or (if no edit stuck) the same update."""
    body = bytearray(VALID_BODY)
    for pos, delete, insert in edits:
        body[pos : pos + delete] = insert
    result = only_protocol_errors(wire.decode_update, bytes(body), LOOKUP, SPECS)
    if result is not None:
        assert bytes(body) == VALID_BODY


# ---------------------------------------------------------------------- agreement with cbor2 on valid input


# Tags cbor2 leaves as CBORTag (it gives 0-5, 30, 37, 258... a meaning of their own): ours and RFC 8746's.
PLAIN_TAGS = [18, 40, 72, 84, 85, 86, 1000, 2**32 + 1]


def valid_within_limits() -> st.SearchStrategy:
    leaves = (
        st.integers(-(2**64), 2**64 - 1)
        | st.floats()
        | st.text(max_size=30)
        | st.binary(max_size=30)
        | st.booleans()
        | st.none()
    )

    def extend(children):
        return (
            st.lists(children, max_size=8)
            | st.dictionaries(st.integers(-(2**64), 2**64 - 1) | st.text(max_size=8), children, max_size=8)
            | st.builds(cbor2.CBORTag, st.sampled_from(PLAIN_TAGS), children)
        )

    return st.recursive(leaves, extend, max_leaves=60)


def depth_of(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, cbor2.CBORTag):
        return 1 + depth_of(value.value)
    return 0


def normalise(value):
    if isinstance(value, memoryview | bytes):
        return ("bytes", bytes(value))
    if isinstance(value, list | tuple):
        return ("list", [normalise(v) for v in value])
    if isinstance(value, Mapping):  # cbor2 6 gives an immutable map inside a tag
        return ("map", {normalise(k): normalise(v) for k, v in value.items()})
    if isinstance(value, Tagged | cbor2.CBORTag):
        return ("tag", value.tag, normalise(value.value))
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else value)
    return (type(value).__name__, value)


@settings(max_examples=250, deadline=None)
@given(valid_within_limits(), st.booleans())
def test_reader_agrees_with_cbor2(value, canonical):
    if depth_of(value) > Limits().max_depth:
        return
    data = cbor2.dumps(value, canonical=canonical)
    ours = cbor_reader.loads(data, Limits(), frozenset(PLAIN_TAGS))
    assert normalise(ours) == normalise(cbor2.loads(data))
