"""An unmasked secure sum is published only inside the bounds every honest round keeps (aggregator/secagg_bounds.py):
a device that does not follow the protocol and writes its own words (a weight that wraps the total down to the
survivor count, a huge value) gets the round abandoned with the reason, and the previous model stays; honest
rounds, with dropouts, worst-case rounding or distributed DP noise, still publish."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from aggregator_harness import run
from secagg_harness import CLIP, secure_rounds, secure_running, until_masked

from aggregator.secagg_bounds import SumOutOfBounds, bounded_mean, mean_norm_bound
from aggregator.secagg_round import ABANDON_REASONS
from appliance.protocol import discrete_gaussian
from appliance.protocol import messages as m
from appliance.protocol import quantise as quantise_module
from appliance.protocol.quantise import levels_for, private_levels, quantise
from tests.secagg_sim import MAX_SAMPLES, play

W = 4096


class _ZeroDraws:
    """Rounding words that are all 0 (a keystream that leaves the zeros it encrypts as they are): stochastic
    rounding then rounds every coordinate with a fractional part up, the largest rounding error an honest device
    can have (a legitimate, if unlucky, draw)."""

    def update_into(self, data: bytes, buffer: memoryview) -> int:
        buffer[: len(data)] = data
        return len(data)


def _quantise_rounding_up(delta: np.ndarray, samples: int, *, levels: int, max_samples: int) -> np.ndarray:
    with mock.patch.object(quantise_module, "rounding_draws", lambda rng: _ZeroDraws()):
        return quantise(delta, samples, clip_norm=CLIP, levels=levels, max_samples=max_samples,
                        rng=np.random.default_rng(0))


def _sum(inputs: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(inputs[0])
    for words in inputs:
        total += words  # uint32: modulo 2^32, as the unmasked sum is
    return total


def _worst_case_inputs(devices: int, survivors: int, parameters: int, samples: int, levels: int) -> list[np.ndarray]:
    """``survivors`` honest inputs of a roster of ``devices``: each update exactly at the clip norm, all in the
    same direction, every coordinate rounded up."""
    delta = np.full(parameters, CLIP / math.sqrt(parameters), dtype=np.float32)
    return [_quantise_rounding_up(delta, samples, levels=levels, max_samples=W)
            for _ in range(survivors)]


def _hostile(words: np.ndarray, add: dict[int, int]) -> np.ndarray:
    """A device's input with its own words written in: ``add`` maps a word's index (-1: the weight) to what it
    adds there, mod 2^32."""
    words = words.copy()
    for j, value in add.items():
        words[j] = np.uint32((int(words[j]) + value) % 2**32)
    return words


# -------------------------------------------------------------------------------- honest rounds publish


@pytest.mark.parametrize(("n", "phase", "rate"), [
    (3, "masked", 0.0), (4, "share", 0.3), (10, "advertise", 0.3), (30, "share", 0.3), (30, "masked", 0.1),
    (200, "share", 0.3),
])
def test_honest_rounds_with_dropouts_pass_the_bounds(n: int, phase: str, rate: float) -> None:
    outcome = play(n, parameters=16 if n > 30 else 64, drop_phase=phase, drop_rate=rate, seed=n,
                   neighbours=n - 1 if phase == "masked" else None)
    survivors = len(outcome.plan.survivors)
    mean, weight = bounded_mean(outcome.unmasked, survivors=survivors, levels=outcome.setup.levels,
                                max_samples=MAX_SAMPLES, clip_norm=CLIP)
    assert weight == sum(int(outcome.plain[v][-1]) for v in outcome.plan.survivors)
    assert mean.shape == (outcome.unmasked.size - 1,)


@pytest.mark.parametrize(("devices", "survivors", "parameters", "samples"), [
    (4, 4, 50, 1), (4, 4, 50, 10**6), (200, 120, 10_000, 1), (4096, 3, 100_000, 1),
])
def test_the_honest_worst_case_passes(devices: int, survivors: int, parameters: int, samples: int) -> None:
    """Every device at exactly the clip norm, all in the same direction, every coordinate rounded up: the mean is
    as long as honest devices can make it, and it passes (with a weight of 1 each, the rounding is the largest
    part of the step: the allowance is what holds it)."""
    levels = levels_for(devices)
    total = _sum(_worst_case_inputs(devices, survivors, parameters, samples, levels))
    mean, weight = bounded_mean(total, survivors=survivors, levels=levels, max_samples=W, clip_norm=CLIP)
    assert weight == survivors * min(samples, W)
    assert np.linalg.norm(mean) >= CLIP  # the case is a real worst case: at the clip norm and beyond


def test_the_norm_allowance_catches_the_reviewers_384x_attack_and_a_much_smaller_one() -> None:
    """Three honest devices at 512 samples, updates at the clip norm in one direction, plus a device whose
    weight word makes the weights sum to the survivor count: the step would be 384x too long, and is refused. The
    allowance is tight: a device that scales the same honest step by only 1.15x is refused too, while the
    honest worst case (the same devices, rounding up, no hostile weight) is at least C and passes."""
    levels = levels_for(4)
    honest = _worst_case_inputs(4, 3, 50, 512, levels)
    zero = _quantise_rounding_up(np.zeros(50, np.float32), 1, levels=levels, max_samples=W)
    others = int(_sum(honest)[-1])
    assert others == 3 * 512
    for weight_to in (4, math.floor(others / 1.15)):  # 384x; 1.15x, the weight still in [S, S W]
        total = _sum([*honest, _hostile(zero, {-1: weight_to - others - 1})])  # its own word is 1
        assert int(total[-1]) == weight_to
        with pytest.raises(SumOutOfBounds, match="L2 norm"):
            bounded_mean(total, survivors=4, levels=levels, max_samples=W, clip_norm=CLIP)
    mean, _ = bounded_mean(_sum(honest), survivors=3, levels=levels, max_samples=W, clip_norm=CLIP)
    assert CLIP <= np.linalg.norm(mean) < 1.15 * CLIP
    bound = mean_norm_bound(survivors=4, weight=4, dimension=50, levels=levels, max_samples=W, clip_norm=CLIP)
    assert bound < 1.1 * CLIP + 1e-4  # what the hostile device can make the step at most: 1.1 C and a hair


def test_weights_beyond_the_cap_are_refused() -> None:
    """A weight word pushing the total past S x W would shrink every honest device's step to nothing."""
    levels = levels_for(4)
    honest = _worst_case_inputs(4, 3, 50, 512, levels)
    zero = _quantise_rounding_up(np.zeros(50, np.float32), 1, levels=levels, max_samples=W)
    total = _sum([*honest, _hostile(zero, {-1: 4 * W + 1 - 3 * 512 - 1})])
    with pytest.raises(SumOutOfBounds, match=r"outside \[4, 16384\]"):
        bounded_mean(total, survivors=4, levels=levels, max_samples=W, clip_norm=CLIP)


