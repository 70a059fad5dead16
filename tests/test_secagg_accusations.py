"""Accusations in a secure round (docs/protocol.md 12.5, 12.6): a device that rejects a dealer's shares carries the
share channel's Diffie-Hellman point and a DLEQ proof, and the aggregator opens the dealer's signed ciphertext with
it. Whoever is lying loses its own contribution: a device that accuses honest neighbours is left out and they
count; a dealer whose shares were bad is left out and its accuser counts. Forged evidence convicts its maker."""

from __future__ import annotations

import numpy as np
import pytest
from nacl.bindings import crypto_core_ed25519_add
from nacl.secret import SecretBox

from appliance.protocol import dleq, secagg, shamir, x25519
from appliance.protocol.secagg import (
    Accusation,
    DeviceRound,
    SecAggError,
    accusation_holds,
    judge,
    plan_unmask,
    share_key,
)
from tests.secagg_sim import ORDER_8, make_setup, play, routed_to, seeded_entropy

# ------------------------------------------------------------------------------------------ the whole round


def test_a_device_accusing_every_neighbour_is_left_out_and_they_all_count():
    """The liar names all k of its neighbours, with genuine channel points and proofs, and masks with none of them.
    Before, every named dealer was left out (k honest contributions gone); now their ciphertexts show good shares,
    so only the liar's input is left out and the sum is exactly the plain sum over everyone else."""
    n, liar = 12, 5
    outcome = play(n, neighbours=6, seed=11, false_accusations={liar: set(range(n)) - {liar}})
    named = set(outcome.setup.graph[liar])
    assert len(named) == 6
    assert outcome.plan.survivors == [v for v in range(n) if v != liar]
    assert outcome.plan.excluded == [liar]
    assert outcome.plan.verdicts.false_accusers == {liar} and not outcome.plan.verdicts.cheating_dealers
    assert outcome.plan.exclusion_reason(liar) == "false-accusation"
    assert np.array_equal(outcome.unmasked, outcome.expected)
    everyone_else = sum((outcome.plain[v] for v in range(n) if v != liar), np.zeros_like(outcome.plain[0]))
    assert np.array_equal(outcome.unmasked, everyone_else)


def test_several_liars_cannot_push_a_round_below_its_threshold():
    """Three devices of seven each accuse all their neighbours: before, that left nobody; now the four honest
    devices are summed."""
    liars = {0, 3, 6}
    outcome = play(7, neighbours=6, seed=2, false_accusations={v: set(range(7)) - {v} for v in liars})
    assert outcome.plan.survivors == [1, 2, 4, 5]
    assert set(outcome.plan.excluded) == liars
    assert np.array_equal(outcome.unmasked, outcome.expected)


def test_a_dealer_with_a_bad_share_for_one_neighbour_is_left_out_and_its_accuser_counts():
    outcome = play(10, inconsistent={6: {1}}, neighbours=9, seed=3)
    assert outcome.plan.excluded == [6]
    assert outcome.plan.verdicts.held == {(1, 6)} and not outcome.plan.verdicts.false_accusers
    assert outcome.plan.exclusion_reason(6) == "bad-shares"
    assert 1 in outcome.plan.survivors and len(outcome.plan.survivors) == 9
    assert np.array_equal(outcome.unmasked, outcome.expected)


def test_a_dealer_whose_ciphertext_does_not_open_under_the_proven_key_is_left_out():
    outcome = play(8, garbled={2: {5}}, neighbours=7, seed=9)
    assert outcome.plan.excluded == [2]
    assert outcome.plan.verdicts.held == {(5, 2)}
    assert np.array_equal(outcome.unmasked, outcome.expected)


# ---------------------------------------------------------------------------------------- one accusation


def _dealt(n: int = 5, entropy_label: str = "accusations"):
    devices = [DeviceRound(7, seeded_entropy(f"{entropy_label} {i}")) for i in range(n)]
    setup = make_setup(devices)
    dealings = {i: d.deal(setup, i) for i, d in enumerate(devices)}
    for i, d in enumerate(devices):
        assert d.receive(routed_to(setup, dealings, i)) == []
    return devices, setup, dealings


def test_genuine_evidence_against_an_honest_dealer_convicts_the_accuser():
    devices, setup, dealings = _dealt()
    accusation = devices[0].accusation(1)
    assert not accusation_holds(setup, 0, accusation, dealings[1])
    plan = plan_unmask(setup, dealings, {v: (accusation,) if v == 0 else () for v in range(5)})
    assert plan.excluded == [0] and plan.survivors == [1, 2, 3, 4]


