"""``serve --max-samples``: a device's signed sample count is its weight in the average, so one device claiming
2^31 - 1 samples could outweigh the whole fleet. Such a claim is refused (422 too-many-samples) and the published
model is the honest devices' weighted mean; sites enrolled with ``enroll --site`` carry sums and are exempt
(tests/test_aggregator_tree.py runs a tree with the bound)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import Harness, run, running

from aggregator import cli
from aggregator.app import SERVICES
from aggregator.buffered import BufferPolicy
from aggregator.cli import main
from aggregator.registry import Enrolment
from aggregator.rounds import DEFAULT_MAX_SAMPLES, RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.store import Store
from appliance.config import CamerasConfig, DataConfig
from flctl.fleet import Fleet

HOSTILE = 2**31 - 1  # the most a signed update can claim (aggregator/verify.py)


async def _refused_for_samples(h: Harness, body: bytes) -> dict:
    before = h.rejected("too-many-samples")
    status, problem = await h.upload(body)
    assert (status, problem["reason"]) == (422, "too-many-samples"), problem
    assert problem["type"].endswith("too-many-samples") and "--max-samples" in problem["detail"]
    assert h.rejected("too-many-samples") == before + 1
    return problem


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_device_claiming_2_31_minus_1_samples_is_refused_and_the_model_is_the_honest_mean(
    tmp_path: Path, mode: str
) -> None:
    policy = (RoundPolicy(min_clients=2, goal_clients=2, round_timeout=600) if mode == "sync"
              else RoundPolicy(min_clients=1, round_timeout=600, buffer=BufferPolicy(size=2)))

    async def go() -> None:
        async with running(tmp_path, devices=3, policy=policy) as h:
            hostile, *honest = h.devices
            task = await h.task()
            assert task is not None
            v0 = await h.model(0)
            # Signed, enrolled, within the norm bound, for the open round: only its sample count is wrong.
            problem = await _refused_for_samples(h, hostile.update(task, h.delta(scale=0.5), num_samples=HOSTILE))
            assert f"claims {HOSTILE} samples" in problem["detail"]
            assert f"at most {DEFAULT_MAX_SAMPLES}" in problem["detail"]
            sent = [(h.delta(), 100), (h.delta(), 300)]
            for device, (delta, n) in zip(honest, sent, strict=True):
                status, answer = await h.upload(device.update(task, delta, num_samples=n))
                assert status == 200, answer
            next_task = await h.task(after=task.round_id, wait=10)
            assert next_task is not None and next_task.model_version == 1
            ns = np.array([n for _, n in sent], dtype=np.float64)
            expected = v0 + (ns[:, None] * np.array([h.flat(d) for d, _ in sent])).sum(0) / ns.sum()
            np.testing.assert_allclose(await h.model(1), expected, rtol=1e-5, atol=1e-7)
            closed = h.engine.store.get_round(task.round_id)
            assert closed.status == "published" and (closed.participants, closed.samples) == (2, 400)
            assert hostile.device_id not in h.engine.store.round_devices(task.round_id)

    run(go())


def test_an_honest_agent_at_default_settings_stays_within_the_default_bound(tmp_path: Path) -> None:
    """An agent signs the number of frames it trained on once (epochs do not multiply it: see
    tests/test_trainer_training.py): at most samples_per_round, and never more than its frame buffer holds."""
    assert DataConfig().samples_per_round <= CamerasConfig().buffer_max_frames <= DEFAULT_MAX_SAMPLES
    assert RoundPolicy().max_samples == DEFAULT_MAX_SAMPLES

    async def go() -> None:
        async with running(tmp_path, devices=3) as h:
            task = await h.task()
            assert task is not None
            for device, n in zip(h.devices[:2], (DataConfig().samples_per_round, CamerasConfig().buffer_max_frames),
                                 strict=True):
                status, answer = await h.upload(device.update(task, h.delta(), num_samples=n))
                assert status == 200, answer
            await _refused_for_samples(h, h.devices[2].update(task, h.delta(), num_samples=DEFAULT_MAX_SAMPLES + 1))

    run(go())


def test_status_and_page_show_the_bound(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, policy=RoundPolicy(min_clients=2, max_samples=1000)) as h:
            status = await (await h.client.get("/v1/status")).json()
            assert status["policy"]["max_samples"] == 1000 and status["current_round"]["max_samples"] == 1000
            page = await (await h.client.get("/")).text()
            assert "at most 1000 samples" in page

    run(go())


def test_a_key_enrolled_as_a_site_may_carry_more_samples_than_a_device(tmp_path: Path) -> None:
    site = SimulatedDevice()

    async def go() -> None:
        async with running(tmp_path, devices=1, enrolled=[SimulatedDevice()],
                           policy=RoundPolicy(min_clients=1, goal_clients=3, max_samples=100)) as h:
            h.app[SERVICES].registry.enroll([Enrolment(site.device_id, bytes(site.key.verify_key), "site-a",
                                                       site=True)])
            task = await h.task()
            assert task is not None
            await _refused_for_samples(h, h.devices[0].update(task, h.delta(), num_samples=101))
            status, answer = await h.upload(site.update(task, h.delta(), num_samples=100_000))
            assert status == 200, answer

    run(go())


def test_enroll_site_marks_new_and_enrolled_keys_as_sites(tmp_path: Path, capsys) -> None:
    assert main(["keygen", "--state", str(tmp_path)]) == 0
    device, site = SimulatedDevice(), SimulatedDevice()
    assert main(["enroll", "--state", str(tmp_path), device.public_key_hex, site.public_key_hex]) == 0
    assert main(["enroll", "--state", str(tmp_path), "--site", site.public_key_hex, "--name", "site-a"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{site.device_id} enrolled as a site site-a"
    assert main(["enroll", "--state", str(tmp_path), "--site", site.public_key_hex]) == 0
    assert capsys.readouterr().out.strip() == f"{site.device_id} already enrolled as a site"
    store = Store(tmp_path)
    try:
        assert store.is_site(site.device_id) and not store.is_site(device.device_id)
    finally:
        store.close()


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "many", str(2**31)])
def test_serve_refuses_a_bad_max_samples_in_one_line(tmp_path: Path, capsys, value: str) -> None:
    main(["keygen", "--state", str(tmp_path)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--state", str(tmp_path), "--synthetic-parameters", "10", "--max-samples", value])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"fl-aggregator serve: error: argument --max-samples: expected a whole number of samples "
                      f"from 1 to {2**31 - 1}, got {value!r}"]


def test_secure_aggregation_takes_the_bound_as_its_weight_cap_up_to_2_20(tmp_path: Path, capsys) -> None:
    """A secure round's roster carries the weight cap W that devices apply to themselves (min(samples, W)):
    --max-samples sets it, within what the ring leaves for it."""
    serve = ["serve", "--state", str(tmp_path), "--synthetic-parameters", "10", "--secure-aggregation",
             "--clip-norm", "1"]
    config = cli._secure_aggregation(cli.build_parser().parse_args([*serve, "--max-samples", "2000"]))
    assert config is not None and config.max_samples == 2000
    main(["keygen", "--state", str(tmp_path)])
    capsys.readouterr()
    code = main([*serve, "--max-samples", str(2**20 + 1)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--max-samples {2**20 + 1} with --secure-aggregation" in err


@pytest.mark.parametrize("samples", [768, DEFAULT_MAX_SAMPLES, 6000])
def test_the_fleet_demo_serves_a_bound_its_own_agents_fit(tmp_path: Path, samples: int) -> None:
    """``flctl demo --samples N`` trains each agent on N synthetic samples: its aggregator must take them."""
    command = Fleet(root=tmp_path, samples_per_round=samples, port=8080).serve_command()
    args = cli.build_parser().parse_args(command[1:])
    assert args.max_samples == max(samples, DEFAULT_MAX_SAMPLES)