def test_a_coordinate_beyond_what_the_survivors_can_reach_is_refused() -> None:
    """Three of four devices survive, each honest one at weight W with its update on one coordinate: the hostile
    one adds 1.05 B to that coordinate. The mean stays inside 1.1 C (the norm bound cannot see it), but no three
    devices can put more than 3 B into a coordinate."""
    levels = levels_for(4)
    delta = np.zeros(50, np.float32)
    delta[0] = CLIP
    honest = [_quantise_rounding_up(delta, W, levels=levels, max_samples=W) for _ in range(2)]
    zero = _quantise_rounding_up(np.zeros(50, np.float32), W, levels=levels, max_samples=W)
    total = _sum([*honest, _hostile(zero, {0: round(1.05 * levels)})])
    weighted_norm = abs(int(total[:1].view("<i4")[0])) * CLIP / (3 * levels)
    assert CLIP < weighted_norm < 1.1 * CLIP
    with pytest.raises(SumOutOfBounds, match="coordinate"):
        bounded_mean(total, survivors=3, levels=levels, max_samples=W, clip_norm=CLIP)


# ------------------------------------------------------------------------------------------- distributed DP


@pytest.mark.parametrize(("devices", "survivors", "z", "parameters"), [(3, 3, 1.0, 3), (30, 20, 1.0, 2000),
                                                                      (100, 100, 0.5, 500)])
