"""Adaptive clipping in central DP (issue 16; Andrew et al. 2021): the clip norm moves to the target quantile of
the update norms, the task and the norm bound follow it, a restart keeps it, epsilon is dp-accounting's for the
two Gaussian mechanisms of every round, and bad settings are refused at start-up."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from aggregator_harness import Harness, run, running
from dp_accounting import rdp
from scipy import stats

from aggregator import cli
from aggregator.adaptive_clip import (
    MAX_CLIP_NORM,
    MIN_CLIP_NORM,
    AdaptiveClip,
    model_noise_multiplier,
    next_clip_norm,
    unclipped_norm,
)
from aggregator.privacy import DPConfig, GaussianSum, PrivacyError, PrivacyLedger
from aggregator.rounds import CLIP_NORM_HEADROOM, MAX_UPDATE_NORM, RoundPolicy, TrainingPlan
from appliance import wire
from appliance.agent import clip_update
from flctl.ports import free_port


def _composed_epsilon(z_model: float, z_count: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    pair = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_model),
                                          dp_accounting.GaussianDpEvent(z_count)])
    accountant.compose(pair, rounds)
    return accountant.get_epsilon(delta)


def _gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("quantile", "start"), [(0.5, 0.1), (0.2, 10.0), (0.8, 1.0)])
def test_the_clip_norm_settles_at_the_target_quantile_of_log_normal_norms(quantile: float, start: float) -> None:
    """Norms log-normal (median 1, sigma 0.5), 100 devices a round, the default count noise for z = 1 (sigma_b = 5):
    after 150 rounds C sits at the quantile, within 5 standard deviations of the estimate's own fluctuation.

    Near the quantile q, log C moves as x <- x - eta (k x + e): k = f(log q) is the log-norm density there, e the
    noise of the fraction within C (binomial sampling and sigma_b / m). Its stationary spread is
    eta s_e / sqrt(2 eta k - (eta k)^2), which the tolerance is derived from."""
    mu, sigma, m, eta, sigma_b = 0.0, 0.5, 100, 0.2, 5.0
    rng = np.random.default_rng(16)
    clip = start
    for _ in range(150):
        norms = rng.lognormal(mu, sigma, m)
        clip = next_clip_norm(clip, list(norms), quantile, eta, sigma_b, rng).next_clip_norm
    target = math.exp(mu + sigma * stats.norm.ppf(quantile))
    k = stats.norm.pdf(stats.norm.ppf(quantile)) / sigma
    s_e = math.sqrt(quantile * (1 - quantile) / m + (sigma_b / m) ** 2)
    spread = eta * s_e / math.sqrt(2 * eta * k - (eta * k) ** 2)
    assert abs(math.log(clip / target)) < 5 * spread, f"C {clip:.4f}, quantile {target:.4f}, spread {spread:.4f}"


def test_the_fraction_within_the_clip_norm_carries_noise_of_the_configured_std() -> None:
    """Every norm within C: the noised fraction is 1 + N(0, sigma_b^2) / m (a chi-square test of the variance)."""
    sigma_b, m, draws = 3.0, 40, 4000
    rng = np.random.default_rng(5)
    fractions = np.array([next_clip_norm(1.0, [0.5] * m, 0.5, 0.2, sigma_b, rng).within for _ in range(draws)])
    statistic = float(np.sum(((fractions - 1) * m) ** 2)) / sigma_b**2
    p_value = 2 * min(stats.chi2.cdf(statistic, draws), stats.chi2.sf(statistic, draws))
    assert p_value > 1e-4


def test_a_huge_rate_and_count_noise_bound_the_step_instead_of_overflowing() -> None:
    """exp(-eta (b - gamma)) overflowed for eta |b| past ~709 (z = 1000, sigma_b = 5 z, two devices): the round
    could not close, retried every 5 s. The step is clamped; the clip norm stays within its bounds."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        step = next_clip_norm(1.0, [0.5, 3.0], 0.5, 1e6, 5000.0, rng)
        assert MIN_CLIP_NORM <= step.next_clip_norm <= MAX_CLIP_NORM


