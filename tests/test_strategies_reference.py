"""Each aggregation rule against a plain numpy (or scipy) reference, honest and Byzantine updates alike."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aggregator.strategies import AggregationError, UpdateSet, make_strategy
from aggregator.strategies.fedavg import BLOCK_UPDATES
from aggregator.strategies.fedopt import FedAdam, FedYogi
from aggregator.strategies.krum import MultiKrum


def _updates(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    deltas = rng.normal(0.0, 1.0, (n, size)).astype(np.float32)
    weights = rng.integers(1, 100, n).astype(np.float64)
    return deltas, weights


def _set(deltas: np.ndarray, weights: np.ndarray, columns: int = 37) -> UpdateSet:
    """Tiny chunks (``columns`` per chunk) so every rule is exercised across chunk boundaries."""
    return UpdateSet(list(deltas), weights, chunk_bytes=4 * len(deltas) * columns)


def _aggregate(name: str, deltas: np.ndarray, weights: np.ndarray, **options) -> np.ndarray:
    strategy = make_strategy(name, **options)
    strategy.start_round(deltas.shape[1])
    for delta, weight in zip(deltas, weights, strict=True):
        strategy.add(delta, float(weight))
    return strategy.aggregate(_set(deltas, weights))


def test_fedavg_is_the_sample_weighted_mean() -> None:
    deltas, weights = _updates(13, 1000)
    expected = np.average(deltas.astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(_aggregate("fedavg", deltas, weights), expected, rtol=1e-5, atol=1e-6)


def test_fedavg_in_float32_blocks_stays_within_its_error_bound() -> None:
    """FedAvg sums blocks of updates in float32 (aggregator/strategies/fedavg.py, FedAvg.add): every coordinate of
    the mean is within BLOCK_UPDATES * 2^-24 of the weighted mean of |delta| (plus the float32 result's own half
    ulp), over many blocks, weights from 1 to 2^31 and deltas of mixed signs and scales."""
    rng = np.random.default_rng(7)
    n = 5 * BLOCK_UPDATES + 3  # whole blocks and a partial one
    deltas = (rng.normal(0.0, 1.0, (n, 4000)) * rng.choice([1e-6, 1.0, 1e3], (n, 1))).astype(np.float32)
    weights = rng.choice([1.0, 37.0, 2.0**31 - 1], n)
    expected = np.average(deltas.astype(np.float64), axis=0, weights=weights)
    got = _aggregate("fedavg", deltas, weights).astype(np.float64)
    scale = np.average(np.abs(deltas.astype(np.float64)), axis=0, weights=weights)
    bound = BLOCK_UPDATES * 2.0**-24 * scale + np.spacing(np.abs(expected).astype(np.float32)) / 2
    assert np.all(np.abs(got - expected) <= bound)


def test_fedavg_server_learning_rate_scales_the_step() -> None:
    deltas, weights = _updates(5, 100)
    expected = 0.5 * np.average(deltas.astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(_aggregate("fedavg", deltas, weights, server_lr=0.5), expected, rtol=1e-5, atol=1e-6)


def test_fedavg_memory_does_not_grow_with_clients() -> None:
    """The accumulator is all FedAvg keeps: adding 200 updates leaves it at model size."""
    strategy = make_strategy("fedavg")
    strategy.start_round(10_000)
    delta = np.ones(10_000, dtype=np.float32)
    for _ in range(200):
        strategy.add(delta, 2.0)
    held = [v for v in vars(strategy).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in held) <= 2 * 8 * 10_000
    np.testing.assert_allclose(strategy.mean_delta(), delta)


def _reference_fedopt(rounds: list[np.ndarray], yogi: bool, eta: float, b1: float, b2: float, tau: float):
    m = np.zeros_like(rounds[0], dtype=np.float64)
    v = np.full_like(rounds[0], tau * tau, dtype=np.float64)
    steps = []
    for d in rounds:
        d = d.astype(np.float64)
        m = b1 * m + (1 - b1) * d
        v = v - (1 - b2) * d * d * np.sign(v - d * d) if yogi else b2 * v + (1 - b2) * d * d
        steps.append(eta * m / (np.sqrt(v) + tau))
    return steps


@pytest.mark.parametrize("cls,yogi", [(FedAdam, False), (FedYogi, True)])
def test_fedopt_matches_the_paper_and_survives_a_restart(cls, yogi: bool) -> None:
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    rounds = [_updates(6, 300, seed) for seed in range(3)]
    means = [np.average(d.astype(np.float64), axis=0, weights=w) for d, w in rounds]
    expected = _reference_fedopt(means, yogi, eta, b1, b2, tau)
    strategy = cls(eta=eta, beta1=b1, beta2=b2, tau=tau)
    for i, (deltas, weights) in enumerate(rounds):
        if i == 2:  # restart: a fresh instance restores the moments saved with the previous version
            saved = {k: v.copy() for k, v in strategy.state().items()}
            strategy = cls(eta=eta, beta1=b1, beta2=b2, tau=tau)
            strategy.load_state(saved)
        strategy.start_round(300)
        for delta, weight in zip(deltas, weights, strict=True):
            strategy.add(delta, float(weight))
        step = strategy.aggregate(_set(deltas, weights))
        np.testing.assert_allclose(step, expected[i], rtol=1e-4, atol=1e-7)


def test_median_is_coordinatewise() -> None:
    for n in (7, 8):
        deltas, weights = _updates(n, 500)
        np.testing.assert_allclose(_aggregate("median", deltas, weights), np.median(deltas, axis=0), rtol=1e-6)


def test_trimmed_mean_matches_scipy() -> None:
    deltas, weights = _updates(20, 500)
    expected = stats.trim_mean(deltas.astype(np.float64), 0.2, axis=0)
    np.testing.assert_allclose(_aggregate("trimmed-mean", deltas, weights, beta=0.2), expected, rtol=1e-5, atol=1e-6)


def _reference_multikrum(deltas: np.ndarray, weights: np.ndarray, f: int, keep: int) -> tuple[list[int], np.ndarray]:
    x = deltas.astype(np.float64)
    n = len(x)
    distances = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
    scores = []
    for i in range(n):
        others = np.sort(np.delete(distances[i], i))
        scores.append(others[: n - f - 2].sum())
    chosen = sorted(int(i) for i in np.argsort(scores, kind="stable")[:keep])
    return chosen, np.average(x[chosen], axis=0, weights=weights[chosen])


def test_multikrum_selects_and_averages_like_the_reference() -> None:
    deltas, weights = _updates(11, 400)
    deltas[3] += 5.0
    deltas[8] *= -4.0
    chosen, expected = _reference_multikrum(deltas, weights, f=2, keep=7)
    strategy = MultiKrum(byzantine=2, keep=7)
    assert strategy.select(_set(deltas, weights)) == chosen
    assert 3 not in chosen and 8 not in chosen
    np.testing.assert_allclose(strategy.aggregate(_set(deltas, weights)), expected, rtol=1e-5, atol=1e-6)


def _byzantine_round(attack: str, honest: int = 12, byzantine: int = 3, size: int = 400):
    rng = np.random.default_rng(11)
    mu = rng.normal(0.0, 1.0, size)
    good = (mu + rng.normal(0.0, 0.1, (honest, size))).astype(np.float32)
    honest_mean = good.astype(np.float64).mean(axis=0)
    if attack == "scaled":
        bad = np.repeat(good[:1] * 50.0, byzantine, axis=0)
    elif attack == "sign-flipped":
        bad = np.repeat(-10.0 * good[:1], byzantine, axis=0)
    else:  # noise
        bad = rng.normal(0.0, 30.0, (byzantine, size)).astype(np.float32)
    deltas = np.vstack([good, bad]).astype(np.float32)
    weights = np.full(len(deltas), 10.0)
    return deltas, weights, honest_mean


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped", "noise"])
def test_robust_rules_stay_close_to_the_honest_mean(attack: str) -> None:
    deltas, weights, honest_mean = _byzantine_round(attack)
    scale = np.linalg.norm(honest_mean)

    def error(name: str, **options) -> float:
        return float(np.linalg.norm(_aggregate(name, deltas, weights, **options) - honest_mean) / scale)

    assert error("fedavg") > 1.0  # the attack works on the plain mean...
    assert error("median") < 0.1  # ...and not on the robust rules
    assert error("trimmed-mean", beta=0.25) < 0.1
    assert error("krum", byzantine=3) < 0.05


def test_chunks_stay_within_the_byte_budget() -> None:
    deltas, weights = _updates(50, 10_000)
    updates = UpdateSet(list(deltas), weights, chunk_bytes=64 * 1024)
    covered = 0
    for start, stop, matrix in updates.chunks():
        assert matrix.nbytes <= 64 * 1024
        np.testing.assert_array_equal(matrix, deltas[:, start:stop])
        covered += stop - start
    assert covered == 10_000


def test_rules_explain_why_they_cannot_aggregate() -> None:
    deltas, weights = _updates(4, 10)
    with pytest.raises(AggregationError, match="2f\\+3"):
        MultiKrum(byzantine=1).aggregate(_set(deltas, weights))
    with pytest.raises(AggregationError, match="no updates"):
        make_strategy("trimmed-mean", beta=0.49).aggregate(_set(deltas[:0], weights[:0]))
    with pytest.raises(ValueError, match="beta must be in"):
        make_strategy("trimmed-mean", beta=0.5)
    fedavg = make_strategy("fedavg")
    fedavg.start_round(10)
    with pytest.raises(AggregationError, match="no updates"):
        fedavg.aggregate(_set(deltas[:0], weights[:0]))
    with pytest.raises(ValueError, match="unknown strategy 'bulyan'"):
        make_strategy("bulyan")