def test_honest_noised_rounds_pass_and_a_shifted_weight_does_not(devices: int, survivors: int, z: float,
                                                                 parameters: int) -> None:
    """With distributed DP every weight is 1 and each device adds N_Z(0, sigma^2) to its words: the honest worst
    case plus real noise passes; a weight word off by one, or a value of the noise's own size added to every
    coordinate by one device, does not."""
    levels, sigma = private_levels(devices, z, parameters)
    delta = np.full(parameters, CLIP / math.sqrt(parameters), dtype=np.float32)
    inputs = []
    for i in range(survivors):
        words = _quantise_rounding_up(delta, 1, levels=levels, max_samples=1)
        noise = discrete_gaussian.sample(sigma, parameters, bytes([i]) * 32)
        np.add(words[:-1], (noise % 2**32).astype(np.uint32), out=words[:-1])
        inputs.append(words)
    total = _sum(inputs)
    bounds = {"survivors": survivors, "levels": levels, "max_samples": 1, "clip_norm": CLIP, "noise_sigma": sigma}
    _, weight = bounded_mean(total, **bounds)
    assert weight == survivors
    with pytest.raises(SumOutOfBounds, match="weights"):
        bounded_mean(_hostile(total, {-1: 1}), **bounds)
    shift = round(8 * sigma * math.sqrt(survivors))  # each coordinate moved by 8 standard deviations of the noise sum
    with pytest.raises(SumOutOfBounds, match="L2 norm"):
        bounded_mean(_hostile(total, dict.fromkeys(range(parameters), shift)), **bounds)


# ------------------------------------------------------------------------------- the round on the aggregator


async def _attacked_round(tmp_path: Path, hostile_words) -> None:
    """Three honest devices at 512 samples and one writing its own words (``hostile_words(words, others)``):
    the round is abandoned with the reason, in status and metrics, and the model stays what it was."""
    async with secure_running(tmp_path, devices=4) as h:
        task = await h.task()
        before = h.engine.params.copy()
        rounds = secure_rounds(h, task)
        await until_masked(rounds)
        honest, cheat = rounds[:3], rounds[3]
        rng = np.random.default_rng(3)
        for r in honest:
            delta = rng.normal(size=h.engine.models.layout.size).astype(np.float32)
            delta *= 0.5 * CLIP / np.linalg.norm(delta)
            assert (await h.upload(r.masked_input(delta, 512)))[0] == 200
        words = hostile_words(cheat.device.mask(np.zeros(h.engine.models.layout.size, np.float32), 1), 3 * 512)
        key = next(d.key for d in h.devices if d.device_id == cheat.device_id)
        body = m.encode_masked(m.MaskedInput(task.round_id, cheat.device_id, words, ()), key)
        assert (await h.upload(body))[0] == 200
        await asyncio.gather(*(r.unmask() for r in rounds))
        nxt = await h.task(after=task.round_id, wait=30)
        assert nxt is not None and nxt.model_version == task.model_version
        assert h.engine.version == 0 and np.array_equal(h.engine.params, before)
        record = (await (await h.client.get("/v1/status")).json())["rounds"][-1]
        assert record["status"] == "abandoned"
        assert "a device did not follow the protocol" in record["note"]
        assert h.counter("fl_aggregator_secagg_abandoned_total", reason="sum-out-of-bounds") == 1
        assert h.counter("fl_aggregator_rounds_total", outcome="abandoned") == 1


def test_a_weight_word_wrapping_the_total_to_the_survivor_count_abandons_the_round(tmp_path: Path) -> None:
    """The reviewer's attack: 3 x 512 + w = 4 mod 2^32, the published step would be 384x too long."""
    run(_attacked_round(tmp_path, lambda words, others: _hostile(words, {-1: 4 - others - 1})))


def test_a_huge_value_word_abandons_the_round(tmp_path: Path) -> None:
    run(_attacked_round(tmp_path, lambda words, others: _hostile(words, {0: 2**30})))


def test_the_new_reason_is_counted_from_the_first_scrape(tmp_path: Path) -> None:
    assert "sum-out-of-bounds" in ABANDON_REASONS

    async def go() -> None:
        async with secure_running(tmp_path, devices=2) as h:
            text = await (await h.client.get("/metrics")).text()
            assert 'fl_aggregator_secagg_abandoned_total{reason="sum-out-of-bounds"} 0.0' in text

    run(go())
