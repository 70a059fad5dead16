"""A whole secure-aggregation round played with the pure protocol functions, no network: devices that drop out
after a chosen phase, an aggregator that routes, plans and unmasks. Used by the protocol and privacy tests."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import numpy as np

from appliance.protocol import graph
from appliance.protocol.quantise import levels_for, quantise
from appliance.protocol.secagg import (
    Answer,
    Dealing,
    DeviceRound,
    RoundSetup,
    RoutedShare,
    UnmaskPlan,
    UnmaskReport,
    masked_with,
    plan_unmask,
    threshold_for,
    unmask_total,
)

ROUND = 7
MAX_SAMPLES = 1000
CLIP = 1.0
PHASES = ("advertise", "share", "masked")


def make_setup(devices: list[DeviceRound], neighbours: int | None = None, fraction: float = 0.5) -> RoundSetup:
    n = len(devices)
    k = graph.effective_neighbours(n, neighbours)
    return RoundSetup(ROUND, tuple(d.keys for d in devices), k, threshold_for(k, fraction), levels_for(n),
                      MAX_SAMPLES, CLIP, graph_seed=b"test roster digest")


def _off_polynomial(setup: RoundSetup, devices: list[DeviceRound], dealer: int, recipient: int, sealed: bytes) -> bytes:
    """The dealer's ciphertext for ``recipient`` re-sealed with its share of b changed by one: it opens fine
    but no longer fits the dealer's commitments."""
    box = devices[dealer]._channel(recipient)[1]  # the channel's key is the same at both ends
    plain = bytearray(box.decrypt(sealed))
    plain[16] = (plain[16] + 1) % 256
    return bytes(box.encrypt(bytes(plain)))


def routed_to(setup: RoundSetup, dealings: dict[int, Dealing], recipient: int) -> list[RoutedShare]:
    return [
        RoutedShare(u, dealings[u].self_commitments, dealings[u].key_commitments, dealings[u].ciphertexts[recipient])
        for u in setup.graph[recipient]
        if u in dealings
    ]


# A point of order 8 (the torsion part Ed25519 has and the prime-order group has not).
ORDER_8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")


def seeded_entropy(label: str):
    """A reproducible entropy source for the protocol's ``entropy`` arguments: SHA-256 of ``label/0``, ``label/1``..."""
    counter = itertools.count()
    buffer = bytearray()

    def take(n: int) -> bytes:
        while len(buffer) < n:
            buffer.extend(hashlib.sha256(f"{label}/{next(counter)}".encode()).digest())
        out = bytes(buffer[:n])
        del buffer[:n]
        return out

    return take

@dataclass
class Outcome:
    setup: RoundSetup
    plan: UnmaskPlan
    report: UnmaskReport
    unmasked: np.ndarray  # the aggregator's sum after unmasking
    expected: np.ndarray  # the plain sum of the survivors' quantised inputs
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # what each device sent
    plain: dict[int, np.ndarray] = field(default_factory=dict)  # its quantised input before masking
    deltas: dict[int, np.ndarray] = field(default_factory=dict)


def play(
    n: int,
    parameters: int = 64,
    drop_phase: str | None = None,
    drop_rate: float = 0.0,
    neighbours: int | None = None,
    seed: int = 0,
    garbled: dict[int, set[int]] | None = None,
    inconsistent: dict[int, set[int]] | None = None,
    lying_holders: set[int] = frozenset(),
    false_accusations: dict[int, set[int]] | None = None,
) -> Outcome:
    """One round. ``drop_phase``: the last phase the dropped devices finish (advertise: they never deal;
    share: they never send a masked input; masked: they never answer the unmask request). ``garbled``:
    dealer -> recipients whose ciphertext from that dealer is corrupted in transit; ``inconsistent``: dealer ->
    recipients it gives a share off its polynomial (sealed properly). ``lying_holders`` answer with wrong shares.
    ``false_accusations``: accuser -> honest dealers it rejects anyway (with genuine evidence, and without masking
    with them, as its masked input then says).
    """
    rng = np.random.default_rng(seed)
    devices = [DeviceRound(ROUND) for _ in range(n)]
    setup = make_setup(devices, neighbours)
    gone = set(rng.permutation(n)[: round(drop_rate * n)].tolist()) if drop_phase else set()
    dealings = {i: devices[i].deal(setup, i) for i in range(n) if not (drop_phase == "advertise" and i in gone)}
    for dealer, recipients in (garbled or {}).items():
        for r in recipients:
            ciphertext = bytearray(dealings[dealer].ciphertexts[r])
            ciphertext[-1] ^= 1
            dealings[dealer].ciphertexts[r] = bytes(ciphertext)
    for dealer, recipients in (inconsistent or {}).items():
        for r in recipients:
            sealed = dealings[dealer].ciphertexts[r]
            dealings[dealer].ciphertexts[r] = _off_polynomial(setup, devices, dealer, r, sealed)
    outcome_masked, outcome_plain, deltas, rejections = {}, {}, {}, {}
    for i in sorted(dealings):
        if drop_phase == "share" and i in gone:
            continue
        rejected = set(devices[i].receive(routed_to(setup, dealings, i)))
        lies = (false_accusations or {}).get(i, set()) & set(setup.graph[i])
        devices[i]._accepted = [u for u in devices[i]._accepted if u not in lies]
        rejections[i] = tuple(devices[i].accusation(u) for u in sorted(rejected | lies))
        delta = rng.normal(0, 0.05, parameters).astype(np.float32)
        samples = int(rng.integers(1, 2 * MAX_SAMPLES))
        seed_i = seed * 1000 + i
        outcome_plain[i] = quantise(delta, samples, clip_norm=CLIP, levels=setup.levels, max_samples=MAX_SAMPLES,
                                    rng=np.random.default_rng(seed_i))
        outcome_masked[i] = devices[i].mask(delta, samples, np.random.default_rng(seed_i))
        deltas[i] = delta
    plan = plan_unmask(setup, dealings, rejections)
    total = np.zeros(parameters + 1, dtype=np.uint32)
    expected = np.zeros(parameters + 1, dtype=np.uint32)
    for v in plan.survivors:
        total += outcome_masked[v]
        expected += outcome_plain[v]
    answers: dict[int, Answer] = {}
    for v in rejections:
        if drop_phase == "masked" and v in gone:
            continue
        answer = devices[v].answer(plan.survivors, plan.dropped)
        if v in lying_holders:
            answer = Answer({u: (s + 1) for u, s in answer.self_shares.items()}, answer.key_shares, answer.pair_seeds)
        answers[v] = answer
    commitments = {u: (d.self_commitments, d.key_commitments) for u, d in dealings.items()}
    partners = masked_with(setup, set(dealings), rejections)
    report = unmask_total(total, setup, plan, partners, commitments, answers)
    return Outcome(setup, plan, report, total, expected, outcome_masked, outcome_plain, deltas)