def test_a_ciphertext_sealed_under_another_key_convicts_the_dealer():
    devices, setup, dealings = _dealt()
    plain = devices[0]._channel(1)[1].decrypt(dealings[1].ciphertexts[0])
    dealings[1].ciphertexts[0] = bytes(SecretBox(bytes(32)).encrypt(plain, bytes(24)))  # right size, wrong key
    assert devices[0].receive(routed_to(setup, dealings, 0)) == [1]
    assert accusation_holds(setup, 0, devices[0].accusation(1), dealings[1])


@pytest.mark.parametrize("forgery", [
    "a random point as K",
    "K of another channel",
    "K with a torsion component",
    "the proof of an accusation against another dealer",
    "a proof made with another secret",
    "a proof with one bit flipped",
    "a proof for another round",
])
def test_forged_evidence_convicts_the_accuser(forgery):
    """Whatever the dealer did, evidence that does not prove its point convicts the accuser: against an honest
    dealer, and against one whose ciphertext to the accuser does not even open (so no forged key can frame a dealer,
    and none can excuse a liar)."""
    devices, setup, dealings = _dealt()
    me, dealer, other = 0, 1, 2
    genuine = devices[me].accusation(dealer)
    k_point, proof = genuine.channel_point, genuine.proof
    if forgery == "a random point as K":
        k_point = shamir.base_point_times(12345)
    elif forgery == "K of another channel":
        k_point = devices[me].accusation(other).channel_point
    elif forgery == "K with a torsion component":
        k_point = crypto_core_ed25519_add(k_point, ORDER_8)
    elif forgery == "the proof of an accusation against another dealer":
        k_point, proof = devices[me].accusation(other).channel_point, devices[me].accusation(other).proof
    elif forgery == "a proof made with another secret":
        proof = dleq.prove(7, me, dealer, devices[3]._cipher_secret, setup.keys[dealer].cipher, seeded_entropy("w"))
        k_point = shamir.point_times(devices[3]._cipher_secret, setup.keys[dealer].cipher)
    elif forgery == "a proof with one bit flipped":
        proof = proof[:40] + bytes([proof[40] ^ 1]) + proof[41:]
    elif forgery == "a proof for another round":
        proof = dleq.prove(8, me, dealer, devices[me]._cipher_secret, setup.keys[dealer].cipher, seeded_entropy("w"))
    forged = Accusation(dealer, k_point, proof)
    assert not accusation_holds(setup, me, forged, dealings[dealer])
    broken = bytearray(dealings[dealer].ciphertexts[me])
    broken[-1] ^= 1
    dealings[dealer].ciphertexts[me] = bytes(broken)
    assert accusation_holds(setup, me, genuine, dealings[dealer])  # the truth still convicts the dealer
    assert not accusation_holds(setup, me, forged, dealings[dealer])
    verdicts = judge(setup, dealings, {me: (forged,)})
    assert verdicts.false_accusers == {me} and not verdicts.cheating_dealers


def test_an_accusation_of_a_device_that_is_no_neighbour_convicts_the_accuser():
    devices = [DeviceRound(7) for _ in range(8)]
    setup = make_setup(devices, neighbours=2)
    dealings = {i: d.deal(setup, i) for i, d in enumerate(devices)}
    stranger = next(v for v in range(1, 8) if v not in setup.graph[0])
    made_up = Accusation(stranger, shamir.point_times(devices[0]._cipher_secret, setup.keys[stranger].cipher),
                         dleq.prove(7, 0, stranger, devices[0]._cipher_secret, setup.keys[stranger].cipher,
                                    seeded_entropy("w")))
    assert not accusation_holds(setup, 0, made_up, dealings[stranger])


# ------------------------------------------------------------------------------ what an accusation reveals


def _garble(dealings, dealer: int, recipient: int) -> None:
    broken = bytearray(dealings[dealer].ciphertexts[recipient])
    broken[-1] ^= 1
    dealings[dealer].ciphertexts[recipient] = bytes(broken)


def _shares_revealed(setup, dealings, accuser: int, accusations) -> dict[int, int]:
    """What the aggregator can read with the channel points of ``accusations``: the accuser's own shares of its mask
    key r, from the ciphertexts the accuser dealt to the accused (holder x -> share)."""
    revealed = {}
    for a in accusations:
        box = SecretBox(share_key(setup.round_id, accuser, a.dealer, x25519.u_coordinate(a.channel_point)))
        plain = box.decrypt(dealings[accuser].ciphertexts[a.dealer])
        revealed[a.dealer + 1] = int.from_bytes(plain[48:80], "little")
    return revealed


