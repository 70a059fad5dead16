"""Async mode (FedBuff): a version every K updates, stale updates weighted (1 + s)^-0.5 against a numpy reference,
too-stale updates refused with a reason, and what a start-up refuses to combine it with."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import Harness, running

from aggregator.buffered import AsyncActivity, BufferConfigError, BufferPolicy
from aggregator.cli import main
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from appliance import wire
from flctl.ports import free_port

K = 3


def _policy(**buffer: object) -> RoundPolicy:
    return RoundPolicy(min_clients=1, round_timeout=600, buffer=BufferPolicy(size=K, **buffer))


async def _accepted(h: Harness, body: bytes) -> None:
    status, answer = await h.upload(body)
    assert status == 200, answer


def test_versions_come_every_k_updates_with_stale_deltas_weighted_as_the_numpy_reference(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=9, policy=_policy()) as h:
            d = h.devices
            task0 = await h.task()
            assert task0 is not None and task0.model_version == 0
            v0 = await h.model(0)
            first = [(h.delta(), n) for n in (10, 20, 30)]
            for device, (delta, n) in zip(d[:2], first, strict=False):
                await _accepted(h, device.update(task0, delta, num_samples=n))
            assert await h.task(after=task0.round_id) is None  # K - 1 updates publish nothing
            await _accepted(h, d[2].update(task0, first[2][0], num_samples=first[2][1]))
            task1 = await h.task(after=task0.round_id, wait=10)
            assert task1 is not None and task1.model_version == 1
            v1 = await h.model(1)
            ns = np.array([n for _, n in first], dtype=np.float64)
            expected_v1 = v0 + (ns[:, None] * np.array([h.flat(t) for t, _ in first])).sum(0) / ns.sum()
            np.testing.assert_allclose(v1, expected_v1, rtol=1e-5, atol=1e-7)

            # Buffer 2 on v1: two updates trained on v0 (staleness 1) and one on v1 (staleness 0).
            second = [(d[3], task0, h.delta(), 7), (d[4], task1, h.delta(), 11), (d[5], task0, h.delta(), 13)]
            for device, task, delta, n in second:
                await _accepted(h, device.update(task, delta, num_samples=n))
            task2 = await h.task(after=task1.round_id, wait=10)
            assert task2 is not None and task2.model_version == 2
            # Buffer 3 on v2: staleness 2 (from v0), 1 (from v1) and 0.
            third = [(d[6], task0, h.delta(), 5), (d[7], task1, h.delta(), 9), (d[8], task2, h.delta(), 3)]
            for device, task, delta, n in third:
                await _accepted(h, device.update(task, delta, num_samples=n))
            task3 = await h.task(after=task2.round_id, wait=10)
            assert task3 is not None and task3.model_version == 3

            def reference(start: np.ndarray, rows: list, version: int) -> np.ndarray:
                n = np.array([r[3] for r in rows], dtype=np.float64)
                w = np.array([(1.0 + version - r[1].model_version) ** -0.5 for r in rows])
                deltas = np.array([h.flat(r[2]) for r in rows])
                return start + (n[:, None] * w[:, None] * deltas).sum(0) / n.sum()

            v2 = await h.model(2)
            np.testing.assert_allclose(v2, reference(v1, second, 1), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(await h.model(3), reference(v2, third, 2), rtol=1e-5, atol=1e-7)

            status = await (await h.client.get("/v1/status")).json()
            assert status["async"]["buffer"] == K and status["async"]["weighting"] == "polynomial"
            assert status["async"]["staleness"] == {"0": 5, "1": 3, "2": 1}
            assert status["async"]["versions_per_hour"] == 3
            assert h.counter("fl_aggregator_update_staleness_count") == 9
            assert h.counter("fl_aggregator_update_staleness_bucket", le="0.0") == 5
            assert h.counter("fl_aggregator_versions_per_hour") == 3
            page = await (await h.client.get("/")).text()
            assert "versions in the last hour: <b>3</b>" in page and "staleness of accepted updates" in page

    asyncio.run(go())


def test_constant_weighting_folds_stale_updates_in_at_full_weight(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=6, policy=_policy(weighting="constant")) as h:
            task0 = await h.task()
            for device in h.devices[:K]:
                await _accepted(h, device.update(task0, h.delta()))
            task1 = await h.task(after=task0.round_id, wait=10)
            v1 = await h.model(1)
            deltas = [h.delta() for _ in range(K)]
            for device, delta in zip(h.devices[K:], deltas, strict=True):
                await _accepted(h, device.update(task0, delta))  # all staleness 1
            assert await h.task(after=task1.round_id, wait=10) is not None
            np.testing.assert_allclose(await h.model(2), v1 + np.mean([h.flat(x) for x in deltas], axis=0),
                                       rtol=1e-5, atol=1e-7)

    asyncio.run(go())


def test_an_update_older_than_max_staleness_is_refused_with_a_reason(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=8, policy=_policy(max_staleness=1)) as h:
            d = h.devices
            tasks = [await h.task()]
            for version in (1, 2):
                for device in d[(version - 1) * K : version * K]:
                    await _accepted(h, device.update(tasks[-1], h.delta()))
                tasks.append(await h.task(after=tasks[-1].round_id, wait=10))
                assert tasks[-1].model_version == version
            before = h.rejected("too-stale")
            status, problem = await h.upload(d[6].update(tasks[0], h.delta()))  # v0 while v2 is current
            assert (status, problem["reason"]) == (410, "too-stale")
            assert "version 0, 2 versions behind" in problem["detail"] and "--max-staleness" in problem["detail"]
            assert h.rejected("too-stale") == before + 1
            await _accepted(h, d[7].update(tasks[1], h.delta()))  # v1: staleness 1, inside the bound

            # Not a round of this aggregator, or a version that round did not train: refused, not folded in.
            forged = wire.Task(**{**tasks[1].__dict__, "model_version": 0, "model_digest": tasks[0].model_digest})
            status, problem = await h.upload(d[6].update(forged, h.delta()))
            assert (status, problem["reason"]) == (409, "wrong-model")
            future = wire.Task(**{**tasks[2].__dict__, "round_id": tasks[2].round_id + 5})
            status, problem = await h.upload(d[6].update(future, h.delta()))
            assert (status, problem["reason"]) == (409, "wrong-round")

    asyncio.run(go())


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        (["--mode", "async"], "--mode async needs --buffer K"),
        (["--buffer", "5"], "--buffer, --max-staleness and --staleness-weight go with --mode async"),
        (["--mode", "async", "--buffer", "0"], "--buffer K must be at least 1"),
        (["--mode", "async", "--buffer", str(2**63)], "--buffer K must be at most 9223372036854775807"),
        (["--mode", "async", "--buffer", "4", "--secure-aggregation", "--clip-norm", "1"],
         "cannot be combined with --secure-aggregation"),
        (["--mode", "async", "--buffer", "4", "--dp", "central", "--dp-noise-multiplier", "1", "--clip-norm", "1"],
         "cannot be combined with --dp"),
        (["--mode", "async", "--buffer", "4", "--strategy", "median"], "needs a sum-based --strategy"),
        (["--mode", "async", "--buffer", "1"], "--min-clients (2) must not exceed --buffer (1)"),
        (["--mode", "async", "--buffer", "4", "--goal-clients", "3"], "--goal-clients goes with --mode sync"),
    ],
)
def test_serve_refuses_async_settings_that_cannot_work_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], complaint: str
) -> None:
    main(["keygen", "--state", str(tmp_path)])
    capsys.readouterr()
    listen = f"127.0.0.1:{free_port()}"
    assert main(["serve", "--state", str(tmp_path), "--synthetic-parameters", "10", "--listen", listen, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and complaint in err, err


@pytest.mark.parametrize(("setting", "complaint"), [
    ({"max_staleness": -1}, "--max-staleness must be 0 or more versions"),
    ({"weighting": "linear"}, "--staleness-weight 'linear': expected one of"),
    ({"exponent": 0.0}, "exponent must be positive"),
    ({"exponent": -0.5}, "exponent must be positive"),
    ({"exponent": float("nan")}, "exponent must be positive"),
])
def test_a_buffer_policy_that_cannot_work_is_refused_when_built(setting: dict, complaint: str) -> None:
    """A negative --max-staleness would refuse every update. The command line offers only the named weightings and
    the default exponent; a policy built otherwise (a deployment's own start-up code) is refused, not weighted as
    polynomial, or its stale updates weighted up."""
    with pytest.raises(BufferConfigError, match=complaint):
        BufferPolicy(size=4, **setting)


def test_an_update_arriving_while_its_buffer_closes_counts_in_the_next_one(tmp_path: Path) -> None:
    """Async mode never answers round-closed to a fresh update: it waits for the next buffer."""

    async def go() -> None:
        async with running(tmp_path, devices=K + 1, policy=_policy()) as h:
            task0 = await h.task()
            bodies = [device.update(task0, h.delta()) for device in h.devices]
            answers = await asyncio.gather(*(h.upload(body) for body in bodies))
            assert [status for status, _ in answers] == [200] * (K + 1)
            status = await (await h.client.get("/v1/status")).json()
            assert status["model"]["version"] == 1 and status["current_round"]["accepted"] == 1
            assert status["async"]["staleness"] == {"0": K, "1": 1}

    asyncio.run(go())


def test_a_device_has_one_update_per_buffer(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2, policy=_policy()) as h:
            device: SimulatedDevice = h.devices[0]
            task0 = await h.task()
            await _accepted(h, device.update(task0, h.delta()))
            status, problem = await h.upload(device.update(task0, h.delta()))
            assert (status, problem["reason"]) == (409, "duplicate")

    asyncio.run(go())


def test_versions_per_hour_counts_the_last_hour_only() -> None:
    activity = AsyncActivity()
    activity.published(100.0)
    activity.published(3000.0)
    assert activity.versions_per_hour(now=3000.0) == 2
    assert activity.versions_per_hour(now=3701.0) == 1
    activity.published(7000.0)
    assert activity.versions_per_hour(now=7000.0) == 1
