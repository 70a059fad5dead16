"""Distributed differential privacy (issue 16): each device adds discrete Gaussian noise to its quantised update
inside secure aggregation. The sampler draws the exact discrete Gaussian; the room in Z_2^32 holds the noise;
a secure round publishes the devices' mean plus noise of the configured scale, accounted by dp-accounting for
the survivors actually summed; --dp distributed without secure aggregation is refused."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from aggregator_harness import Harness, run
from dp_accounting import rdp
from nacl.signing import SigningKey
from scipy import stats
from secagg_harness import CLIP, flat_delta, secure_rounds, secure_running, transport, until_masked

from aggregator import cli
from aggregator.privacy import DPConfig
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from appliance import wire
from appliance.protocol import discrete_gaussian
from appliance.protocol import messages as m
from appliance.protocol.quantise import MAX_SUM, check_room, noise_tail, private_levels, sensitivity

KEY = bytes(range(32))  # the tests' fixed noise key; devices draw theirs from os.urandom


def _exact_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    reach = math.ceil(40 * sigma) + 1
    everywhere = np.arange(-reach, reach + 1, dtype=np.float64)
    norm = np.exp(-everywhere**2 / (2 * sigma**2)).sum()
    return np.exp(-support.astype(np.float64) ** 2 / (2 * sigma**2)) / norm


@pytest.mark.parametrize("sigma", [0.6, 3.5, 40.0])
def test_the_sampler_fits_the_exact_discrete_gaussian(sigma: float) -> None:
    """A chi-square goodness-of-fit test against the exact pmf, the tails pooled; mean and variance as exact."""
    n = 200_000
    draws = discrete_gaussian.sample(sigma, n, KEY)
    assert draws.dtype == np.int64
    reach = max(1, int(3 * sigma))  # bins -reach..reach, and the two tails beyond
    support = np.arange(-reach, reach + 1)
    pmf = _exact_pmf(sigma, support)
    tail = (1 - pmf.sum()) / 2
    observed = np.array([(draws < -reach).sum(), *[(draws == x).sum() for x in support], (draws > reach).sum()])
    expected = n * np.array([tail, *pmf, tail])
    keep = expected >= 5
    observed = np.append(observed[keep], observed[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    statistic, p_value = stats.chisquare(observed[expected > 0], expected[expected > 0])
    assert p_value > 1e-4, f"chi-square {statistic:.1f} over {keep.sum()} bins"
    reach = math.ceil(40 * sigma) + 1
    x = np.arange(-reach, reach + 1)
    variance = float(np.dot(_exact_pmf(sigma, x), x.astype(np.float64) ** 2))
    assert abs(draws.mean()) < 5 * math.sqrt(variance / n)
    assert draws.var() == pytest.approx(variance, rel=5 * math.sqrt(2 / n))


def test_the_sampler_at_the_scale_of_a_real_round() -> None:
    """sigma in the millions of quantisation steps, as a roster has it: mean 0 and variance sigma^2 (the
    discrete Gaussian's variance equals sigma^2 to double precision at this scale); fresh keys, fresh noise."""
    sigma, n = 3.7e6, 500_000
    draws = discrete_gaussian.sample(sigma, n, KEY).astype(np.float64)
    statistic = float(np.sum(draws**2)) / sigma**2
    p_value = 2 * min(stats.chi2.cdf(statistic, n), stats.chi2.sf(statistic, n))
    assert p_value > 1e-4, f"std {draws.std():.4g}, sigma {sigma:.4g}"
    assert abs(draws.mean()) < 5 * sigma / math.sqrt(n)
    other = discrete_gaussian.sample(sigma, 1000, bytes(32))
    assert not np.array_equal(other, discrete_gaussian.sample(sigma, 1000, KEY))


def test_the_levels_leave_room_in_the_ring_for_the_noise() -> None:
    for devices, z, dimension in [(2, 0.5, 10), (8, 1.0, 74_660), (100, 3.0, 1_000_000), (1000, 20.0, 10**7)]:
        levels, sigma = private_levels(devices, z, dimension)
        assert sigma == pytest.approx(z * sensitivity(levels, dimension) / math.sqrt(devices))
        assert devices * levels + noise_tail(devices, sigma) <= MAX_SUM
        check_room(devices, levels, 1, sigma)
        with pytest.raises(ValueError, match="overflow"):  # one level more, or more noise, would not fit
            check_room(devices, levels + max(1, levels // 1000), 1, sigma * 1.001)
    assert private_levels(8, 0.0, 100)[0] == MAX_SUM // 8  # without noise: the plain rule
    # The tail bound: the noise of n devices passes T in some coordinate of 2^32 with probability <= 2^-40.
    assert 2 * 2**32 * math.exp(-noise_tail(5, 1.0) ** 2 / (2 * 5)) == pytest.approx(2**-40)


def test_the_roster_carries_the_noise_and_refuses_a_bad_one() -> None:
    from tests.test_secagg_messages import _roster

    roster, key = _roster(4)[0], SigningKey.generate()
    assert "noise_sigma" not in wire.verify(m.encode_roster(roster, key), wire.pinned(key.verify_key)).payload
    levels, sigma = private_levels(4, 1.0, 100)
    noised = m.Roster(**{**roster.__dict__, "levels": levels, "max_samples": 1, "noise_sigma": sigma})
    decoded = m.decode_roster(m.encode_roster(noised, key), key.verify_key)
    assert decoded.noise_sigma == sigma and decoded.setup().noise_sigma == sigma
    crowded = m.Roster(**{**noised.__dict__, "levels": MAX_SUM // 4})  # no room left for the noise
    with pytest.raises(wire.ProtocolError, match="overflow"):
        m.decode_roster(m.encode_roster(crowded, key), key.verify_key)


def _independent_epsilon(noise_multipliers: list[float], delta: float) -> float:
    accountant = rdp.RdpAccountant()
    for z in noise_multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return accountant.get_epsilon(delta)


async def _status(h: Harness) -> dict:
    return await (await h.client.get("/v1/status")).json()


def test_a_distributed_dp_round_publishes_the_mean_plus_the_devices_noise(tmp_path: Path) -> None:
    """Round 1: four devices, the mean differs from the plain mean by noise of std sqrt(4) sigma C / (4 B). Round 2:
    one device stops after sharing, so the sum holds the noise of three, and the ledger says so. Epsilon in the
    status and in each signed release equals dp-accounting's for those noise multipliers, called here."""
    z, delta, parameters = 0.8, 1e-5, 3000

    async def go() -> None:
        policy = RoundPolicy(min_clients=2, goal_clients=4, round_timeout=15)
        privacy = DPConfig(z, delta, mode="distributed")
        async with secure_running(tmp_path, devices=4, parameters=parameters, phase_timeout=5, policy=policy,
                                  privacy=privacy) as h:
            multipliers = []
            after = 0
            for drop in (False, True):
                task = await h.task(after=after, wait=30)
                assert task is not None and task.secure_aggregation
                rounds = secure_rounds(h, task)
                await until_masked(rounds)
                roster = rounds[0].roster
                assert roster.max_samples == 1 and roster.noise_sigma > 0
                sending = rounds[1:] if drop else rounds
                deltas = [flat_delta(h, 0.001) for _ in sending]
                for r, d in zip(sending, deltas, strict=True):
                    assert (await h.upload(r.masked_input(d, 50)))[0] == 200
                before = h.engine.params.astype(np.float64).copy()
                await asyncio.gather(*(r.unmask() for r in sending))
                assert await h.task(after=task.round_id, wait=30) is not None, "the next round did not open"
                published = h.engine.params.astype(np.float64) - before
                n = len(sending)
                step = CLIP / roster.levels  # one quantisation level, in parameter units
                noise_std = math.sqrt(n) * roster.noise_sigma * step / n
                residual = published - np.mean(deltas, axis=0, dtype=np.float64)
                statistic = float(np.sum(residual**2)) / noise_std**2
                p_value = 2 * min(stats.chi2.cdf(statistic, parameters), stats.chi2.sf(statistic, parameters))
                assert p_value > 1e-4, f"residual std {residual.std():.4g}, configured {noise_std:.4g}"
                multipliers.append(math.sqrt(n) * roster.noise_sigma / (roster.levels + math.sqrt(parameters)))
                after = task.round_id
            assert multipliers[0] == pytest.approx(z, rel=1e-6)  # calibrated for the roster of 4
            assert multipliers[1] == pytest.approx(z * math.sqrt(3 / 4), rel=1e-6)  # one fewer: less noise
            status = await _status(h)
            expected = _independent_epsilon(multipliers, delta)
            assert status["privacy"]["mode"] == "distributed"
            assert "discrete Gaussian noise actually summed" in status["privacy"]["accounting"]
            assert status["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-9)
            response = await h.client.get("/v1/models/2")
            release = wire.decode_model_release(await response.read(), h.key.verify_key, h.specs)
            assert release.privacy["mode"] == "distributed" and release.privacy["rounds"] == 2
            assert release.privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
            assert release.privacy["noise_multiplier"] == pytest.approx(multipliers[1], rel=1e-9)
            assert "noised by the devices" in status["rounds"][-1]["note"]

    run(go())


def test_a_sum_whose_noise_would_pass_the_budget_is_never_unmasked(tmp_path: Path) -> None:
    """The budget fits one round at the full roster's noise; with one device gone the sum holds less noise than
    that, so the aggregator abandons the round before asking anyone for shares, and says why."""
    z, delta = 1.0, 1e-5
    budget = _independent_epsilon([z], delta) * 1.01

    async def go() -> None:
        policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=8)
        privacy = DPConfig(z, delta, budget, mode="distributed")
        async with secure_running(tmp_path, devices=3, phase_timeout=5, policy=policy, privacy=privacy) as h:
            task = await h.task(wait=30)
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            for r in rounds[1:]:
                assert (await h.upload(r.masked_input(flat_delta(h), 10)))[0] == 200
            assert await h.task(after=task.round_id, wait=30) is not None
            record = (await _status(h))["rounds"][-1]
            assert record["status"] == "abandoned" and "past the budget" in record["note"]
            assert h.engine.version == 0 and (await _status(h))["privacy"]["epsilon"] == 0
            assert h.counter("fl_aggregator_secagg_abandoned_total", reason="privacy-budget") == 1

    run(go())


def test_distributed_dp_without_secure_aggregation_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    base = ["serve", "--state", str(tmp_path / "s"), "--init", "--synthetic-parameters", "10", "--clip-norm", "1",
            "--dp", "distributed", "--dp-noise-multiplier", "1"]
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dp distributed needs --secure-aggregation" in err
    assert not (tmp_path / "s").exists()


def test_a_round_opened_without_noise_is_not_published_after_a_restart_with_distributed_dp(tmp_path: Path) -> None:
    """The roster of the open round asked for no noise; the aggregator comes back with --dp distributed (the
    state has published nothing yet, so the start-up check lets it): that sum is never published as private."""
    key, sims = SigningKey.generate(), [SimulatedDevice() for _ in range(3)]
    policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=20)

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, phase_timeout=5, policy=policy, key=key, enrolled=sims) as h:
            task = await h.task(wait=30)
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            assert rounds[0].roster.noise_sigma == 0
        privacy = DPConfig(1.0, 1e-5, mode="distributed")
        async with secure_running(tmp_path, devices=3, phase_timeout=5, policy=policy, key=key, enrolled=sims,
                                  privacy=privacy) as h:
            for r in rounds:
                r.transport = transport(h)
                assert (await h.upload(r.masked_input(flat_delta(h), 10)))[0] == 200
            await asyncio.gather(*(r.unmask() for r in rounds), return_exceptions=True)
            assert await h.task(after=task.round_id, wait=30) is not None
            record = (await _status(h))["rounds"][-1]
            assert record["status"] == "abandoned" and "no noise" in record["note"], record
            assert h.engine.version == 0 and (await _status(h))["privacy"]["epsilon"] == 0
            assert h.counter("fl_aggregator_secagg_abandoned_total", reason="unnoised") == 1

    run(go())
