"""The tensor section: RFC 8746 typed arrays in and out, and every way a hostile section is refused."""

from __future__ import annotations

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import wire
from appliance.wire import ENCODINGS, Limits, ParamSpec, ProtocolError

T = cbor2.CBORTag


def section(items: dict) -> bytes:
    return cbor2.dumps(items, canonical=True)


def f32(dims: list[int], data: bytes) -> T:
    return T(40, [dims, T(85, data)])


def reason_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    return info.value.reason


def test_float32_decodes_as_zero_copy_view_of_the_input():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    raw = wire.encode_tensors({"w": w})
    buf = memoryview(raw)
    out, encoding = wire.decode_tensors(buf)
    assert encoding == "float32"
    np.testing.assert_array_equal(out["w"], w)
    assert np.shares_memory(out["w"], np.frombuffer(buf, dtype=np.uint8))
    assert not out["w"].flags.writeable  # the received body is never modified in place


def test_float16_and_int8_round_trip_within_their_precision():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    out16, enc16 = wire.decode_tensors(wire.encode_tensors({"w": w}, "float16"))
    assert enc16 == "float16" and out16["w"].dtype == np.float32
    np.testing.assert_allclose(out16["w"], w, rtol=1e-3, atol=1e-3)
    out8, enc8 = wire.decode_tensors(wire.encode_tensors({"w": w}, "int8"))
    assert enc8 == "int8" and out8["w"].dtype == np.float32
    step = np.abs(w).max() / 127
    assert np.abs(out8["w"] - w).max() <= step / 2 + 1e-6
    raw8, _ = wire.decode_tensors(wire.encode_tensors({"w": w}, "int8"), dequantise=False)
    assert raw8["w"].dtype == np.int8 and np.abs(raw8["w"]).max() == 127


def test_all_zero_and_empty_tensors_survive_int8():
    out, _ = wire.decode_tensors(wire.encode_tensors({"z": np.zeros(4), "e": np.zeros((0, 3))}, "int8"))
    assert out["z"].tolist() == [0, 0, 0, 0] and out["e"].shape == (0, 3)


def test_unknown_encoding_is_refused_when_encoding():
    with pytest.raises(ValueError, match="bfloat16"):
        wire.encode_tensors({"w": np.zeros(2)}, "bfloat16")


def test_specs_must_match_names_and_shapes_exactly():
    raw = wire.encode_tensors({"a": np.zeros((2, 3)), "b": np.zeros(4)})
    specs = [ParamSpec("a", (2, 3)), ParamSpec("b", (4,))]
    assert set(wire.decode_tensors(raw, specs)[0]) == {"a", "b"}
    assert reason_of(wire.decode_tensors, raw, [ParamSpec("a", (2, 3))]) == "wrong-tensors"
    assert reason_of(wire.decode_tensors, raw, [*specs, ParamSpec("c", (1,))]) == "wrong-tensors"
    assert reason_of(wire.decode_tensors, raw, [ParamSpec("a", (3, 2)), ParamSpec("b", (4,))]) == "wrong-shape"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("encoding", ["float32", "float16"])
