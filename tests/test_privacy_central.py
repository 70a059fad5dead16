"""Central differential privacy (issue 16): calibrated noise, the accountant's epsilon in status, metrics and every
signed release, a budget that stops rounds, refusals of settings that break the guarantee, and nothing changed
with DP off."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from aggregator_harness import Harness, run, running
from dp_accounting import rdp
from scipy import stats

from aggregator.privacy import DPConfig, GaussianSum, PrivacyError
from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.strategies import make_strategy
from aggregator.strategies.chunks import UpdateSet
from appliance import wire

ROOT = Path(__file__).resolve().parent.parent
CLIP = 1.0


def _independent_epsilon(z: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


async def _release(h: Harness, which: str | int) -> wire.ModelRelease:
    response = await h.client.get(f"/v1/models/{which}")
    assert response.status == 200
    return wire.decode_model_release(await response.read(), h.key.verify_key, h.specs)


async def _round(h: Harness, after: int, scale: float = 0.01) -> int:
    task = await h.task(after=after, wait=10)
    assert task is not None, "no round opened"
    for device in h.devices:
        assert (await h.upload(device.update(task, h.delta(scale))))[0] == 200
    return task.round_id


def test_the_noise_has_the_calibrated_standard_deviation() -> None:
    """Noise on the sum of zero deltas is N(0, (z S)^2) per coordinate: a chi-square test of its variance."""
    z, clip, n = 1.3, 0.7, 200_000
    rule = make_strategy("fedavg")
    rule.make_private(GaussianSum(clip, z))
    rule.start_round(n)
    for _ in range(4):
        rule.add(np.zeros(n, np.float32), 50.0)
    noise = rule.mean_delta().astype(np.float64) * 4  # the mean divides the noised sum by the 4 participants
    statistic = float(np.sum(noise**2)) / (z * clip) ** 2
    p_value = 2 * min(stats.chi2.cdf(statistic, n), stats.chi2.sf(statistic, n))
    assert p_value > 1e-4, f"noise std {noise.std():.5f}, calibrated {z * clip:.5f}"
    assert abs(float(noise.mean())) < 5 * z * clip / math.sqrt(n)


def test_each_device_counts_once_and_is_clipped_to_the_bound_on_the_server() -> None:
    rule = make_strategy("fedavg")
    rule.make_private(GaussianSum(CLIP, 1e-12))  # noise negligible: see the clipping
    rule.start_round(4)
    big = np.array([3.0, 4.0, 0.0, 0.0], np.float32)  # norm 5 -> clipped to 1
    small = np.array([0.0, 0.0, 0.3, 0.0], np.float32)
    rule.add(big, 1_000_000.0)  # a huge sample count buys no extra weight
    rule.add(small, 1.0)
    np.testing.assert_allclose(rule.mean_delta(), [0.3, 0.4, 0.15, 0.0], atol=1e-6)


def test_with_dp_off_fedavg_is_exactly_the_weighted_mean() -> None:
    rng = np.random.default_rng(3)
    deltas = [rng.standard_normal(1000).astype(np.float32) for _ in range(5)]
    weights = [10.0, 3.0, 7.0, 1.0, 30.0]
    rule = make_strategy("fedavg")
    rule.start_round(1000)
    for d, w in zip(deltas, weights, strict=True):
        rule.add(d, w)
    block = np.zeros(1000, np.float32)  # FedAvg sums up to BLOCK_UPDATES (16) products in float32, then in float64
    for d, w in zip(deltas, weights, strict=True):
        block += d * np.float32(w)
    expected = (block.astype(np.float64) / sum(weights)).astype(np.float32)
    got = rule.aggregate(UpdateSet(deltas, np.array(weights), 1 << 20))
    assert got.tobytes() == expected.tobytes()


def test_a_release_without_dp_carries_no_dp_field() -> None:
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    release = wire.ModelRelease(1, b"p" * 32, {"w": np.zeros(3, np.float32)}, created_at=1)
    message, _ = wire.encode_model_release(release, key)
    assert wire.verify(message, wire.pinned(key.verify_key)).payload.keys().isdisjoint({"dp"})
    private = wire.ModelRelease(1, b"p" * 32, {"w": np.zeros(3, np.float32)}, created_at=1,
                                privacy={"epsilon": 1.5, "delta": 1e-5, "noise_multiplier": 1.1, "rounds": 2})
    decoded = wire.decode_model_release(wire.encode_model_release(private, key)[0], key.verify_key)
    assert decoded.privacy == private.privacy


def test_epsilon_is_the_accountants_and_the_budget_stops_rounds(tmp_path: Path) -> None:
    z, delta = 1.5, 1e-5
    budget = (_independent_epsilon(z, 2, delta) + _independent_epsilon(z, 3, delta)) / 2  # 2 rounds fit, 3 do not

    async def go() -> None:
        policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=60)
        plan = TrainingPlan(clip_norm=CLIP)
        privacy = DPConfig(noise_multiplier=z, delta=delta, epsilon_budget=budget)
        async with running(tmp_path, devices=3, policy=policy, plan=plan, privacy=privacy) as h:
            first = await _round(h, 0)
            second = await _round(h, first)
            assert await h.task(after=second, wait=3) is None, "a third round opened past the budget"
            status = await (await h.client.get("/v1/status")).json()
            assert status["current_round"] is None and status["model"]["version"] == 2
            spent = status["privacy"]
            assert spent["exhausted"] and spent["rounds"] == 2
            assert spent["epsilon"] == pytest.approx(_independent_epsilon(z, 2, delta), rel=1e-9)
            assert h.counter("fl_aggregator_dp_epsilon") == pytest.approx(spent["epsilon"], rel=1e-9)
            for version in (1, 2):
                release = await _release(h, version)
                assert release.privacy is not None
                assert release.privacy["rounds"] == version
                assert release.privacy["epsilon"] == pytest.approx(_independent_epsilon(z, version, delta), rel=1e-9)
                assert (release.privacy["delta"], release.privacy["noise_multiplier"]) == (delta, z)
        # a restart reads the ledger: the spent budget stays spent
        async with running(tmp_path, devices=0, key=h.key, enrolled=h.devices, policy=policy, plan=plan,
                           privacy=privacy) as again:
            status = await (await again.client.get("/v1/status")).json()
            assert status["privacy"]["rounds"] == 2 and status["current_round"] is None

    run(go())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dp-noise-multiplier", "-1"], "--dp-noise-multiplier must be positive"),
        (["--dp-noise-multiplier", "1", "--dp-delta", "1.5"], "--dp-delta must be in (0, 1)"),
        (["--dp-noise-multiplier", "1", "--strategy", "krum"], "--dp needs a rule built on the sum"),
        (["--dp-noise-multiplier", "1", "--strategy", "median"], "--dp needs a rule built on the sum"),
        (["--dp-noise-multiplier", "1", "--clip-norm", "0"], "--dp needs --clip-norm > 0"),
        ([], "--dp central needs --dp-noise-multiplier"),
        (["--dp-noise-multiplier", "1", "--upstream", "http://127.0.0.1:9", "--upstream-key", "ab" * 32],
         "--dp runs at the root of a tree, not on a site"),
    ],
)
def test_bad_dp_settings_are_refused_at_start_up(tmp_path: Path, args: list[str], message: str) -> None:
    state = tmp_path / "state"
    base = ["--clip-norm", "1"] if "--clip-norm" not in args else []
    done = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "serve", "--init", "--state", str(state), "--synthetic-parameters",
         "10", "--listen", "127.0.0.1:9", "--dp", "central", *base, *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not state.exists()


@pytest.mark.parametrize(("settings", "named"), [
    ({"mode": "local"}, "--dp 'local': choose one of central, distributed"),
    ({"noise_multiplier": math.inf}, "--dp-noise-multiplier must be a finite number, got inf"),
    ({"noise_multiplier": math.nan}, "--dp-noise-multiplier must be a finite number, got nan"),
    ({"delta": 0.0}, "--dp-delta must be in (0, 1)"),
    ({"delta": 1.0}, "--dp-delta must be in (0, 1)"),
    ({"epsilon_budget": 0.0}, "--dp-epsilon-budget must be positive and finite"),
    ({"epsilon_budget": -1.0}, "--dp-epsilon-budget must be positive and finite"),
    ({"epsilon_budget": math.inf}, "--dp-epsilon-budget must be positive and finite"),
    ({"epsilon_budget": math.nan}, "--dp-epsilon-budget must be positive and finite"),
], ids=lambda value: str(value) if not isinstance(value, dict) else ",".join(f"{k}={v}" for k, v in value.items()))
def test_dp_settings_no_guarantee_can_come_from_are_refused_when_built(settings: dict, named: str) -> None:
    """What the command line's number parsing lets through (0, 1, a negative budget) and what only a configuration
    built in code can hold (a mode no option offers, an infinite noise): refused naming the setting, never a run whose
    epsilon means nothing (an infinite noise, a budget of nan that nothing exceeds)."""
    with pytest.raises(PrivacyError) as refused:
        DPConfig(**{"noise_multiplier": 1.0, **settings})
    assert named in str(refused.value)


def test_delta_must_be_below_one_over_the_fleet() -> None:
    config = DPConfig(noise_multiplier=1.0, delta=0.01)
    config.check_population(50)
    with pytest.raises(PrivacyError, match="not below 1/N"):
        config.check_population(100)


def test_dp_is_refused_on_a_state_whose_versions_were_trained_without_it(tmp_path: Path) -> None:
    async def go() -> None:
        policy = RoundPolicy(min_clients=2, goal_clients=2, round_timeout=60)
        plan = TrainingPlan(clip_norm=CLIP)
        async with running(tmp_path, devices=2, policy=policy, plan=plan) as h:
            await _round(h, 0)
            assert await h.task(after=1, wait=10) is not None
        with pytest.raises(RuntimeError, match="published 1 versions but 0 were trained with DP noise"):
            async with running(tmp_path, devices=0, key=h.key, enrolled=h.devices, policy=policy, plan=plan,
                               privacy=DPConfig(noise_multiplier=1.0)):
                pass

    run(go())
