"""The worked example of docs/protocol.md section 12 (secure aggregation) is generated here and checked, so the
document cannot rot.

    .venv/bin/python tests/test_secagg_example.py            # print the generated blocks
    .venv/bin/python tests/test_secagg_example.py --write    # rewrite them in docs/protocol.md

Every random byte of the example comes from fixed streams (keys, secrets, polynomial coefficients, nonces, the
stochastic rounding), and Ed25519 signatures are deterministic, so the bytes are the same on every machine.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import cbor2
import numpy as np
from nacl.bindings import crypto_core_ed25519_sub
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aggregator.secagg_bounds import bounded_mean, mean_norm_bound  # noqa: E402
from appliance import wire  # noqa: E402
from appliance.protocol import dleq, key_possession, shamir, x25519  # noqa: E402
from appliance.protocol import messages as m  # noqa: E402
from appliance.protocol.quantise import dequantise, levels_for, quantise  # noqa: E402
from appliance.protocol.secagg import (  # noqa: E402
    Dealing,
    DeviceRound,
    RoutedShare,
    accusation_holds,
    masked_with,
    open_shares,
    pairwise_mask_seed,
    plan_unmask,
    self_mask_seed,
    share_key,
    threshold_for,
    unmask_total,
)
from tests.test_wire_example import (  # noqa: E402
    DOC,
    _plain,
    assert_doc_shows,
    diag,
    doc_blocks,
    wrap_hex,
    write_or_print,
)

ROUND = 7
DEADLINE = 1_764_288_600
NAMES = ("A", "B", "C")
UPDATES = {
    "A": (np.array([0.5, -0.25, 0.125], dtype=np.float32), 128),
    "B": (np.array([-0.125, 0.0625, 0.5], dtype=np.float32), 64),
    "C": (np.array([0.25, 0.25, -0.5], dtype=np.float32), 32),
}


def _stream(label: str):
    """A fixed byte stream: SHA-256(label || counter) blocks, handed out in order."""
    state = {"buffer": b"", "counter": 0}

    def take(n: int) -> bytes:
        while len(state["buffer"]) < n:
            block = hashlib.sha256(f"{label}/{state['counter']}".encode()).digest()
            state["buffer"] += block
            state["counter"] += 1
        out, state["buffer"] = state["buffer"][:n], state["buffer"][n:]
        return out

    return take


def signing_key(name: str) -> SigningKey:
    return SigningKey(hashlib.sha256(f"fl-edge secagg example device {name}".encode()).digest())


AGGREGATOR_KEY = SigningKey(hashlib.sha256(b"fl-edge secagg example aggregator").digest())


class Example:
    """Three devices; C drops out after the share phase, A and B are summed."""

    def __init__(self) -> None:
        self.keys = {n: signing_key(n) for n in NAMES}
        self.ids = {n: wire.key_id(k.verify_key) for n, k in self.keys.items()}
        self.rounds = {n: DeviceRound(ROUND, _stream(f"fl-edge secagg example entropy {n}")) for n in NAMES}
        self.advertise = {
            n: m.encode_advertise(m.Advertise(ROUND, self.ids[n], self.rounds[n].keys,
                                              self.rounds[n].cipher_key_proof(self.ids[n])), self.keys[n])
            for n in NAMES
        }
        order = sorted(NAMES, key=lambda n: self.ids[n])
        self.index = {n: order.index(n) for n in NAMES}
        self.name_at = dict(enumerate(order))
        self.roster = m.Roster(ROUND, tuple(self.ids[n] for n in order), tuple(self.rounds[n].keys for n in order),
                               neighbours=2, threshold=threshold_for(2), levels=levels_for(3), max_samples=1000,
                               clip_norm=1.0, deadline=DEADLINE - 500)
        self.roster_body = m.encode_roster(self.roster, AGGREGATOR_KEY)
        self.setup = m.decode_roster(self.roster_body, AGGREGATOR_KEY.verify_key).setup()
        self.dealings = {n: self.rounds[n].deal(self.setup, self.index[n]) for n in NAMES}
        self.shares_body = {n: m.encode_shares(m.Shares(ROUND, self.ids[n], self.dealings[n]), self.keys[n])
                            for n in NAMES}
        survivors = ("A", "B")
        self.routed = {}
        for n in survivors:
            i = self.index[n]
            shares = tuple(
                RoutedShare(self.index[d], self.dealings[d].self_commitments, self.dealings[d].key_commitments,
                            self.dealings[d].ciphertexts[i])
                for d in sorted(NAMES, key=lambda d: self.index[d]) if d != n
            )
            self.routed[n] = m.encode_routed(m.Routed(ROUND, self.ids[n], i, shares, DEADLINE - 300), AGGREGATOR_KEY)
        self.rejected = {}
        self.accusations = {}
        self.masked = {}
        self.masked_body = {}
        for n in survivors:
            routed = m.decode_routed(self.routed[n], AGGREGATOR_KEY.verify_key)
            self.rejected[n] = self.rounds[n].receive(routed.shares)
            delta, samples = UPDATES[n]
            self.masked[n] = self.rounds[n].mask(delta, samples, np.random.default_rng(0))
            self.accusations[n] = tuple(self.rounds[n].accusation(d) for d in self.rejected[n])
            self.masked_body[n] = m.encode_masked(
                m.MaskedInput(ROUND, self.ids[n], self.masked[n], self.accusations[n]), self.keys[n])
        rejections = {self.index[n]: self.accusations[n] for n in survivors}
        self.plan = plan_unmask(self.setup, {self.index[n]: d for n, d in self.dealings.items()}, rejections)
        self.request = m.UnmaskRequest(ROUND, tuple(self.plan.survivors), tuple(self.plan.dropped), DEADLINE)
        self.request_body = m.encode_unmask_request(self.request, AGGREGATOR_KEY)
        self.answers = {n: self.rounds[n].answer(self.plan.survivors, self.plan.dropped) for n in survivors}
        self.unmask_body = {n: m.encode_unmask(m.Unmask(ROUND, self.ids[n], self.answers[n]), self.keys[n])
                            for n in survivors}
        self.total = sum((self.masked[n] for n in survivors), np.zeros(4, dtype=np.uint32))
        self.unmasked = self.total.copy()
        commitments = {self.index[n]: (d.self_commitments, d.key_commitments) for n, d in self.dealings.items()}
        unmask_total(self.unmasked, self.setup, self.plan, masked_with(self.setup, set(range(3)), rejections),
                     commitments, {self.index[n]: a for n, a in self.answers.items()})


def split(body: bytes) -> tuple[bytes, bytes]:
    """(envelope, section) of a message."""
    stream = io.BytesIO(body)
    cbor2.CBORDecoder(stream).decode()
    return body[: stream.tell()], body[stream.tell():]


def message_diag(body: bytes, section_note: str = "") -> str:
    envelope, section = split(body)
    protected, _, payload, signature = cbor2.loads(envelope).value
    lines = [
        "/ COSE_Sign1 /",
        "18([",
        f"  / protected / << {diag(cbor2.loads(protected), 1)} >>,",
        "  / unprotected / {},",
        f"  / payload / << {diag(_plain(cbor2.loads(payload)), 1)} >>,",
        f"  / signature / {diag(signature)}",
        "])",
    ]
    if section:
        lines += [f"/ section, {len(section)} bytes{section_note} /", diag(_plain(cbor2.loads(section)))]
    return "\n".join(lines)


def words(array: np.ndarray) -> str:
    return "[" + ", ".join(str(int(w)) for w in array) + "]"


def example_blocks() -> dict[str, str]:
    ex = Example()
    setup = ex.setup
    delta, samples = UPDATES["A"]
    step = setup.clip_norm / setup.levels
    plain_a = quantise(delta, samples, clip_norm=1.0, levels=setup.levels, max_samples=1000,
                       rng=np.random.default_rng(0))  # the draws mask() made
    scale = min(samples, 1000) / 1000 * setup.levels / setup.clip_norm
    weighted, weight = dequantise(ex.unmasked, clip_norm=1.0, levels=setup.levels, max_samples=1000)
    return {
        "secagg-example-devices": "\n".join(
            [f"aggregator id           {wire.key_id(AGGREGATOR_KEY.verify_key)}"]
            + [f"device {n}: id {ex.ids[n]}  roster index {ex.index[n]}  x = {ex.index[n] + 1}" for n in NAMES]
            + [f"graph: {setup.neighbours} neighbours each (the complete graph), threshold t = {setup.threshold}",
               f"levels B = floor((2^31 - 1) / 3) = {setup.levels}, max_samples W = 1000, clip_norm C = 1.0"]
        ),
        "secagg-advertise": message_diag(ex.advertise["A"]) + "\n\nhex:\n" + wrap_hex(ex.advertise["A"])
        + "\n\n" + possession_block(ex),
        "secagg-roster": message_diag(ex.roster_body)
        + f"\n\ngraph seed = SHA-256(section) = {setup.graph_seed.hex()}",
        "secagg-shares": message_diag(ex.shares_body["A"]),
        "secagg-routed": message_diag(ex.routed["A"]),
        "secagg-masked": "\n".join([
            f"device A: delta {[float(x) for x in delta]}, {samples} samples, ||delta|| <= C",
            f"w = min({samples}, W) = {min(samples, 1000)}; scale = (w / W) * (B / C) = {scale!r}",
            f"x = delta * scale = {[float(v) for v in delta.astype(np.float64) * scale]}",
            f"words before masking (stochastic rounding, two's complement; last word w) = {words(plain_a)}",
            f"self-mask seed  = {self_mask_seed(ROUND, ex.rounds['A']._self_secret).hex()}",
            *pairwise_seed_lines(ex),
            f"masked words (sent) = {words(ex.masked['A'])}",
            "",
            message_diag(ex.masked_body["A"], ": a uint32 typed array, RFC 8746 tag 70"),
        ]),
        "secagg-accusation": accusation_block(ex),
        "secagg-unmask-request": message_diag(ex.request_body),
        "secagg-unmask": message_diag(ex.unmask_body["A"]),
        "secagg-sum": "\n".join([
            f"sum of A's and B's masked words          {words(ex.total)}",
            f"after taking the masks off               {words(ex.unmasked)}",
            f"read as int32, last word as the weight   {[int(v) for v in ex.unmasked[:-1].view(np.int32)]}, "
            f"{int(ex.unmasked[-1])}",
            f"sum of w_i * delta_i = W * C / B * q      {[round(float(v), 6) for v in weighted]}",
            f"sum of w_i                               {weight}",
            f"weighted mean delta                      {[round(float(v), 6) for v in weighted / weight]}",
            f"step (C / B, per unit of weight W)       {step!r}",
            *bound_checks(ex),
        ]),
    }


def pairwise_seed_lines(ex: Example) -> list[str]:
    """A's pairwise seed with B (12.5), from A's clamped mask secret by X25519, as a device computes it; and the
    same u from B's end with the Ed25519 group's multiplication, as the aggregator computes it from a rebuilt r."""
    setup, a_round, b_round = ex.setup, ex.rounds["A"], ex.rounds["B"]
    a, b = ex.index["A"], ex.index["B"]
    low, high = sorted((a, b))
    r_b_point = setup.keys[b].mask
    u_r_b = x25519.u_coordinate(r_b_point)
    shared = x25519.shared_u(a_round._mask_x25519, u_r_b)
    assert shared == x25519.u_coordinate(shamir.point_times(b_round._mask_secret, a_round.keys.mask))
    assert a_round.keys.mask == shamir.base_point_times(x25519.group_scalar(a_round._mask_x25519))
    seed = pairwise_mask_seed(ROUND, a, b, shared)
    assert seed == a_round._pair_seeds[b] == b_round._pair_seeds[a]  # what A masked with, and B
    names = {a: "A", b: "B"}
    return [
        "pairwise seed A-B:",
        f"   r_A, a clamped X25519 scalar       {a_round._mask_x25519.hex()}",
        f"   r_A mod L                          {shamir.scalar_bytes(a_round._mask_secret).hex()}",
        f"   R_A = G * (r_A mod L) (mask_key)   {a_round.keys.mask.hex()}",
        f"   R_B (B's mask_key)                 {r_b_point.hex()}",
        f"   u(R_B) = (1 + y) / (1 - y) mod p   {u_r_b.hex()}",
        f"   X25519(r_A, u(R_B))                {shared.hex()}",
        "     = u(R_A * (r_B mod L)), what B (and the aggregator, from a rebuilt r_B) gets",
        f"   s_AB = SHA-256(\"fl-edge/secagg/v1/pairwise-mask\" || round || {low} ({names[low]}, the lower index) "
        f"|| {high} ({names[high]}) || u)",
        f"        = {seed.hex()}",
    ]


def possession_block(ex: Example) -> str:
    """The aggregator's check of A's cipher_proof (12.3), with the intermediate values a reimplementation needs."""
    keys = ex.rounds["A"].keys
    proof = bytes(cbor2.loads(cbor2.loads(ex.advertise["A"]).value[2])["cipher_proof"])
    c, s = shamir.scalar_from_bytes(proof[:32]), shamir.scalar_from_bytes(proof[32:])
    t = crypto_core_ed25519_sub(shamir.base_point_times(s), shamir.point_times(c, keys.cipher))
    again = key_possession.challenge(ROUND, ex.ids["A"], keys.cipher, t)
    assert key_possession.verify(ROUND, ex.ids["A"], keys.cipher, proof) and again == c
    return "\n".join([
        "aggregator, checking A's cipher_proof:",
        f"   c = {proof[:32].hex()}",
        f"   s = {proof[32:].hex()}",
        f"   T = s * G - c * A_A            {t.hex()}",
        '   SHA-512("fl-edge/secagg/v1/cipher-key" || round || '
        f'{len(ex.ids["A"])} (2 bytes BE) || device id || G || A_A || T) mod L',
        f"     = {shamir.scalar_bytes(again).hex()} = c: A knows its cipher secret",
    ])


def accusation_block(ex: Example) -> str:
    """Section 12.5/12.6's accusation: had C dealt A a share of b_C off its polynomial, A's evidence and the
    aggregator's judgement of it, step by step (and the same evidence against honest B's ciphertext)."""
    setup = ex.setup
    a, c = ex.index["A"], ex.index["C"]
    a_round, c_round = ex.rounds["A"], ex.rounds["C"]
    honest = ex.dealings["C"]
    plain = bytearray(a_round._channel(c)[1].decrypt(honest.ciphertexts[a]))
    plain[16] = (plain[16] + 1) % 256  # the first byte of the share of b_C, plus one
    nonce = hashlib.sha256(b"fl-edge secagg example cheating nonce").digest()[:24]
    cheating = Dealing(honest.self_commitments, honest.key_commitments,
                       {**honest.ciphertexts, a: bytes(c_round._channel(a)[1].encrypt(bytes(plain), nonce))})
    routed = RoutedShare(c, cheating.self_commitments, cheating.key_commitments, cheating.ciphertexts[a])
    evidence = a_round.accusation(c)
    k_point, proof = evidence.channel_point, evidence.proof
    cs, ss = int.from_bytes(proof[:32], "little"), int.from_bytes(proof[32:], "little")
    a_key, c_key = setup.keys[a].cipher, setup.keys[c].cipher
    t1 = crypto_core_ed25519_sub(shamir.base_point_times(ss), shamir.point_times(cs, a_key))
    t2 = crypto_core_ed25519_sub(shamir.point_times(ss, c_key), shamir.point_times(cs, k_point))
    k_u = x25519.u_coordinate(k_point)
    assert k_u == a_round._channel(c)[0] == c_round._channel(a)[0]  # what A and C got from X25519
    key = share_key(ROUND, a, c, k_u)
    opened = open_shares(setup, c, a, a_round._channel(c)[1], routed.self_commitments,
                         routed.key_commitments, routed.ciphertext)
    assert opened is not None and accusation_holds(setup, a, evidence, cheating)
    b = ex.index["B"]
    against_b = a_round.accusation(b)
    assert not accusation_holds(setup, a, against_b, ex.dealings["B"])
    x = a + 1
    return "\n".join([
        f"C's ciphertext to A, resealed with the first byte of the share of b_C plus one (nonce {nonce.hex()}):",
        wrap_hex(cheating.ciphertexts[a]),
        "",
        f"A: channel point K = A_C * (a_A mod L)   {k_point.hex()}",
        f"   u(K) = X25519(a_A, u(A_C))           {k_u.hex()}",
        f"   share key = SHA-256(\"fl-edge/secagg/v1/share-key\" || round || {c} (C, the lower index) || {a} (A) "
        "|| u(K))",
        f"             = {key.hex()}",
        f"   opens: round {ROUND}, dealer {c}, recipient {a}; share of b_C {shamir.scalar_bytes(opened[0]).hex()}",
        f"   G * share != sum_j C_j * {x}^j (C's self commitments): A rejects C, does not mask with it, and its",
        "   masked input carries [dealer, K, c || s]:",
        "",
        '"rejected": ' + diag([c, k_point, proof]).join(["[", "]"]),
        "",
        "aggregator, against C's signed dealing to A:",
        f"   c = {shamir.scalar_bytes(cs).hex()}",
        f"   s = {shamir.scalar_bytes(ss).hex()}",
        f"   T1 = s * G - c * A_A            {t1.hex()}",
        f"   T2 = s * A_C - c * K            {t2.hex()}",
        f"   SHA-512(\"fl-edge/secagg/v1/dleq\" || round || {a} || {c} || G || A_A || A_C || K || T1 || T2) mod L",
        f"     = {shamir.scalar_bytes(dleq.challenge(ROUND, a, c, a_key, c_key, k_point, t1, t2)).hex()} = c: "
        "the proof holds",
        "   the ciphertext opens under the key from u(K), and the share of b_C does not fit: the accusation holds,",
        "   C's input is left out (bad-shares) and A's counts",
        "",
        "the same evidence made against B, whose ciphertext to A holds good shares: the proof holds, the shares",
        "fit, so the accusation is false: A's input is left out (false-accusation) and B's counts",
    ])


def bound_checks(ex: Example) -> list[str]:
    """The aggregator's checks of the unmasked sum (section 12.6), with the example's numbers."""
    setup, survivors = ex.setup, len(ex.plan.survivors)
    mean, weight = bounded_mean(ex.unmasked, survivors=survivors, levels=setup.levels,
                                max_samples=setup.max_samples, clip_norm=setup.clip_norm)  # raises if one fails
    q = ex.unmasked[:-1].view(np.int32).astype(np.int64)
    bound = mean_norm_bound(survivors=survivors, weight=weight, dimension=q.size, levels=setup.levels,
                            max_samples=setup.max_samples, clip_norm=setup.clip_norm)
    return [
        f"{'check 1: S <= sum of w_i <= S * W':<41}{survivors} <= {weight} <= {survivors * setup.max_samples}",
        f"{'check 2: max |q_j| <= S * B':<41}{int(np.abs(q).max())} <= {survivors * setup.levels}",
        f"{'check 3: ||mean delta|| <= bound':<41}{float(np.linalg.norm(mean)):.6f} <= {bound:.10f}",
    ]


# -------------------------------------------------------------------------------------------- tests


def test_the_example_round_unmasks_to_the_plain_sum():
    ex = Example()
    assert ex.plan.survivors == sorted(ex.index[n] for n in ("A", "B"))
    assert ex.plan.dropped == [ex.index["C"]]
    weighted, weight = dequantise(ex.unmasked, clip_norm=1.0, levels=ex.setup.levels, max_samples=1000)
    assert weight == 128 + 64
    reference = 128 * UPDATES["A"][0].astype(np.float64) + 64 * UPDATES["B"][0].astype(np.float64)
    assert np.allclose(weighted, reference, atol=2 * 1000 / ex.setup.levels)


def test_the_example_is_deterministic():
    assert example_blocks() == example_blocks()


def test_doc_shows_the_current_example():
    """If this fails after a deliberate protocol change, run: python tests/test_secagg_example.py --write"""
    assert_doc_shows(DOC, example_blocks())


def test_doc_hex_is_a_valid_advertisement():
    hex_text = doc_blocks(DOC.read_text())["secagg-advertise"].split("hex:\n", 1)[1].split("\n\n", 1)[0]
    body = bytes.fromhex(hex_text.replace("\n", ""))
    key = signing_key("A")
    decoded = m.decode_advertise(body, {wire.key_id(key.verify_key): key.verify_key}.get)
    assert decoded.round_id == ROUND


if __name__ == "__main__":
    write_or_print(DOC, example_blocks())
