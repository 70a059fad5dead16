"""Feldman-verifiable Shamir secret sharing over Z_L, L the prime order of the Ed25519 group.

A dealer splits a secret s (an integer mod L) with a random polynomial f of degree t-1, f(0) = s: holder x
(an integer 1..2^32-1, distinct per holder) gets f(x). Any t shares give s back by Lagrange interpolation
at 0; t-1 shares say nothing about it (every value of s fits them equally well).

The dealer also publishes the commitments C_j = a_j * G of its coefficients (G the Ed25519 base point,
32-byte compressed points). A holder checks f(x) * G == sum_j x^j * C_j, so a device cannot hand out shares
that reconstruct to different secrets depending on who answers (Feldman 1987). C_0 = s * G is the secret's
public key: the aggregator checks every reconstruction against it, and for the mask key it is the very key
the device advertised (:mod:`appliance.protocol.secagg`).

Costs here (libsodium through pynacl, one core): a fixed-base multiplication 22 us, a variable-base one 104 us
(constant time: a small x costs as much as any scalar), a point addition 17 us (it decompresses both points and
compresses the sum). A holder therefore checks all its dealers at once (:func:`verify_sum`: t-1 multiplications
in all instead of t-1 per dealer) and looks at dealers one by one only when the sum fails. What is left is one
addition per commitment point, which no grouping avoids. A device checks its two kinds of shares (self-mask and
mask key) with one sum each: one equation for both would need a random weight rho on one kind (without it a
dealer could add e to one share and -e to the other and pass), and rho times the key shares' side is one more
variable-base multiplication (104 us), while the one equation saves only a fixed-base one (22 us).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_scalarmult_ed25519_base_noclamp,
    crypto_scalarmult_ed25519_noclamp,
)
from nacl.exceptions import RuntimeError as NaclRuntimeError

L = 2**252 + 27742317777372353535851937790883648493
SCALAR_BYTES = 32
POINT_BYTES = 32


class InvalidPoint(ValueError):
    """A commitment is not a point of the prime-order group (or an operation on it gave the identity)."""


Entropy = Callable[[int], bytes]


def random_scalar(entropy: Entropy = os.urandom) -> int:
    """A random non-zero element of Z_L: 64 random bytes reduced mod L (the bias is below 2^-259)."""
    while True:
        value = int.from_bytes(entropy(64), "little") % L
        if value:
            return value


def scalar_bytes(value: int) -> bytes:
    """The 32-byte little-endian encoding of a scalar (reduced mod L)."""
    return (value % L).to_bytes(SCALAR_BYTES, "little")


def scalar_from_bytes(data: bytes) -> int:
    """A scalar from its 32-byte little-endian encoding; values >= L are refused (they are not canonical)."""
    if len(data) != SCALAR_BYTES:
        raise ValueError(f"a scalar is {SCALAR_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "little")
    if value >= L:
        raise ValueError("scalar is not reduced mod L")
    return value


def base_point_times(scalar: int) -> bytes:
    """scalar * G, compressed (32 bytes). The scalar must be non-zero mod L."""
    try:
        return crypto_scalarmult_ed25519_base_noclamp(scalar_bytes(scalar))
    except NaclRuntimeError as exc:
        raise InvalidPoint("scalar is zero mod L") from exc


def point_times(scalar: int, point: bytes) -> bytes:
    """scalar * point, compressed; the point must be in the prime-order group and the product not the identity."""
    try:
        return crypto_scalarmult_ed25519_noclamp(scalar_bytes(scalar), point)
    except (NaclRuntimeError, TypeError, ValueError) as exc:
        raise InvalidPoint("not a point of the prime-order group, or a product that is the identity") from exc


def _add(p: bytes, q: bytes) -> bytes:
    try:
        return crypto_core_ed25519_add(p, q)
    except (NaclRuntimeError, TypeError, ValueError) as exc:
        raise InvalidPoint("cannot add points that are not in the group") from exc


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for a in reversed(coefficients):
        value = (value * x + a) % L
    return value


def share(
    secret: int, holders: Sequence[int], threshold: int, entropy: Entropy = os.urandom
) -> tuple[dict[int, int], list[bytes]]:
    """Split ``secret`` among ``holders`` (their x coordinates) so that any ``threshold`` of them recover it.

    Returns the shares (x -> f(x)) and the commitments [a_0 * G, ..., a_{t-1} * G]. ``entropy`` draws the
    coefficients (os.urandom; the documentation's worked example passes a fixed stream).
    """
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(holders)} holders")
    if len(set(holders)) != len(holders) or any(not 0 < x < 2**32 for x in holders):
        raise ValueError("holders must be distinct integers in [1, 2^32)")
    if not 0 < secret < L:
        raise ValueError("the secret must be a non-zero scalar")
    coefficients = [secret] + [random_scalar(entropy) for _ in range(threshold - 1)]
    commitments = [base_point_times(a) for a in coefficients]
    return {x: _evaluate(coefficients, x) for x in holders}, commitments


def reconstruct(shares: Mapping[int, int]) -> int:
    """f(0) from the given shares (x -> f(x)) by Lagrange interpolation; pass exactly ``threshold`` of them.

    With fewer than the threshold the result is a valid-looking scalar that is not the secret."""
    xs = list(shares)
    if not xs:
        raise ValueError("no shares")
    secret = 0
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                numerator = numerator * xj % L
                denominator = denominator * (xj - xi) % L
        secret = (secret + shares[xi] * numerator * pow(denominator, -1, L)) % L
    return secret


def commitment_at(commitments: Sequence[bytes], x: int) -> bytes:
    """sum_j x^j * C_j: what f(x) * G must equal for a consistent share at x (Horner's rule in the group)."""
    acc = commitments[-1]
    for c in reversed(commitments[:-1]):
        acc = _add(point_times(x, acc), c)
    return acc


def verify_share(commitments: Sequence[bytes], x: int, value: int) -> bool:
    """Whether ``value`` is the share at ``x`` of the polynomial behind ``commitments``."""
    try:
        return value != 0 and base_point_times(value) == commitment_at(commitments, x)
    except InvalidPoint:
        return False


def verify_sum(dealings: Sequence[Sequence[bytes]], x: int, values: Sequence[int]) -> bool:
    """Whether the shares at ``x`` of several dealers are all consistent, checked at the cost of one dealer.

    sum_d f_d(x) * G == sum_j x^j * (sum_d C_{d,j}). A single dealer's bad share always fails the check; only
    dealers that coordinate their errors could cancel them (malicious, colluding devices are outside the
    honest-but-curious model; see docs/aggregator.md). All dealings must have the same threshold.
    """
    if not dealings or len(dealings) != len(values):
        raise ValueError("one value per dealing, at least one")
    if len({len(d) for d in dealings}) != 1:
        raise ValueError("the dealings have different thresholds")
    try:
        summed = list(dealings[0])
        for dealing in dealings[1:]:
            summed = [_add(a, b) for a, b in zip(summed, dealing, strict=True)]
        total = sum(values) % L
        return total != 0 and base_point_times(total) == commitment_at(summed, x)
    except InvalidPoint:
        return False


def commits_to(commitments: Sequence[bytes], secret: int) -> bool:
    """Whether ``secret`` is the dealt secret (C_0 == secret * G)."""
    try:
        return 0 < secret < L and base_point_times(secret) == commitments[0]
    except InvalidPoint:
        return False
