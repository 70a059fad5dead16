"""A device's update as integers in Z_{2^32}, and the aggregator's way back from their sum.

Why Z_{2^32} and not a prime field: numpy's uint32 arithmetic *is* arithmetic mod 2^32 (no reductions),
ChaCha20 output read as uint32 is uniform in it (no rejection sampling), and 4 bytes a parameter is what a
float32 update costs, so masking adds no bytes to the upload.

What a device with n samples and clipped delta d (||d|| <= C, the task's clip norm) sends, before masks, is
P + 1 words:

- words 0..P-1: stochastic rounding of x_j = (w / W) * d_j * (B / C), w = min(n, W): each is in [-B, B],
  written in two's complement;
- word P: w.

W (``max_samples``) caps one device's weight; B (``levels``) is floor((2^31 - 1) / N) for a roster of N
devices, so the sum of N inputs stays in [-(2^31 - 1), 2^31 - 1] and reads back exactly as an int32: that is
the room the modulus leaves for N devices. The sum of the weight words is at most N * W < 2^32 (checked when
the round is set up). The aggregator learns only

    sum_i w_i * d_i = W * (C / B) * sum_i q_i      and      sum_i w_i,

so the sample-weighted mean (FedAvg) is their quotient. Stochastic rounding (round up with probability equal
to the fractional part) is unbiased, so the quantisation error averages out over devices and rounds instead of
accumulating; one device's error per coordinate is below C / B.

How the rounding is drawn (the device's own business: nobody can check it). With f_j = x_j - floor(x_j), exact
in float64, and u_j a uniform 32-bit word, q_j = floor(x_j) + [u_j < 2^32 f_j]: 2^32 f_j is exact too, so x_j
rounds up with probability ceil(2^32 f_j) / 2^32, which is f_j to 2^-32 (exactly f_j once |x_j| >= 2^20, where
f_j has no bits below 2^-32). A float64 sum floor(x_j + u) would not be: above 2^20 it rounds the sum itself,
and up to 2^-22 of a level goes astray in favour of rounding up. The words u_j are the ChaCha20 keystream of
RFC 8439 (block counter 0 first, nonce of 12 zero bytes) under a 32-byte key drawn from the caller's generator
(``rng.bytes(32)``), so a seeded generator gives the same words every time, and a chunk's draws do not depend on
the chunk size. ChaCha20, not the generator's own floats: it writes 4 bytes a coordinate in half the time numpy
takes for a float64 uniform (1.3 ms against 2.7 ms for a million coordinates here). Not AES-CTR, although AES-NI
makes it faster still here (0.5 ms): on cores without AES instructions (a Raspberry Pi 4's Cortex-A72) AES is
several times slower than ChaCha20, which is the masks' cipher for the same reason.

An update longer than C is clipped to C (1 - 2^-30) rather than C: float64 rounding in the norm (a relative error
below 2^-39 here), the scale and the products then cannot carry any |x_j| up to B, so q_j stays in [-B, B]
without a clamp over every coordinate, and the clipped norm is still below C. The float64 norm is only taken
when it matters: a float32 update whose float32 sum of squares is clearly below the limit (by more than its
rounding error can be) is left as it is.

With distributed differential privacy (docs/privacy.md) each device then adds discrete Gaussian noise
N_Z(0, sigma^2) (:mod:`.discrete_gaussian`) to each of its words 0..P-1, and every weight is 1 (W = 1). The room
must then hold the noise too. The discrete Gaussian is sigma^2-subgaussian (Canonne, Kamath and Steinke 2020),
so the noise summed over n devices exceeds T in magnitude with probability at most 2 exp(-T^2 / (2 n sigma^2));
over at most 2^32 coordinates (no update has more words) the sum wraps anywhere with probability at most
2^-40 when T = sigma * sqrt(2 n * ln(2^73)) (:func:`noise_tail`). :func:`check_room` asks N * B + T <= 2^31 - 1.

One device's quantised vector has L2 norm at most B + sqrt(P) (the clipped, scaled delta has norm at most B,
and stochastic rounding moves each of the P coordinates by less than 1): that is the sensitivity
(:func:`sensitivity`) the noise is calibrated to. :func:`private_levels` picks the largest B for which N devices'
noise of noise multiplier z still fits: sigma = z (B + sqrt(P)) / sqrt(N), so T = z (B + sqrt(P)) sqrt(2 ln 2^73)
whatever N, and B = floor((2^31 - 1 - z sqrt(P) c) / (N + z c)) with c = sqrt(2 ln 2^73), about 10.06.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

MODULUS_BITS = 32
_CHUNK = 32768  # coordinates quantised per step: its float64, int32 and draw buffers (0.8 MB) stay in the L2 cache
_CLIP_MARGIN = 1 - 2**-30  # an update is clipped to C * _CLIP_MARGIN (see the module docstring)
_ROUNDING_KEY_BYTES = 32  # a ChaCha20 key
_ROUNDING_IV = bytes(16)  # OpenSSL's ChaCha20 IV: block counter 0 (little-endian), then the 12-byte nonce
_FRACTION_SCALE = 2.0**MODULUS_BITS
_DOT_ELEMENTS = 8192  # the longest dot product taken at once (see _sum_of_squares)
_FLOAT32_NORM_FLOOR = 2.0**-60  # below this limit^2, float32 underflow could matter: take the float64 norm
MAX_SUM = 2**31 - 1
# The smallest clip norm: below it a float64 update small enough to fit could have a sum of squares that underflows
# to 0 (every |d_j| < 1e-154), escape clipping, and be scaled by B / C past B.
MIN_CLIP_NORM = 1e-30
# The probability that the noise makes a sum wrap is at most 2^-WRAP_BITS, for updates of up to 2^32 words.
WRAP_BITS = 40
_TAIL_LOG = (1 + MODULUS_BITS + WRAP_BITS) * math.log(2)  # ln(2 * 2^32 / 2^-40)


def levels_for(devices: int) -> int:
    """B: the largest |q| one device may send so that the sum over ``devices`` inputs cannot wrap around."""
    if devices < 1:
        raise ValueError("a round has at least one device")
    return MAX_SUM // devices


def noise_tail(devices: int, noise_sigma: float) -> float:
    """T: the noise of ``devices`` devices (N_Z(0, sigma^2) each) summed exceeds T in magnitude in any coordinate
    with probability at most 2^-40 (see the module docstring)."""
    return noise_sigma * math.sqrt(2 * devices * _TAIL_LOG)


def sensitivity(levels: int, dimension: int) -> float:
    """The largest L2 norm of one device's quantised vector of ``dimension`` coordinates: B + sqrt(P)."""
    return levels + math.sqrt(dimension)


