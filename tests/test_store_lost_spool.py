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

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import Harness, run, running
from nacl.signing import SigningKey

from aggregator.app import METRICS
from aggregator.buffered import BufferPolicy
from aggregator.record_checks import RecordCheck
from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.simulate import SimulatedDevice
from aggregator.store import SPOOL_LOSS_CAUSES, SpoolJob, Store, StoreError
from appliance import wire
from flctl.ports import free_port

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


def _segment(state: Path, round_id: int) -> Path:
    return state / "spool" / f"round-{round_id:08d}.seg"


def _truncate(segment: Path, size: int) -> None:
    """The disk hands the segment back ``size`` bytes long."""
    with segment.open("r+b") as fh:
        fh.truncate(size)


def _the_one_error(caplog: pytest.LogCaptureFixture) -> str:
    """The resume names every update it took out of a round in one error line, and logs no other."""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    return errors[0]


async def _assert_published(h: Harness, base: np.ndarray, deltas: list[np.ndarray], samples: list[int]) -> None:
    """Model 1 is ``base`` plus the mean of exactly these (flat) deltas, weighted by their samples."""
    expected = base + np.average(deltas, axis=0, weights=samples)
    np.testing.assert_allclose(await _model(h, 1), expected, rtol=1e-5, atol=1e-7)


async def _upload_first(
    h: Harness, samples: list[int], count: int, encoding: str = "float32"
) -> tuple[wire.Task, np.ndarray, list[dict[str, np.ndarray]], list[bytes]]:
    """The open round's task, model 0, and for each enrolled device a delta and its signed update (``samples[i]``
    samples, in ``encoding``); the first ``count`` updates are uploaded and acknowledged. Returns all four."""
    task = await h.task()
    base = await _model(h, 0)
    deltas = [h.delta() for _ in h.devices]
    bodies = [d.update(task, delta, num_samples=n, encoding=encoding)
              for d, delta, n in zip(h.devices, deltas, samples, strict=True)]
    for body in bodies[:count]:
        assert (await h.upload(body))[0] == 200
    return task, base, deltas, bodies


async def _cut_after_two(
    state: Path, key: SigningKey, policy: RoundPolicy, short_by: int
) -> tuple[list[SimulatedDevice], wire.Task, list[tuple[str, int, int]]]:
    """Two of three enrolled devices upload to the open round and the aggregator stops; the disk comes back with
    the segment ending ``short_by`` bytes before the end of the second record. Returns the devices, the round's
    task and its records as they were acknowledged."""
    async with running(state, devices=3, key=key, policy=policy) as h:
        task = await h.task()
        for device in h.devices[:2]:
            assert (await h.upload(device.update(task, h.delta())))[0] == 200
    records = _records(state, task.round_id)
    _truncate(_segment(state, task.round_id), records[1][1] + records[1][2] - short_by)
    return h.devices, task, records


