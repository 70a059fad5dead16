"""The bounded CBOR reader: every limit and malformation has its own stable reason."""

from __future__ import annotations

import math

import cbor2
import pytest

from appliance import cbor_reader
from appliance.cbor_reader import Limits, Tagged
from appliance.errors import ProtocolError

LIMITS = Limits()


def reason(data: bytes, limits: Limits = LIMITS, tags: frozenset[int] = frozenset()) -> str:
    with pytest.raises(ProtocolError) as info:
        cbor_reader.loads(data, limits, tags)
    return info.value.reason


def nested_arrays(depth: int) -> bytes:
    return b"\x81" * depth + b"\x00"


def test_too_large_is_checked_before_reading():
    assert reason(b"\x00" * 11, Limits(max_bytes=10)) == "too-large"
    assert cbor_reader.loads(b"\x49" + b"x" * 9, Limits(max_bytes=10)) == b"x" * 9


def test_depth_limit():
    assert cbor_reader.loads(nested_arrays(8), LIMITS) is not None  # 8 containers around the leaf: allowed
    assert reason(nested_arrays(9)) == "too-deep"
    assert reason(b"\xa1\x00" * 9 + b"\x00") == "too-deep"  # maps count too
    assert reason(b"\xd8\x28" * 9 + b"\x00", tags=frozenset({40})) == "too-deep"  # and tags


def test_depth_limit_protects_the_interpreter():
    """A 100,000-deep nest is refused at the limit rather than exhausting Python's recursion."""
    assert reason(nested_arrays(100_000), Limits(max_depth=8, max_items=10**6)) == "too-deep"


def test_container_length_limit_is_checked_before_reading_items():
    limits = Limits(max_container_len=4)
    assert cbor_reader.loads(cbor2.dumps([0] * 4), limits) == [0] * 4
    assert reason(cbor2.dumps([0] * 5), limits) == "too-long"
    assert reason(cbor2.dumps({i: i for i in range(5)}), limits) == "too-long"
    # A 9-byte message declaring 2**64-1 entries costs nothing.
    assert reason(b"\x9b" + b"\xff" * 8) == "too-long"
    assert reason(b"\xbb" + b"\xff" * 8) == "too-long"


def test_item_count_limit():
    limits = Limits(max_items=10)
    assert cbor_reader.loads(cbor2.dumps([0] * 9), limits) == [0] * 9  # 1 array + 9 items
    assert reason(cbor2.dumps([0] * 10), limits) == "too-many-items"
    assert reason(cbor2.dumps([[0] * 5, [0] * 5]), limits) == "too-many-items"


def test_unknown_tags_are_refused_and_allowed_ones_kept():
    assert reason(cbor2.dumps(cbor2.CBORTag(1, 0))) == "unknown-tag"
    assert reason(cbor2.dumps(cbor2.CBORTag(2, b"\x01"))) == "unknown-tag"  # bignum
    assert cbor_reader.loads(cbor2.dumps(cbor2.CBORTag(40, 7)), LIMITS, frozenset({40})) == Tagged(40, 7)
    assert reason(cbor2.dumps(cbor2.CBORTag(41, 7)), tags=frozenset({40})) == "unknown-tag"


@pytest.mark.parametrize(
    "data",
    [b"\x5f\x41a\xff", b"\x7f\x61a\xff", b"\x9f\x01\xff", b"\xbf\x01\x02\xff"],
    ids=["bstr", "tstr", "array", "map"],
)
def test_indefinite_lengths_are_refused(data):
    assert reason(data) == "indefinite-length"


def test_trailing_bytes():
    assert reason(b"\x01\x02") == "trailing-bytes"
    assert reason(cbor2.dumps({"a": 1}) + b"\x00") == "trailing-bytes"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x18",
        b"\x19\x01",
        b"\x1b" + b"\x00" * 7,
        b"\x43ab",
        b"\x63ab",
        b"\x82\x01",
        b"\xa1\x01",
        b"\xf9\x00",
        b"\xfa\x00\x00",
        b"\xfb" + b"\x00" * 7,
        b"\xd8",
        b"\x5b" + b"\xff" * 8,
    ],
)
def test_truncated(data):
    assert reason(data) == "truncated"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x1c", "reserved additional information 28"),
        (b"\x3e", "reserved additional information 30 on a negative integer"),
        (b"\xff", "a break outside an indefinite item"),
        (b"\xf7", "undefined"),
        (b"\xf0", "unassigned simple value"),
        (b"\xf8\x20", "one-byte simple value"),
        (b"\x62\xc3\x28", "invalid UTF-8"),
        (b"\xa2\x01\x00\x01\x00", "duplicate map key"),
        (b"\xa1\x41a\x00", "byte-string map key"),
        (b"\xa1\xf9\x3c\x00\x00", "float map key"),
        (b"\xa1\x80\x00", "array map key"),
        (b"\xa1\xf5\x00", "boolean map key"),
        (b"\xa2\x01\x00\xf5\x00", "true as a key beside 1"),
    ],
)
def test_malformed(data, why):
    assert reason(data) == "malformed", why


def test_byte_strings_are_views_of_the_input():
    data = bytearray(cbor2.dumps([b"abc", "d"]))
    value = cbor_reader.loads(data, LIMITS)
    assert isinstance(value[0], memoryview) and bytes(value[0]) == b"abc"
    data[2] = ord("X")
    assert bytes(value[0]) == b"Xbc"  # no copy was made


@pytest.mark.parametrize(
    "value",
    [
        0,
        23,
        24,
        255,
        256,
        65535,
        65536,
        2**32,
        2**64 - 1,
        -1,
        -24,
        -25,
        -(2**64),
        0.5,
        -0.0,
        1e300,
        1.5e-5,
        math.inf,
        -math.inf,
        True,
        False,
        None,
        "",
        "ü€😀",
        b"",
        b"\x00\xff",
        [],
        {},
        [1, [2, [3]]],
        {"a": 1, "b": [None, {"c": b"x"}], 3: -4},
    ],
)
def test_agrees_with_cbor2_on_valid_values(value):
    for canonical in (False, True):
        encoded = cbor2.dumps(value, canonical=canonical)
        ours = cbor_reader.loads(encoded, LIMITS)
        assert normalise(ours) == normalise(cbor2.loads(encoded))


def test_half_and_single_floats_decode_exactly():
    assert cbor_reader.loads(b"\xf9\x3e\x00", LIMITS) == 1.5
    assert cbor_reader.loads(b"\xfa\x47\xc3\x50\x00", LIMITS) == 100000.0
    assert math.isnan(cbor_reader.loads(b"\xf9\x7e\x00", LIMITS))


def normalise(value):
    """Make values comparable: our byte strings are memoryviews, cbor2 may give tuples inside tags."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list | tuple):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, Tagged | cbor2.CBORTag):
        return ("tag", value.tag, normalise(value.value))
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, bool):
        return ("bool", value)
    return value
