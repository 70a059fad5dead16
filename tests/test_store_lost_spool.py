"""A resumed round never aggregates bytes it does not have (aggregator/store.py ``Store.recover_segment``).

Every acknowledged update was fdatasynced before its receipt, so its record should be on disk after any restart.
A disk that lies (an SD card, a filesystem mounted without barriers) can still come back with a round's spool
segment shorter than its acknowledged records, or without the segment at all. The restart used to extend such a
segment with zeros, and the lost updates then counted as all-zero deltas at full weight, pulling the published
model toward the base. Now they are taken out of the round: named in one error line, counted in
``fl_aggregator_spool_lost_updates_total{cause}`` and listed in the round's status as ``lost_devices``; their
receipts are withdrawn, and the round goes on with the rest.

The aggregator runs in process on loopback (tests/aggregator_harness.py), is stopped, its spool damaged by hand,
and started again on the same state directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import Harness, run, running
from nacl.signing import SigningKey

from aggregator.app import METRICS
from aggregator.rounds import RoundPolicy
from aggregator.store import SPOOL_LOSS_CAUSES, Store
from appliance import wire

LOST = "fl_aggregator_spool_lost_updates_total"
CUT = "fl_aggregator_spool_cut_bytes_total"


async def _model(h: Harness, version: int) -> np.ndarray:
    response = await h.client.get(f"/v1/models/{version}")
    assert response.status == 200
    return h.flat(wire.decode_model_release(await response.read(), h.key.verify_key, h.specs).tensors)


async def _status_of(h: Harness, round_id: int) -> dict:
    status = await (await h.client.get("/v1/status")).json()
    return next(r for r in status["rounds"] if r["round"] == round_id)


def _records(state: Path, round_id: int) -> list[tuple[str, int, int]]:
    """(device, offset, length) of the round's acknowledged records, in spool order."""
    store = Store(state)
    try:
        return [(u.device_id, u.offset, u.length) for u in store.round_updates(round_id)]
    finally:
        store.close()


def test_a_segment_cut_short_on_disk_resumes_with_the_intact_updates_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = SigningKey.generate()
    policy = RoundPolicy(min_clients=2, goal_clients=5, round_timeout=600)
    samples = [5, 10, 20, 40, 15]

    async def go() -> None:
        async with running(tmp_path, devices=5, key=key, policy=policy) as h:
            devices = h.devices
            task = await h.task()
            base = await _model(h, 0)
            deltas = [h.delta() for _ in devices]
            for device, delta, n in list(zip(devices, deltas, samples, strict=True))[:4]:
                assert (await h.upload(device.update(task, delta, num_samples=n)))[0] == 200
            registry = h.app[METRICS].registry  # declared at 0 from the first scrape
            assert [registry.get_sample_value(LOST, {"cause": c}) for c in SPOOL_LOSS_CAUSES] == [0.0, 0.0]
            assert registry.get_sample_value(CUT) == 0.0

        # The disk comes back without the last 2 acknowledged records but 100 bytes of the first of them.
        records = _records(tmp_path, task.round_id)
        assert [r[0] for r in records] == [d.device_id for d in devices[:4]]
        segment = tmp_path / "spool" / f"round-{task.round_id:08d}.seg"
        size = records[2][1] + 100
        with segment.open("r+b") as fh:
            fh.truncate(size)
        lost = sorted(d.device_id for d in devices[2:4])

        with caplog.at_level(logging.ERROR):
            async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
                errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
                assert len(errors) == 1, errors
                assert f"round {task.round_id}:" in errors[0] and all(d in errors[0] for d in lost)
                assert "shorter" in errors[0] or "holds" in errors[0]
                assert h.counter(LOST, cause="segment-short") == 2
                assert h.counter(LOST, cause="segment-missing") == 0
                assert h.counter(CUT) == 100  # what was left of the first lost record
                assert h.engine.current.accepted == 2
                open_round = await _status_of(h, task.round_id)
                assert open_round["participants"] == 2 and sorted(open_round["lost_devices"]) == lost
                assert sorted(open_round["devices"]) == sorted(d.device_id for d in devices[:2])

                assert (await h.upload(devices[4].update(task, deltas[4], num_samples=samples[4])))[0] == 200
                await h.engine.close_round()
                kept = [0, 1, 4]
                expected = base + np.average([h.flat(deltas[i]) for i in kept], axis=0,
                                             weights=[samples[i] for i in kept])
                np.testing.assert_allclose(await _model(h, 1), expected, rtol=1e-5, atol=1e-7)
                closed = await _status_of(h, task.round_id)
                assert closed["status"] == "published" and closed["participants"] == 3
                assert closed["samples"] == sum(samples[i] for i in kept)
                assert sorted(closed["lost_devices"]) == lost

    run(go())


