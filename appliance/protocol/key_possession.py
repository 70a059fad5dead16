"""A Schnorr proof that a device knows the secret of the cipher key it advertises (docs/protocol.md 12.3).

Why: an accusation (12.5) shows the aggregator the channel point K = a_J * A_D of the accused dealer D. Were D free
to advertise A_D = lambda * A_V for an honest V's key (lambda known to it: 1 for a plain copy), each neighbour J's
accusation against D would also give K / lambda = a_J * A_V, the point of J's channel with V, and t of them V's
secrets. A device that proves it knows log_G(A_D) cannot have tied A_D to a key whose secret it does not know.

Non-interactive (Fiat-Shamir), as (c, s): T = w * G for a fresh random w, c = H(round, device id, G, A, T),
s = w + c * a; the verifier recomputes T = s * G - c * A. H is SHA-512 of a domain label, the round (8 bytes
big-endian), the device id's UTF-8 length (2 bytes big-endian) and bytes, and the three points, read
little-endian and reduced mod L. The round and the device id bind a proof to one advertisement: a copied key with
its owner's proof is refused.
"""

from __future__ import annotations

import hashlib

from nacl.bindings import crypto_core_ed25519_sub
from nacl.exceptions import RuntimeError as NaclRuntimeError

from appliance.protocol import shamir

DOMAIN = b"fl-edge/secagg/v1/cipher-key"
PROOF_BYTES = 2 * shamir.SCALAR_BYTES  # c || s
BASE_POINT = shamir.base_point_times(1)


def challenge(round_id: int, device_id: str, a_point: bytes, t: bytes) -> int:
    """c = SHA-512(domain ‖ round (8 BE) ‖ len(device id) (2 BE) ‖ device id ‖ G ‖ A ‖ T) mod L."""
    device = device_id.encode()
    digest = hashlib.sha512(
        DOMAIN + round_id.to_bytes(8, "big") + len(device).to_bytes(2, "big") + device + BASE_POINT + a_point + t
    ).digest()
    return int.from_bytes(digest, "little") % shamir.L


def prove(round_id: int, device_id: str, secret: int, entropy: shamir.Entropy) -> bytes:
    """The 64-byte proof (c ‖ s, scalars little-endian) that the sender knows ``secret`` = log_G(A)."""
    w = shamir.random_scalar(entropy)
    c = challenge(round_id, device_id, shamir.base_point_times(secret), shamir.base_point_times(w))
    return shamir.scalar_bytes(c) + shamir.scalar_bytes(w + c * secret)


def verify(round_id: int, device_id: str, a_point: bytes, proof: bytes) -> bool:
    """Whether ``proof`` shows that ``device_id`` knows log_G(A); False for anything malformed (never raises)."""
    if len(proof) != PROOF_BYTES:
        return False
    try:
        c = shamir.scalar_from_bytes(proof[:32])
        s = shamir.scalar_from_bytes(proof[32:])
        if c == 0 or s == 0:
            return False
        t = crypto_core_ed25519_sub(shamir.base_point_times(s), shamir.point_times(c, a_point))
    except (ValueError, TypeError, NaclRuntimeError):  # InvalidPoint is a ValueError
        return False
    return challenge(round_id, device_id, a_point, t) == c
