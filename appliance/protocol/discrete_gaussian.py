"""Discrete Gaussian noise on a device's quantised update (distributed DP, docs/privacy.md).

The discrete Gaussian N_Z(0, sigma^2) puts mass proportional to exp(-x^2 / (2 sigma^2)) on every integer x.
:func:`sample` draws it with the rejection sampler of Canonne, Kamath and Steinke 2020 ("The Discrete Gaussian
for Differential Privacy", Algorithm 3), vectorised over the P coordinates of an update:

1. t = floor(sigma) + 1; Y = G1 - G2 with G1, G2 independent geometric on {0, 1, ...} of ratio exp(-1 / t), so
   P(Y = y) is proportional to exp(-|y| / t) (the discrete Laplace);
2. keep Y with probability exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)), else draw again (coordinate by coordinate).

A kept Y has exactly the discrete Gaussian's distribution (CKS20, Theorem 15); each draw is kept with probability
above 1/2 for every sigma, so a few passes finish any vector.

Where CKS20 computes the two Bernoulli trials with exact rational arithmetic, this does them in float64, which
is what makes it fast enough for a million coordinates (about 0.2 s here) and is why it is numerically sound
rather than exact: a geometric variate is floor(t * E) for E = -ln(U) exponential (P(floor(tE) >= k) =
exp(-k / t) exactly; U has 53 random bits, so E is correct to about 1e-16 relative and t * E to well below
one integer step for every |Y| the room checks allow), and the acceptance compares a uniform on a grid of
2^-53 with an exp() correct to about 1e-16 relative. So every probability the sampler realises is within about
1e-15 of the exact one (absolute), far below anything that changes an epsilon the ledger reports.
tests/test_secagg_dp.py checks the moments and a chi-square fit against the exact pmf.

The randomness is the ChaCha20 keystream (:mod:`.prg`, RFC 8439) of a 32-byte key from the device's own
entropy (os.urandom), drawn fresh for each update: nothing the aggregator knows or sees determines the noise.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from appliance.protocol import prg

DOMAIN = b"fl-edge/dp/v1/discrete-gaussian"
_TWO_TO_53 = float(2**53)


class _Uniforms:
    """Uniform floats in (0, 1] with 53 random bits each, from the ChaCha20 keystream of ``key`` (one stream per
    pass, keyed by SHA-256 of the key and the pass number, so no keystream is used twice)."""

    def __init__(self, key: bytes):
        if len(key) != prg.SEED_BYTES:
            raise ValueError(f"the noise key is {prg.SEED_BYTES} bytes")
        self._key = key
        self._pass = 0

    def draw(self, count: int) -> np.ndarray:
        seed = hashlib.sha256(DOMAIN + self._key + self._pass.to_bytes(8, "big")).digest()
        self._pass += 1
        words = prg.keystream_words(seed, 2 * count).astype(np.uint64)
        bits = (words[0::2] << np.uint64(21)) | (words[1::2] >> np.uint64(11))  # 32 + 21 = 53 bits
        return (bits.astype(np.float64) + 1.0) / _TWO_TO_53


def sample(sigma: float, size: int, key: bytes) -> np.ndarray:
    """``size`` independent draws of N_Z(0, sigma^2) (int64), from the noise key ``key`` (32 random bytes)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"the discrete Gaussian's sigma must be positive, got {sigma}")
    uniforms = _Uniforms(key)
    t = math.floor(sigma) + 1
    out = np.zeros(size, dtype=np.int64)
    pending = np.arange(size)
    while pending.size:
        n = pending.size
        u = uniforms.draw(3 * n)
        g1 = np.floor(-np.log(u[:n]) * t)
        g2 = np.floor(-np.log(u[n : 2 * n]) * t)
        y = g1 - g2
        keep = u[2 * n :] <= np.exp(-np.square(np.abs(y) - sigma * sigma / t) / (2 * sigma * sigma))
        out[pending[keep]] = y[keep].astype(np.int64)
        pending = pending[~keep]
    return out

