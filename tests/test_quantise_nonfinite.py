"""A device's quantiser never sends a word outside [-B, B]: an update holding an infinity is refused whatever the
clip norm, also past the one (about 1.3e154) whose square is itself infinite, where the float32 norm shortcut
compared inf <= inf and let the infinity through as the word -2^31."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.protocol.quantise import quantise


@pytest.mark.parametrize("clip_norm", [1.0, 1e200])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_an_update_with_a_non_finite_value_is_refused_whatever_the_clip_norm(clip_norm: float, bad: float) -> None:
    delta = np.array([bad, 0.5, -0.25], dtype=np.float32)
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="no finite norm"):
        quantise(delta, 5, clip_norm=clip_norm, levels=1000, max_samples=10, rng=np.random.default_rng(0))


def test_a_finite_float32_update_under_a_huge_clip_norm_stays_within_the_levels() -> None:
    delta = np.array([3.0e38, -3.0e38, 1.0], dtype=np.float32)
    words = quantise(delta, 5, clip_norm=1e200, levels=1000, max_samples=10, rng=np.random.default_rng(0))
    assert np.all(np.abs(words[:-1].view("<i4").astype(np.int64)) <= 1000)


def test_a_clip_norm_too_small_to_quantise_safely_is_refused_by_the_quantiser_the_roster_and_the_cli() -> None:
    """Under a clip norm of 1e-200 an update of 1e-160s has a sum of squares that underflows to 0: it would escape
    clipping and be scaled by B / C far past B. Such a clip norm is refused where it is set and where it arrives."""
    from aggregator.secagg_round import SecAggConfigError, check_secure_strategy
    from aggregator.strategies import STRATEGIES
    from appliance.protocol.secagg import DeviceRound, RoundSetup, SecAggError

    delta = np.full(3, 1e-160)
    with pytest.raises(ValueError, match="clip norm of at least 1e-30"):
        quantise(delta, 5, clip_norm=1e-200, levels=1000, max_samples=10, rng=np.random.default_rng(0))
    keys = tuple(DeviceRound(1).keys for _ in range(3))
    with pytest.raises(SecAggError, match="clip norm must be at least 1e-30"):
        RoundSetup(1, keys, 2, 2, 1000, 10, 1e-200, bytes(32))
    with pytest.raises(SecAggConfigError, match="--clip-norm >= 1e-30"):
        check_secure_strategy(STRATEGIES["fedavg"], 1e-200, False)
    words = quantise(delta, 5, clip_norm=1e-30, levels=1000, max_samples=10, rng=np.random.default_rng(0))
    assert np.all(np.abs(words[:-1].view("<i4").astype(np.int64)) <= 1000)
