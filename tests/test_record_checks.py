"""A spooled record's check at resume (aggregator/record_checks.py) rebuilds exactly the section its device signed.

The sections are rebuilt from the record and the model's parameter specs, so the rebuilt bytes must be the
protocol's deterministic encoding for every shape of model (more than 23 tensors, names of different lengths in
an order that is not the specs', scalars, empty tensors) and every encoding, or a sound record would be taken for a
changed one; and a changed bit must never round away (float16 and int8 records hold dequantised values). A section
in a valid encoding that is not the deterministic one (the reader accepts it) gets a CRC-32 instead.
"""

from __future__ import annotations

import hashlib
import time
import warnings

import cbor2
import numpy as np
import pytest
from nacl.signing import SigningKey

from aggregator.models import Layout
from aggregator.record_checks import (
    CRC32,
    MASKED_SHA256,
    RecordCheck,
    TensorSection,
    crc32_check,
    masked_check,
    record_intact,
)
from aggregator.verify import delta_of
from appliance import wire
from appliance.protocol import messages as m


def _specs() -> list[wire.ParamSpec]:
    names = [f"layer{i}.{'w' * (i % 3 + 1)}" for i in range(30)] + ["b", "conv.weight"]
    shapes = [(i % 4 + 1, 3) for i in range(30)] + [(), (0, 5)]
    return [wire.ParamSpec(n, s) for n, s in zip(reversed(names), shapes, strict=True)]


def _received(specs: list[wire.ParamSpec], encoding: str) -> tuple[wire.Verified, np.ndarray]:
    """An update as the aggregator receives it: its verified envelope and its record (the decoded float32 delta)."""
    key = SigningKey.generate()
    rng = np.random.default_rng(1)
    tensors = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in specs}
    body = wire.encode_update(wire.Update("d", 1, 0, b"\0" * 32, 1, tensors, encoding=encoding), key)
    verified = wire.verify(body, lambda kid: key.verify_key)
    _, delta, _ = delta_of(verified, Layout(specs), wire.DEFAULT_LIMITS)
    return verified, delta.view(np.uint8)


