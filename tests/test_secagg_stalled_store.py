"""A secure round on an aggregator whose disk stops answering (an SD card or a network disk that hangs in a write or
an fsync): each phase still ends at its deadline, plus at most one phase timeout for the messages being stored then.
A device message whose write had not returned by then is not counted and not acknowledged (503 spool-unavailable), and
when its write lands later it still does not count, after a restart either. A write of the round's own record (the
roster, the unmask request) that does not return within a phase timeout abandons the round, saying so in the status
and in ``fl_aggregator_secagg_abandoned_total{reason="store-unavailable"}``; nothing is published from it.

The disk is played by holding one kind of write on an event until the test lets it go."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggregator_harness import Harness, run
from secagg_harness import expected_mean, flat_delta, secure_rounds, secure_running, transport, until_masked

from aggregator.app import WRITES_LEFT_BEHIND
from aggregator.privacy import DPConfig, PrivacyLedger
from aggregator.rounds import RoundPolicy
from aggregator.secagg_round import SecureRounds
from appliance import wire
from appliance.protocol import messages as m

GUARD_SECONDS = 60.0  # only reached when a phase end waits for the stalled write (and then the test fails)
# The phase timeout of the tests whose share phase ends at its deadline with a share still being written: the
# others' shares, dealt and posted after the roster, must be in before it, and so must the masked inputs after the
# routing (at 1 s a loaded CI machine missed it: the stalled share came after the phase end, 409 wrong-phase). It is
# also how long that phase end waits for the stalled write.
SHARE_PHASE_SECONDS = 5
TOLERANCE = 1e-5
# The phase timeout of a test that restarts the aggregator in the share phase and reads the roster again: the restart
# must come before the share phase's deadline, or the round resumes past it and is abandoned with no shares (at 1 s a
# loaded CI machine's restart missed it: 410 round-closed).
SHARE_PHASE_KEPT = 30


def hold(obj: Any, name: str, stalls: Callable[..., bool], release: threading.Event,
         monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make ``obj.name(...)`` wait for ``release`` when ``stalls(...)`` says so; returns an event set once a held
    call has gone through to the real one (its write landed)."""
    real = getattr(obj, name)
    landed = threading.Event()

    def held(*args: Any) -> Any:
        if not stalls(*args):
            return real(*args)
        release.wait(GUARD_SECONDS)  # bounded: a write held on the event loop would stop the guard too
        try:
            return real(*args)
        finally:
            landed.set()

    monkeypatch.setattr(obj, name, held)
    return landed


async def post(h: Harness, phase: str, body: bytes) -> tuple[int, dict]:
    response = await h.client.post(f"/v1/secagg/{phase}", data=body, headers={"Content-Type": wire.CONTENT_TYPE})
    return response.status, await response.json()


async def published_delta(h: Harness, round_id: int, before: np.ndarray) -> np.ndarray:
    assert await h.task(after=round_id, wait=30) is not None, "the next round did not open"
    return h.engine.params.astype(np.float64) - before


async def round_record(h: Harness, round_id: int) -> dict:
    rounds = (await (await h.client.get("/v1/status")).json())["rounds"]
    return next(r for r in rounds if r["round"] == round_id)


def test_a_share_whose_write_hangs_past_the_phase_end_is_not_counted_and_the_others_publish(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, round_timeout=30, phase_timeout=SHARE_PHASE_SECONDS) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            stalled = rounds[2]
            landed = hold(h.engine.secure, "_save_message",
                          lambda _round, device, phase, _body: phase == "share" and device == stalled.device_id,
                          release, monkeypatch)
            await until_masked(rounds, stop_after="join")
            dealing = stalled.device.deal(stalled.roster.setup(), stalled.index)
            body = m.encode_shares(m.Shares(task.round_id, stalled.device_id, dealing), h.devices[2].key)
            before = h.engine.params.copy()
            async with asyncio.timeout(GUARD_SECONDS):
                await asyncio.gather(*(r.share() for r in rounds[:2]))
                status, problem = await post(h, "shares", body)  # answered at the phase end: not acknowledged
                assert (status, problem["reason"]) == (503, "spool-unavailable"), problem
                assert "not stored before the share phase ended" in problem["detail"]
                release.set()  # the disk answers again: the share lands, too late to count
                await asyncio.to_thread(landed.wait)
                await asyncio.gather(*(r.receive() for r in rounds[:2]))
                deltas = [flat_delta(h) for _ in rounds[:2]]
                for r, delta in zip(rounds[:2], deltas, strict=True):
                    assert (await h.upload(r.masked_input(delta, 40)))[0] == 200
                await asyncio.gather(*(r.unmask() for r in rounds[:2]))
                published = await published_delta(h, task.round_id, before)
            np.testing.assert_allclose(published, expected_mean(deltas, [40, 40]), atol=TOLERANCE)
            record = await round_record(h, task.round_id)
            assert record["status"] == "published"
            assert record["secure"]["sum_devices"] == 2 and record["secure"]["dropouts"]["share"] == 1

    try:
        run(go())
    finally:
        release.set()


