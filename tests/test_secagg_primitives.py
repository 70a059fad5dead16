"""The building blocks of secure aggregation: ChaCha20 mask expansion, verifiable Shamir sharing, the neighbour
graph and the quantisation into Z_{2^32}."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

from appliance.protocol import graph, prg, shamir
from appliance.protocol.quantise import MAX_SUM, check_room, dequantise, levels_for, quantise

ROOT = Path(__file__).resolve().parent.parent
# RFC 8439 appendix A.1, test vector 2: key and nonce all zero, block counter 1.
RFC8439_A1_TV2 = bytes.fromhex(
    "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
    "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f"
)


# ------------------------------------------------------------------------------------------------ ChaCha20


def test_mask_words_are_the_rfc8439_keystream():
    assert prg.keystream_words(bytes(32), 16).tobytes() == RFC8439_A1_TV2


def test_mask_words_match_an_independent_chacha20():
    # libsodium's ChaCha20-Poly1305 (RFC 8439 section 2.8) encrypts with the keystream from block counter 1:
    # its ciphertext of zeros, without the 16-byte tag, is the mask.
    seed = bytes(range(100, 132))
    sealed = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(20_000), None, bytes(12), seed)
    assert prg.keystream_words(seed, 5000).tobytes() == sealed[:20_000]


def test_masks_added_chunk_by_chunk_are_the_whole_keystreams():
    size = 2 * prg.CHUNK_WORDS + 1001  # two whole chunks and a short one
    start = np.arange(size, dtype=np.uint32) * np.uint32(2654435761)
    seeds = [bytes([i]) * 32 for i in range(3)]
    acc = start.copy()
    prg.add_masks(acc, [(seeds[0], +1), (seeds[1], -1), (seeds[2], +1)])
    words = [prg.keystream_words(seed, size) for seed in seeds]
    assert np.array_equal(acc, start + words[0] - words[1] + words[2])


def test_masks_go_only_on_a_uint32_vector():
    with pytest.raises(ValueError, match="uint32"):
        prg.add_masks(np.zeros(4, dtype=np.int64), [(bytes(32), +1)])


def test_add_mask_then_subtract_gives_back_the_input():
    acc = np.arange(1000, dtype=np.uint32)
    prg.add_mask(acc, b"k" * 32, +1)
    assert not np.array_equal(acc, np.arange(1000, dtype=np.uint32))
    prg.add_mask(acc, b"k" * 32, -1)
    assert np.array_equal(acc, np.arange(1000, dtype=np.uint32))


def test_a_seed_must_be_32_bytes():
    with pytest.raises(ValueError, match="32 bytes"):
        prg.keystream_words(b"short", 4)


# ------------------------------------------------------------------------------------------------- Shamir


def test_any_t_shares_rebuild_the_secret_and_t_minus_1_do_not():
    secret = shamir.random_scalar()
    holders = list(range(1, 11))
    shares, commitments = shamir.share(secret, holders, threshold=6)
    assert shamir.reconstruct({x: shares[x] for x in holders[:6]}) == secret
    assert shamir.reconstruct({x: shares[x] for x in holders[4:]}) == secret
    too_few = shamir.reconstruct({x: shares[x] for x in holders[:5]})
    assert too_few != secret
    assert not shamir.commits_to(commitments, too_few)
    assert shamir.commits_to(commitments, secret)


def test_a_share_off_the_polynomial_fails_verification():
    shares, commitments = shamir.share(shamir.random_scalar(), [1, 2, 3, 4, 5], threshold=3)
    assert all(shamir.verify_share(commitments, x, v) for x, v in shares.items())
    assert not shamir.verify_share(commitments, 2, (shares[2] + 1) % shamir.L)
    assert not shamir.verify_share(commitments, 3, shares[2])


def test_the_summed_check_catches_one_bad_dealer_among_many():
    dealings = [shamir.share(shamir.random_scalar(), [1, 2, 3, 4], threshold=3) for _ in range(6)]
    values = [shares[4] for shares, _ in dealings]
    commitment_lists = [commitments for _, commitments in dealings]
    assert shamir.verify_sum(commitment_lists, 4, values)
    values[3] = (values[3] + 7) % shamir.L
    assert not shamir.verify_sum(commitment_lists, 4, values)


def test_commitments_that_are_not_points_fail_verification_instead_of_raising():
    shares, commitments = shamir.share(shamir.random_scalar(), [1, 2, 3], threshold=2)
    broken = [commitments[0], b"\xff" * 32]
    assert not shamir.verify_share(broken, 1, shares[1])
    assert not shamir.verify_sum([broken], 1, [shares[1]])


def test_share_refuses_nonsense():
    with pytest.raises(ValueError, match="threshold"):
        shamir.share(5, [1, 2], threshold=3)
    with pytest.raises(ValueError, match="distinct"):
        shamir.share(5, [1, 1, 2], threshold=2)


# -------------------------------------------------------------------------------------------------- graph


@pytest.mark.parametrize("n", [3, 10, 57, 100, 1000])
def test_the_graph_is_k_regular_symmetric_and_fixed_by_its_seed(n):
    k = graph.effective_neighbours(n, None)
    g = graph.neighbours(n, k, b"seed")
    assert all(len(adjacent) == k and i not in adjacent for i, adjacent in enumerate(g))
    assert all(i in g[j] for i, adjacent in enumerate(g) for j in adjacent)
    assert g == graph.neighbours(n, k, b"seed")
    if k < n - 1:
        assert g != graph.neighbours(n, k, b"other seed")


def test_default_degree_is_about_2_log2_n_and_complete_when_small():
    assert graph.default_neighbours(100) == 14
    assert graph.default_neighbours(1000) == 20
    assert graph.default_neighbours(5) == 4  # 2 * 3 = 6 > n - 1
    assert graph.effective_neighbours(100, 7) == 8  # rounded up to even
    assert graph.effective_neighbours(10, 50) == 9
    assert graph.neighbours(5, 4, b"s") == [[j for j in range(5) if j != i] for i in range(5)]


# ----------------------------------------------------------------------------------------------- quantise


def test_stochastic_rounding_is_unbiased():
    delta = np.full(200_000, 0.123456789e-3, dtype=np.float32)
    levels = levels_for(100)
    words = quantise(delta, 10, clip_norm=1.0, levels=levels, max_samples=10, rng=np.random.default_rng(1))
    weighted, weight = dequantise(words, clip_norm=1.0, levels=levels, max_samples=10)
    assert weight == 10
    step = 1.0 / levels * 10  # max_samples * C / B, per unit of weight
    assert abs(weighted.mean() / 10 - float(delta[0])) < 5 * step / np.sqrt(delta.size)
    assert np.all(np.abs(weighted / 10 - delta) <= step / 10 + 1e-12)


def test_quantising_chunk_by_chunk_draws_what_one_pass_would():
    """The rounding words u are one ChaCha20 keystream (RFC 8439, counter 0, zero nonce) under a key of 32 bytes
    from the generator, read in
    order whatever the chunking: the words are floor(x) + [u < 2^32 (x - floor(x))] over the whole vector, x the
    update clipped to C (1 - 2^-30) and scaled."""
    delta = np.random.default_rng(3).normal(0, 0.05, 2 * 32768 + 7).astype(np.float32)  # norm about 9: clipped
    levels = levels_for(10)
    words = quantise(delta, 30, clip_norm=1.0, levels=levels, max_samples=40, rng=np.random.default_rng(4))
    exact = delta.astype(np.float64)
    x = exact * ((30 / 40) * levels / 1.0 * (1.0 * (1 - 2**-30) / float(np.sqrt(np.dot(exact, exact)))))
    key = np.random.default_rng(4).bytes(32)
    keystream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * delta.size))
    u = np.frombuffer(keystream, dtype="<u4")
    expected = np.floor(x) + (u < (x - np.floor(x)) * 2**32)
    assert np.array_equal(words[:-1].view(np.int32), expected.astype(np.int32))
    assert words[-1] == 30


def test_rounding_is_reproducible_from_the_generator_and_changes_with_it():
    delta = np.random.default_rng(5).normal(0, 1e-3, 1000).astype(np.float32)
    levels = levels_for(100)

    def words(seed: int) -> np.ndarray:
        return quantise(delta, 10, clip_norm=1.0, levels=levels, max_samples=10, rng=np.random.default_rng(seed))

    assert np.array_equal(words(1), words(1))
    assert not np.array_equal(words(1), words(2))


def test_a_coordinate_at_the_clip_norm_stays_within_the_levels():
    """A one-hot update at exactly C (and far beyond it) scales to just under B: rounding, however it falls,
    gives at most B in magnitude, never B + 1."""
    levels = levels_for(3)
    for value in (1.0, -1.0, 1e30, -1e30):
        for seed in range(20):
            q = quantise(np.array([value, 0.0], dtype=np.float32), 7, clip_norm=1.0, levels=levels, max_samples=7,
                         rng=np.random.default_rng(seed))[:-1].view(np.int32)
            assert abs(int(q[0])) in (levels - 1, levels) and q[1] == 0


@pytest.mark.parametrize("ratio", [1 - 2**-12, 1 + 2**-12])
def test_an_update_a_hair_from_the_clip_norm_is_clipped_only_if_over_it(ratio: float):
    """The float32 shortcut that skips the float64 norm must not wave through an update just over the limit:
    one at C (1 + 2^-12) comes back clipped to C, one at C (1 - 2^-12) comes back as it was."""
    direction = np.random.default_rng(6).normal(size=5000)
    delta = (direction * (ratio / np.linalg.norm(direction))).astype(np.float32)
    exact = delta.astype(np.float64)
    levels = levels_for(2)
    words = quantise(delta, 1, clip_norm=1.0, levels=levels, max_samples=1, rng=np.random.default_rng(0))
    weighted, _ = dequantise(words, clip_norm=1.0, levels=levels, max_samples=1)
    expected = exact / max(1.0, float(np.linalg.norm(exact)) / (1 - 2**-30))
    assert np.allclose(weighted, expected, rtol=0, atol=1.0 / levels)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_an_update_with_a_nan_or_an_infinity_is_refused(bad: float):
    with pytest.raises(ValueError, match="no finite norm"):
        quantise(np.array([0.1, bad], dtype=np.float32), 1, clip_norm=1.0, levels=100, max_samples=1,
                 rng=np.random.default_rng(0))


def test_the_weight_is_capped_and_scales_the_update():
    delta = np.array([0.5, -0.25], dtype=np.float32)
    levels = levels_for(3)
    words = quantise(delta, 5000, clip_norm=1.0, levels=levels, max_samples=100, rng=np.random.default_rng(0))
    weighted, weight = dequantise(words, clip_norm=1.0, levels=levels, max_samples=100)
    assert weight == 100
    assert np.allclose(weighted, 100 * delta, atol=1e-6)


def test_n_extreme_inputs_sum_without_wrapping():
    """The modulus leaves room for N devices: N inputs all at +C (and all at -C) sum back exactly."""
    n = 1000
    levels = levels_for(n)
    for sign in (+1, -1):
        one = quantise(np.array([sign * 1.0], dtype=np.float32), 7, clip_norm=1.0, levels=levels, max_samples=7,
                       rng=np.random.default_rng(0))
        total = np.zeros(2, dtype=np.uint32)
        for _ in range(n):
            total += one
        weighted, weight = dequantise(total, clip_norm=1.0, levels=levels, max_samples=7)
        assert weight == n * 7
        assert weighted[0] == pytest.approx(sign * n * 7.0)
        assert abs(int(total[:1].view(np.int32)[0])) <= MAX_SUM


def test_an_update_longer_than_the_clip_norm_is_clipped_not_wrapped():
    levels = levels_for(2)
    words = quantise(np.array([30.0, 40.0], dtype=np.float32), 1, clip_norm=5.0, levels=levels, max_samples=1,
                     rng=np.random.default_rng(0))
    weighted, _ = dequantise(words, clip_norm=5.0, levels=levels, max_samples=1)
    assert np.allclose(weighted, [3.0, 4.0], atol=1e-6)


def test_room_is_checked():
    check_room(100, levels_for(100), 1000)
    with pytest.raises(ValueError, match="overflow"):
        check_room(100, levels_for(99), 1000)
    with pytest.raises(ValueError, match="overflow"):
        check_room(2**20, 1, 2**12)


QUANTISE_AND_COUNT_OTHER_THREADS = """
import os, time
import numpy as np
from appliance.protocol.quantise import quantise

def other_threads_ticks():
    ticks = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != os.getpid():
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks

delta = np.random.default_rng(0).normal(0, 1e-4, 2_000_000).astype(np.float32)
before = other_threads_ticks()
for seed in range(3):
    quantise(delta, 10, clip_norm=1.0, levels=1000, max_samples=10, rng=np.random.default_rng(seed))
time.sleep(0.2)
print(other_threads_ticks() - before)
"""


def test_quantising_keeps_to_one_core():
    """A device's quantiser runs on the thread that calls it: no BLAS helper threads that compute part of a norm
    and then spin on the other cores (they doubled a device's CPU time for the round at P = 1M)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", QUANTISE_AND_COUNT_OTHER_THREADS], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    assert int(run.stdout) == 0, f"other threads used {run.stdout.strip()} clock ticks"
