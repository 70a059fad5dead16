"""Any change to a signed message is refused with a ProtocolError: never accepted, never another exception."""

from __future__ import annotations

import io
import random

import cbor2
import numpy as np
import pytest
from nacl.signing import SigningKey

from appliance import wire
from appliance.wire import ProtocolError

DEVICE = SigningKey(bytes(range(32)))
DEVICE_ID = wire.key_id(DEVICE.verify_key)
AGGREGATOR = SigningKey(bytes(range(32, 64)))
# Failing checks a tampered message may legitimately hit; anything else is a bug in the test's premise.
TAMPER_REASONS = {
    "bad-signature",
    "digest-mismatch",
    "truncated",
    "trailing-bytes",
    "malformed",
    "indefinite-length",
    "unknown-tag",
    "not-signed",
    "bad-algorithm",
    "unknown-key",
    "too-long",
    "too-deep",
    "too-many-items",
    "too-large",
    "bad-tensor",
    "tensor-too-large",
    "not-finite",
    "wrong-tensors",
    "wrong-shape",
}


def lookup(kid: str):
    return {DEVICE_ID: DEVICE.verify_key}.get(kid)


def small_update() -> bytes:
    update = wire.Update(
        device_id=DEVICE_ID,
        round_id=3,
        model_version=2,
        base_digest=b"\x11" * 32,
        num_samples=10,
        tensors={"w": np.array([[0.5, -1.0]], dtype=np.float32), "b": np.array([0.25], dtype=np.float32)},
        metrics={"loss": 0.5},
        nonce=b"\x22" * 16,
        created_at=1_700_000_000,
    )
    return wire.encode_update(update, DEVICE)


def refused(decode, message: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(message)
    assert info.value.reason in TAMPER_REASONS, info.value
    return info.value.reason


BIT_FLIPS = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF)


def test_small_update_every_byte_every_bit_flip_is_refused():
    """Every single-bit flip (and inversion) at every position of a whole Update body, envelope and tensors."""
    body = small_update()
    wire.decode_update(body, lookup)  # the untouched message is fine
    seen = set()
    for pos in range(len(body)):
        for mask in BIT_FLIPS:
            tampered = bytearray(body)
            tampered[pos] ^= mask
            seen.add(refused(lambda m: wire.decode_update(m, lookup), bytes(tampered)))
    assert {"bad-signature", "digest-mismatch", "malformed"} <= seen


@pytest.mark.slow
def test_small_update_every_byte_every_value_is_refused():
    """All 255 other values at every position (about 30 s)."""
    body = small_update()
    for pos in range(len(body)):
        for value in range(256):
            if value == body[pos]:
                continue
            tampered = bytearray(body)
            tampered[pos] = value
            refused(lambda m: wire.decode_update(m, lookup), bytes(tampered))


@pytest.mark.parametrize("kind", ["task", "receipt"])
def test_small_aggregator_messages_every_byte_flip_is_refused(kind):
    if kind == "task":
        message = wire.encode_task(
            wire.Task(
                round_id=1, model_version=1, model_digest=b"m" * 32, package_digest=b"p" * 32, deadline=9, issued_at=5
            ),
            AGGREGATOR,
        )
        decode = lambda m: wire.decode_task(m, AGGREGATOR.verify_key)  # noqa: E731
    else:
        message = wire.encode_receipt(wire.Receipt("d" * 32, 4, b"u" * 32, accepted_at=7), AGGREGATOR)
        decode = lambda m: wire.decode_receipt(m, AGGREGATOR.verify_key)  # noqa: E731
    decode(message)
    for pos in range(len(message)):
        for mask in BIT_FLIPS:
            tampered = bytearray(message)
            tampered[pos] ^= mask
            refused(decode, bytes(tampered))


def test_unprotected_header_must_be_a_map():
    """The unprotected header is not signed; anything but a map there is malformed, not silently ignored."""
    body = small_update()
    pos = body.index(b"\xa0")  # the empty unprotected map right after the protected header
    for value in (0x00, 0x20, 0x40, 0x60, 0x80, 0xF4, 0xF6):
        tampered = bytearray(body)
        tampered[pos] = value
        assert refused(lambda m: wire.decode_update(m, lookup), bytes(tampered)) == "malformed"


def _rewrapped(body: bytes) -> dict[str, bytes]:
    """The same signed update in other bytes: only what the signature does not cover is changed."""
    decoder = cbor2.CBORDecoder(io.BytesIO(body))
    protected, _, payload, signature = decoder.decode().value
    rest = body[decoder.fp.tell():]
    return {
        "unprotected header with contents": cbor2.dumps(
            cbor2.CBORTag(18, [protected, {7: b"anything"}, payload, signature])) + rest,
        "array length in a longer head": b"\xd2\x98\x04" + body[2:],
        "tag in a longer head": b"\xd8\x12" + body[1:],
        "protected header length in a longer head": body[:2] + b"\x59\x00" + bytes([len(protected)])
        + body[4:],
    }


def test_a_signed_update_has_one_encoding_so_one_envelope_digest():
    """The envelope's digest names an update (receipts, idempotency: docs/protocol.md section 8). Re-wrapping a
    captured update in other bytes would give it another digest, so it could be counted again (in a later async
    buffer) or front-run its device's own copy: every re-wrapping is refused."""
    body = small_update()
    assert wire.decode_update(body, lookup).device_id == DEVICE_ID
    forms = _rewrapped(body)
    for name, tampered in forms.items():
        assert tampered != body
        assert refused(lambda m: wire.decode_update(m, lookup), tampered) == "malformed", name


def test_large_update_sampled_flips_are_refused():
    rng = np.random.default_rng(7)
    update = wire.Update(
        device_id=DEVICE_ID,
        round_id=1,
        model_version=1,
        base_digest=b"\x00" * 32,
        num_samples=100,
        tensors={"w": rng.standard_normal((1000, 1000)).astype(np.float32), "b": np.zeros(1000, np.float32)},
    )
    body = wire.encode_update(update, DEVICE)
    envelope_end = len(body) - len(wire.encode_tensors(update.tensors))
    picker = random.Random(11)
    positions = list(range(envelope_end + 64))  # the whole envelope and the start of the tensor section
    positions += picker.sample(range(envelope_end, len(body)), 100)  # tensor data, headers and tail
    positions += [len(body) - 1]
    reasons = set()
    for pos in positions:
        tampered = bytearray(body)
        tampered[pos] ^= 1 << picker.randrange(8)
        reasons.add(refused(lambda m: wire.decode_update(m, lookup), bytes(tampered)))
    assert "digest-mismatch" in reasons and "bad-signature" in reasons


def test_truncated_and_extended_bodies_are_refused():
    body = small_update()
    for cut in range(len(body)):
        refused(lambda m: wire.decode_update(m, lookup), body[:cut])
    refused(lambda m: wire.decode_update(m, lookup), body + b"\x00")
