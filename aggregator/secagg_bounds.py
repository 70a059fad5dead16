"""What an unmasked secure-aggregation sum must satisfy before anything made from it is published.

The aggregator never sees one device's input, and arithmetic mod 2^32 lets a device that does not follow the
protocol put any word into it: into its weight word (a wrap of the weight sum down to the survivor count divided
a round's step by a tiny total weight and published it 384x too long) or into its values. Without range proofs
nothing stops a device from *shifting* the sum; these checks stop it from taking the published model anywhere
honest devices could not. Each one holds for every honest round, by the arithmetic of
appliance/protocol/quantise.py (with distributed DP: except with probability 2^-40, the odds the ring's room
already accepts), so a round that fails one is abandoned, never published.

Honest device i of the S survivors (n devices in the roster, B levels, W the weight cap, C the clip norm, P
parameters, sigma the roster's noise or 0):

- weight w_i = min(samples, W), in [1, W];
- x_i = d_i (w_i / W) (B / C) with ||d_i|| <= C (clipped), so ||x_i|| <= w_i B / W and |x_ij| <= B;
- q_ij = clamp(floor(x_ij + u_ij), -B, B), u_ij in [0, 1): the rounding error e_ij = q_ij - x_ij is in (-1, 1)
  (floor(x + u) lies in (x - 1, x + 1), and clamping to [-B, B], which holds x, only moves q towards x);
- with distributed DP, plus nu_ij ~ N_Z(0, sigma^2), sigma^2-subgaussian (Canonne, Kamath, Steinke 2020); W = 1.

The unmasked sum is Q_j = sum_i (q_ij + nu_ij) and Omega = sum_i w_i; the published mean is (W C / B) Q / Omega:

1. **Weight**: S <= Omega <= S W (with distributed DP, W = 1: Omega = S exactly). S W <= n W < 2^32, so the
   word reads back as it was summed.
2. **Each coordinate**: |Q_j| <= S B + T, T = ``noise_tail(S, sigma)`` (0 without noise; with noise it is
   passed in any of up to 2^32 coordinates with probability at most 2^-40, quantise.py).
3. **Norm of the mean**: mean = sum_i w_i d_i / Omega + (W C / (B Omega)) (sum_i e_i + sum_i nu_i). The first
   term is a convex combination of clipped deltas: norm <= C. Each coordinate of sum_i e_i is below S in
   magnitude, so ||sum_i e_i|| < S sqrt(P). The noise sum has independent (S sigma^2)-subgaussian coordinates,
   so ||sum_i nu_i||^2 <= S sigma^2 (P + 2 sqrt(P t) + 2 t) except with probability e^-t (Hsu, Kakade and Zhang
   2012, Theorem 1), t = 40 ln 2. So

       ||mean|| <= C + (W C / (B Omega)) (S sqrt(P) + sigma sqrt(S (P + 2 sqrt(P t) + 2 t))),

   and the check allows ``CLIP_NORM_HEADROOM`` (1.1, the plain path's norm bound) x C plus that quantisation
   (and noise) allowance. The extra 0.1 C absorbs floating point, all of it far smaller: the float64 rounding in
   quantise (|e_ij| < 1 + 2^-21 for B < 2^31, ||x_i|| a few ulps over w_i B / W) and the float32 cast of the
   published mean (relative 2^-24).

What is left to a hostile device: any sum that passes. It can pick Omega anywhere in [S, S W], so shrink the
honest devices' step towards zero or, at Omega = S, scale it up until the norm bound stops it, and add any
values within the bounds: it can make the published step any vector of norm up to
1.1 C + (W C / B) sqrt(P) (+ the noise term). Only range proofs on each masked input would hold it to its own
share of the mean.
"""

from __future__ import annotations

import math

import numpy as np

from aggregator.norms import l2_norm
from aggregator.rounds import CLIP_NORM_HEADROOM
from appliance.protocol.quantise import WRAP_BITS, dequantise, noise_tail

# t of the noise's norm tail: an honest round's noise passes the norm bound with probability at most e^-t = 2^-40.
_NORM_TAIL = WRAP_BITS * math.log(2)


class SumOutOfBounds(Exception):
    """The unmasked sum is one no round of honest devices can make; the message says which bound it breaks."""


def mean_norm_bound(*, survivors: int, weight: int, dimension: int, levels: int, max_samples: int,
                    clip_norm: float, noise_sigma: float = 0.0) -> float:
    """The largest L2 norm the weighted mean of ``survivors`` honest devices' inputs (total weight ``weight``)
    can have: 1.1 C plus the quantisation and noise allowance of the module docstring."""
    rounding = survivors * math.sqrt(dimension)
    noise = noise_sigma * math.sqrt(survivors * (dimension + 2 * math.sqrt(dimension * _NORM_TAIL) + 2 * _NORM_TAIL))
    return CLIP_NORM_HEADROOM * clip_norm + max_samples * clip_norm / (levels * weight) * (rounding + noise)


def bounded_mean(total: np.ndarray, *, survivors: int, levels: int, max_samples: int, clip_norm: float,
                 noise_sigma: float = 0.0) -> tuple[np.ndarray, int]:
    """From the unmasked sum of ``survivors`` inputs (P + 1 uint32 words): (their weighted mean delta in float64,
    their total weight), or :class:`SumOutOfBounds` if it breaks a bound every honest round keeps."""
    words = np.asarray(total, dtype="<u4")
    weight = int(words[-1])
    if not survivors <= weight <= survivors * max_samples:
        raise SumOutOfBounds(f"the unmasked weights sum to {weight}, outside [{survivors}, {survivors * max_samples}]"
                             f" for {survivors} devices of weight 1 to {max_samples}")
    values = words[:-1].view("<i4")
    reach = survivors * levels + noise_tail(survivors, noise_sigma)
    largest = max(int(values.max(initial=0)), -int(values.min(initial=0)))  # no int32 abs: -2^31 has none
    if largest > reach:
        raise SumOutOfBounds(f"a coordinate of the unmasked sum is {largest} in magnitude, beyond the {reach:.0f} "
                             f"that {survivors} devices' inputs can reach")
    weighted, _ = dequantise(words, clip_norm=clip_norm, levels=levels, max_samples=max_samples)
    mean = weighted / weight
    norm = l2_norm(mean)
    bound = mean_norm_bound(survivors=survivors, weight=weight, dimension=values.size, levels=levels,
                            max_samples=max_samples, clip_norm=clip_norm, noise_sigma=noise_sigma)
    if not norm <= bound:
        raise SumOutOfBounds(f"the unmasked mean has L2 norm {norm:.4g}, beyond the {bound:.4g} that {survivors} "
                             f"devices' updates clipped to {clip_norm:g} can reach")
    return mean, weight
