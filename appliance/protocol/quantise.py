"""A device's update as integers in Z_{2^32}, and the aggregator's way back from their sum.

Why Z_{2^32} and not a prime field: numpy's uint32 arithmetic *is* arithmetic mod 2^32 (no reductions),
ChaCha20 output read as uint32 is uniform in it (no rejection sampling), and 4 bytes a parameter is what a
float32 update costs, so masking adds no bytes to the upload.

What a device with n samples and clipped delta d (||d|| <= C, the task's clip norm) sends, before masks, is
P + 1 words:

- words 0..P-1: stochastic rounding of (w / W) * d_j * (B / C), w = min(n, W): each is in [-B, B], written in
  two's complement;
- word P: w.

W (``max_samples``) caps one device's weight; B (``levels``) is floor((2^31 - 1) / N) for a roster of N
devices, so the sum of N inputs stays in [-(2^31 - 1), 2^31 - 1] and reads back exactly as an int32: that is
the room the modulus leaves for N devices. The sum of the weight words is at most N * W < 2^32 (checked when
the round is set up). The aggregator learns only

    sum_i w_i * d_i = W * (C / B) * sum_i q_i      and      sum_i w_i,

so the sample-weighted mean (FedAvg) is their quotient. Stochastic rounding (round up with probability equal
to the fractional part) is unbiased, so the quantisation error averages out over devices and rounds instead of
accumulating; one device's error per coordinate is below C / B.
"""

from __future__ import annotations

import numpy as np

MODULUS_BITS = 32
MAX_SUM = 2**31 - 1


def levels_for(devices: int) -> int:
    """B: the largest |q| one device may send so that the sum over ``devices`` inputs cannot wrap around."""
    if devices < 1:
        raise ValueError("a round has at least one device")
    return MAX_SUM // devices


def check_room(devices: int, levels: int, max_samples: int) -> None:
    """Refuse parameters under which a sum of ``devices`` inputs could overflow the modulus."""
    if levels < 1 or devices * levels > MAX_SUM:
        raise ValueError(f"{devices} inputs of up to {levels} in magnitude can overflow 2^31 - 1")
    if max_samples < 1 or devices * max_samples >= 2**MODULUS_BITS:
        raise ValueError(f"{devices} weights of up to {max_samples} can overflow 2^32")


def quantise(
    delta: np.ndarray,
    num_samples: int,
    *,
    clip_norm: float,
    levels: int,
    max_samples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """The P + 1 words of one device's weighted, clipped update (see the module docstring), as uint32."""
    if not clip_norm > 0:
        raise ValueError("secure aggregation needs a positive clip norm: the quantisation range comes from it")
    if num_samples < 1:
        raise ValueError("an update has at least one sample")
    scaled = np.array(delta, dtype=np.float64).ravel()  # a copy: worked on in place from here
    norm = float(np.sqrt(np.dot(scaled, scaled)))
    weight = min(num_samples, max_samples)
    scale = (weight / max_samples) * (levels / clip_norm)
    if norm > clip_norm:  # clipped here too, so that no coordinate can leave [-B, B]
        scale *= clip_norm / norm
    scaled *= scale
    scaled += rng.random(scaled.size)
    np.floor(scaled, out=scaled)
    np.clip(scaled, -levels, levels, out=scaled)
    words = np.empty(scaled.size + 1, dtype="<u4")
    words[:-1] = scaled.astype(np.int32).view(np.uint32)  # |q| <= B < 2^31; two's complement: -q is 2^32 - q
    words[-1] = weight
    return words


def dequantise(
    total: np.ndarray, *, clip_norm: float, levels: int, max_samples: int
) -> tuple[np.ndarray, int]:
    """From the unmasked sum of the inputs: (sum_i w_i * d_i as float64, sum_i w_i)."""
    q = np.asarray(total, dtype="<u4")[:-1].view("<i4")
    weighted = q.astype(np.float64) * (max_samples * clip_norm / levels)
    return weighted, int(total[-1])