def test_non_finite_values_are_refused(value, encoding):
    raw = wire.encode_tensors({"w": np.array([1.0, value])}, encoding)
    assert reason_of(wire.decode_tensors, raw) == "not-finite"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"w": 5}, "bad-tensor"),
        ({"w": T(40, [[1], b"\0\0\0\0"])}, "bad-tensor"),  # untyped data
        ({"w": T(40, [[1], T(85, b"\0\0\0")])}, "bad-tensor"),  # 3 bytes cannot hold one float32
        ({"w": T(40, [[2], T(85, b"\0\0\0\0")])}, "bad-tensor"),  # dims say 2 elements, data holds 1
        ({"w": T(40, [[-1], T(85, b"")])}, "bad-tensor"),
        ({"w": T(40, [[True], T(85, b"\0\0\0\0")])}, "bad-tensor"),
        ({"w": T(40, [1, T(85, b"\0\0\0\0")])}, "bad-tensor"),  # dims not an array
        ({"w": T(40, [[1], T(72, b"\1")])}, "bad-tensor"),  # int8 without a scale
        ({"w": [T(40, [[1], T(85, b"\0\0\0\0")]), 0.5]}, "bad-tensor"),  # a scale on float32
        ({"w": [T(40, [[1], T(72, b"\1")]), 0.0]}, "bad-tensor"),
        ({"w": [T(40, [[1], T(72, b"\1")]), -1.0]}, "bad-tensor"),
        ({"w": [T(40, [[1], T(72, b"\1")]), float("nan")]}, "bad-tensor"),
        ({"w": [T(40, [[1], T(72, b"\1")]), 1]}, "bad-tensor"),  # scale must be a float
        ({"w": [T(40, [[1], T(72, b"\1")])]}, "bad-tensor"),
        ({"a": f32([1], b"\0\0\0\0"), "b": T(40, [[1], T(84, b"\0\0")])}, "bad-tensor"),  # mixed encodings
        ({1: f32([1], b"\0\0\0\0")}, "bad-tensor"),  # names are text
        ({"w": T(40, [[1], T(86, b"\0" * 8)])}, "unknown-tag"),  # float64 is not a protocol type
        ({"w": T(85, [[1], T(85, b"\0\0\0\0")])}, "bad-tensor"),  # [dims, data] under another tag than 40
        ({"w": T(40, [[-2, -2], T(85, b"\0" * 16)])}, "bad-tensor"),  # negative dims whose product fits the data
    ],
)
def test_malformed_tensors_are_refused_with_a_reason(bad, reason):
    assert reason_of(wire.decode_tensors, section(bad)) == reason


def test_section_must_be_a_map():
    assert reason_of(wire.decode_tensors, cbor2.dumps([1, 2])) == "bad-tensor"


@pytest.mark.parametrize(
    "dims",
    [
        [2**64 - 1, 0],  # zero elements, but numpy cannot make the shape
        [2**40, 2**40, 0],
        [1] * 70,  # more dimensions than numpy supports
        [1] * 40,
    ],
)
def test_absurd_dimensions_are_a_protocol_error_not_a_crash(dims):
    data = b"" if 0 in dims else b"\0\0\0\0"
    assert reason_of(wire.decode_tensors, section({"w": f32(dims, data)})) in {"bad-tensor", "tensor-too-large"}


def test_a_tensor_whose_dimensions_multiply_past_the_element_limit_is_too_large() -> None:
    """Each dimension is within the limit, their product is not: refused by size, before its bytes are counted."""
    assert reason_of(wire.decode_tensors, section({"w": f32([11, 10], b"\0" * 4)}),
                     limits=Limits(max_tensor_elements=100)) == "tensor-too-large"


def test_element_limit_counts_all_tensors():
    raw = wire.encode_tensors({"a": np.zeros(60), "b": np.zeros(60)})
    limits = Limits(max_tensor_elements=100)
    assert reason_of(wire.decode_tensors, raw, limits=limits) == "tensor-too-large"
    assert set(wire.decode_tensors(raw, limits=Limits(max_tensor_elements=120))[0]) == {"a", "b"}


def test_tensors_digest_is_sha256_of_the_section():
    import hashlib

    raw = wire.encode_tensors({"w": np.ones(3)})
    assert wire.tensors_digest(raw) == hashlib.sha256(raw).digest()


def test_parameters_digest_is_the_digest_of_the_float32_section_without_joining_it():
    tensors = {"b": np.arange(3, dtype=np.float32), "a.weight": np.ones((2, 3), dtype=np.float64)}
    assert wire.parameters_digest(tensors) == wire.tensors_digest(wire.encode_tensors(tensors, "float32"))