def test_t_accusations_would_reveal_the_accusers_mask_key_so_a_device_leaves_instead():
    """Each accusation opens one channel both ways, and with it the accuser's shares dealt down that channel. t of
    them would give the aggregator t shares of the accuser's mask key r and of its self-mask seed b: its input. So
    a device that t dealers send bad shares (here three, t = 3) leaves the round instead of accusing them."""
    devices, setup, dealings = _dealt()
    assert setup.threshold == 3
    for dealer in (1, 2, 3):
        _garble(dealings, dealer, 0)
    revealed = _shares_revealed(setup, dealings, 0, [devices[0].accusation(d) for d in (1, 2, 3)])
    assert shamir.reconstruct(revealed) == devices[0]._mask_secret  # why the device must not send these
    with pytest.raises(SecAggError, match="too-many-rejected"):
        devices[0].receive(routed_to(setup, dealings, 0))


def test_fewer_than_t_bad_dealers_are_all_accused():
    devices, setup, dealings = _dealt()
    for dealer in (1, 2):
        _garble(dealings, dealer, 0)
    assert devices[0].receive(routed_to(setup, dealings, 0)) == [1, 2]
    accusations = [devices[0].accusation(d) for d in (1, 2)]
    assert judge(setup, dealings, {0: accusations}).cheating_dealers == {1, 2}
    revealed = _shares_revealed(setup, dealings, 0, accusations)
    assert shamir.reconstruct(revealed) != devices[0]._mask_secret  # t - 1 shares say nothing about it


# ---------------------------------------------------------------------------------------- the cost of judging


def _counting_judgements(monkeypatch) -> list[tuple[int, int]]:
    """The (accuser, dealer) accusations the aggregator judges, each one DLEQ check and up to two Feldman checks
    of the dealer's t commitments (0.11 s at N = 1000 on the complete graph, t = 501)."""
    judged: list[tuple[int, int]] = []
    real = secagg.accusation_holds

    def counting(setup, accuser, accusation, dealing):
        judged.append((accuser, accusation.dealer))
        return real(setup, accuser, accusation, dealing)

    monkeypatch.setattr(secagg, "accusation_holds", counting)
    return judged


def test_a_dealer_that_cheats_every_neighbour_is_judged_once(monkeypatch):
    """Its k neighbours all accuse it, rightly. One judgement convicts it; the others need none (their accusers
    did not mask with it, which is all the sum needs). Judging all k made one hostile device cost the aggregator
    k judgements: 999 x 0.11 s, nearly two minutes of its event loop, at N = 1000 on the complete graph."""
    judged = _counting_judgements(monkeypatch)
    n, cheat = 10, 6
    outcome = play(n, inconsistent={cheat: set(range(n)) - {cheat}}, neighbours=n - 1, seed=5)
    assert outcome.plan.excluded == [cheat] and outcome.plan.exclusion_reason(cheat) == "bad-shares"
    assert judged == [(0, cheat)]
    assert np.array_equal(outcome.unmasked, outcome.expected)


def test_a_device_accusing_every_neighbour_is_judged_once(monkeypatch):
    judged = _counting_judgements(monkeypatch)
    n, liar = 10, 3
    outcome = play(n, neighbours=n - 1, seed=6, false_accusations={liar: set(range(n)) - {liar}})
    assert outcome.plan.excluded == [liar] and outcome.plan.exclusion_reason(liar) == "false-accusation"
    assert judged == [(liar, 0)]
    assert np.array_equal(outcome.unmasked, outcome.expected)


def test_the_judgement_does_not_depend_on_the_order_masked_inputs_arrived():
    """The aggregator judges again after a restart, from its stored messages, read in another order."""
    n = 9
    devices = [DeviceRound(7, seeded_entropy(f"order {i}")) for i in range(n)]
    setup = make_setup(devices)
    dealings = {i: d.deal(setup, i) for i, d in enumerate(devices)}
    _garble(dealings, 2, 0)
    _garble(dealings, 2, 5)
    for i, d in enumerate(devices):
        d.receive(routed_to(setup, dealings, i))
    accusations = {0: (devices[0].accusation(2),), 5: (devices[5].accusation(2),), 7: (devices[7].accusation(4),)}
    arrived = judge(setup, dealings, accusations)
    restarted = judge(setup, dealings, dict(reversed(accusations.items())))
    assert arrived == restarted
    assert arrived.cheating_dealers == {2} and arrived.false_accusers == {7}