@pytest.mark.parametrize(("norm", "end"), [(1e300, MAX_CLIP_NORM), (0.0, MIN_CLIP_NORM)])
def test_rounds_that_keep_pushing_the_clip_norm_leave_it_at_its_bound(norm: float, end: float) -> None:
    """Every device far above C (or at zero), round after round, with a fast rate: C is carried from round to round
    as the aggregator does and stops at MAX_CLIP_NORM (MIN_CLIP_NORM). Unclamped, it ran up to 1e304 (down to 0)
    within a dozen rounds: an update norm bound past what the strategies can sum, or noise calibrated to nothing."""
    rng = np.random.default_rng(3)
    clip = 1.0
    for _ in range(30):
        clip = next_clip_norm(clip, [norm] * 100, 0.5, 200.0, 0.01, rng).next_clip_norm
    assert clip == end
    assert CLIP_NORM_HEADROOM * clip <= MAX_UPDATE_NORM  # the round's update norm bound stays what it says
    assert 0 < GaussianSum(clip, 1.0).noise_std < math.inf


def test_the_norm_before_clipping_is_the_reported_one_or_counts_as_clipped() -> None:
    assert unclipped_norm(7.5, lambda: 2.0, 2.0) == 7.5  # the agent's update_norm
    assert unclipped_norm(None, lambda: 1.2, 2.0) == 1.2  # no report: what arrived
    assert unclipped_norm(None, lambda: 2.0, 2.0) > 2.0  # no report and at C: the device clipped it


def test_epsilon_is_dp_accountings_for_both_mechanisms_and_equals_z_alone(tmp_path: Path) -> None:
    """The ledger's epsilon equals dp-accounting composing the model's Gaussian (z_delta) and the count's (2 sigma_b)
    every round; by Andrew et al.'s Theorem 1, that is the epsilon of one Gaussian of multiplier z."""
    z, sigma_b, delta, rounds = 1.2, 2.0, 1e-5, 7
    config = DPConfig(z, delta, adaptive=AdaptiveClip(0.5, count_stddev=sigma_b))
    z_model = model_noise_multiplier(z, sigma_b)
    assert config.model_noise_multiplier == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    ledger = PrivacyLedger(tmp_path, config)
    clip = 1.0
    for _ in range(rounds):
        step = ledger.adapt_clip(clip, [0.5, 2.0, 3.0])
        assert step is not None
        ledger.record_round(clip=step)
        clip = step.next_clip_norm
    expected = _composed_epsilon(z_model, 2 * sigma_b, rounds, delta)
    assert ledger.spent() == pytest.approx(expected, rel=1e-9)
    assert ledger.spent() == pytest.approx(_gaussian_epsilon(z, rounds, delta), rel=1e-6)
    assert ledger.release_metadata()["noise_multiplier"] == pytest.approx(z_model)
    again = PrivacyLedger(tmp_path, config)  # a restart: the same epsilon and the same clip norm
    assert again.spent() == ledger.spent() and again.round_clip_norm(99.0) == clip


async def _adaptive_round(h: Harness, after: int, norms: list[float]) -> wire.Task:
    """One round in which device i's delta had norm ``norms[i]`` before it clipped to the task's C, as the agent
    does (update_norm in the signed metrics)."""
    task = await h.task(after=after, wait=10)
    assert task is not None, "no round opened"
    for device, norm in zip(h.devices, norms, strict=True):
        direction = h.delta(1.0)
        length = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in direction.values()))
        delta, before = clip_update({k: v * np.float32(norm / length) for k, v in direction.items()}, task.clip_norm)
        status, answer = await h.upload(device.update(task, delta, metrics={"update_norm": before}))
        assert status == 200, answer
    return task


