"""The secure-aggregation messages on the wire: each one round-trips, and each kind of bad input is refused with
its reason before anything big is decoded (bad signature, wrong type or phase, wrong signer, wrong length,
a section that does not match its digest or breaks the limits)."""

from __future__ import annotations

import hashlib

import cbor2
import numpy as np
import pytest
from nacl.signing import SigningKey

from appliance import wire
from appliance.errors import ProtocolError
from appliance.protocol import messages as m
from appliance.protocol.quantise import levels_for
from appliance.protocol.secagg import Accusation, Answer, DeviceRound, RoutedShare

DEVICE_KEY = SigningKey(bytes(range(32)))
DEVICE = wire.key_id(DEVICE_KEY.verify_key)
AGGREGATOR_KEY = SigningKey(bytes(range(32, 64)))
AGGREGATOR = AGGREGATOR_KEY.verify_key


def lookup(kid: str):
    return DEVICE_KEY.verify_key if kid == DEVICE else None


def _roster(n: int = 4) -> tuple[m.Roster, list[DeviceRound]]:
    devices = [DeviceRound(9) for _ in range(n)]
    ids = tuple(sorted(f"{i:032x}" for i in range(n)))
    return m.Roster(9, ids, tuple(d.keys for d in devices), n - 1, 3, levels_for(n), 1000, 1.5, 1_800_000_000), \
        devices


def _advertise() -> m.Advertise:
    device = DeviceRound(9)
    return m.Advertise(9, DEVICE, device.keys, device.cipher_key_proof(DEVICE))


def _resign(body: bytes, key: SigningKey, kid: str, change: dict) -> bytes:
    """The same message with payload fields changed and signed again (so only the change is wrong)."""
    tag = cbor2.loads(body)
    envelope_end = len(cbor2.dumps(tag, canonical=True))
    payload = dict(cbor2.loads(tag.value[2]))
    payload.update(change)
    return wire.sign(payload, key, kid) + body[envelope_end:]


def test_advertise_round_trips_and_names_its_signer():
    device = DeviceRound(9)
    advertise = m.Advertise(9, DEVICE, device.keys, device.cipher_key_proof(DEVICE))
    body = m.encode_advertise(advertise, DEVICE_KEY)
    assert m.decode_advertise(body, lookup) == advertise
    other = SigningKey(bytes(range(1, 33)))
    forged = m.encode_advertise(advertise, other)  # says DEVICE, signed by someone else
    with pytest.raises(ProtocolError) as refused:
        m.decode_advertise(forged, lookup)
    assert refused.value.reason == "bad-signature"


def test_roster_round_trips_and_its_digest_seeds_the_graph():
    roster, _ = _roster(5)
    body = m.encode_roster(roster, AGGREGATOR_KEY)
    decoded = m.decode_roster(body, AGGREGATOR)
    assert decoded == roster
    assert decoded.setup().graph_seed == hashlib.sha256(roster.section()).digest()
    with pytest.raises(ProtocolError) as refused:
        m.decode_roster(body, SigningKey(bytes(32)).verify_key)
    assert refused.value.reason == "unknown-key"


def test_a_roster_whose_arithmetic_could_overflow_is_refused():
    roster, _ = _roster(5)
    greedy = m.Roster(**{**roster.__dict__, "levels": levels_for(4)})
    with pytest.raises(ProtocolError) as refused:
        m.decode_roster(m.encode_roster(greedy, AGGREGATOR_KEY), AGGREGATOR)
    assert refused.value.reason == "bad-roster"


