"""The secure round's Diffie-Hellman agreements with X25519 (docs/protocol.md 12.2): a device multiplies with the
Montgomery ladder, the aggregator (from a secret it rebuilt mod L) and an accusation's proof on the Ed25519 group;
every seed and channel key must come out bit for bit the same, and a roster key that has no X25519 value is
refused with a reason naming its device, never a traceback."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from nacl.bindings import crypto_core_ed25519_add, crypto_scalarmult_base

from appliance import wire
from appliance.protocol import shamir, x25519
from appliance.protocol.quantise import quantise
from appliance.protocol.secagg import (
    DeviceRound,
    RoundSetup,
    SecAggError,
    channel_box,
    masked_with,
    pairwise_mask_seed,
    plan_unmask,
    unmask_total,
)
from appliance.secagg_client import SecAggDropped, SecureRound
from tests.secagg_sim import CLIP, MAX_SAMPLES, ORDER_8, ROUND, make_setup, routed_to

# ------------------------------------------------------------------------------------------------ primitives


def test_the_u_coordinate_of_the_base_point_is_curve25519s_base_point_9():
    """RFC 7748 section 4.1: the Ed25519 base point maps to u = 9."""
    assert x25519.u_coordinate(shamir.base_point_times(1)) == (9).to_bytes(32, "little")


def test_x25519_of_a_clamped_scalar_is_the_u_of_the_group_multiplication_by_it_mod_l():
    for _ in range(50):
        c = x25519.clamped_scalar(os.urandom)
        scalar = x25519.group_scalar(c)
        assert 0 < scalar < shamir.L
        assert c[0] & 7 == 0 and c[31] >> 6 == 1  # RFC 7748 clamping: a multiple of 8 in [2^254, 2^255)
        point = shamir.base_point_times(shamir.random_scalar())
        assert x25519.shared_u(c, x25519.u_coordinate(point)) == x25519.u_coordinate(shamir.point_times(scalar, point))
        assert crypto_scalarmult_base(c) == x25519.u_coordinate(shamir.base_point_times(scalar))


def test_u_coordinates_of_many_keys_at_once_are_each_ones_own():
    points = [shamir.base_point_times(shamir.random_scalar()) for _ in range(29)]
    assert x25519.u_coordinates(points) == [x25519.u_coordinate(p) for p in points]
    assert x25519.u_coordinates([]) == []


def test_an_encoding_with_no_u_is_refused_with_its_position():
    good = shamir.base_point_times(5)
    for bad, why in ((b"\x01" + bytes(31), "identity"), ((2**255 - 19).to_bytes(32, "little"), "not below p")):
        with pytest.raises(x25519.InvalidKey, match=why) as refused:
            x25519.u_coordinates([good, good, bad])
        assert refused.value.position == 2


# ------------------------------------------------------------------ the same bytes at both ends and at the aggregator


def _dealt(n: int = 4):
    devices = [DeviceRound(ROUND) for _ in range(n)]
    setup = make_setup(devices)
    return devices, setup, {i: d.deal(setup, i) for i, d in enumerate(devices)}


def test_a_devices_pairwise_seed_is_the_one_the_aggregator_makes_from_its_partners_rebuilt_secret():
    """Device i makes s_ij with X25519 from its clamped r_i; the aggregator, once it has rebuilt r_j mod L from
    shares, multiplies R_i by it on the Ed25519 group and takes u. The two must be the same 32 bytes."""
    devices, setup, _ = _dealt()
    for i, device in enumerate(devices):
        for j in setup.graph[i]:
            rebuilt = devices[j]._mask_secret  # what Shamir shares and the aggregator rebuilds: r_j mod L
            expected = pairwise_mask_seed(ROUND, j, i,
                                          x25519.u_coordinate(shamir.point_times(rebuilt, setup.keys[i].mask)))
            assert device._pair_seeds[j] == expected == devices[j]._pair_seeds[i]


def test_the_channel_key_from_x25519_is_the_one_the_aggregator_derives_from_the_accusations_point():
    """An accusation carries the channel's Ed25519 point K, made on the rare path with the group's multiplication;
    the aggregator keys the channel with u(K). That key must open what the dealer sealed under its X25519 key."""
    devices, setup, dealings = _dealt()
    accuser, dealer = 0, 2
    evidence = devices[accuser].accusation(dealer)
    k_u = x25519.u_coordinate(evidence.channel_point)
    assert k_u == devices[accuser]._channel(dealer)[0] == devices[dealer]._channel(accuser)[0]
    plain = channel_box(setup, accuser, dealer, k_u).decrypt(dealings[dealer].ciphertexts[accuser])
    assert plain[:16] == ROUND.to_bytes(8, "big") + dealer.to_bytes(4, "big") + accuser.to_bytes(4, "big")


def test_the_sum_is_exact_when_the_aggregator_must_rebuild_a_dropped_devices_mask_key():
    """Device 0 deals and drops out; device 1 sends its masked input and goes quiet. Nobody hands the aggregator
    1's seed with 0, so it rebuilds r_0 mod L from t shares and recomputes that seed on the Ed25519 group: the sum
    is exact only if it is bit for bit the seed device 1 made with X25519."""
    n, parameters = 6, 32
    devices, setup, dealings = _dealt(n)
    rng = np.random.default_rng(3)
    total = np.zeros(parameters + 1, dtype=np.uint32)
    expected = np.zeros(parameters + 1, dtype=np.uint32)
    for i in range(1, n):
        assert devices[i].receive(routed_to(setup, dealings, i)) == []
        delta = rng.normal(0, 0.05, parameters).astype(np.float32)
        samples = int(rng.integers(1, MAX_SAMPLES))
        total += devices[i].mask(delta, samples, np.random.default_rng(i))
        expected += quantise(delta, samples, clip_norm=CLIP, levels=setup.levels, max_samples=MAX_SAMPLES,
                             rng=np.random.default_rng(i))
    accusations = {i: () for i in range(1, n)}
    plan = plan_unmask(setup, dealings, accusations)
    assert plan.survivors == [1, 2, 3, 4, 5] and plan.dropped == [0]
    answers = {v: devices[v].answer(plan.survivors, plan.dropped) for v in range(2, n)}  # 1 is quiet
    commitments = {u: (d.self_commitments, d.key_commitments) for u, d in dealings.items()}
    report = unmask_total(total, setup, plan, masked_with(setup, set(dealings), accusations), commitments, answers)
    assert report.rebuilt_keys == {0}
    assert np.array_equal(total, expected)


# -------------------------------------------------------------------------------------------- hostile keys

# Roster keys with no X25519 value: the identity (no u), y not below p, and points of order 2, 4 and 8 (X25519
# refuses them: libsodium's list of small-order u, or an all-zero result). The aggregator refuses every one of them
# at advertise (tests/test_secagg_hostile.py); a device given one anyway refuses the roster.
NO_SHARED_SECRET = [bytes.fromhex(h) for h in (
    "01" + "00" * 31, "ee" + "ff" * 30 + "7f", "ec" + "ff" * 30 + "7f", "00" * 32, "00" * 31 + "80",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
)]  # fmt: skip


def _with_key(setup: RoundSetup, device: int, which: str, key: bytes) -> RoundSetup:
    keys = list(setup.keys)
    keys[device] = dataclasses.replace(keys[device], **{which: key})
    return dataclasses.replace(setup, keys=tuple(keys))


@pytest.mark.parametrize("which", ["cipher", "mask"])
@pytest.mark.parametrize("key", NO_SHARED_SECRET, ids=lambda k: k.hex()[:8])
def test_a_roster_with_a_neighbour_key_that_gives_no_shared_secret_is_refused_naming_the_device(which, key):
    devices = [DeviceRound(ROUND) for _ in range(3)]
    setup = _with_key(make_setup(devices), 2, which, key)
    with pytest.raises(SecAggError) as refused:
        devices[0].deal(setup, 0)
    assert refused.value.reason == "bad-roster"
    assert f"device 2's {which} key is not a point of the prime-order group" in refused.value.detail


def test_a_device_that_cannot_prove_its_channel_with_a_rejected_neighbour_leaves_the_round_with_a_reason():
    """A cipher key with a torsion component (only a roster the aggregator did not check can hold one) still gives
    X25519 a value, but the accusation's point must be in the prime-order group: the device leaves the round
    (bad-roster) instead of failing with a traceback."""
    devices = [DeviceRound(ROUND) for _ in range(3)]
    honest = make_setup(devices)
    setup = _with_key(honest, 2, "cipher", crypto_core_ed25519_add(honest.keys[2].cipher, ORDER_8))
    devices[0].deal(setup, 0)
    with pytest.raises(SecAggError) as refused:
        devices[0].accusation(2)
    assert refused.value.reason == "bad-roster" and "device 2's cipher key" in refused.value.detail

    task = wire.Task(ROUND, 1, bytes(32), bytes(32), deadline=2_000_000_000, clip_norm=CLIP, secure_aggregation=True)
    secure = SecureRound(None, task, "device-0", None)  # masked_input sends nothing: no transport, no signing
    secure.device, secure.rejected = devices[0], [2]
    with pytest.raises(SecAggDropped) as dropped:
        secure.masked_input(np.zeros(4, dtype=np.float32), 1)
    assert dropped.value.reason == "bad-roster"


# ------------------------------------------------------------------------- the worked example, as a stranger reads it


def test_the_worked_examples_pairwise_seed_follows_from_its_printed_numbers_with_another_x25519():
    """docs/protocol.md 12.9 prints r_A, R_B, u(R_B), X25519(r_A, u(R_B)) and s_AB. Recomputed from those numbers
    alone, with the documented formulas and OpenSSL's X25519 (not libsodium's, which wrote them), they must agree:
    what a second implementation reading 12.2 and 12.5 would get."""
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()

    def printed(label: str) -> bytes:
        return bytes.fromhex(re.search(re.escape(label) + r"\s+=?\s*([0-9a-f]{64})", doc).group(1))

    r_a, r_b_point = printed("r_A, a clamped X25519 scalar"), printed("R_B (B's mask_key)")
    y = int.from_bytes(r_b_point, "little") & (2**255 - 1)
    u = ((1 + y) * pow(1 - y, -1, x25519.P) % x25519.P).to_bytes(32, "little")
    assert u == printed("u(R_B) = (1 + y) / (1 - y) mod p")
    shared = X25519PrivateKey.from_private_bytes(r_a).exchange(X25519PublicKey.from_public_bytes(u))
    assert shared == printed("X25519(r_A, u(R_B))")
    low_high = re.search(r"s_AB = SHA-256\(.*\|\| round \|\| (\d+) \(B, the lower index\) \|\| (\d+) \(A\)", doc)
    low, high = int(low_high.group(1)), int(low_high.group(2))
    seed = hashlib.sha256(b"fl-edge/secagg/v1/pairwise-mask" + ROUND.to_bytes(8, "big") + low.to_bytes(4, "big")
                          + high.to_bytes(4, "big") + shared).digest()
    assert seed == printed("|| u)\n")
