"""A secure-aggregation round, played with the pure protocol: the unmasked sum is exactly the plain sum of the
survivors' quantised inputs, whatever drops out after which phase; bad shares cost their dealer its
contribution, never the round; devices refuse unmask requests that would expose one of them."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.protocol.quantise import dequantise
from appliance.protocol.secagg import DeviceRound, SecAggError
from tests.secagg_sim import CLIP, MAX_SAMPLES, PHASES, make_setup, play, routed_to


def _assert_exact(outcome):
    assert np.array_equal(outcome.unmasked, outcome.expected)
    assert len(outcome.plan.survivors) >= 2


@pytest.mark.parametrize("n", [3, 4, 10, 30])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_the_unmasked_sum_is_the_plain_sum(n, phase, rate):
    # up to 30 devices the default degree is (nearly) the complete graph: 30 % may vanish even during unmasking
    outcome = play(n, drop_phase=phase, drop_rate=rate, neighbours=n - 1 if phase == "masked" else None, seed=n)
    _assert_exact(outcome)
    gone = round(rate * n)
    if phase == "masked":
        assert len(outcome.plan.survivors) == n  # they sent their inputs: they count, though they went quiet
    else:
        assert len(outcome.plan.survivors) + len(outcome.plan.excluded) == n - gone


@pytest.mark.parametrize(("phase", "rate", "neighbours"), [
    ("advertise", 0.3, None),
    ("share", 0.3, None),
    ("masked", 0.1, None),
    # vanishing during unmasking needs t of each survivor's holders to answer: a wider graph (200 devices
    # checking 60 dealings each take about half a minute)
    pytest.param("masked", 0.3, 60, marks=pytest.mark.slow),
])
def test_two_hundred_devices_on_the_secagg_plus_graph(phase, rate, neighbours):
    outcome = play(200, parameters=16, drop_phase=phase, drop_rate=rate, neighbours=neighbours, seed=2)
    assert outcome.setup.neighbours < 199
    _assert_exact(outcome)
    assert len(outcome.plan.survivors) >= 0.6 * 200


def test_the_sum_reads_back_as_the_weighted_sum_of_the_updates():
    outcome = play(12, parameters=500, drop_phase="share", drop_rate=0.25, seed=5)
    weighted, weight = dequantise(outcome.unmasked, clip_norm=CLIP, levels=outcome.setup.levels,
                                  max_samples=MAX_SAMPLES)
    survivors = outcome.plan.survivors
    weights = [int(outcome.plain[v][-1]) for v in survivors]
    assert weight == sum(weights)
    def clipped(delta):
        delta = delta.astype(np.float64)
        return delta * min(1.0, CLIP / np.linalg.norm(delta))

    reference = sum(w * clipped(outcome.deltas[v]) for v, w in zip(survivors, weights, strict=True))
    step = MAX_SAMPLES * CLIP / outcome.setup.levels
    assert np.max(np.abs(weighted - reference)) <= len(survivors) * step


def test_a_dealer_whose_ciphertext_does_not_open_loses_only_its_own_contribution():
    outcome = play(10, garbled={3: {4}}, neighbours=9, seed=1)
    _assert_exact(outcome)
    assert 3 in outcome.plan.excluded and 3 not in outcome.plan.survivors
    assert len(outcome.plan.survivors) == 9


def test_a_dealer_with_shares_off_its_polynomial_loses_only_its_own_contribution():
    outcome = play(10, inconsistent={6: {1, 2}}, neighbours=9, seed=3)
    _assert_exact(outcome)
    assert outcome.plan.excluded == [6]
    assert len(outcome.plan.survivors) == 9


def test_a_holder_answering_with_wrong_shares_is_ignored():
    outcome = play(10, lying_holders={2}, seed=4)
    _assert_exact(outcome)
    assert outcome.report.bad_holders == {2}


def test_too_few_shares_is_an_error_never_a_wrong_sum():
    with pytest.raises(SecAggError, match="too-few-shares"):
        play(30, drop_phase="masked", drop_rate=0.6, neighbours=6, seed=0)


# ------------------------------------------------------------------------------------------ unmask refusals


def _dealt_round(n: int = 5):
    devices = [DeviceRound(7) for _ in range(n)]
    setup = make_setup(devices)
    dealings = {i: d.deal(setup, i) for i, d in enumerate(devices)}
    for i, d in enumerate(devices):
        assert d.receive(routed_to(setup, dealings, i)) == []
    return devices


def test_a_device_refuses_to_give_both_kinds_of_share_for_one_device():
    device = _dealt_round()[0]
    with pytest.raises(SecAggError, match="both survivor and dropped"):
        device.answer([0, 1, 2, 3], [3, 4])


def test_a_device_refuses_a_second_request_naming_a_device_the_other_way():
    device = _dealt_round()[0]
    first = device.answer([0, 1, 2, 3], [4])
    assert 4 in first.key_shares and 4 in first.pair_seeds and 4 not in first.self_shares
    again = device.answer([0, 1, 2, 3], [4])  # the same request again (an aggregator restart) is answered
    assert again == first
    with pytest.raises(SecAggError, match="other way"):
        device.answer([0, 1, 2, 4], [3])


def test_a_device_refuses_when_fewer_than_t_survive():
    device = _dealt_round()[0]
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        device.answer([0], [1, 2, 3, 4])


def test_a_device_not_in_the_roster_cannot_deal():
    devices = [DeviceRound(7) for _ in range(4)]
    setup = make_setup(devices)
    with pytest.raises(SecAggError, match="not-in-roster"):
        DeviceRound(7).deal(setup, 0)
    with pytest.raises(SecAggError, match="not-in-roster"):
        DeviceRound(8).deal(setup, 0)