def test_shares_routed_unmask_round_trip():
    roster, devices = _roster(4)
    setup = roster.setup()
    dealing = devices[1].deal(setup, 1)
    shares = m.Shares(9, DEVICE, dealing)
    assert m.decode_shares(m.encode_shares(shares, DEVICE_KEY), lookup) == shares
    routed = m.Routed(9, DEVICE, 0, (RoutedShare(1, dealing.self_commitments, dealing.key_commitments,
                                                 dealing.ciphertexts[0]),), 1_800_000_100)
    assert m.decode_routed(m.encode_routed(routed, AGGREGATOR_KEY), AGGREGATOR) == routed
    request = m.UnmaskRequest(9, (0, 1, 3), (2,), 1_800_000_200)
    assert m.decode_unmask_request(m.encode_unmask_request(request, AGGREGATOR_KEY), AGGREGATOR) == request
    unmask = m.Unmask(9, DEVICE, Answer({0: 5, 3: 7}, {2: 11}, {2: b"s" * 32}))
    assert m.decode_unmask(m.encode_unmask(unmask, DEVICE_KEY), lookup) == unmask


def test_masked_input_round_trips_without_copying_its_words():
    words = np.arange(1001, dtype=np.uint32) * np.uint32(4_000_037)
    evidence = (Accusation(2, b"K" * 32, b"p" * 64), Accusation(5, b"k" * 32, b"q" * 64))
    body = m.encode_masked(m.MaskedInput(9, DEVICE, words, evidence), DEVICE_KEY)
    decoded = m.decode_masked(body, lookup, words=1001)
    assert np.array_equal(decoded.words, words) and decoded.rejected == evidence
    assert len(body) < 4 * 1001 + 400 + 2 * 102  # 4 bytes a parameter, a small envelope, 102 bytes an accusation


def test_a_masked_input_of_the_wrong_length_is_refused_from_its_payload():
    body = m.encode_masked(m.MaskedInput(9, DEVICE, np.zeros(10, dtype=np.uint32), ()), DEVICE_KEY)
    with pytest.raises(ProtocolError) as refused:
        m.decode_masked(body, lookup, words=11)
    assert refused.value.reason == "wrong-length"
    lying = _resign(body, DEVICE_KEY, DEVICE, {"words": 11})  # claims 11 words, carries 10
    with pytest.raises(ProtocolError) as refused:
        m.decode_masked(lying, lookup, words=11)
    assert refused.value.reason == "wrong-length"


@pytest.mark.parametrize(("rejected", "reason"), [
    ([2, 5], "bad-section"),  # bare indices, as before evidence: an accusation nobody could check
    ([[2, b"K" * 32]], "bad-section"),
    ([[2, b"K" * 32, b"p" * 64, 0]], "bad-section"),
    ([[2, b"K" * 31, b"p" * 64]], "wrong-length"),
    ([[2, b"K" * 32, b"p" * 63]], "wrong-length"),
    ([[5, b"K" * 32, b"p" * 64], [2, b"K" * 32, b"p" * 64]], "bad-section"),
    ([[2, b"K" * 32, b"p" * 64], [2, b"K" * 32, b"p" * 64]], "bad-section"),
    ([[-1, b"K" * 32, b"p" * 64]], "bad-payload"),
    ({"2": 1}, "bad-section"),
])
def test_malformed_evidence_in_a_masked_input_is_refused(rejected, reason):
    body = m.encode_masked(m.MaskedInput(9, DEVICE, np.zeros(4, dtype=np.uint32), ()), DEVICE_KEY)
    with pytest.raises(ProtocolError) as refused:
        m.decode_masked(_resign(body, DEVICE_KEY, DEVICE, {"rejected": rejected}), lookup)
    assert refused.value.reason == reason


def test_a_message_in_the_wrong_phase_is_refused():
    body = m.encode_masked(m.MaskedInput(9, DEVICE, np.zeros(4, dtype=np.uint32), ()), DEVICE_KEY)
    with pytest.raises(ProtocolError) as refused:
        m.decode_masked(_resign(body, DEVICE_KEY, DEVICE, {"phase": "share"}), lookup)
    assert refused.value.reason == "wrong-phase"


def test_a_message_of_another_type_is_refused():
    body = m.encode_advertise(_advertise(), DEVICE_KEY)
    with pytest.raises(ProtocolError) as refused:
        m.decode_shares(body, lookup)
    assert refused.value.reason == "wrong-type"


