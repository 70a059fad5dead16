"""The secure round's Diffie-Hellman agreements on the device, with the X25519 Montgomery ladder (RFC 7748) on the
same curve as the rest of the round's Ed25519 group (docs/protocol.md 12.2).

Why: libsodium's generic Ed25519 multiplication (``crypto_scalarmult_ed25519_noclamp``) checks that its point is
in the prime-order group (a multiplication by L) before it multiplies, and costs 90 us here (one core) against
32 us for X25519 with the u-coordinate below. A device at N = 100 makes 28 agreements a round (a share channel
and a pairwise seed with each of its 14 neighbours): 2.5 ms with the one, 0.9 ms with the other.

Every per-round Diffie-Hellman secret is a clamped X25519 scalar c (RFC 7748 section 5: 32 random bytes, bits 0,
1, 2 and 255 cleared, bit 254 set). Its scalar of the prime-order group, for the public key (c mod L) * G, the
Shamir sharing and the proofs, is c mod L, which is never 0: c is a multiple of 8 in [2^254, 2^255), the
multiples of L there are 4L to 7L, and none of them is a multiple of 8 (L is odd). For a point P of the group,
X25519(c, u(P)) = u(c * P) = u((c mod L) * P): the ladder multiplies the point whose u-coordinate is u(P) (P or
-P, which have the same u), and L * P is the identity. u(P) = (1 + y) / (1 - y) mod p, p = 2^255 - 19, y the
Edwards y-coordinate of P (RFC 7748 section 4.1). Both ends of a channel, and the aggregator when it rebuilds a
dropped device's secret and multiplies with libsodium's Ed25519 functions, therefore hash the same 32 bytes.

A device does not check that its neighbours' keys are in the prime-order group: the aggregator did when it
accepted their advertisements (12.3, ``bad-key``), and X25519 is safe for any u (its scalar is a multiple of the
cofactor 8, so a small-order component of the point changes nothing; a u off the curve is on its quadratic twist,
whose large subgroup has prime order too). The check costs a multiplication by L, 42 us a key
(``crypto_core_ed25519_is_valid_point``), more than the agreement itself. What the device does refuse, cheaply, is
an encoding that is no key at all or gives no shared secret (:class:`InvalidKey`).
"""

from __future__ import annotations

from collections.abc import Sequence

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import RuntimeError as NaclRuntimeError

from appliance.protocol import shamir

P = 2**255 - 19
KEY_BYTES = 32
_Y_MASK = (1 << 255) - 1  # bit 255 of an Edwards encoding is the sign of x, which u does not depend on


class InvalidKey(ValueError):
    """A key that is not a point of the prime-order group; ``position``: its place in the list
    :func:`u_coordinates` was given."""

    def __init__(self, detail: str, position: int = 0):
        super().__init__(detail)
        self.position = position


def clamped_scalar(entropy: shamir.Entropy) -> bytes:
    """A new secret: 32 bytes from ``entropy``, clamped as RFC 7748 section 5 does (little-endian)."""
    c = bytearray(entropy(KEY_BYTES))
    c[0] &= 248
    c[31] &= 127
    c[31] |= 64
    return bytes(c)


def group_scalar(clamped: bytes) -> int:
    """The scalar of the prime-order group that a clamped scalar stands for: c mod L (never 0)."""
    return int.from_bytes(clamped, "little") % shamir.L


def u_coordinates(points: Sequence[bytes]) -> list[bytes]:
    """u = (1 + y) / (1 - y) mod p of each compressed Edwards point, 32 bytes little-endian each.

    One modular inversion for all of them (Montgomery's trick: 3 multiplications a point instead of an inversion
    each): 28 keys take 2 us each, one alone 26 us. Raises :class:`InvalidKey` for an encoding whose y is not
    below p or is 1 (the identity, which has no u)."""
    denominators = []
    for position, point in enumerate(points):
        if len(point) != KEY_BYTES:
            raise InvalidKey(f"a key is {KEY_BYTES} bytes, got {len(point)}", position)
        y = int.from_bytes(point, "little") & _Y_MASK
        if y >= P:
            raise InvalidKey("its y-coordinate is not below p = 2^255 - 19", position)
        if y == 1:
            raise InvalidKey("it is the identity", position)
        denominators.append((1 - y) % P)
    prefix = [1]  # prefix[i] = product of denominators[:i]
    for d in denominators:
        prefix.append(prefix[-1] * d % P)
    inverse = pow(prefix[-1], -1, P)  # of the product of all the denominators
    us = [b""] * len(points)
    for position in reversed(range(len(points))):
        y = (1 - denominators[position]) % P
        us[position] = ((1 + y) * inverse * prefix[position] % P).to_bytes(KEY_BYTES, "little")
        inverse = inverse * denominators[position] % P  # now the inverse of prefix[position]
    return us


def u_coordinate(point: bytes) -> bytes:
    """u of one compressed Edwards point (:func:`u_coordinates`)."""
    return u_coordinates([point])[0]


def shared_u(clamped: bytes, u: bytes) -> bytes:
    """X25519(c, u): the u-coordinate of c times the point, 32 bytes little-endian.

    libsodium refuses a u of small order and an all-zero result; for a key of the prime-order group and a
    non-zero c mod L neither can happen, so either means the key is not one (:class:`InvalidKey`)."""
    try:
        return crypto_scalarmult(clamped, u)
    except (NaclRuntimeError, TypeError, ValueError) as exc:
        raise InvalidKey("it is of small order: X25519 gives no shared secret with it") from exc