def test_tasks_and_the_norm_bound_follow_the_clip_norm_and_a_restart_keeps_it(tmp_path: Path) -> None:
    z, sigma_b, gamma, eta, delta = 1.0, 0.6, 0.5, 0.2, 1e-5
    adaptive = AdaptiveClip(gamma, learning_rate=eta, count_stddev=sigma_b)
    privacy = DPConfig(z, delta, adaptive=adaptive)
    policy = RoundPolicy(min_clients=4, goal_clients=4, round_timeout=60)

    async def go() -> None:
        async with running(tmp_path, devices=4, policy=policy, plan=TrainingPlan(clip_norm=1.0),
                           privacy=privacy) as h:
            after, clips = 0, []
            for _ in range(3):
                task = await _adaptive_round(h, after, [0.2, 0.4, 3.0, 5.0])
                after = task.round_id
                clips.append(task.clip_norm)
            following = await h.task(after=after, wait=10)  # the fourth round is open: the third is published
            assert following is not None
            status = await (await h.client.get("/v1/status")).json()
        assert clips[0] == 1.0  # the first round clips to --clip-norm
        moved = status["privacy"]["adaptive_clip"]
        history = moved["history"]
        assert [entry["clip_norm"] for entry in history] == clips
        for entry, clip in zip(history, [*clips[1:], following.clip_norm], strict=True):
            assert clip == pytest.approx(entry["clip_norm"] * math.exp(-eta * (entry["within"] - gamma)), rel=1e-12)
        assert moved["clip_norm"] == following.clip_norm != clips[0]
        assert status["current_round"]["clip_norm"] == following.clip_norm
        # the devices' pre-clip norms (counted with noise) are not published in the clear as round metrics
        assert [r["metrics"] for r in status["rounds"] if r["status"] == "published"] == [{}, {}, {}]
        assert status["current_round"]["max_update_norm"] == pytest.approx(CLIP_NORM_HEADROOM * following.clip_norm)
        assert status["privacy"]["epsilon"] == pytest.approx(
            _composed_epsilon(model_noise_multiplier(z, sigma_b), 2 * sigma_b, 3, delta), rel=1e-9)

        # a restart (with another --clip-norm, even) resumes the open round on the clip norm it had
        async with running(tmp_path, devices=0, key=h.key, enrolled=h.devices, policy=policy,
                           plan=TrainingPlan(clip_norm=7.0), privacy=privacy) as again:
            resumed = await again.task(after=after, wait=10)
            assert resumed is not None and resumed.round_id == following.round_id
            assert resumed.clip_norm == following.clip_norm
            assert again.engine.strategy.privacy.clip_norm == following.clip_norm  # the server clips to it too
            await _adaptive_round(again, after, [0.2, 0.4, 3.0, 5.0])
            assert await again.task(after=following.round_id, wait=10) is not None  # published: the next is open
            status = await (await again.client.get("/v1/status")).json()
        assert status["privacy"]["rounds"] == 4
        assert status["privacy"]["adaptive_clip"]["history"][-1]["clip_norm"] == following.clip_norm

    run(go())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dp", "central", "--dp-adaptive-clip", "1.5"], "--dp-adaptive-clip must be a quantile in (0, 1)"),
        (["--dp", "central", "--dp-adaptive-clip", "0"], "--dp-adaptive-clip must be a quantile in (0, 1)"),
        (["--dp", "central", "--dp-adaptive-clip", "0.5", "--dp-clip-learning-rate", "-0.1"],
         "--dp-clip-learning-rate must be positive"),
        (["--dp-adaptive-clip", "0.5"], "--dp-adaptive-clip goes with --dp central"),
        (["--dp", "central", "--dp-clip-learning-rate", "0.2"], "go with --dp-adaptive-clip"),
        (["--dp", "central", "--dp-adaptive-clip", "0.5", "--dp-clip-count-stddev", "0.5"],
         "leaves no privacy for the model's noise"),
        (["--dp", "distributed", "--secure-aggregation", "--dp-adaptive-clip", "0.5"],
         "--dp-adaptive-clip needs --dp central, not distributed"),
    ],
)
def test_bad_adaptive_clip_settings_are_refused_at_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    state = tmp_path / "state"
    code = cli.main(["serve", "--init", "--state", str(state), "--synthetic-parameters", "10", "--listen",
                     f"127.0.0.1:{free_port()}", "--clip-norm", "1", "--dp-noise-multiplier", "1", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not state.exists()


def test_dp_config_refuses_a_count_that_takes_all_the_privacy() -> None:
    with pytest.raises(PrivacyError, match=r"must exceed 0\.5"):
        DPConfig(1.0, adaptive=AdaptiveClip(0.5, count_stddev=0.5))
    assert DPConfig(1.0, adaptive=AdaptiveClip(0.5)).model_noise_multiplier == pytest.approx(1 / math.sqrt(0.99))


def _demo_args(*options: str):
    import argparse

    from flctl.demo import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["demo", *options])


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--dp-adaptive-clip", "0.5"], "--dp-adaptive-clip goes with --dp-noise-multiplier"),
        (["--dp-noise-multiplier", "1", "--dp-clip-learning-rate", "0.1"], "goes with --dp-adaptive-clip"),
        (["--dp-noise-multiplier", "1", "--dp-adaptive-clip", "2"], "must be a quantile in (0, 1)"),
        (["--dp-noise-multiplier", "1", "--dp-adaptive-clip", "0.5", "--dp-mode", "distributed",
          "--secure-aggregation"], "needs --dp central"),
    ],
)
def test_the_demo_refuses_bad_adaptive_clip_settings(options: list[str], reason: str) -> None:
    from flctl.demo import privacy_settings

    with pytest.raises(SystemExit, match=re.escape(reason)):
        privacy_settings(_demo_args(*options))


