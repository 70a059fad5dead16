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