def test_a_missing_segment_resumes_without_its_updates_and_an_identical_resend_counts_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = SigningKey.generate()
    policy = RoundPolicy(min_clients=2, goal_clients=4, round_timeout=600)
    samples = [5, 10, 20, 40]

    async def go() -> None:
        async with running(tmp_path, devices=4, key=key, policy=policy) as h:
            devices = h.devices
            task = await h.task()
            base = await _model(h, 0)
            deltas = [h.delta() for _ in devices]
            bodies = [d.update(task, delta, num_samples=n) for d, delta, n in zip(devices, deltas, samples,
                                                                                   strict=True)]
            for body in bodies[:3]:
                assert (await h.upload(body))[0] == 200

        (tmp_path / "spool" / f"round-{task.round_id:08d}.seg").unlink()
        lost = sorted(d.device_id for d in devices[:3])

        with caplog.at_level(logging.ERROR):
            async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
                errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
                assert len(errors) == 1, errors
                assert f"round {task.round_id}:" in errors[0] and "missing" in errors[0]
                assert all(d in errors[0] for d in lost)
                assert h.counter(LOST, cause="segment-missing") == 3
                assert h.engine.current.accepted == 0
                assert sorted((await _status_of(h, task.round_id))["lost_devices"]) == lost

                # A device that never saw its receipt (the aggregator stopped before answering) still holds its
                # update and sends it again: the withdrawn receipt is not replayed, the update counts afresh.
                status, receipt = await h.upload(bodies[0])
                assert status == 200
                assert wire.decode_receipt(receipt, h.key.verify_key).device_id == devices[0].device_id
                assert h.engine.current.accepted == 1 and h.counter("fl_aggregator_updates_resent_total") == 0
                assert (await h.upload(bodies[3]))[0] == 200
                await h.engine.close_round()
                kept = [0, 3]
                expected = base + np.average([h.flat(deltas[i]) for i in kept], axis=0,
                                             weights=[samples[i] for i in kept])
                np.testing.assert_allclose(await _model(h, 1), expected, rtol=1e-5, atol=1e-7)
                closed = await _status_of(h, task.round_id)
                assert closed["status"] == "published" and closed["participants"] == 2
                # the device that sent its update again counts, and is not listed as lost any more
                assert sorted(closed["lost_devices"]) == sorted(set(lost) - {devices[0].device_id})
                assert devices[0].device_id in closed["devices"]

    run(go())


def test_a_round_left_below_its_quorum_by_the_loss_is_abandoned(tmp_path: Path) -> None:
    key = SigningKey.generate()
    policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=600)

    async def go() -> None:
        async with running(tmp_path, devices=3, key=key, policy=policy) as h:
            devices = h.devices
            task = await h.task()
            for device in devices[:2]:
                assert (await h.upload(device.update(task, h.delta())))[0] == 200
        records = _records(tmp_path, task.round_id)
        with (tmp_path / "spool" / f"round-{task.round_id:08d}.seg").open("r+b") as fh:
            fh.truncate(records[1][1] + records[1][2] - 4)  # the second record lacks its last float
        async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
            assert h.engine.current.accepted == 1
            await h.engine.close_round()
            closed = await _status_of(h, task.round_id)
            assert closed["status"] == "abandoned" and "quorum" in closed["note"]
            assert closed["lost_devices"] == [records[1][0]]
            assert (await h.client.get("/v1/models/1")).status == 404

    run(go())


def test_a_segment_that_lost_only_the_padding_after_its_last_record_keeps_every_update(tmp_path: Path) -> None:
    """The zero padding after a record is no data: a segment that ends right after its last record's bytes holds
    every acknowledged update, and the next record still starts aligned."""
    policy = RoundPolicy(min_clients=1, goal_clients=3, round_timeout=600)
    key = SigningKey.generate()

    async def go() -> None:
        async with running(tmp_path, devices=3, key=key, policy=policy) as h:
            devices = h.devices
            task = await h.task()
            for device in devices[:2]:
                assert (await h.upload(device.update(task, h.delta())))[0] == 200
        records = _records(tmp_path, task.round_id)
        with (tmp_path / "spool" / f"round-{task.round_id:08d}.seg").open("r+b") as fh:
            fh.truncate(records[1][1] + records[1][2])
        async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
            assert h.engine.current.accepted == 2 and h.counter(LOST, cause="segment-short") == 0
            assert (await _status_of(h, task.round_id))["lost_devices"] == []
            assert (await h.upload(devices[2].update(task, h.delta())))[0] == 200
        assert [r[1] % 4096 for r in _records(tmp_path, task.round_id)] == [0, 0, 0]

    run(go())
