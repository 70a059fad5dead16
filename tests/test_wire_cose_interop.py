"""Interoperability with an independent COSE implementation (pycose): our Sign1 verifies there and theirs here."""

from __future__ import annotations

import hashlib

import cbor2
import numpy as np
import pytest
from nacl.signing import SigningKey

from appliance import wire
from appliance.wire import ProtocolError

pycose = pytest.importorskip("pycose", reason="pycose is a dev dependency (pip install -e '.[dev]')")
from pycose.algorithms import EdDSA  # noqa: E402
from pycose.headers import KID, Algorithm  # noqa: E402
from pycose.keys import OKPKey  # noqa: E402
from pycose.keys.curves import Ed25519  # noqa: E402
from pycose.messages import Sign1Message  # noqa: E402

KEY = SigningKey(bytes(range(100, 132)))
KID_TEXT = wire.key_id(KEY.verify_key)


def okp_public(key: SigningKey) -> OKPKey:
    return OKPKey(crv=Ed25519, x=bytes(key.verify_key))


def okp_private(key: SigningKey) -> OKPKey:
    return OKPKey(crv=Ed25519, d=bytes(key), x=bytes(key.verify_key))


def pycose_decode(message: bytes) -> Sign1Message:
    """pycose 1.1's own decode() assumes cbor2 < 6, which returned a list and dicts inside a tag where cbor2 6
    returns a tuple and immutable maps. So the outer tag is taken apart here, and the rest (header parsing,
    Sig_structure, EdDSA) is left to pycose."""
    tagged = cbor2.loads(message)
    assert tagged.tag == 18
    protected, unprotected, payload, signature = tagged.value
    return Sign1Message.from_cose_obj([protected, dict(unprotected), payload, signature], True)


def test_our_sign1_verifies_with_pycose():
    message = wire.sign({"v": 1, "type": "probe", "n": 7}, KEY, KID_TEXT)
    decoded = pycose_decode(message)
    decoded.key = okp_public(KEY)
    assert decoded.verify_signature()
    assert decoded.phdr[Algorithm] is EdDSA and decoded.phdr[KID] == KID_TEXT.encode()
    assert cbor2.loads(decoded.payload) == {"v": 1, "type": "probe", "n": 7}
    decoded.key = okp_public(SigningKey(b"\x01" * 32))
    assert not decoded.verify_signature()


def test_our_update_envelope_verifies_with_pycose_and_pins_the_tensors():
    device_id = KID_TEXT
    update = wire.Update(device_id, 1, 1, b"\x00" * 32, 5, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    body = wire.encode_update(update, KEY)
    section = wire.encode_tensors(update.tensors)
    envelope = body[: len(body) - len(section)]
    decoded = pycose_decode(envelope)
    decoded.key = okp_public(KEY)
    assert decoded.verify_signature()
    assert cbor2.loads(decoded.payload)["tensors_sha256"] == hashlib.sha256(section).digest()


def pycose_sign(payload: bytes, phdr: dict, key: SigningKey = KEY) -> bytes:
    message = Sign1Message(phdr=phdr, payload=payload)
    message.key = okp_private(key)
    return message.encode()


def test_pycose_sign1_verifies_with_wire_verify():
    payload = cbor2.dumps({"v": 1, "type": "probe", "x": [1, 2]}, canonical=True)
    message = pycose_sign(payload, {Algorithm: EdDSA, KID: KID_TEXT.encode()})
    verified = wire.verify(message, wire.pinned(KEY.verify_key))
    assert verified.kid == KID_TEXT and verified.payload == {"v": 1, "type": "probe", "x": [1, 2]}


def test_pycose_sign1_with_a_non_deterministic_payload_still_verifies():
    """Receivers check the signature over the bytes received; deterministic encoding is a sender's duty."""
    payload = b"\xa2\x64type\x65probe\x61v\x18\x01"  # keys unsorted, 1 encoded in two bytes
    message = pycose_sign(payload, {Algorithm: EdDSA, KID: KID_TEXT.encode()})
    assert wire.verify(message, wire.pinned(KEY.verify_key)).payload == {"type": "probe", "v": 1}


def test_pycose_sign1_with_the_wrong_key_or_algorithm_is_refused():
    payload = cbor2.dumps({"v": 1})
    forged = pycose_sign(payload, {Algorithm: EdDSA, KID: KID_TEXT.encode()}, SigningKey(b"\x02" * 32))
    with pytest.raises(ProtocolError) as info:
        wire.verify(forged, wire.pinned(KEY.verify_key))
    assert info.value.reason == "bad-signature"
    unprotected_kid = Sign1Message(phdr={Algorithm: EdDSA}, uhdr={KID: KID_TEXT.encode()}, payload=payload)
    unprotected_kid.key = okp_private(KEY)
    with pytest.raises(ProtocolError) as info:
        wire.verify(unprotected_kid.encode(), wire.pinned(KEY.verify_key))
    assert info.value.reason == "malformed"  # kid must be protected: it chooses the key


def test_pycose_signed_task_decodes_as_a_task():
    payload = {
        "v": 1,
        "type": "task",
        "round": 2,
        "model_version": 1,
        "model_digest": b"m" * 32,
        "package_digest": b"p" * 32,
        "deadline": 100,
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 0.5,
        "prox_mu": 0.0,
        "encoding": "float16",
        "clip_norm": 0.0,
        "issued_at": 50,
    }
    message = pycose_sign(cbor2.dumps(payload, canonical=True), {Algorithm: EdDSA, KID: KID_TEXT.encode()})
    task = wire.decode_task(message, KEY.verify_key)
    assert (task.round_id, task.encoding, task.learning_rate) == (2, "float16", 0.5)
