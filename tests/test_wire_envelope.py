"""The COSE_Sign1 envelope as wire.verify sees it: who may sign, what the header must say, size bounds."""

from __future__ import annotations

import cbor2
import pytest
from nacl.signing import SigningKey

from appliance import wire
from appliance.wire import ProtocolError

KEY = SigningKey(b"\x05" * 32)
KID = wire.key_id(KEY.verify_key)
LOOKUP = wire.pinned(KEY.verify_key)


def reason(message: bytes, lookup=LOOKUP) -> str:
    with pytest.raises(ProtocolError) as info:
        wire.verify(message, lookup)
    return info.value.reason


def hand_signed(protected: dict, payload: bytes, key: SigningKey = KEY, unprotected=None, tag: int = 18) -> bytes:
    """A COSE_Sign1 assembled by hand with cbor2, to reach checks that wire.sign never violates."""
    prot = cbor2.dumps(protected)
    sig = key.sign(cbor2.dumps(["Signature1", prot, b"", payload])).signature
    return cbor2.dumps(cbor2.CBORTag(tag, [prot, {} if unprotected is None else unprotected, payload, sig]))


def test_sign_then_verify_returns_payload_kid_and_rest():
    message = wire.sign({"v": 1, "type": "x", "n": 3}, KEY, KID)
    verified = wire.verify(message + b"tail", LOOKUP)
    assert verified.kid == KID and verified.payload == {"v": 1, "type": "x", "n": 3}
    assert bytes(verified.rest) == b"tail"


def test_payload_is_core_deterministic_cbor():
    """RFC 8949 section 4.2.1: shortest forms and map keys sorted by their encoded bytes."""
    message = wire.sign({"zz": 1.5, "a": 1000, "v": 1, "bb": [1.0, 0.1]}, KEY, KID)
    payload = bytes(cbor2.loads(message).value[2])
    # {"a": 1000, "v": 1, "bb": [1.0, 0.1], "zz": 1.5}: 1.0 and 1.5 fit a half float, 0.1 needs a double
    assert payload.hex() == "a461611903e861760162626282f93c00fb3fb999999999999a627a7af93e00"


def test_protected_header_bytes_are_fixed():
    prot = bytes(cbor2.loads(wire.sign({"v": 1}, KEY, KID)).value[0])
    assert prot == bytes.fromhex("a20127045820") + KID.encode()


def test_unknown_kid():
    assert reason(wire.sign({"v": 1}, KEY, KID), lambda kid: None) == "unknown-key"


def test_signature_by_another_key_for_the_same_kid():
    assert reason(wire.sign({"v": 1}, SigningKey(b"\x06" * 32), KID)) == "bad-signature"


def test_signature_of_wrong_length():
    message = cbor2.loads(wire.sign({"v": 1}, KEY, KID)).value
    short = cbor2.dumps(cbor2.CBORTag(18, [message[0], {}, message[2], bytes(message[3])[:63]]))
    assert reason(short) == "bad-signature"


@pytest.mark.parametrize("version", [0, 2, True, 1.0, "1", None])
def test_only_protocol_version_1_is_accepted(version):
    payload = cbor2.dumps({"v": version} if version is not None else {"type": "x"})
    assert reason(hand_signed({1: -8, 4: KID.encode()}, payload)) == "unsupported-version"


@pytest.mark.parametrize(
    ("protected", "why"),
    [({1: -7, 4: KID.encode()}, "ES256"), ({4: KID.encode()}, "no alg"), ({1: "EdDSA", 4: KID.encode()}, "text")],
)
def test_algorithm_must_be_eddsa(protected, why):
    assert reason(hand_signed(protected, cbor2.dumps({"v": 1}))) == "bad-algorithm", why


@pytest.mark.parametrize("protected", [{1: -8}, {1: -8, 4: KID}, {1: -8, 4: "é".encode()}])
def test_kid_must_be_an_ascii_byte_string(protected):
    assert reason(hand_signed(protected, cbor2.dumps({"v": 1}))) == "malformed"


def test_payload_must_be_a_map():
    assert reason(hand_signed({1: -8, 4: KID.encode()}, cbor2.dumps([1]))) == "bad-payload"


def test_not_a_cose_sign1():
    assert reason(cbor2.dumps({"v": 1})) == "not-signed"
    assert reason(cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b""]))) == "malformed"
    assert reason(hand_signed({1: -8, 4: KID.encode()}, cbor2.dumps({"v": 1}), tag=98)) == "unknown-tag"
    assert reason(b"") == "truncated"


def test_the_unprotected_header_must_be_an_empty_map():
    """It is not signed: contents there would give one signed message other bytes (docs/protocol.md section 4)."""
    payload = cbor2.dumps({"v": 1})
    assert wire.verify(hand_signed({1: -8, 4: KID.encode()}, payload), LOOKUP).kid == KID
    assert reason(hand_signed({1: -8, 4: KID.encode()}, payload, unprotected={99: "note"})) == "malformed"
    assert reason(hand_signed({1: -8, 4: KID.encode()}, payload, unprotected=[])) == "malformed"


def test_whole_message_size_limit():
    limits = wire.Limits(max_bytes=1000)
    with pytest.raises(ProtocolError) as info:
        wire.verify(wire.sign({"v": 1}, KEY, KID) + b"\0" * 1000, LOOKUP, limits)
    assert info.value.reason == "too-large"


@pytest.mark.parametrize("size", [70_000, 200_000])
def test_envelope_larger_than_64_kib_is_too_large_not_truncated(size):
    """The signed part is small by design; a big payload is refused by size, whatever follows it."""
    message = wire.sign({"v": 1, "pad": b"\0" * size}, KEY, KID)
    assert reason(message) == "too-large"
    assert reason(message + b"\0" * 100) == "too-large"


def test_an_envelope_a_few_bytes_over_64_kib_is_too_large_though_read_whole():
    """The prefix read for an envelope is 16 bytes longer than the limit, so an envelope just over 64 KiB is read
    whole, without running past the prefix: its size alone refuses it."""
    big = 65_000
    overhead = len(wire.sign({"v": 1, "pad": b"\0" * big}, KEY, KID)) - big
    message = wire.sign({"v": 1, "pad": b"\0" * (64 * 1024 + 1 - overhead)}, KEY, KID)
    assert 64 * 1024 < len(message) <= wire.ENVELOPE_PREFIX_BYTES
    assert reason(message) == "too-large"
    assert reason(message + b"\0" * 100) == "too-large"
