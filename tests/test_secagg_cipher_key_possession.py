"""An advertisement proves that its sender knows its cipher secret (docs/protocol.md 12.3), so no device can
advertise a cipher key tied to another device's.

Why it matters since accusations carry channel points (12.5): a device D that advertised A_D = lambda * A_V for an
honest V's cipher key A_V (lambda known: 1 for a plain copy) deals garbage, every neighbour J of D rejects it and
its accusation shows K_JD = a_J * A_D = lambda * (a_J * A_V), so the aggregator gets K_JV = K_JD / lambda, the
point of the channel between J and the honest V, and with it V's shares of b_V and r_V sent to J: one accusation
per common neighbour, t of them and V's input is open. One hostile device (with a curious aggregator, or just a
copy of V's key) was enough. D cannot prove it knows log_G(lambda * A_V) without knowing V's secret."""

from __future__ import annotations

import os

import pytest
from nacl.signing import SigningKey

from appliance import wire
from appliance.errors import ProtocolError
from appliance.protocol import messages as m
from appliance.protocol import shamir
from appliance.protocol.secagg import DeviceRound

ROUND = 9
VICTIM_KEY, HOSTILE_KEY = SigningKey(bytes(range(32))), SigningKey(bytes(range(1, 33)))
VICTIM, HOSTILE = wire.key_id(VICTIM_KEY.verify_key), wire.key_id(HOSTILE_KEY.verify_key)


def lookup(kid: str):
    return {VICTIM: VICTIM_KEY.verify_key, HOSTILE: HOSTILE_KEY.verify_key}.get(kid)


def _advertisement(device: str, key: SigningKey, cipher_key: bytes, mask_key: bytes, proof: bytes) -> bytes:
    payload = {"v": wire.PROTOCOL_VERSION, "type": "secagg-advertise", "phase": "advertise", "round": ROUND,
               "device": device, "cipher_key": cipher_key, "mask_key": mask_key, "cipher_proof": proof}
    return wire.sign(payload, key, device)


def test_an_honest_advertisement_carries_a_proof_the_aggregator_takes():
    device = DeviceRound(ROUND)
    body = m.encode_advertise(m.Advertise(ROUND, VICTIM, device.keys, device.cipher_key_proof(VICTIM)), VICTIM_KEY)
    assert m.decode_advertise(body, lookup).keys == device.keys


@pytest.mark.parametrize("factor", [1, 2, shamir.L - 1])
def test_a_cipher_key_tied_to_another_devices_is_refused(factor: int):
    """The hostile device's key is factor * A_victim (a copy, twice it, its negation). The best proof it has is the
    victim's own (bound to the victim's id and key) or any other bytes: each is refused with bad-key, so the key
    never reaches the roster and no accusation against its sender can open a channel of the victim's."""
    victim = DeviceRound(ROUND)
    victim_proof = victim.cipher_key_proof(VICTIM)
    related = shamir.point_times(factor, victim.keys.cipher)
    mask = DeviceRound(ROUND).keys.mask
    for proof in (victim_proof, os.urandom(64), DeviceRound(ROUND).cipher_key_proof(HOSTILE)):
        body = _advertisement(HOSTILE, HOSTILE_KEY, related, mask, proof)
        with pytest.raises(ProtocolError) as refused:
            m.decode_advertise(body, lookup)
        assert refused.value.reason == "bad-key"


def test_an_advertisement_without_a_proof_is_refused():
    device = DeviceRound(ROUND)
    payload = {"v": wire.PROTOCOL_VERSION, "type": "secagg-advertise", "phase": "advertise", "round": ROUND,
               "device": VICTIM, "cipher_key": device.keys.cipher, "mask_key": device.keys.mask}
    with pytest.raises(ProtocolError) as refused:
        m.decode_advertise(wire.sign(payload, VICTIM_KEY, VICTIM), lookup)
    assert refused.value.reason == "bad-payload"