@pytest.mark.parametrize("scale", [1e300, 3.0e38, 1e37])
def test_int8_scale_that_would_overflow_float32_is_refused_quietly(scale):
    """A scale whose products overflow float32 is bad input, refused before numpy warns about overflow."""
    import warnings

    raw = section({"w": [T(40, [[2], T(72, b"\x7f\x81")]), scale]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reason_of(wire.decode_tensors, raw) == "bad-tensor"


def test_largest_allowed_int8_scale_decodes_finite():
    scale = float(np.finfo(np.float32).max) / 128
    out, _ = wire.decode_tensors(section({"w": [T(40, [[2], T(72, b"\x7f\x80")]), scale]}))
    assert np.isfinite(out["w"]).all()


def reference_section(tensors: dict, encoding: str) -> bytes:
    """The tensor section as cbor2 encodes it in canonical mode: what encode_tensors must produce byte for byte."""
    section = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        dims = list(array.shape)
        if encoding == "int8":
            values = np.asarray(array, dtype=np.float32)
            peak = float(np.max(np.abs(values))) if values.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            q = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
            section[name] = [T(40, [dims, T(72, q.tobytes())]), scale]
        else:
            data = np.ascontiguousarray(array, dtype=np.dtype(encoding).newbyteorder("<")).tobytes()
            section[name] = T(40, [dims, T(85 if encoding == "float32" else 84, data)])
    return cbor2.dumps(section, canonical=True)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=0, max_size=40),
        st.lists(st.integers(0, 5), max_size=4).flatmap(
            lambda shape: st.builds(
                lambda seed, scale: np.random.default_rng(seed).standard_normal(shape) * scale,
                st.integers(0, 2**32 - 1),
                st.sampled_from([0.0, 1e-3, 1.0, 300.0]),
            )
        ),
        max_size=6,
    ),
    st.sampled_from(ENCODINGS),
    st.sampled_from([np.float32, np.float64, np.float16]),
)
def test_encoding_is_canonical_cbor_byte_for_byte(tensors, encoding, dtype):
    """Names of any length and script, scalars, empty and zero tensors, any input dtype: the section's bytes
    are exactly cbor2's canonical encoding, so a section is a function of its content (section 3.1)."""
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    assert wire.encode_tensors(tensors, encoding) == reference_section(tensors, encoding)


def test_non_contiguous_and_big_endian_inputs_encode_like_their_values():
    w = np.arange(12, dtype=">f4").reshape(3, 4).T  # big-endian and transposed
    assert wire.encode_tensors({"w": w}) == wire.encode_tensors({"w": np.ascontiguousarray(w, dtype="<f4")})
    out, _ = wire.decode_tensors(wire.encode_tensors({"w": w}))
    np.testing.assert_array_equal(out["w"], w)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 6), max_size=3), min_size=1, max_size=4),
    st.sampled_from(ENCODINGS),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1e-6, 1.0, 1000.0]),
)
def test_decode_inverts_encode(shapes, encoding, seed, magnitude):
    rng = np.random.default_rng(seed)
    tensors = {f"p{i}": (rng.standard_normal(s) * magnitude).astype(np.float32) for i, s in enumerate(shapes)}
    specs = [ParamSpec(name, a.shape) for name, a in tensors.items()]
    out, got_encoding = wire.decode_tensors(wire.encode_tensors(tensors, encoding), specs)
    assert got_encoding == encoding
    for name, array in tensors.items():
        assert out[name].dtype == np.float32 and out[name].shape == array.shape
        if encoding == "float32":
            np.testing.assert_array_equal(out[name], array)
        elif encoding == "float16":
            np.testing.assert_array_equal(out[name], array.astype(np.float16).astype(np.float32))
        elif array.size:
            step = float(np.abs(array).max()) / 127
            assert float(np.abs(out[name] - array).max()) <= step * 0.5001 + 1e-30
