"""A publication whose SQLite commit fails (a full disk, say) is retried by the round clock. Until it is recorded
the new version is not published: GET /v1/models/{v} is 404 and the status still names the old version. The retry
steps the model once from the updates it holds: not from the version that failed to be recorded (which added the
buffer's delta twice), and with FedAdam's moments as they were before the failed attempt (not moved twice)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from test_aggregator_tree import wait_until

from aggregator import rounds
from aggregator.buffered import BufferPolicy
from aggregator.privacy import DPConfig
from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.store import Store
from tests.aggregator_harness import run, running

DEVICES = 2
ETA, BETA1, BETA2, TAU = 0.01, 0.9, 0.99, 1e-3  # FedAdam's defaults (aggregator/strategies/fedopt.py)

POLICIES = {
    "async": RoundPolicy(min_clients=1, round_timeout=600, buffer=BufferPolicy(size=DEVICES, weighting="constant")),
    "sync": RoundPolicy(min_clients=DEVICES, goal_clients=DEVICES, round_timeout=600),
}


def one_step(rule: str, v0: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The first published version from ``v0`` and the round's sample-weighted mean delta."""
    if rule == "fedavg":
        return v0 + mean
    m = (1 - BETA1) * mean
    v = BETA2 * TAU**2 + (1 - BETA2) * mean * mean
    return v0 + ETA * m / (np.sqrt(v) + TAU)


@pytest.mark.parametrize(("mode", "rule"), [("async", "fedavg"), ("async", "fedadam"), ("sync", "fedadam")])
def test_a_publication_whose_commit_failed_is_not_served_and_its_retry_steps_the_model_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, rule: str
) -> None:
    disk_full = [True]
    failed: list[int] = []
    record = Store.finish_round

    def finish_round(self: Store, round_id: int, *args: object, **kwargs: object) -> None:
        if kwargs.get("new_model") is not None and disk_full[0]:
            failed.append(round_id)
            raise sqlite3.OperationalError("database or disk is full")
        record(self, round_id, *args, **kwargs)

    monkeypatch.setattr(Store, "finish_round", finish_round)
    monkeypatch.setattr(rounds, "CLOSE_RETRY_SECONDS", 0.05)

    async def go() -> None:
        async with running(tmp_path, devices=DEVICES, policy=POLICIES[mode], strategy=rule) as h:
            task = await h.task()
            assert task is not None
            v0 = await h.model(0)
            deltas = [h.delta() for _ in h.devices]
            for device, delta in zip(h.devices, deltas, strict=True):
                status, answer = await h.upload(device.update(task, delta))
                assert status == 200, answer

            await wait_until(lambda: len(failed) >= 2, what="two failed attempts to record version 1")
            response = await h.client.get("/v1/models/1")
            assert response.status == 404 and (await response.json())["reason"] == "unknown-version"
            status = await (await h.client.get("/v1/status")).json()
            assert status["model"]["version"] == 0

            disk_full[0] = False
            task1 = await h.task(after=task.round_id, wait=10)
            assert task1 is not None and task1.model_version == 1
            mean = np.mean([h.flat(delta) for delta in deltas], axis=0)
            np.testing.assert_allclose(await h.model(1), one_step(rule, v0, mean), rtol=1e-5, atol=1e-7)

    run(go())


def test_a_private_publication_retried_after_a_failed_commit_keeps_the_moments_it_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Central DP: the retry publishes the model the privacy ledger counted (its noise is not drawn again), and the
    FedAdam moments the next round steps from are the ones written beside that version, not those from before."""
    disk_full = [True]
    failed: list[int] = []
    record = Store.finish_round

    def finish_round(self: Store, round_id: int, *args: object, **kwargs: object) -> None:
        if kwargs.get("new_model") is not None and disk_full[0]:
            failed.append(round_id)
            raise sqlite3.OperationalError("database or disk is full")
        record(self, round_id, *args, **kwargs)

    monkeypatch.setattr(Store, "finish_round", finish_round)
    monkeypatch.setattr(rounds, "CLOSE_RETRY_SECONDS", 0.05)

    async def go() -> None:
        async with running(tmp_path, devices=DEVICES, policy=POLICIES["sync"], strategy="fedadam",
                           plan=TrainingPlan(clip_norm=1.0), privacy=DPConfig(noise_multiplier=0.01, delta=1e-5)) as h:
            task = await h.task()
            assert task is not None
            for device in h.devices:
                status, answer = await h.upload(device.update(task, h.delta()))
                assert status == 200, answer
            await wait_until(lambda: len(failed) >= 2, what="two failed attempts to record version 1")
            disk_full[0] = False
            assert await h.task(after=task.round_id, wait=10) is not None
            with np.load(h.state_dir / "models" / "v00000001.strategy.npz") as saved:
                np.testing.assert_array_equal(h.engine.strategy.m, saved["fedadam/m"])
                np.testing.assert_array_equal(h.engine.strategy.v, saved["fedadam/v"])

    run(go())


def test_a_private_round_counted_before_its_commit_failed_takes_no_update_its_counted_model_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Central DP: once the ledger counted a round's noised model, the retried close publishes that model. An update
    sent while the commit fails is refused (410 round-closed) rather than acknowledged, left out of the published
    model and listed among the round's participants."""
    disk_full = [True]
    failed: list[int] = []
    record = Store.finish_round

    def finish_round(self: Store, round_id: int, *args: object, **kwargs: object) -> None:
        if kwargs.get("new_model") is not None and disk_full[0]:
            failed.append(round_id)
            raise sqlite3.OperationalError("database or disk is full")
        record(self, round_id, *args, **kwargs)

    monkeypatch.setattr(Store, "finish_round", finish_round)
    monkeypatch.setattr(rounds, "CLOSE_RETRY_SECONDS", 3600.0)  # the clock waits; the test closes the round itself

    async def go() -> None:
        policy = RoundPolicy(min_clients=DEVICES, goal_clients=DEVICES, round_timeout=600)
        async with running(tmp_path, devices=DEVICES + 1, policy=policy, plan=TrainingPlan(clip_norm=1.0),
                           privacy=DPConfig(noise_multiplier=0.01, delta=1e-5)) as h:
            task = await h.task()
            assert task is not None
            for device in h.devices[:DEVICES]:
                status, answer = await h.upload(device.update(task, h.delta()))
                assert status == 200, answer
            await wait_until(lambda: any("closing round" in r.getMessage() for r in caplog.records),
                             what="the round clock waiting to close the round again after its commit failed")
            status, answer = await h.upload(h.devices[DEVICES].update(task, h.delta()))
            assert status == 410, "an update was acknowledged into a round whose counted model lacks it"
            assert answer["reason"] == "round-closed"

            disk_full[0] = False
            await h.engine.close_round()
            assert h.engine.version == 1
            closed = h.engine.store.get_round(task.round_id)
            assert (closed.status, closed.participants) == ("published", DEVICES)

    run(go())
