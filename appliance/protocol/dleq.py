"""Chaum-Pedersen proofs of discrete-log equality on the prime-order Ed25519 group (docs/protocol.md 12.5).

A device that rejects a dealer's shares shows the aggregator the channel's Diffie-Hellman point K = a * D (a its
cipher secret, A = a * G its advertised cipher key, D the dealer's) and proves that log_G(A) = log_D(K) without
revealing a: the aggregator can then open the dealer's signed ciphertext itself and see who is telling the truth.

Non-interactive (Fiat-Shamir), as (c, s): the prover draws w, sets T1 = w * G, T2 = w * D, c = H(..., T1, T2),
s = w + c * a; the verifier recomputes T1 = s * G - c * A and T2 = s * D - c * K and checks that they hash to c.
H is SHA-512 of a domain label, the round, both indices and all six points, read little-endian and reduced mod L
(512 bits reduced: the bias is below 2^-259). The round and the indices bind a proof to one channel of one round,
so it cannot be replayed for another dealer or another round.

The group is the one the mask keys and the Feldman commitments live in (:mod:`.shamir`), with libsodium's checks:
``crypto_scalarmult_ed25519_noclamp`` refuses any point outside the prime-order subgroup, small-order points,
non-canonical encodings and an identity result, and every point a proof is checked against goes through it, so a
proof over a point with a torsion component cannot pass. (ristretto255 would give the same prime-order group, but
pynacl exposes no binding for it, and one group for the whole protocol is less for another implementation to get
right.)
"""

from __future__ import annotations

import hashlib

from nacl.bindings import crypto_core_ed25519_sub
from nacl.exceptions import RuntimeError as NaclRuntimeError

from appliance.protocol import shamir

DOMAIN = b"fl-edge/secagg/v1/dleq"
PROOF_BYTES = 2 * shamir.SCALAR_BYTES  # c || s
BASE_POINT = shamir.base_point_times(1)


def challenge(round_id: int, accuser: int, dealer: int, a_point: bytes, d_point: bytes, k_point: bytes,
              t1: bytes, t2: bytes) -> int:
    """c = SHA-512(domain ‖ round (8 BE) ‖ accuser (4 BE) ‖ dealer (4 BE) ‖ G ‖ A ‖ D ‖ K ‖ T1 ‖ T2) mod L."""
    digest = hashlib.sha512(
        DOMAIN + round_id.to_bytes(8, "big") + accuser.to_bytes(4, "big") + dealer.to_bytes(4, "big")
        + BASE_POINT + a_point + d_point + k_point + t1 + t2
    ).digest()
    return int.from_bytes(digest, "little") % shamir.L


def prove(round_id: int, accuser: int, dealer: int, secret: int, d_point: bytes,
          entropy: shamir.Entropy) -> bytes:
    """The 64-byte proof (c ‖ s, scalars little-endian) that K = secret * D has the discrete log of A = secret * G."""
    a_point = shamir.base_point_times(secret)
    k_point = shamir.point_times(secret, d_point)
    w = shamir.random_scalar(entropy)
    c = challenge(round_id, accuser, dealer, a_point, d_point, k_point, shamir.base_point_times(w),
                  shamir.point_times(w, d_point))
    return shamir.scalar_bytes(c) + shamir.scalar_bytes(w + c * secret)


def verify(round_id: int, accuser: int, dealer: int, a_point: bytes, d_point: bytes, k_point: bytes,
           proof: bytes) -> bool:
    """Whether ``proof`` shows log_G(A) = log_D(K); False for anything malformed (never raises on bad bytes)."""
    if len(proof) != PROOF_BYTES:
        return False
    try:
        c = shamir.scalar_from_bytes(proof[:32])
        s = shamir.scalar_from_bytes(proof[32:])
        if c == 0 or s == 0:  # a zero scalar has no product here; an honest proof has one with probability 2^-251
            return False
        t1 = crypto_core_ed25519_sub(shamir.base_point_times(s), shamir.point_times(c, a_point))
        t2 = crypto_core_ed25519_sub(shamir.point_times(s, d_point), shamir.point_times(c, k_point))
    except (ValueError, TypeError, NaclRuntimeError):  # InvalidPoint is a ValueError
        return False
    return challenge(round_id, accuser, dealer, a_point, d_point, k_point, t1, t2) == c
