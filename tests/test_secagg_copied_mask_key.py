"""A device that advertises a copy of an honest device's mask key, or its negation (the same u-coordinate,
docs/protocol.md 12.2), must not make its neighbours hand the curious aggregator their pairwise seeds with the honest
device. The copier cannot know the copied secret, but it can still deal shares that t - 1 holders accept (Feldman
commitments built "in the exponent" around the copied key), and those holders mask with it. When it then drops out,
they send the aggregator their seeds with it; were a seed made from the Diffie-Hellman value alone, the seed with the
copier would be the seed with the honest device, and with the honest device's self mask (it survived) the aggregator
would unmask its input. Unlike the cipher key (12.3), the mask key carries no proof of possession."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from nacl.bindings import crypto_core_ed25519_add

from appliance.protocol import prg, shamir
from appliance.protocol.quantise import quantise
from appliance.protocol.secagg import (
    Dealing,
    DeviceRound,
    masked_with,
    plan_unmask,
    self_mask_seed,
    unmask_total,
    x_of,
)
from tests.secagg_sim import CLIP, MAX_SAMPLES, ROUND, make_setup, routed_to

VICTIM, COPIER = 0, 3
PARAMETERS = 16


def _negated(point: bytes) -> bytes:
    return point[:31] + bytes([point[31] ^ 0x80])


def _basis(xs: list[int]) -> list[list[int]]:
    """The coefficients (constant first) mod L of each Lagrange basis polynomial of the points ``xs``."""
    rows = []
    for i, xi in enumerate(xs):
        poly, denominator = [1], 1
        for j, xj in enumerate(xs):
            if j != i:
                poly = [(a - xj * b) % shamir.L for a, b in zip([0, *poly], [*poly, 0], strict=True)]
                denominator = denominator * (xi - xj) % shamir.L
        inverse = pow(denominator, -1, shamir.L)
        rows.append([c * inverse % shamir.L for c in poly])
    return rows


def _commitments_around(key: bytes, shares: dict[int, int], threshold: int) -> list[bytes]:
    """Feldman commitments of the polynomial with f(0) = log_G(key), unknown, and f(x) = shares[x]."""
    xs = [0, *shares]
    points = [key, *(shamir.base_point_times(s) for s in shares.values())]
    commitments = []
    for j in range(threshold):
        terms = [shamir.point_times(row[j], p) for row, p in zip(_basis(xs), points, strict=True) if row[j]]
        total = terms[0]
        for term in terms[1:]:
            total = crypto_core_ed25519_add(total, term)
        commitments.append(total)
    return commitments


@pytest.mark.parametrize("copy", [lambda key: key, _negated], ids=["copied", "negated"])
def test_a_copied_mask_key_gives_the_aggregator_no_seed_of_the_honest_device(copy):
    devices = [DeviceRound(ROUND) for _ in range(4)]
    copier = devices[COPIER]
    copier.keys = dataclasses.replace(copier.keys, mask=copy(devices[VICTIM].keys.mask))
    setup = make_setup(devices)  # the complete graph of 4: t = 3, so t - 1 = 2 holders can accept the copier
    t = setup.threshold
    dealings = {i: d.deal(setup, i) for i, d in enumerate(devices)}
    fooled = [h for h in setup.graph[COPIER] if h != VICTIM]
    assert len(fooled) == t - 1
    key_shares = {x_of(h): shamir.random_scalar() for h in fooled}
    key_commitments = _commitments_around(setup.keys[COPIER].mask, key_shares, t)
    ciphertexts = dict(dealings[COPIER].ciphertexts)
    for h in fooled:
        box = copier._channel(h)[1]
        plain = box.decrypt(ciphertexts[h])[:48] + shamir.scalar_bytes(key_shares[x_of(h)])
        ciphertexts[h] = bytes(box.encrypt(plain))
    dealings[COPIER] = Dealing(dealings[COPIER].self_commitments, tuple(key_commitments), ciphertexts)

    rejected = {i: devices[i].receive(routed_to(setup, dealings, i)) for i in range(3)}
    assert rejected == {VICTIM: [COPIER], **{h: [] for h in fooled}}  # the fooled holders mask with the copier
    rng = np.random.default_rng(5)
    deltas = {i: rng.normal(0, 0.1, PARAMETERS).astype(np.float32) for i in range(3)}
    masked = {i: devices[i].mask(deltas[i], 10, np.random.default_rng(i)) for i in range(3)}
    plain = {i: quantise(deltas[i], 10, clip_norm=CLIP, levels=setup.levels, max_samples=MAX_SAMPLES,
                         rng=np.random.default_rng(i)) for i in range(3)}
    accusations = {VICTIM: (devices[VICTIM].accusation(COPIER),), **{h: () for h in fooled}}
    plan = plan_unmask(setup, dealings, accusations)  # the copier sends no masked input
    assert plan.survivors == [0, 1, 2] and plan.dropped == [COPIER]
    answers = {v: devices[v].answer(plan.survivors, plan.dropped) for v in plan.survivors}

    # the round itself still sums exactly
    total = sum(masked.values()).astype(np.uint32)
    commitments = {u: (d.self_commitments, d.key_commitments) for u, d in dealings.items()}
    unmask_total(total, setup, plan, masked_with(setup, set(dealings), accusations), commitments, answers)
    assert np.array_equal(total, sum(plain.values()).astype(np.uint32))

    # the curious aggregator: the victim's self mask (it survived) and the seeds the fooled holders sent for the
    # copier, taken off the victim's masked input as if they were the victim's seeds with them
    b = shamir.reconstruct({x_of(v): a.self_shares[VICTIM] for v, a in answers.items()})
    guess = masked[VICTIM].copy()
    prg.add_mask(guess, self_mask_seed(ROUND, b), -1)
    for h in fooled:
        prg.add_mask(guess, answers[h].pair_seeds[COPIER], -1)  # the victim added +PRG(s_0h): 0 < h
    assert not np.array_equal(guess, plain[VICTIM])