def test_a_message_signed_by_one_device_for_another_is_refused():
    stranger = SigningKey(bytes(range(64, 96)))
    body = m.encode_unmask(m.Unmask(9, DEVICE, Answer({}, {}, {})), stranger)  # kid DEVICE, stranger's key
    body = _resign(body, stranger, wire.key_id(stranger.verify_key), {})
    with pytest.raises(ProtocolError) as refused:
        m.decode_unmask(body, lambda kid: stranger.verify_key)
    assert refused.value.reason == "kid-mismatch"


def test_a_section_that_does_not_match_its_digest_is_refused():
    body = bytearray(m.encode_unmask(m.Unmask(9, DEVICE, Answer({0: 5}, {}, {})), DEVICE_KEY))
    body[-1] ^= 1
    with pytest.raises(ProtocolError) as refused:
        m.decode_unmask(bytes(body), lookup)
    assert refused.value.reason == "digest-mismatch"


def test_a_tampered_signature_is_refused():
    body = bytearray(m.encode_advertise(_advertise(), DEVICE_KEY))
    body[-5] ^= 1  # inside the signature, the last item of the envelope
    with pytest.raises(ProtocolError) as refused:
        m.decode_advertise(bytes(body), lookup)
    assert refused.value.reason == "bad-signature"


def test_shares_with_a_ciphertext_of_the_wrong_length_are_refused():
    roster, devices = _roster(4)
    dealing = devices[0].deal(roster.setup(), 0)
    dealing.ciphertexts[1] = dealing.ciphertexts[1][:-1]
    with pytest.raises(ProtocolError) as refused:
        m.decode_shares(m.encode_shares(m.Shares(9, DEVICE, dealing), DEVICE_KEY), lookup)
    assert refused.value.reason == "wrong-length"


def test_section_limits_apply_before_decoding():
    answer = Answer({u: 1 for u in range(50)}, {}, {})
    body = m.encode_unmask(m.Unmask(9, DEVICE, answer), DEVICE_KEY)
    with pytest.raises(ProtocolError) as refused:
        m.decode_unmask(body, lookup, wire.Limits(max_container_len=16))
    assert refused.value.reason == "too-long"


def test_the_task_says_when_a_round_is_secure():
    task = wire.Task(round_id=1, model_version=0, model_digest=b"d" * 32, package_digest=b"p" * 32,
                     deadline=100, clip_norm=1.0, issued_at=50, secure_aggregation=True)
    assert wire.decode_task(wire.encode_task(task, AGGREGATOR_KEY), AGGREGATOR).secure_aggregation
    plain = wire.Task(round_id=1, model_version=0, model_digest=b"d" * 32, package_digest=b"p" * 32, deadline=100,
                      issued_at=50)
    body = wire.encode_task(plain, AGGREGATOR_KEY)
    assert b"secagg" not in body  # plain tasks are byte-for-byte what they were
    assert not wire.decode_task(body, AGGREGATOR).secure_aggregation


def _sealed(payload: dict, section: bytes, key: SigningKey, kid: str) -> bytes:
    """A message with any section, its digest signed: so that only the section's own form is wrong."""
    return wire.sign({"v": 1, **payload, "section_sha256": hashlib.sha256(section).digest()}, key, kid) + section


@pytest.mark.parametrize("order", [[1, 0, 2, 3], [0, 1, 1, 3]])
def test_a_roster_out_of_id_order_or_naming_a_device_twice_is_refused(order: list[int]):
    """The roster's order is every device's index, the same on all of them; a device listed twice would take two."""
    roster, _ = _roster()
    shuffled = m.Roster(roster.round_id, tuple(roster.device_ids[i] for i in order),
                        tuple(roster.keys[i] for i in order), roster.neighbours, roster.threshold, roster.levels,
                        roster.max_samples, roster.clip_norm, roster.deadline)
    with pytest.raises(ProtocolError) as refused:
        m.decode_roster(m.encode_roster(shuffled, AGGREGATOR_KEY), AGGREGATOR)
    assert refused.value.reason == "bad-section"