def test_a_segment_cut_short_on_disk_resumes_with_the_intact_updates_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = SigningKey.generate()
    policy = RoundPolicy(min_clients=2, goal_clients=5, round_timeout=600)
    samples = [5, 10, 20, 40, 15]

    async def go() -> None:
        async with running(tmp_path, devices=5, key=key, policy=policy) as h:
            devices = h.devices
            task, base, deltas, _ = await _upload_first(h, samples, 4)
            registry = h.app[METRICS].registry  # declared at 0 from the first scrape
            assert [registry.get_sample_value(LOST, {"cause": c}) for c in SPOOL_LOSS_CAUSES] == [0.0] * 3
            assert registry.get_sample_value(CUT) == 0.0

        # The disk comes back without the last 2 acknowledged records but 100 bytes of the first of them.
        records = _records(tmp_path, task.round_id)
        assert [r[0] for r in records] == [d.device_id for d in devices[:4]]
        _truncate(_segment(tmp_path, task.round_id), records[2][1] + 100)
        lost = sorted(d.device_id for d in devices[2:4])

        with caplog.at_level(logging.ERROR):
            async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
                error = _the_one_error(caplog)
                assert f"round {task.round_id}:" in error and all(d in error for d in lost)
                assert "shorter" in error or "holds" in error
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
                await _assert_published(h, base, [h.flat(deltas[i]) for i in kept], [samples[i] for i in kept])
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
            task, base, deltas, bodies = await _upload_first(h, samples, 3)

        _segment(tmp_path, task.round_id).unlink()
        lost = sorted(d.device_id for d in devices[:3])

        with caplog.at_level(logging.ERROR):
            async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
                error = _the_one_error(caplog)
                assert f"round {task.round_id}:" in error and "missing" in error
                assert all(d in error for d in lost)
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
                await _assert_published(h, base, [h.flat(deltas[i]) for i in kept], [samples[i] for i in kept])
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
        devices, task, records = await _cut_after_two(tmp_path, key, policy, 4)  # the second lacks its last float
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
        devices, task, _ = await _cut_after_two(tmp_path, key, policy, 0)
        async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
            assert h.engine.current.accepted == 2 and h.counter(LOST, cause="segment-short") == 0
            assert (await _status_of(h, task.round_id))["lost_devices"] == []
            assert (await h.upload(devices[2].update(task, h.delta())))[0] == 200
        assert [r[1] % 4096 for r in _records(tmp_path, task.round_id)] == [0, 0, 0]

    run(go())


def _spooled(state: Path, round_id: int) -> dict[str, tuple[np.ndarray, str]]:
    """Each device's spooled delta in the round (a copy) and the kind of check its record carries."""
    store = Store(state)
    try:
        return {u.device_id: (np.array(store.read_delta(round_id, u.offset, u.length)), u.check.kind)
                for u in store.round_updates(round_id)}
    finally:
        store.close()