def test_a_share_that_lands_after_the_phase_end_does_not_count_after_a_restart_either(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The late share is in the database once its write returns; the round resumed from the database must route
    and unmask exactly what the round before the restart did, or the survivors' masks would not come off."""
    release = threading.Event()

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, round_timeout=30, phase_timeout=SHARE_PHASE_SECONDS) as h:
            key, enrolled = h.key, h.devices
            task = await h.task()
            rounds = secure_rounds(h, task)
            stalled = rounds[2]
            landed = hold(h.engine.secure, "_save_message",
                          lambda _round, device, phase, _body: phase == "share" and device == stalled.device_id,
                          release, monkeypatch)
            await until_masked(rounds, stop_after="join")
            dealing = stalled.device.deal(stalled.roster.setup(), stalled.index)
            body = m.encode_shares(m.Shares(task.round_id, stalled.device_id, dealing), h.devices[2].key)
            async with asyncio.timeout(GUARD_SECONDS):
                await asyncio.gather(*(r.share() for r in rounds[:2]))
                assert (await post(h, "shares", body))[0] == 503
                release.set()  # the late share lands before the share phase's end is recorded
                await asyncio.to_thread(landed.wait)
                await asyncio.gather(*(r.receive() for r in rounds[:2]))  # masks made without the stalled device
            before = h.engine.params.copy()
        with sqlite3.connect(tmp_path / "aggregator.db") as db:  # the late share is stored all the same
            assert db.execute("SELECT count(*) FROM secagg_messages WHERE phase='share' AND device_id=?",
                              (stalled.device_id,)).fetchone() == (1,)
        async with secure_running(tmp_path, devices=3, round_timeout=30, phase_timeout=SHARE_PHASE_SECONDS, key=key,
                                  enrolled=enrolled) as h:
            for r in rounds[:2]:
                r.transport = transport(h)
            deltas = [flat_delta(h) for _ in rounds[:2]]
            async with asyncio.timeout(GUARD_SECONDS):
                for r, delta in zip(rounds[:2], deltas, strict=True):
                    assert (await h.upload(r.masked_input(delta, 25)))[0] == 200
                await asyncio.gather(*(r.unmask() for r in rounds[:2]))
                published = await published_delta(h, task.round_id, before)
            np.testing.assert_allclose(published, expected_mean(deltas, [25, 25]), atol=TOLERANCE)

    try:
        run(go())
    finally:
        release.set()


def test_a_masked_input_whose_spool_fsync_hangs_at_the_deadline_is_not_acknowledged_nor_summed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    armed = threading.Event()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if armed.is_set() and threading.current_thread().name.startswith("spool-writer"):
            release.wait(GUARD_SECONDS)
        real_fdatasync(fd)

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, round_timeout=6, phase_timeout=1) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            deltas = [flat_delta(h) for _ in rounds]
            for r, delta in zip(rounds[:2], deltas[:2], strict=True):
                assert (await h.upload(r.masked_input(delta, 30)))[0] == 200
            before = h.engine.params.copy()
            monkeypatch.setattr(os, "fdatasync", fdatasync)
            armed.set()
            async with asyncio.timeout(GUARD_SECONDS):
                late = rounds[2].masked_input(deltas[2], 30)
                status, problem = await h.upload(late)  # held past the deadline
                assert (status, problem["reason"]) == (503, "spool-unavailable"), problem
                armed.clear()
                release.set()  # its record lands now: the unmask request was made without it
                await asyncio.gather(*(r.unmask() for r in rounds[:2]))
                published = await published_delta(h, task.round_id, before)
                while h.engine.store.receipt_for(wire.update_digest(late)) is None:  # the late record, committed
                    await asyncio.sleep(0.05)
            np.testing.assert_allclose(published, expected_mean(deltas[:2], [30, 30]), atol=TOLERANCE)
            record = await round_record(h, task.round_id)
            assert record["secure"]["sum_devices"] == 2 and record["participants"] == 2
            assert rounds[2].device_id not in record["devices"] and record["devices_total"] == 2
            assert (record["left_out_devices"], record["left_out_devices_total"]) == ([rounds[2].device_id], 1)
            assert record["secure"]["left_out"] == {"late": 1}
            status, problem = await h.upload(late)  # its record holds a receipt: still never given
            assert (status, problem["reason"]) == (410, "round-closed"), problem

    try:
        run(go())
    finally:
        release.set()