def private_levels(devices: int, noise_multiplier: float, dimension: int) -> tuple[int, float]:
    """(B, sigma) for distributed DP: each of ``devices`` devices adds N_Z(0, sigma^2), sigma =
    z * (B + sqrt(P)) / sqrt(devices), and B is the largest level that leaves room for the sum's noise."""
    c = math.sqrt(2 * _TAIL_LOG)
    levels = math.floor((MAX_SUM - noise_multiplier * math.sqrt(dimension) * c) / (devices + noise_multiplier * c))
    while levels >= 1:
        sigma = noise_multiplier * sensitivity(levels, dimension) / math.sqrt(devices)
        if devices * levels + noise_tail(devices, sigma) <= MAX_SUM:  # float rounding: check, step down if need be
            return levels, sigma
        levels -= 1
    raise ValueError(f"noise multiplier {noise_multiplier} over {devices} devices and {dimension} parameters leaves "
                     "no room in 2^31 - 1 for the update")


def check_room(devices: int, levels: int, max_samples: int, noise_sigma: float = 0.0) -> None:
    """Refuse parameters under which a sum of ``devices`` inputs could overflow the modulus (with noise of
    ``noise_sigma`` per device: except with probability 2^-40)."""
    if levels < 1 or devices * levels + noise_tail(devices, noise_sigma) > MAX_SUM:
        noise = f" and noise of sigma {noise_sigma:g} each" if noise_sigma else ""
        raise ValueError(f"{devices} inputs of up to {levels} in magnitude{noise} can overflow 2^31 - 1")
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
    """The P + 1 words of one device's weighted, clipped update (see the module docstring), as uint32.

    ``rng`` supplies the key of the rounding draws: the same seed gives the same words."""
    if not clip_norm >= MIN_CLIP_NORM:
        raise ValueError(f"secure aggregation needs a clip norm of at least {MIN_CLIP_NORM:g}: the quantisation "
                         "range comes from it")
    if num_samples < 1:
        raise ValueError("an update has at least one sample")
    flat = np.asarray(delta).ravel()  # a view of the caller's update: read, never copied whole
    size = max(1, min(_CHUNK, flat.size))
    scaled = np.empty(size)  # float64: the work buffer that stays in the CPU cache
    limit = clip_norm * _CLIP_MARGIN
    weight = min(num_samples, max_samples)
    scale = (weight / max_samples) * (levels / clip_norm)
    if not _float32_norm_below(flat, limit):
        norm = math.sqrt(sum(_sum_of_squares(scaled, flat[start : start + size])
                             for start in range(0, flat.size, size)))
        if not math.isfinite(norm):
            raise ValueError("the update has no finite norm: it holds a NaN or an infinity, or overflows float64")
        if norm > limit:
            scale *= limit / norm
    words = np.empty(flat.size + 1, dtype="<u4")
    signed = words[:-1].view("<i4")  # |q| <= B < 2^31; two's complement: -q is 2^32 - q
    whole, draws, round_up = np.empty(size), np.empty(size, dtype="<u4"), np.empty(size, dtype=bool)
    keystream = rounding_draws(rng)
    zeros = bytes(4 * size)
    # A chunk at a time, so that every buffer stays in the CPU cache and no other large array is made.
    for start in range(0, flat.size, size):
        source = flat[start : start + size]
        x, floor_x, u, up = scaled[: source.size], whole[: source.size], draws[: source.size], round_up[: source.size]
        keystream.update_into(zeros[: 4 * source.size], memoryview(u).cast("B"))
        np.copyto(x, source)  # float64 whatever the update's dtype
        x *= scale
        np.floor(x, out=floor_x)
        x -= floor_x  # f = x - floor(x): exact, in [0, 1)
        x *= _FRACTION_SCALE  # 2^32 f: exact
        np.greater(x, u, out=up)
        out = signed[start : start + source.size]
        np.copyto(out, floor_x, casting="unsafe")  # integral and in [-B, B - 1]: the cast is exact
        np.add(out, up, out=out)
    words[-1] = weight
    return words