def test_the_demo_reads_adaptive_clipping_settings_and_each_rounds_clip_norm() -> None:
    from flctl.demo import _round_clip_norms, privacy_settings

    clip, z, _, adaptive = privacy_settings(_demo_args("--dp-noise-multiplier", "0.1", "--dp-adaptive-clip", "0.3"))
    assert (clip, z, adaptive) == (4.0, 0.1, AdaptiveClip(0.3))
    status = {"privacy": {"adaptive_clip": {"history": [{"version": 1, "clip_norm": 4.0, "within": 0.2},
                                                         {"version": 2, "clip_norm": 4.4, "within": 0.5}]}}}
    assert _round_clip_norms(status) == {1: 4.0, 2: 4.4}
    assert _round_clip_norms({"privacy": None}) == {}


@pytest.mark.slow
def test_the_demo_shows_the_clip_norm_of_every_round(tmp_path: Path) -> None:
    """`flctl demo --dp-noise-multiplier Z --dp-adaptive-clip 0.5` (2 devices, 2 rounds, about 40 s): the
    summary has a clip-norm column, the first round clips to the demo's clip norm and the second to where the
    first moved it; the epsilon is dp-accounting's for both mechanisms of each round."""
    z, delta = 0.005, 1e-5  # little noise, so two devices still learn
    out = tmp_path / "demo"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "flctl"), "demo", "--devices", "2", "--rounds", "2",
         "--dp-noise-multiplier", str(z), "--dp-adaptive-clip", "0.5", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    history = summary["privacy"]["adaptive_clip"]["history"]
    assert [r["clip_norm"] for r in summary["rounds"]] == [entry["clip_norm"] for entry in history]
    assert history[0]["clip_norm"] == 4.0
    assert history[1]["clip_norm"] == pytest.approx(4.0 * math.exp(-0.2 * (history[0]["within"] - 0.5)))
    assert summary["privacy"]["epsilon"] == pytest.approx(
        _composed_epsilon(model_noise_multiplier(z, 5 * z), 10 * z, 2, delta), rel=1e-9)
    table = done.stdout.split("Summary", 1)[1]
    assert "clip norm" in table.splitlines()[2]
    assert f"{history[1]['clip_norm']:.3g}" in table