def test_a_roster_whose_write_hangs_abandons_the_round_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, round_timeout=30, phase_timeout=1) as h:
            secure = h.engine.secure
            hold(secure, "_write", lambda statements: any("roster=excluded.roster" in sql for sql, _ in statements),
                 release, monkeypatch)
            task = await h.task()
            rounds = secure_rounds(h, task)
            async with asyncio.timeout(GUARD_SECONDS):
                await asyncio.gather(*(r.advertise() for r in rounds))
                nxt = await h.task(after=task.round_id, wait=30)  # abandoned at the phase end plus a phase timeout
                assert nxt is not None and h.engine.version == 0
                roster = await h.client.get(f"/v1/secagg/{task.round_id}/roster")
                assert roster.status == 410  # never served: it was never stored
            record = await round_record(h, task.round_id)
            assert record["status"] == "abandoned"
            assert "the roster was not stored within 1 s" in record["note"], record["note"]
            assert "the roster was not stored within 1 s" in record["secure"]["outcome"]
            assert h.counter("fl_aggregator_secagg_abandoned_total", reason="store-unavailable") == 1
            release.set()

    try:
        run(go())
    finally:
        release.set()


def test_a_round_whose_first_record_failed_keeps_its_roster_across_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The round's first record (written without waiting, so a stalled disk holds nothing up) fails once, an I/O
    error say. The roster's record, which the devices wait for before reading it, must still leave the round on disk:
    the devices act on that roster (their shares, masked inputs acknowledged after it), so a restart goes on with it."""
    real_write = SecureRounds._write
    failed: list[str] = []

    def write(self: SecureRounds, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        if not failed and statements[0][0].startswith("INSERT INTO secagg_rounds"):
            failed.append(statements[0][0])
            raise sqlite3.OperationalError("disk I/O error")
        real_write(self, statements)

    monkeypatch.setattr(SecureRounds, "_write", write)

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, round_timeout=60, phase_timeout=SHARE_PHASE_KEPT) as h:
            key, enrolled = h.key, h.devices
            task = await h.task()
            rounds = secure_rounds(h, task)
            await until_masked(rounds, stop_after="join")
            roster = await h.client.get(f"/v1/secagg/{task.round_id}/roster")
            assert roster.status == 200
            served = await roster.read()
        assert failed, "the round's first record was not written through SecureRounds._write"
        async with secure_running(tmp_path, devices=3, round_timeout=60, phase_timeout=SHARE_PHASE_KEPT, key=key,
                                  enrolled=enrolled) as h:
            again = await h.client.get(f"/v1/secagg/{task.round_id}/roster")
            assert again.status == 200, await again.text()
            assert await again.read() == served
            assert (await round_record(h, task.round_id))["secure"]["phase"] == "share"

    run(go())


def test_a_late_masked_input_stays_out_of_a_round_resumed_in_the_unmask_phase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The late masked input's record lands after the unmask request named the other two. The round resumed after a
    restart holds what the round before it held: the late input is not taken in again, so it is not counted as a
    device that dropped out of the unmask phase, and the two survivors' mean is published."""
    release = threading.Event()
    armed = threading.Event()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if armed.is_set() and threading.current_thread().name.startswith("spool-writer"):
            release.wait(GUARD_SECONDS)
        real_fdatasync(fd)

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, round_timeout=8, phase_timeout=3) as h:
            key, enrolled = h.key, h.devices
            task = await h.task()
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            deltas = [flat_delta(h) for _ in rounds]
            for r, delta in zip(rounds[:2], deltas[:2], strict=True):
                assert (await h.upload(r.masked_input(delta, 30)))[0] == 200
            before = h.engine.params.copy()
            monkeypatch.setattr(os, "fdatasync", fdatasync)
            armed.set()
            async with asyncio.timeout(GUARD_SECONDS):
                late = rounds[2].masked_input(deltas[2], 30)
                assert (await h.upload(late))[0] == 503
                armed.clear()
                release.set()
                while h.engine.store.receipt_for(wire.update_digest(late)) is None:  # the late record, committed
                    await asyncio.sleep(0.05)
                await rounds[0].unmask()
        async with secure_running(tmp_path, devices=3, round_timeout=8, phase_timeout=3, key=key,
                                  enrolled=enrolled) as h:
            rounds[1].transport = transport(h)
            async with asyncio.timeout(GUARD_SECONDS):
                await rounds[1].unmask()
                published = await published_delta(h, task.round_id, before)
            np.testing.assert_allclose(published, expected_mean(deltas[:2], [30, 30]), atol=TOLERANCE)
            record = await round_record(h, task.round_id)
            assert record["secure"]["sum_devices"] == 2 and record["participants"] == 2
            assert record["secure"]["dropouts"].get("unmask", 0) == 0, record["secure"]
            assert record["secure"]["left_out"] == {"late": 1}

    try:
        run(go())
    finally:
        release.set()