def test_masked_words_in_a_longer_head_than_the_shortest_are_refused():
    """One masked input has one encoding: another would be other bytes, so another digest, for the same words."""
    words = np.arange(10, dtype=np.uint32)
    data = words.astype("<u4").tobytes()
    section = b"\xd8\x46\x59" + len(data).to_bytes(2, "big") + data  # a length of 40 takes one byte (0x58), not two
    payload = {"type": "secagg-masked", "phase": "masked", "round": 9, "device": DEVICE, "words": 10, "rejected": []}
    with pytest.raises(ProtocolError) as refused:
        m.decode_masked(_sealed(payload, section, DEVICE_KEY, DEVICE), lookup, words=10)
    assert refused.value.reason == "bad-section"


@pytest.mark.parametrize("indices", [[2, 1], [1, 1]])
def test_unmask_shares_out_of_order_or_twice_for_one_device_are_refused(indices: list[int]):
    """Two shares for one device would leave one of them to chance (the decoder keeps one)."""
    section = cbor2.dumps({"self_shares": [[u, bytes(32)] for u in indices], "key_shares": [], "pair_seeds": []},
                          canonical=True)
    payload = {"type": "secagg-unmask", "phase": "unmask", "round": 9, "device": DEVICE}
    with pytest.raises(ProtocolError) as refused:
        m.decode_unmask(_sealed(payload, section, DEVICE_KEY, DEVICE), lookup)
    assert refused.value.reason == "bad-section"


def test_a_masked_input_declaring_more_words_than_any_model_has_is_refused_from_its_payload():
    """The declared length is bounded by the tensor limit (P + 1 words) before the section is hashed or read."""
    body = m.encode_masked(m.MaskedInput(9, DEVICE, np.zeros(4, dtype=np.uint32), ()), DEVICE_KEY)
    huge = _resign(body, DEVICE_KEY, DEVICE, {"words": wire.DEFAULT_LIMITS.max_tensor_elements + 2})
    with pytest.raises(ProtocolError) as refused:
        m.decode_masked(huge, lookup)
    assert refused.value.reason == "bad-payload" and "words" in refused.value.detail


@pytest.mark.parametrize("change", [
    {"clip_norm": float("nan")},  # the quantisation bound every device clips to
    {"noise_sigma": float("inf")},  # distributed DP's noise
    {"noise_sigma": -1.0},
])
def test_a_roster_whose_parameters_no_device_can_compute_with_is_refused(change: dict):
    roster, _ = _roster()
    body = m.encode_roster(roster, AGGREGATOR_KEY)
    with pytest.raises(ProtocolError) as refused:
        m.decode_roster(_resign(body, AGGREGATOR_KEY, wire.key_id(AGGREGATOR), change), AGGREGATOR)
    assert refused.value.reason == "bad-payload"



def _payload_of(body: bytes) -> dict:
    """The signed payload of an encoded message, without its ``v`` and ``section_sha256`` (which _sealed adds)."""
    payload = dict(cbor2.loads(cbor2.loads(body).value[2]))
    payload.pop("v")
    payload.pop("section_sha256", None)
    return payload


@pytest.mark.parametrize("order", [[3, 1], [1, 1]])
def test_an_unmask_request_with_survivors_out_of_order_or_named_twice_is_refused(order: list[int]):
    """Each survivor answers once: a survivor named twice would be counted twice towards the threshold."""
    section = cbor2.dumps({"survivors": order, "dropped": [2]}, canonical=True)
    payload = {"type": "secagg-unmask-request", "phase": "unmask", "round": 9, "deadline": 1_800_000_200}
    with pytest.raises(ProtocolError) as refused:
        m.decode_unmask_request(_sealed(payload, section, AGGREGATOR_KEY, wire.key_id(AGGREGATOR)), AGGREGATOR)
    assert refused.value.reason == "bad-section" and "'survivors'" in refused.value.detail