def rounding_draws(rng: np.random.Generator) -> CipherContext:
    """The source of the rounding words u_j: a ChaCha20 keystream (encrypt zeros to read it) under a key from
    ``rng``, block counter 0 first."""
    return Cipher(algorithms.ChaCha20(rng.bytes(_ROUNDING_KEY_BYTES), _ROUNDING_IV), mode=None).encryptor()


def _float32_norm_below(flat: np.ndarray, limit: float) -> bool:
    """Whether a float32 update's norm is certainly at most ``limit``, from float32 dot products (no float64
    copy): each of at most n = 8192 products and sums errs by at most 2^-24 relatively, so a piece's sum of squares
    is within n 2^-24 / (1 - n 2^-24) < 2^-10 of the true one, whatever order the BLAS adds in, and a total below
    limit^2 (1 - 2^-10) certifies the norm. False for other dtypes, near the limit, and for NaN, infinity or
    overflow (even when the squared limit is itself infinite): the float64 norm then decides."""
    squared_limit = limit * limit
    if flat.dtype != np.float32 or not squared_limit >= _FLOAT32_NORM_FLOOR:
        return False
    pieces = (flat[start : start + _DOT_ELEMENTS] for start in range(0, flat.size, _DOT_ELEMENTS))
    with np.errstate(over="ignore", invalid="ignore"):  # an infinite or NaN total just says "not certain"
        total = sum(float(np.dot(piece, piece)) for piece in pieces)
    # Finite first: past a clip norm of about 1.3e154 the squared limit is infinite, and inf <= inf.
    return math.isfinite(total) and total <= squared_limit * (1 - 2**-10)


def _sum_of_squares(buffer: np.ndarray, values: np.ndarray) -> float:
    """sum(values ** 2) in float64, through ``buffer``, as dot products of at most 8192 elements. OpenBLAS splits
    a dot product of more than 10,000 elements across threads, and its idle threads then spin on the other cores
    (measured here: twice the device's CPU time for the round's work, on a 2-core machine); shorter ones run on
    the calling thread (tests/test_secagg_primitives.py checks that no other thread does any work)."""
    part = buffer[: values.size]
    np.copyto(part, values)
    pieces = (part[start : start + _DOT_ELEMENTS] for start in range(0, part.size, _DOT_ELEMENTS))
    return sum(float(np.dot(piece, piece)) for piece in pieces)


def dequantise(
    total: np.ndarray, *, clip_norm: float, levels: int, max_samples: int
) -> tuple[np.ndarray, int]:
    """From the unmasked sum of the inputs: (sum_i w_i * d_i as float64, sum_i w_i)."""
    q = np.asarray(total, dtype="<u4")[:-1].view("<i4")
    weighted = q.astype(np.float64) * (max_samples * clip_norm / levels)
    return weighted, int(total[-1])
