"""The quantisation rules of docs/protocol.md section 5, written from the document alone (Python's own
round-half-even and struct's binary16 packing, element by element) and compared byte for byte with what
appliance.wire sends, and with what it decodes."""

from __future__ import annotations

import struct

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from appliance import wire

FINITE_FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6)
ARRAYS = hnp.arrays(np.float32, SHAPES, elements=FINITE_FLOAT32)


def documented_int8(x: np.ndarray) -> tuple[list[int], float]:
    """Section 5: scale = max|x| / 127 in binary64 (1.0 when that is 0 in binary32); q = x / binary32(scale) in
    binary32 arithmetic, rounded half to even, clipped to [-127, 127]."""
    values = [np.float32(v) for v in x.ravel()]
    scale = max((abs(float(v)) for v in values), default=0.0) / 127
    if np.float32(scale) == 0:
        scale = 1.0
    q = [max(-127, min(127, round(float(v / np.float32(scale))))) for v in values]
    return q, scale


def documented_float16(x: np.ndarray) -> bytes:
    """Section 5: each binary32 value rounded to the nearest binary16, ties to even; too large: +-Infinity."""
    out = b""
    for v in x.ravel():
        try:
            out += struct.pack("<e", float(v))  # IEEE 754 roundTiesToEven
        except OverflowError:
            out += struct.pack("<e", float("inf") if v > 0 else float("-inf"))
    return out


def int8_section(name: str, x: np.ndarray) -> bytes:
    q, scale = documented_int8(x)
    data = bytes(np.array(q, dtype=np.int8))
    return cbor2.dumps({name: [cbor2.CBORTag(40, [list(x.shape), cbor2.CBORTag(72, data)]), scale]}, canonical=True)


@settings(max_examples=300, deadline=None)
@given(x=ARRAYS)
def test_int8_follows_the_documented_rule(x: np.ndarray) -> None:
    assert wire.encode_tensors({"w": x}, "int8") == int8_section("w", x)


@settings(max_examples=300, deadline=None)
@given(x=ARRAYS)
def test_float16_follows_the_documented_rule(x: np.ndarray) -> None:
    expected = cbor2.dumps({"w": cbor2.CBORTag(40, [list(x.shape), cbor2.CBORTag(84, documented_float16(x))])},
                           canonical=True)
    with np.errstate(over="ignore"):
        assert wire.encode_tensors({"w": x}, "float16") == expected


@pytest.mark.parametrize(
    "values,expected_q",
    [
        ([127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5], [127, 2, 4, -2, 0, 0, 2]),  # scale 1.0: ties go to even
        ([-254.0, 3.0, -1.0, 1.0], [-127, 2, 0, 0]),  # scale 2.0: 1.5 -> 2, -0.5 -> 0, 0.5 -> 0
        ([0.0, 0.0], [0, 0]),  # all zero: scale 1.0
        ([1e-44, -1e-44], [0, 0]),  # max|x| / 127 is 0 in binary32: scale 1.0, not a division by zero
    ],
)
def test_int8_edge_cases(values: list[float], expected_q: list[int]) -> None:
    x = np.array(values, dtype=np.float32)
    assert documented_int8(x)[0] == expected_q
    assert wire.encode_tensors({"w": x}, "int8") == int8_section("w", x)


def test_float16_ties_and_overflow() -> None:
    x = np.array([2049.0, 2051.0, 65519.0, 65520.0, -65520.0, 1e-8], dtype=np.float32)
    with np.errstate(over="ignore"):
        section = wire.encode_tensors({"w": x}, "float16")
    data = np.frombuffer(cbor2.loads(section)["w"].value[1].value, dtype="<f2")
    assert data.tolist() == [2048.0, 2052.0, 65504.0, float("inf"), float("-inf"), 0.0]
    with pytest.raises(wire.ProtocolError) as refused:  # so a sender must not use float16 for such values
        wire.decode_tensors(section)
    assert refused.value.reason == "not-finite"


@settings(max_examples=100, deadline=None)
@given(q=hnp.arrays(np.int8, SHAPES), scale=st.floats(min_value=1e-30, max_value=1e30))
def test_receivers_dequantise_as_documented(q: np.ndarray, scale: float) -> None:
    """value = binary32(q) x binary32(scale), for any q in [-128, 127] and any valid scale."""
    section = cbor2.dumps({"w": [cbor2.CBORTag(40, [list(q.shape), cbor2.CBORTag(72, q.tobytes())]), scale]},
                          canonical=True)
    decoded, encoding = wire.decode_tensors(section)
    assert encoding == "int8"
    assert decoded["w"].ravel().tolist() == [float(np.float32(v) * np.float32(scale)) for v in q.ravel()]