@pytest.mark.parametrize("length", [31, 33])
def test_a_roster_entry_with_a_key_of_another_length_is_refused(length: int):
    """Keys() itself refuses a key of another length (SecAggError), so the roster is built here on the wire: the
    decoder must refuse it as a ProtocolError naming the entry's form, not let a SecAggError escape."""
    roster, _ = _roster()
    entries = [[d, k.cipher, k.mask] for d, k in zip(roster.device_ids, roster.keys, strict=True)]
    entries[1][2] = bytes(length)
    section = cbor2.dumps({"devices": entries}, canonical=True)
    payload = _payload_of(m.encode_roster(roster, AGGREGATOR_KEY))
    with pytest.raises(ProtocolError) as refused:
        m.decode_roster(_sealed(payload, section, AGGREGATOR_KEY, wire.key_id(AGGREGATOR)), AGGREGATOR)
    assert refused.value.reason == "bad-section" and "32-byte key" in refused.value.detail


def _routed_body() -> bytes:
    roster, devices = _roster(4)
    dealing = devices[1].deal(roster.setup(), 1)
    share = RoutedShare(1, dealing.self_commitments, dealing.key_commitments, dealing.ciphertexts[0])
    return m.encode_routed(m.Routed(9, DEVICE, 0, (share,), 1_800_000_100), AGGREGATOR_KEY)


@pytest.mark.parametrize("device", [5, None, b"device"])
def test_a_routed_message_whose_recipient_is_not_text_is_refused(device):
    """The recipient is the device the dealings are for: a routed message naming no device is nobody's."""
    body = _resign(_routed_body(), AGGREGATOR_KEY, wire.key_id(AGGREGATOR), {"device": device})
    with pytest.raises(ProtocolError) as refused:
        m.decode_routed(body, AGGREGATOR)
    assert refused.value.reason == "bad-payload" and "'device'" in refused.value.detail


@pytest.mark.parametrize("dealers", [[2, 1], [1, 1]])
def test_routed_dealings_out_of_dealer_order_or_twice_from_one_dealer_are_refused(dealers: list[int]):
    """Two dealings from one dealer would leave the recipient to pick one of them: devices could disagree."""
    point = bytes(32)
    section = cbor2.dumps({"dealings": [[d, point, point, b"c" * 8] for d in dealers]}, canonical=True)
    payload = _payload_of(_routed_body())
    with pytest.raises(ProtocolError) as refused:
        m.decode_routed(_sealed(payload, section, AGGREGATOR_KEY, wire.key_id(AGGREGATOR)), AGGREGATOR)
    assert refused.value.reason == "bad-section" and "dealer order" in refused.value.detail


@pytest.mark.parametrize("dealing", [
    [1, bytes(32), bytes(32)],  # no ciphertext
    [1, bytes(32), bytes(32), b"c" * 8, b"more"],  # a fifth item
    [1, bytes(32), bytes(32), 8],  # a ciphertext that is a number: bytes(8) would make it eight zero bytes
    [1, bytes(32), bytes(32), "c" * 8],  # a ciphertext that is text
], ids=["three-items", "five-items", "ciphertext-a-number", "ciphertext-text"])
def test_a_routed_dealing_not_of_four_items_ending_in_a_byte_string_is_refused(dealing: list):
    section = cbor2.dumps({"dealings": [dealing]}, canonical=True)
    payload = _payload_of(_routed_body())
    with pytest.raises(ProtocolError) as refused:
        m.decode_routed(_sealed(payload, section, AGGREGATOR_KEY, wire.key_id(AGGREGATOR)), AGGREGATOR)
    assert refused.value.reason == "bad-section" and "a dealing is" in refused.value.detail


@pytest.mark.parametrize("section", [
    cbor2.dumps(bytes(40)),  # the right bytes, untagged
    cbor2.dumps(cbor2.CBORTag(70, "x" * 40)),  # tag 70 over text, not a byte string
], ids=["untagged", "tagged-text"])
def test_masked_words_that_are_not_a_uint32_typed_array_are_refused(section: bytes):
    payload = {"type": "secagg-masked", "phase": "masked", "round": 9, "device": DEVICE, "words": 10, "rejected": []}
    with pytest.raises(ProtocolError) as refused:
        m.decode_masked(_sealed(payload, section, DEVICE_KEY, DEVICE), lookup, words=10)
    assert refused.value.reason == "bad-section" and "tag 70" in refused.value.detail
