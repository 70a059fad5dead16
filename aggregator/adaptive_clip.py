"""Adaptive clipping for central DP (Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping"): the clip norm C follows a target quantile gamma of the devices' update norms.

Each published round, the aggregator counts the devices whose delta, *before they clipped it*, was no longer than
the round's C: b_i = 1[||delta_i|| <= C]. Devices clip to the task's C, so what arrives says little about that;
the agent reports the norm it clipped from in its signed update (metric ``update_norm``), and the aggregator,
trusted with each update in central mode, reads it there (no wire change). The count gets Gaussian noise
N(0, sigma_b^2) and C moves geometrically: C <- C exp(-eta (b - gamma)), b = noised count / m.

Privacy. The participants m are public, so the count is post-processing of the sum of centred bits b_i - 1/2,
which one device moves by at most 1/2: the count is a Gaussian mechanism of noise multiplier 2 sigma_b. The
operator's noise multiplier z covers both queries (Andrew et al. 2021, Theorem 1): the model's sum gets
z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), and the two Gaussian mechanisms of a round together are worth exactly
one of multiplier z. The ledger (aggregator/privacy.py) composes both, per round, in dp-accounting.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Defaults of Andrew et al. 2021: eta = 0.2 (geometric update) worked across their tasks.
DEFAULT_LEARNING_RATE = 0.2
# sigma_b = 5 z by default: the count then takes 1 % of the privacy ((2 sigma_b)^-2 = z^-2 / 100), so the model's
# noise grows by 0.5 %; the noise on the fraction b is 5 z / m (0.05 at z = 1 and m = 100, the paper's m / 20).
DEFAULT_COUNT_STDDEV_PER_Z = 5.0
# C stays inside these: the update norm bound (1.1 C) must stay below aggregator.rounds.MAX_UPDATE_NORM, and a
# clip norm that underflows to 0 would calibrate no noise.
MIN_CLIP_NORM = 1e-9
MAX_CLIP_NORM = 1e14
# A device that reports no pre-clip norm and sent a delta this close to C is taken to have clipped it.
AT_CLIP_NORM = 1e-3


class AdaptiveClipError(ValueError):
    """Adaptive-clipping settings that cannot work; the message names the flag and why."""


@dataclass(frozen=True)
class AdaptiveClip:
    """``--dp-adaptive-clip GAMMA [--dp-clip-learning-rate ETA] [--dp-clip-count-stddev SIGMA_B]``."""

    target_quantile: float
    learning_rate: float = DEFAULT_LEARNING_RATE
    count_stddev: float | None = None  # None: DEFAULT_COUNT_STDDEV_PER_Z x the noise multiplier

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise AdaptiveClipError(f"--dp-adaptive-clip must be a quantile in (0, 1), got {self.target_quantile}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise AdaptiveClipError(f"--dp-clip-learning-rate must be positive, got {self.learning_rate}")
        if self.count_stddev is not None and not (math.isfinite(self.count_stddev) and self.count_stddev > 0):
            raise AdaptiveClipError(f"--dp-clip-count-stddev must be positive, got {self.count_stddev}")

    def count_stddev_for(self, noise_multiplier: float) -> float:
        """sigma_b: as given, or the default share of the privacy for noise multiplier z."""
        return DEFAULT_COUNT_STDDEV_PER_Z * noise_multiplier if self.count_stddev is None else self.count_stddev


def count_noise_multiplier(count_stddev: float) -> float:
    """The count of centred bits has sensitivity 1/2, so noise sigma_b is a noise multiplier of 2 sigma_b."""
    return 2 * count_stddev


def model_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the model's share of a privacy worth noise multiplier z."""
    left = noise_multiplier**-2 - count_noise_multiplier(count_stddev) ** -2
    if not left > 0:
        raise AdaptiveClipError(
            f"--dp-clip-count-stddev {count_stddev:g} leaves no privacy for the model's noise: with "
            f"--dp-noise-multiplier {noise_multiplier:g} it must exceed {noise_multiplier / 2:g} (z / 2); "
            f"{DEFAULT_COUNT_STDDEV_PER_Z * noise_multiplier:g} (5 z, the default) gives the count 1 % of it"
        )
    return left**-0.5


def unclipped_norm(reported: float | None, received: Callable[[], float], clip_norm: float) -> float:
    """The L2 norm of a device's delta before it clipped it: what it reports (the agent's ``update_norm``), else
    ``received()``, the norm of what arrived; a delta at the clip norm (within 0.1 %) was clipped by its device,
    so its norm counts as above C."""
    if reported is not None and math.isfinite(reported):
        return reported
    norm = received()
    return max(norm, clip_norm * (1 + AT_CLIP_NORM)) if norm >= clip_norm * (1 - AT_CLIP_NORM) else norm


@dataclass(frozen=True)
class ClipStep:
    """One round of the quantile estimate: the C it clipped to, the noised fraction within it, the next C."""

    clip_norm: float
    within: float
    next_clip_norm: float


def next_clip_norm(
    clip_norm: float, unclipped_norms: Sequence[float], target_quantile: float, learning_rate: float,
    count_stddev: float, rng: np.random.Generator | None = None,
) -> ClipStep:
    """C exp(-eta (b - gamma)), b the fraction of the m norms within C with N(0, sigma_b^2) noise on the count.

    The noise comes from numpy's PCG64 seeded with 128 bits from the OS's CSPRNG (``rng``: tests only)."""
    m = len(unclipped_norms)
    if m == 0:
        raise ValueError("no updates: the clip norm moves only with a published round")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    within = sum(1 for norm in unclipped_norms if norm <= clip_norm)
    fraction = (within + float(rng.normal(0.0, count_stddev))) / m
    # the exponent is clamped: a large rate times a noisy fraction would overflow exp() and stall closing
    moved = clip_norm * math.exp(min(max(-learning_rate * (fraction - target_quantile), -50.0), 50.0))
    return ClipStep(clip_norm, fraction, min(max(moved, MIN_CLIP_NORM), MAX_CLIP_NORM))