def test_a_secure_rounds_write_that_hangs_shows_in_the_disk_wait_metric_and_the_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secure round's writes go through a writer thread of their own. One that hangs (a device's set of shares)
    shows as a plain round's does: fl_aggregator_disk_wait_seconds grows, and /v1/status's disk names it and calls
    the disk stalled past --store-timeout. Once the disk answers, the share is stored in its phase and counts."""
    release = threading.Event()
    policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=120, store_timeout=1)

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, phase_timeout=60, policy=policy) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            stalled = rounds[2]
            entered = threading.Event()

            def stalls(_round: int, device: str, phase: str, _body: bytes) -> bool:
                if phase == "share" and device == stalled.device_id:
                    entered.set()
                    return True
                return False

            hold(h.engine.secure, "_save_message", stalls, release, monkeypatch)
            await until_masked(rounds, stop_after="join")
            named = f"device {stalled.device_id}'s share message in secure round {task.round_id}"
            async with asyncio.timeout(GUARD_SECONDS):
                await asyncio.gather(*(r.share() for r in rounds[:2]))
                sharing = asyncio.ensure_future(stalled.share())
                await asyncio.to_thread(entered.wait, GUARD_SECONDS)  # its write hangs
                disk = (await (await h.client.get("/v1/status")).json())["disk"]
                assert disk["oldest_write"] == named, f"a hanging secure-round write is not among the disk's: {disk}"
                assert h.counter("fl_aggregator_disk_wait_seconds") > 0
                while h.counter("fl_aggregator_disk_wait_seconds") <= 1:  # past --store-timeout
                    await asyncio.sleep(0.05)
                disk = (await (await h.client.get("/v1/status")).json())["disk"]
                release.set()
                await sharing
            assert disk["stalled"] and disk["oldest_write"] == named, disk
            assert named not in [what for _, what in h.engine.store.writes.under_way()]  # landed: no longer waited on
            assert len(h.engine.secure.current.dealings) == 3

    try:
        run(go())
    finally:
        release.set()


def test_a_distributed_dp_ledger_write_that_hangs_shows_in_the_status_and_a_stop_leaves_it_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the masks come off, --dp distributed writes in the privacy ledger that the round counts (fsynced). That
    write hanging shows as the others do: /v1/status's disk names it, and a stop waits for it at most
    --store-timeout, then leaves it behind, named (it was on no list of writes under way: the stop joined its thread
    for ever)."""
    release = threading.Event()
    entered = threading.Event()
    real_begin = PrivacyLedger.begin_unmask

    def begin_unmask(self: PrivacyLedger, *args: Any) -> bool:
        entered.set()
        release.wait(GUARD_SECONDS)
        return real_begin(self, *args)

    monkeypatch.setattr(PrivacyLedger, "begin_unmask", begin_unmask)
    policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=120, store_timeout=1)
    privacy = DPConfig(1.0, 1e-5, mode="distributed")

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, phase_timeout=60, policy=policy, privacy=privacy) as h:
            app = h.app
            try:
                task = await h.task()
                rounds = secure_rounds(h, task)
                await until_masked(rounds)
                for r in rounds:
                    assert (await h.upload(r.masked_input(flat_delta(h, 0.001), 1)))[0] == 200
                async with asyncio.timeout(GUARD_SECONDS):
                    await asyncio.gather(*(r.unmask() for r in rounds))
                    await asyncio.to_thread(entered.wait, GUARD_SECONDS)  # the ledger's write hangs
                    named = f"the privacy ledger's count of secure round {task.round_id}"
                    disk = (await (await h.client.get("/v1/status")).json())["disk"]
                    assert disk["oldest_write"] == named, disk
            except BaseException:
                release.set()  # (else the stop would wait for it)
                raise
        assert app[WRITES_LEFT_BEHIND] == [named]

    try:
        run(go())
    finally:
        release.set()
