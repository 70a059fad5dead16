"""The Chaum-Pedersen proof an accusation carries (appliance/protocol/dleq.py, docs/protocol.md 12.5): a fixed vector
that the prover makes and the verifier takes, its challenge recomputed from the document's byte layout, and every
other statement, and every malformed proof, refused."""

from __future__ import annotations

import hashlib

import pytest
from nacl.bindings import crypto_core_ed25519_add

from appliance.protocol import dleq, shamir
from tests.secagg_sim import ORDER_8, seeded_entropy

SECRET = int.from_bytes(hashlib.sha512(b"fl-edge dleq vector a").digest(), "little") % shamir.L
DEALER_SECRET = int.from_bytes(hashlib.sha512(b"fl-edge dleq vector d").digest(), "little") % shamir.L
A = shamir.base_point_times(SECRET)
D = shamir.base_point_times(DEALER_SECRET)
K = shamir.point_times(SECRET, D)
VECTOR_PROOF = bytes.fromhex(  # c || s, scalars little-endian
    "2ac8eea1a5b8fb4d33112c2574563cba82f563414a9b1965e2a089921617ea05"
    "5a37488c34ff4e3b78aaaf0d020bcecf3ef07a8ca68a293e01a54ee166eb0601"
)


def _independent_challenge(round_id, accuser, dealer, t1, t2):
    """c as docs/protocol.md 12.5 spells it, written out again here (not through dleq.challenge)."""
    base = bytes.fromhex("5866666666666666666666666666666666666666666666666666666666666666")
    data = (b"fl-edge/secagg/v1/dleq" + round_id.to_bytes(8, "big") + accuser.to_bytes(4, "big")
            + dealer.to_bytes(4, "big") + base + A + D + K + t1 + t2)
    return int.from_bytes(hashlib.sha512(data).digest(), "little") % shamir.L


def test_the_proof_vector_is_what_the_prover_makes_and_the_verifier_takes():
    proof = dleq.prove(7, 2, 0, SECRET, D, seeded_entropy("fl-edge dleq vector w"))
    assert proof == VECTOR_PROOF
    assert dleq.verify(7, 2, 0, A, D, K, VECTOR_PROOF)
    w = shamir.random_scalar(seeded_entropy("fl-edge dleq vector w"))  # the prover's nonce, drawn the same way
    c = _independent_challenge(7, 2, 0, shamir.base_point_times(w), shamir.point_times(w, D))
    assert shamir.scalar_bytes(c) + shamir.scalar_bytes(w + c * SECRET) == VECTOR_PROOF


@pytest.mark.parametrize(("name", "args"), [
    ("another round", (8, 2, 0, A, D, K)),
    ("another accuser", (7, 1, 0, A, D, K)),
    ("another dealer", (7, 2, 1, A, D, K)),
    ("K of another secret", (7, 2, 0, A, D, shamir.point_times(SECRET + 1, D))),
    ("A and K swapped", (7, 2, 0, K, D, A)),
    ("K with a torsion component", (7, 2, 0, A, D, crypto_core_ed25519_add(K, ORDER_8))),
    ("K not a point", (7, 2, 0, A, D, b"\xff" * 32)),
    ("K the identity", (7, 2, 0, A, D, bytes([1]) + bytes(31))),
])
def test_the_proof_vector_is_refused_for_anything_else(name, args):
    assert not dleq.verify(*args, VECTOR_PROOF), name


@pytest.mark.parametrize(("name", "proof"), [
    ("c = 0", bytes(32) + VECTOR_PROOF[32:]),
    ("s = 0", VECTOR_PROOF[:32] + bytes(32)),
    ("s >= L", VECTOR_PROOF[:32] + shamir.L.to_bytes(32, "little")),
    ("s + L (the same s, not reduced)", VECTOR_PROOF[:32]
     + (int.from_bytes(VECTOR_PROOF[32:], "little") + shamir.L).to_bytes(32, "little")),
    ("63 bytes", VECTOR_PROOF[:63]),
    ("65 bytes", VECTOR_PROOF + b"\0"),
])
def test_a_malformed_proof_is_refused(name, proof):
    assert not dleq.verify(7, 2, 0, A, D, K, proof), name
