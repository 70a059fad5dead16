"""A round's life through the HTTP API: publish at the goal, abandon without a quorum, long-poll, resume."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import Harness, run, running
from nacl.signing import SigningKey

from aggregator.rounds import RoundPolicy, TrainingPlan
from appliance import wire


async def _release(h: Harness, which: str | int) -> wire.ModelRelease:
    response = await h.client.get(f"/v1/models/{which}")
    assert response.status == 200
    assert response.content_type == wire.CONTENT_TYPE
    return wire.decode_model_release(await response.read(), h.key.verify_key, h.specs)


def test_round_publishes_the_weighted_mean_at_the_goal(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=3) as h:
            task = await h.task()
            base = await _release(h, 0)
            assert base.digest == task.model_digest
            deltas, samples = [], [10, 30, 60]
            for device, n, loss in zip(h.devices, samples, (1.0, 2.0, 3.0), strict=True):
                delta = h.delta()
                deltas.append(h.flat(delta))
                status, receipt = await h.upload(device.update(task, delta, num_samples=n, metrics={"loss": loss}))
                assert status == 200
                decoded = wire.decode_receipt(receipt, h.key.verify_key)
                assert (decoded.device_id, decoded.round_id) == (device.device_id, task.round_id)
            following = await h.task(after=task.round_id, wait=10)
            assert following is not None and following.model_version == 1
            release = await _release(h, "latest")
            assert release.version == 1 and release.digest == following.model_digest
            expected = h.flat(base.tensors) + np.average(deltas, axis=0, weights=samples)
            np.testing.assert_allclose(h.flat(release.tensors), expected, rtol=1e-5, atol=1e-6)

            status = await (await h.client.get("/v1/status")).json()
            done = next(r for r in status["rounds"] if r["round"] == task.round_id)
            assert done["status"] == "published" and done["participants"] == 3 and done["samples"] == 100
            assert sorted(done["devices"]) == sorted(d.device_id for d in h.devices)
            assert done["metrics"]["loss"] == pytest.approx((10 * 1 + 30 * 2 + 60 * 3) / 100)
            assert status["model"]["version"] == 1 and status["current_round"]["round"] == following.round_id
            page = await h.client.get("/")
            assert page.status == 200 and page.content_type == "text/html"
            row = (f'<td>{task.round_id}</td><td>v0</td><td class="status-published">published</td>'
                   '<td>3/3</td><td>100</td>')
            assert row in await page.text()
            assert h.counter("fl_aggregator_rounds_total", outcome="published") == 1
            assert h.counter("fl_aggregator_model_version") == 1
            assert h.counter("fl_aggregator_round_participants_count") == 1
            assert h.counter("fl_aggregator_round_participants_sum") == 3

    run(go())


def test_round_without_quorum_is_abandoned_and_reopened_on_the_same_version(tmp_path: Path) -> None:
    async def go() -> None:
        # the deadline runs from start-up: long enough for the first upload to land on a loaded machine
        policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=4.0)
        async with running(tmp_path, devices=3, policy=policy) as h:
            task = await h.task()
            assert (await h.upload(h.devices[0].update(task, h.delta())))[0] == 200
            started = time.monotonic()
            reopened = await h.task(after=task.round_id, wait=60)
            assert reopened is not None and time.monotonic() - started < 60
            assert reopened.round_id == task.round_id + 1
            assert reopened.model_version == task.model_version and reopened.model_digest == task.model_digest
            status = await (await h.client.get("/v1/status")).json()
            old = next(r for r in status["rounds"] if r["round"] == task.round_id)
            assert old["status"] == "abandoned" and "quorum" in old["note"]
            assert h.counter("fl_aggregator_rounds_total", outcome="abandoned") >= 1
            # The straggler's update for the abandoned round is late, not an error of the device.
            status_code, problem = await h.upload(h.devices[1].update(task, h.delta()))
            assert (status_code, problem["reason"]) == (410, "round-closed")
            assert (await h.client.get("/v1/models/1")).status == 404

    run(go())


def test_task_long_poll_waits_then_answers_204_or_wakes_on_a_new_round(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2) as h:
            task = await h.task()
            started = time.monotonic()
            assert await h.task(after=task.round_id, wait=0.5) is None
            assert 0.4 < time.monotonic() - started < 30
            waiter = asyncio.create_task(h.task(after=task.round_id, wait=60))
            deadline = time.monotonic() + 30
            while h.counter("fl_aggregator_task_waiters") != 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert h.counter("fl_aggregator_task_waiters") == 1
            for device in h.devices:
                assert (await h.upload(device.update(task, h.delta())))[0] == 200
            woke = await asyncio.wait_for(waiter, 30)
            assert woke is not None and woke.round_id == task.round_id + 1

    run(go())


def test_restart_resumes_the_open_round_with_each_update_once(tmp_path: Path) -> None:
    key = SigningKey.generate()

    async def go() -> None:
        async with running(tmp_path, devices=3, key=key) as h:
            devices = h.devices
            task = await h.task()
            base = h.flat((await _release(h, 0)).tensors)
            bodies, deltas = [], []
            for device in devices:
                delta = h.delta()
                deltas.append(h.flat(delta))
                bodies.append(device.update(task, delta, num_samples=5))
            receipts = [(await h.upload(b))[1] for b in bodies[:2]]
        async with running(tmp_path, key=key, enrolled=devices) as h:
            assert h.engine.current.round_id == task.round_id and h.engine.current.accepted == 2
            assert (await h.upload(bodies[0])) == (200, receipts[0])  # resend after restart: original receipt
            assert (await h.upload(bodies[2]))[0] == 200
            following = await h.task(after=task.round_id, wait=10)
            assert following is not None
            release = await _release(h, 1)
            np.testing.assert_allclose(h.flat(release.tensors), base + np.mean(deltas, axis=0), rtol=1e-5, atol=1e-6)

    run(go())


# (not named "strategy": labgrid's pytest plugin claims that fixture name)
@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum"])
def test_robust_strategies_aggregate_from_the_spool(tmp_path: Path, rule: str) -> None:
    async def go() -> None:
        policy = RoundPolicy(min_clients=5, goal_clients=5, round_timeout=60)
        async with running(tmp_path, devices=5, policy=policy, strategy=rule, chunk_bytes=256) as h:
            task = await h.task()
            base = h.flat((await _release(h, 0)).tensors)
            deltas = []
            for device in h.devices:
                delta = h.delta()
                deltas.append(h.flat(delta))
                assert (await h.upload(device.update(task, delta)))[0] == 200
            assert await h.task(after=task.round_id, wait=10) is not None
            got = h.flat((await _release(h, 1)).tensors) - base
            stacked = np.array(deltas)
            if rule == "median":
                np.testing.assert_allclose(got, np.median(stacked, axis=0), atol=1e-6)
            elif rule == "trimmed-mean":  # beta 0.2 of 5: drop one from each end
                np.testing.assert_allclose(got, np.sort(stacked, axis=0)[1:4].mean(axis=0), atol=1e-6)
            else:  # f = (5-3)//2 = 1: keeps 4 of 5, averaged
                assert any(
                    np.allclose(got, np.delete(stacked, i, axis=0).mean(axis=0), atol=1e-6) for i in range(5)
                )
            assert not list((tmp_path / "spool").glob(f"round-{task.round_id:08d}.seg"))  # spool dropped

    run(go())


def test_fedadam_moments_survive_a_restart(tmp_path: Path) -> None:
    key = SigningKey.generate()

    async def one_round(h: Harness) -> None:
        task = await h.task()
        for device in h.devices:
            assert (await h.upload(device.update(task, h.delta())))[0] == 200
        assert await h.task(after=task.round_id, wait=10) is not None

    async def go() -> None:
        async with running(tmp_path, devices=2, key=key, strategy="fedadam") as h:
            devices = h.devices
            await one_round(h)
            saved = {k: v.copy() for k, v in h.engine.strategy.state().items()}
        async with running(tmp_path, key=key, enrolled=devices, strategy="fedadam") as h:
            restored = h.engine.strategy.state()
            assert set(restored) == {"m", "v"}
            for name in saved:
                np.testing.assert_array_equal(restored[name], saved[name])
            await one_round(h)
            assert h.engine.version == 2

    run(go())


def test_rounds_limit_stops_publishing_but_keeps_serving(tmp_path: Path) -> None:
    async def go() -> None:
        policy = RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60, max_rounds=1)
        async with running(tmp_path, devices=1, policy=policy) as h:
            task = await h.task()
            assert (await h.upload(h.devices[0].update(task, h.delta())))[0] == 200
            assert await h.task(after=task.round_id, wait=1) is None
            assert (await _release(h, "latest")).version == 1
            status = await (await h.client.get("/v1/status")).json()
            assert status["current_round"] is None
            assert (await h.client.get("/healthz")).status == 200

    run(go())


@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_quantised_updates_are_dequantised(tmp_path: Path, encoding: str) -> None:
    async def go() -> None:
        policy = RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60)
        async with running(tmp_path, devices=1, policy=policy, plan=TrainingPlan(encoding=encoding)) as h:
            task = await h.task()
            assert task.encoding == encoding
            base = h.flat((await _release(h, 0)).tensors)
            delta = h.delta(scale=0.1)
            assert (await h.upload(h.devices[0].update(task, delta, encoding=encoding)))[0] == 200
            assert await h.task(after=task.round_id, wait=10) is not None
            got = h.flat((await _release(h, 1)).tensors) - base
            np.testing.assert_allclose(got, h.flat(delta), atol=0.1 / 127 * 4)

    run(go())


def test_concurrent_uploads_are_each_counted_once(tmp_path: Path) -> None:
    async def go() -> None:
        policy = RoundPolicy(min_clients=2, goal_clients=40, round_timeout=60)
        async with running(tmp_path, devices=40, parameters=20_000, policy=policy) as h:
            task = await h.task()
            bodies = [d.update(task, h.delta()) for d in h.devices]
            # every body twice, all at once: a copy whose device is still being heard is told to retry (429),
            # the retry gets the original receipt; 40 updates counted, each body's two answers identical
            answers = await asyncio.gather(*(h.upload(b) for b in bodies + bodies))
            busy = [i for i, (status, _) in enumerate(answers) if status == 429]
            assert all(answers[i][1]["reason"] == "device-busy" for i in busy)
            for i in busy:
                answers[i] = await h.upload((bodies + bodies)[i])
            assert all(status == 200 for status, _ in answers)
            assert [a[1] for a in answers[:40]] == [a[1] for a in answers[40:]]
            assert h.counter("fl_aggregator_updates_accepted_total") == 40
            following = await h.task(after=task.round_id, wait=10)
            assert following is not None
            status = await (await h.client.get("/v1/status")).json()
            done = next(r for r in status["rounds"] if r["round"] == task.round_id)
            assert done["participants"] == 40

    run(go())