def _flip(segment: Path, at: int) -> None:
    """The disk hands back one byte of the segment with its bits inverted, and the segment keeps its size."""
    with segment.open("r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("encoding", ["float32", "float16", "int8"])
def test_a_record_changed_on_disk_is_taken_out_and_the_round_goes_on_with_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, encoding: str
) -> None:
    """The record rebuilds the tensor section whose SHA-256 the device signed (float16 and int8 records hold the
    dequantised float32 delta: they are rounded back, and must widen to the record's exact bits)."""
    key = SigningKey.generate()
    policy = RoundPolicy(min_clients=2, goal_clients=5, round_timeout=600)
    plan = TrainingPlan(encoding=encoding)
    samples = [5, 10, 20, 40]

    async def go() -> None:
        async with running(tmp_path, devices=4, key=key, policy=policy, plan=plan) as h:
            devices = h.devices
            task, base, _, _ = await _upload_first(h, samples, 4, encoding)

        spooled = _spooled(tmp_path, task.round_id)
        assert {kind for _, kind in spooled.values()} == {f"{encoding}-sha256"}
        records = _records(tmp_path, task.round_id)
        changed, offset, length = records[1]
        segment = _segment(tmp_path, task.round_id)
        _flip(segment, offset + length // 2 + 1)  # inside one float of the second record

        with caplog.at_level(logging.ERROR):
            async with running(tmp_path, key=key, enrolled=devices, policy=policy, plan=plan) as h:
                error = _the_one_error(caplog)
                assert f"round {task.round_id}:" in error and changed in error and str(segment) in error
                assert "fail their check" in error
                assert h.counter(LOST, cause="record-corrupt") == 1
                assert h.counter(LOST, cause="segment-short") == h.counter(LOST, cause="segment-missing") == 0
                open_round = await _status_of(h, task.round_id)
                assert open_round["participants"] == 3 and open_round["lost_devices"] == [changed]

                await h.engine.close_round()
                kept = [i for i, d in enumerate(devices) if d.device_id != changed]
                await _assert_published(h, base, [spooled[devices[i].device_id][0] for i in kept],
                                        [samples[i] for i in kept])
                closed = await _status_of(h, task.round_id)
                assert closed["status"] == "published" and closed["participants"] == 3
                assert closed["samples"] == sum(samples[i] for i in kept) and closed["lost_devices"] == [changed]

    run(go())


def test_bytes_changed_in_a_records_padding_or_in_the_cut_tail_change_nothing(tmp_path: Path) -> None:
    """Only a record's own bytes are checked: its zero padding and the unacknowledged tail are no update's data, so
    a segment damaged there (and an undamaged one) resumes with every acknowledged update."""
    key = SigningKey.generate()
    policy = RoundPolicy(min_clients=2, goal_clients=4, round_timeout=600)
    samples = [5, 10, 20]

    async def go() -> None:
        async with running(tmp_path, devices=3, key=key, policy=policy) as h:
            devices = h.devices
            task, base, deltas, _ = await _upload_first(h, samples, 3)

        records = _records(tmp_path, task.round_id)
        segment = _segment(tmp_path, task.round_id)
        assert all(length % 4096 for _, _, length in records)  # each record is followed by its padding
        _flip(segment, records[0][1] + records[0][2])  # the first byte of the first record's padding
        _flip(segment, records[2][1] - 1)  # the last byte of the second record's padding
        with segment.open("ab") as fh:  # an append that got no receipt: cut at the restart, never read
            fh.write(b"\x01" * 1000)

        async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
            assert h.engine.current.accepted == 3
            assert sum(h.counter(LOST, cause=c) for c in SPOOL_LOSS_CAUSES) == 0
            assert h.counter(CUT) == 1000
            await h.engine.close_round()
            await _assert_published(h, base, [h.flat(d) for d in deltas], samples)
            closed = await _status_of(h, task.round_id)
            assert closed["participants"] == 3 and closed["lost_devices"] == []

    run(go())


def test_an_async_buffers_stale_update_changed_on_disk_is_taken_out(tmp_path: Path) -> None:
    """Async mode spools a stale update scaled by its staleness weight, bytes no signature covers: its record is
    checked by the CRC-32 the spool writer took, an up-to-date one's by its signed digest."""
    key = SigningKey.generate()
    policy = RoundPolicy(min_clients=1, round_timeout=600, buffer=BufferPolicy(size=3))
    samples = {3: 7, 4: 11}

    async def go() -> None:
        async with running(tmp_path, devices=6, key=key, policy=policy) as h:
            devices = h.devices
            task0 = await h.task()
            for device in devices[:3]:
                assert (await h.upload(device.update(task0, h.delta())))[0] == 200
            task1 = await h.task(after=task0.round_id, wait=10)
            v1 = await _model(h, 1)
            fresh = h.delta()
            assert (await h.upload(devices[3].update(task0, h.delta(), num_samples=samples[3])))[0] == 200
            assert (await h.upload(devices[4].update(task1, fresh, num_samples=samples[4])))[0] == 200

        spooled = _spooled(tmp_path, task1.round_id)
        stale = devices[3].device_id
        assert spooled[stale][1] == "crc32" and spooled[devices[4].device_id][1] == "float32-sha256"
        _, offset, length = next(r for r in _records(tmp_path, task1.round_id) if r[0] == stale)
        _flip(_segment(tmp_path, task1.round_id), offset + length // 3)

        async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
            assert h.counter(LOST, cause="record-corrupt") == 1 and h.engine.current.accepted == 1
            assert (await _status_of(h, task1.round_id))["lost_devices"] == [stale]
            others = [(devices[5], h.delta(), 13), (devices[0], h.delta(), 3)]
            for device, delta, n in others:
                assert (await h.upload(device.update(task1, delta, num_samples=n)))[0] == 200
            assert (await h.task(after=task1.round_id, wait=10)).model_version == 2
            held = [(fresh, samples[4])] + [(delta, n) for _, delta, n in others]  # all trained on version 1
            expected = v1 + np.average([h.flat(d) for d, _ in held], axis=0, weights=[n for _, n in held])
            np.testing.assert_allclose(await _model(h, 2), expected, rtol=1e-5, atol=1e-7)

    run(go())


# Resumes the round in a fresh process and prints how much its peak RSS grew while the records were checked.
_RESUME_PEAK = """
import sys
from pathlib import Path
from aggregator.store import Store

def peak_kib() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

store = Store(Path(sys.argv[1]))
before = peak_kib()
recovery = store.recover_segment(1)
print(len(recovery.corrupt), peak_kib() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status for VmHWM")
def test_checking_a_rounds_records_at_resume_maps_one_record_at_a_time(tmp_path: Path) -> None:
    """The check reads every record of the round: mapping the whole segment for it kept every page read resident
    until the last record was checked, so a resume's peak RSS grew with the round (4 GB for 1,000 updates of 4 MB)
    where the replay that follows maps one record at a time."""
    records, values = 24, 262_144  # 24 records of 1 MiB
    store = Store(tmp_path)
    try:
        store.start_writer()

        async def spool() -> None:
            for i in range(records):
                await store.spool(SpoolJob(
                    digest=bytes([i]) * 32, device_id=f"d{i}", round_id=1, num_samples=1, metrics={},
                    delta=np.full(values, i, np.float32), receipt=b"r", accepted_at=1.0,
                ))

        asyncio.run(spool())
    finally:
        store.close()
    run_ = subprocess.run([sys.executable, "-c", _RESUME_PEAK, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert run_.returncode == 0, run_.stderr[-2000:]
    corrupt, grown_kib = map(int, run_.stdout.split())
    assert corrupt == 0
    assert grown_kib < 8 * 1024, f"peak RSS grew by {grown_kib // 1024} MiB checking a {records} MiB segment"


# ------------------------------------------------------------------------------- a check kind this version lacks

NEWER_KIND = "float64-sha512"  # what a newer aggregator might write; no version knows it today


def _set_check_kind(state: Path, device_id: str, kind: str) -> str:
    """Give the device's spooled update row another check kind (as a newer aggregator, or damage, would); returns
    the kind it had."""
    db = sqlite3.connect(state / "aggregator.db")
    try:
        (before,) = db.execute("SELECT check_kind FROM updates WHERE device_id=?", (device_id,)).fetchone()
        with db:
            db.execute("UPDATE updates SET check_kind=? WHERE device_id=?", (kind, device_id))
        return before
    finally:
        db.close()


def _lost_rows(state: Path) -> int:
    db = sqlite3.connect(state / "aggregator.db")
    try:
        return db.execute("SELECT count(*) FROM lost_updates").fetchone()[0]
    finally:
        db.close()


def test_a_record_of_an_unknown_check_kind_stops_the_resume_and_changes_nothing(tmp_path: Path) -> None:
    """A row whose check kind this version does not know (a newer aggregator wrote it and was downgraded, or the row
    is damaged) ended the start in a ValueError traceback. Its record is most likely intact, and taking its update
    out of the round would withdraw the receipt of a device that has deleted it, for good; so the start is refused
    naming the round, the device and the kind, nothing is changed, and a version that knows the kind (here: the
    kind put back) resumes every update."""
    key = SigningKey.generate()
    policy = RoundPolicy(min_clients=2, goal_clients=5, round_timeout=600)

    async def go() -> None:
        async with running(tmp_path, devices=3, key=key, policy=policy) as h:
            devices = h.devices
            task = await h.task()
            for device in devices:
                assert (await h.upload(device.update(task, h.delta())))[0] == 200
        records = _records(tmp_path, task.round_id)
        segment = _segment(tmp_path, task.round_id)
        size = segment.stat().st_size
        newer = devices[1].device_id
        kind = _set_check_kind(tmp_path, newer, NEWER_KIND)

        with pytest.raises(StoreError) as refused:
            async with running(tmp_path, key=key, enrolled=devices, policy=policy):
                pass
        message = str(refused.value)
        assert message.startswith(f"round {task.round_id}: ") and "\n" not in message
        assert f"device {newer} check kind '{NEWER_KIND}'" in message
        assert segment.stat().st_size == size and _records(tmp_path, task.round_id) == records
        assert _lost_rows(tmp_path) == 0

        _set_check_kind(tmp_path, newer, kind)
        async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
            assert h.engine.current.accepted == 3
            assert h.counter(LOST, cause="record-corrupt") == 0
            assert (await _status_of(h, task.round_id))["lost_devices"] == []

    run(go())


def test_serve_refuses_an_unknown_check_kind_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    cmd = [sys.executable, "-m", "aggregator.cli", "serve", "--init", "--state", str(state), "--listen",
           f"127.0.0.1:{port}", "--synthetic-parameters", "10"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=2) as r:
                    round_id = json.load(r)["current_round"]["round"]
                break
            except (urllib.error.URLError, ConnectionError, TypeError):  # not listening yet, or no round yet
                assert first.poll() is None
                time.sleep(0.1)
        else:
            raise AssertionError("the first start never opened a round")
    finally:
        first.terminate()
        first.wait(timeout=30)
    store = Store(state)
    try:
        store.start_writer()
        asyncio.run(store.spool(SpoolJob(
            digest=b"\x01" * 32, device_id="d1", round_id=round_id, num_samples=1, metrics={},
            delta=np.zeros(10, np.float32), receipt=b"r", accepted_at=time.time(),
            check=RecordCheck(NEWER_KIND, b"\x00" * 64),
        )))
    finally:
        store.close()

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fl-aggregator: round {round_id}: ") and f"device d1 check kind '{NEWER_KIND}'" in last


def _spool_two(state: Path) -> list[tuple[str, int, int]]:
    """Round 1 of a bare store spools the updates of devices d1 and d2 (CRC-32 checks); returns their records."""
    store = Store(state)
    try:
        store.start_writer()
        for device_id in ("d1", "d2"):
            asyncio.run(store.spool(SpoolJob(
                digest=device_id.encode().ljust(32, b"\0"), device_id=device_id, round_id=1, num_samples=1, metrics={},
                delta=np.arange(10, dtype=np.float32), receipt=b"r", accepted_at=time.time(),
            )))
    finally:
        store.close()
    return _records(state, 1)


@pytest.mark.parametrize(("kind", "value"), [(NEWER_KIND, b"\x00" * 64), (NEWER_KIND, None), ("crc32", None)],
                         ids=["unknown-kind", "unknown-kind-no-value", "known-kind-no-value"])
def test_a_check_this_version_cannot_verify_is_refused_before_anything_is_cut_or_moved(
    tmp_path: Path, kind: str, value: bytes | None
) -> None:
    """A row whose check this version cannot verify (a kind it does not know, or a kind without its value: damage,
    or a hand edit that cleared the value and left the kind) stops the resume in one line naming the device, before
    the segment's unacknowledged tail is cut or another device's changed record is taken out of the round. A
    missing value ended the start in a TypeError traceback, even for a kind the refusal was there for."""
    records = _spool_two(tmp_path)
    segment = _segment(tmp_path, 1)
    with segment.open("r+b") as fh:  # d1's record changed on disk, and an append that got no receipt
        fh.seek(records[0][1])
        fh.write(b"\xff" * 4)
        fh.seek(0, 2)
        fh.write(b"\x01" * 100)
    on_disk = segment.read_bytes()
    db = sqlite3.connect(tmp_path / "aggregator.db")
    try:
        with db:
            db.execute("UPDATE updates SET check_kind=?, check_value=? WHERE device_id='d2'", (kind, value))
    finally:
        db.close()

    store = Store(tmp_path)
    try:
        with pytest.raises(StoreError) as refused:
            store.recover_segment(1)
    finally:
        store.close()
    message = str(refused.value)
    assert message.startswith("round 1: ") and "\n" not in message
    assert f"device d2 check kind {kind!r}" + ("" if value else " without its value") in message
    assert "d1" not in message
    assert segment.read_bytes() == on_disk and _lost_rows(tmp_path) == 0