@pytest.mark.parametrize("encoding", ["float32", "float16", "int8"])
def test_a_record_rebuilds_its_signed_tensor_section_and_no_changed_bit_does(encoding: str) -> None:
    specs = _specs()
    section = TensorSection(specs)
    verified, record = _received(specs, encoding)
    check = section.check(verified, encoding)
    assert check is not None and check.kind == f"{encoding}-sha256"
    assert check.value[:32] == bytes(verified.payload["tensors_sha256"])
    assert record_intact(check, record, section)
    for at in (0, 3, len(record) // 2, len(record) - 1):  # the lowest and highest bits of floats
        for bit in (0x01, 0x80):
            changed = record.copy()
            changed[at] ^= bit
            assert not record_intact(check, changed, section), (at, bit)


@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_a_record_changed_to_a_value_out_of_its_encodings_range_fails_without_a_warning(encoding: str) -> None:
    """A changed exponent byte can make a float16 record's value larger than float16 holds: it is a changed record
    like any other, reported in the resume's one error line, not also with numpy's "overflow encountered in cast"
    RuntimeWarning on the aggregator's stderr."""
    specs = _specs()
    section = TensorSection(specs)
    verified, record = _received(specs, encoding)
    check = section.check(verified, encoding)
    assert check is not None
    changed = record.copy()
    changed[2:4] = [0x7F, 0x7E]  # the first value becomes 8.5e37, finite in float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not record_intact(check, changed, section)


@pytest.mark.parametrize("kept", [32, 33, 36, -1], ids=["no-scale", "a-scales-head", "half-a-scale",
                                                     "all-but-a-byte"])
def test_an_int8_check_cut_short_in_its_scales_fails_and_does_not_raise(kept: int) -> None:
    """A stored check whose value lost (some of) its scales cannot rebuild the section: the record is taken for a
    changed one, as any other mismatch; it used to raise a CBOR decoding error out of the resume instead."""
    specs = _specs()
    section = TensorSection(specs)
    verified, record = _received(specs, "int8")
    check = section.check(verified, "int8")
    assert check is not None and record_intact(check, record, section)
    assert not record_intact(RecordCheck(check.kind, check.value[:kept]), record, section)


def test_an_int8_update_whose_scale_is_zero_in_float32_passes_its_check() -> None:
    """The reader takes any scale above 0, and dequantises in float32: a scale below float32's smallest subnormal
    (here 1e-50) makes every value 0 or -0, whose int8 data the record cannot give back. Such a record was checked
    against its signed digest and so always failed, taking a sound update out of its round at a resume; it gets a
    CRC-32 instead."""
    key = SigningKey.generate()
    specs = [wire.ParamSpec("w", (4,))]
    data = cbor2.CBORTag(40, [[4], cbor2.CBORTag(72, np.array([1, -1, 0, 127], np.int8).tobytes())])
    section = cbor2.dumps({"w": [data, 1e-50]}, canonical=True)
    payload = {"v": wire.PROTOCOL_VERSION, "type": "update", "device": "d", "round": 1, "model_version": 0,
               "base_digest": b"\0" * 32, "num_samples": 1, "metrics": {}, "encoding": "int8", "nonce": b"n" * 8,
               "created_at": int(time.time()), "tensors_sha256": hashlib.sha256(section).digest()}
    verified = wire.verify(wire.sign(payload, key, "d") + section, lambda kid: key.verify_key)
    _, delta, _ = delta_of(verified, Layout(specs), wire.DEFAULT_LIMITS)  # accepted: a delta of zeros
    assert np.array_equal(delta, np.zeros(4, np.float32))
    record = delta.view(np.uint8)
    check = TensorSection(specs).check(verified, "int8") or crc32_check(record)  # None: the spool writer's CRC-32
    assert record_intact(check, record, TensorSection(specs))
    tiny = section.replace(cbor2.dumps(1e-50), cbor2.dumps(1.5e-45))  # float32's smallest subnormal: invertible
    payload["tensors_sha256"] = hashlib.sha256(tiny).digest()
    verified = wire.verify(wire.sign(payload, key, "d") + tiny, lambda kid: key.verify_key)
    _, delta, _ = delta_of(verified, Layout(specs), wire.DEFAULT_LIMITS)
    check = TensorSection(specs).check(verified, "int8")
    assert check is not None and record_intact(check, delta.view(np.uint8), TensorSection(specs))


def test_a_section_in_another_valid_encoding_gets_no_signed_check() -> None:
    specs = [wire.ParamSpec("w", (2, 2)), wire.ParamSpec("bias", (2,))]
    tensors = {"w": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    section = TensorSection(specs)
    typed = {name: cbor2.CBORTag(40, [list(a.shape), cbor2.CBORTag(85, a.tobytes())]) for name, a in tensors.items()}
    canonical = cbor2.dumps(typed, canonical=True)

    def check_of(section_bytes: bytes) -> RecordCheck | None:
        envelope = wire.Verified("d", {"tensors_sha256": memoryview(b"\1" * 32)}, memoryview(section_bytes), b"")
        return section.check(envelope, "float32")

    assert check_of(canonical) is not None
    unsorted = cbor2.dumps({"bias": typed["bias"], "w": typed["w"]})  # deterministic order is shorter key first
    assert len(unsorted) == len(canonical) and check_of(unsorted) is None
    assert check_of(canonical.replace(b"\x82\x02\x02", b"\x82\x18\x02\x02", 1)) is None  # a 2 in two bytes
    assert check_of(canonical + b"\x00") is None


def test_a_masked_inputs_record_rebuilds_its_signed_section() -> None:
    key = SigningKey.generate()
    words = np.random.default_rng(3).integers(0, 2**32, 70_000, dtype=np.uint32)
    body = m.encode_masked(m.MaskedInput(round_id=1, device_id="d", words=words, rejected=()), key)
    verified = wire.verify(body, lambda kid: key.verify_key)
    envelope = body[: len(body) - m.masked_section_bytes(words.size)]
    check = masked_check(memoryview(body), envelope, verified.digest, verified.payload, words.nbytes)
    assert check == RecordCheck(MASKED_SHA256, bytes(verified.payload["section_sha256"]))
    record = words.astype("<u4").view(np.uint8)
    assert record_intact(check, record, None)
    assert not record_intact(check, np.concatenate([record[:-1], record[-1:] ^ 1]), None)
    assert masked_check(memoryview(body), envelope[:-1], verified.digest, verified.payload, words.nbytes) is None


def test_a_crc32_check_catches_one_changed_bit() -> None:
    record = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)
    check = crc32_check(record)
    assert check.kind == CRC32 and record_intact(check, record, None)
    record[17] ^= 0x80
    assert not record_intact(check, record, None)


def test_a_masked_input_gets_its_signed_check_only_when_its_bytes_are_exactly_envelope_and_shortest_words() -> None:
    """Else the spool takes a CRC: a signed check rebuilt from the words with the shortest head would not match a
    section its device signed with a longer one, and a sound record would be taken for a damaged one at resume."""
    key = SigningKey.generate()
    words = np.arange(100, dtype=np.uint32)
    body = m.encode_masked(m.MaskedInput(round_id=1, device_id="d", words=words, rejected=()), key)
    verified = wire.verify(body, lambda kid: key.verify_key)
    envelope = body[: len(body) - m.masked_section_bytes(words.size)]
    data = words.astype("<u4").tobytes()
    assert masked_check(memoryview(body), envelope, verified.digest, verified.payload, words.nbytes) is not None
    longer_head = envelope + b"\xd8\x46\x5a" + len(data).to_bytes(4, "big") + data  # 400 needs two bytes, not four
    assert masked_check(memoryview(longer_head), envelope, verified.digest, verified.payload, words.nbytes) is None
    trailing = body + b"\x00"
    assert masked_check(memoryview(trailing), envelope, verified.digest, verified.payload, words.nbytes) is None
    other = hashlib.sha256(b"another envelope").digest()
    assert masked_check(memoryview(body), envelope, other, verified.payload, words.nbytes) is None


def test_a_check_of_a_kind_this_version_does_not_know_is_refused_not_passed() -> None:
    with pytest.raises(ValueError, match="unknown spool record check"):
        record_intact(RecordCheck("sha3-256", bytes(32)), np.zeros(8, dtype=np.uint8), None)
