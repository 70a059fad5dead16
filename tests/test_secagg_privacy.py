"""The curious aggregator, played with the pure protocol: what it holds of one device tells it nothing about that
device's update, and fewer than t shares do not unmask it (with t shares, the same steps do: the control)."""

from __future__ import annotations

import numpy as np

from appliance.protocol import prg, shamir
from appliance.protocol.quantise import quantise
from appliance.protocol.secagg import DeviceRound, self_mask_seed, x_of
from tests.secagg_sim import ROUND, make_setup, routed_to

P = 100_000
CHI2_LIMIT = 400.0  # 255 degrees of freedom: mean 255, sd 22.6; 400 is beyond p = 1e-9


def _top_byte_chi2(words: np.ndarray) -> float:
    counts = np.bincount((words >> 24).astype(np.int64), minlength=256)
    expected = words.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _correlation(words: np.ndarray, update: np.ndarray) -> float:
    """Pearson correlation of the words, read as the signed integers the aggregator decodes, with the update."""
    return float(np.corrcoef(words.view(np.int32).astype(np.float64), update.astype(np.float64))[0, 1])


def _round_with_one_update(update: np.ndarray, n: int = 6):
    devices = [DeviceRound(ROUND) for _ in range(n)]
    setup = make_setup(devices)
    dealings = {i: d.deal(setup, i) for i, d in enumerate(devices)}
    for i, d in enumerate(devices):
        d.receive(routed_to(setup, dealings, i))
    plain = quantise(update, 100, clip_norm=1.0, levels=setup.levels, max_samples=1000,
                     rng=np.random.default_rng(0))
    masked = devices[0].mask(update, 100, np.random.default_rng(0))
    return devices, setup, plain, masked


def test_one_masked_input_is_uniform_and_uncorrelated_with_the_update():
    ramp = np.linspace(-1, 1, P).astype(np.float32) / np.sqrt(P / 3)  # a strongly structured update, norm ~1
    _, _, plain, masked = _round_with_one_update(ramp)
    # control: the input before masking is anything but uniform, and it is the update
    assert _top_byte_chi2(plain[:-1]) > 10 * CHI2_LIMIT
    assert _correlation(plain[:-1], ramp) > 0.999
    assert _top_byte_chi2(masked[:-1]) < CHI2_LIMIT
    assert abs(_correlation(masked[:-1], ramp)) < 5 / np.sqrt(P)


def test_t_minus_1_shares_of_the_self_mask_unmask_nothing_and_t_shares_would():
    """The aggregator also knows every pairwise mask of device 0 (as if it had been named dropped); all that is
    left is its self mask b, of which it gathers t - 1 shares."""
    update = np.linspace(-1, 1, P).astype(np.float32) / np.sqrt(P / 3)
    devices, setup, plain, masked = _round_with_one_update(update)
    victim = devices[0]
    pairwise = masked.copy()
    for j in victim._accepted:  # device 0 added +PRG(s_0j) for each j > 0; what is left is x + PRG(b)
        prg.add_mask(pairwise, victim._pair_seeds[j], -1)
    holders = setup.holders(0)
    shares = {x_of(h): devices[h]._held[0][0] for h in holders}
    t = setup.threshold

    def unmasked_with(xs: list[int]) -> np.ndarray:
        guess = shamir.reconstruct({x: shares[x] for x in xs})
        words = pairwise.copy()
        prg.add_mask(words, self_mask_seed(ROUND, guess), -1)
        return words

    xs = sorted(shares)
    assert np.array_equal(unmasked_with(xs[:t]), plain)  # control: t shares unmask device 0 completely
    too_few = unmasked_with(xs[: t - 1])
    assert shamir.reconstruct({x: shares[x] for x in xs[: t - 1]}) != victim._self_secret
    assert _top_byte_chi2(too_few[:-1]) < CHI2_LIMIT
    assert abs(_correlation(too_few[:-1], update)) < 5 / np.sqrt(P)
