"""The signed metadata of an update as the aggregator reads it (aggregator/verify.py), before the tensors are hashed:
a field of the wrong kind is refused with its reason, never read as something else."""

from __future__ import annotations

import numpy as np
import pytest
from nacl.signing import SigningKey

from aggregator.verify import envelope_in, header_of
from appliance import wire
from appliance.errors import ProtocolError

KEY = SigningKey(b"\x07" * 32)
KID = wire.key_id(KEY.verify_key)
LOOKUP = wire.pinned(KEY.verify_key)


def _signed(**fields) -> bytes:
    """An update's body; with ``fields``, the same update with those signed fields replaced, signed again."""
    update = wire.Update(device_id=KID, round_id=1, model_version=0, base_digest=b"\0" * 32, num_samples=10,
                         tensors={"w": np.zeros(3, dtype=np.float32)})
    body = wire.encode_update(update, KEY)
    if not fields:
        return body
    verified = wire.verify(body, LOOKUP)
    payload = {k: bytes(v) if isinstance(v, memoryview) else v for k, v in verified.payload.items()}
    return wire.sign({**payload, **fields}, KEY, KID) + bytes(verified.rest)


def _verified(**fields) -> wire.Verified:
    return wire.verify(_signed(**fields), LOOKUP)


def test_the_signed_fields_are_read() -> None:
    header = header_of(_verified(), "float32")
    assert (header.device_id, header.round_id, header.num_samples) == (KID, 1, 10)


@pytest.mark.parametrize("field", ["round", "model_version", "num_samples", "created_at"])
def test_a_boolean_is_not_read_as_the_integer_it_equals(field: str) -> None:
    """CBOR true is 1 in Python: a round given as true is refused, not taken for round 1."""
    with pytest.raises(ProtocolError) as refused:
        header_of(_verified(**{field: True}), "float32")
    assert refused.value.reason == "bad-payload" and field in refused.value.detail


def test_an_update_naming_another_device_than_its_signer_is_refused_before_its_round_is_judged() -> None:
    """Read before the round's checks (one update per device, duplicates): an update signed by one device and naming
    another is refused for that, never judged as the other device's."""
    with pytest.raises(ProtocolError) as refused:
        header_of(_verified(device="f" * 32), "float32")
    assert refused.value.reason == "kid-mismatch"


@pytest.mark.parametrize("device", [5, KID.encode(), None], ids=["a-number", "bytes", "null"])
def test_a_device_that_is_not_text_is_refused_as_such(device: object) -> None:
    """Refused for what it is (a field of the wrong kind), not as a device mismatch the signer did not make."""
    with pytest.raises(ProtocolError) as refused:
        header_of(_verified(device=device), "float32")
    assert refused.value.reason == "bad-payload" and "'device'" in refused.value.detail


@pytest.mark.parametrize("encoding", ["bf16", 8, None])
def test_an_encoding_no_version_sends_is_refused_as_such_whatever_the_task_asks(encoding: object) -> None:
    """Named as an encoding that does not exist, not as one other than the task's; and refused too when the caller
    gives no task encoding (it only wants the signer)."""
    for task_encoding in ("float32", None):
        with pytest.raises(ProtocolError) as refused:
            header_of(_verified(encoding=encoding), task_encoding)
        assert refused.value.reason == "bad-payload" and "'encoding'" in refused.value.detail, task_encoding


def test_a_message_of_another_type_is_not_read_as_an_update() -> None:
    with pytest.raises(ProtocolError) as refused:
        header_of(_verified(type="secagg-masked"), "float32")
    assert refused.value.reason == "wrong-type"


def test_an_envelope_is_not_moved_onto_a_body_it_does_not_begin() -> None:
    """The body read after the envelope was verified must begin with those very bytes: else its tensors would be
    checked against a signature that never covered what precedes them."""
    head = _signed()
    verified = wire.verify(head, LOOKUP)
    body = bytearray(head)
    assert bytes(envelope_in(memoryview(body), head, verified).rest) == bytes(verified.rest)
    body[5] ^= 1
    with pytest.raises(ValueError):
        envelope_in(memoryview(body), head, verified)
