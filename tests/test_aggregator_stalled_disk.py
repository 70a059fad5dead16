"""A plain (not secure) aggregator whose disk stops answering: an SD card or a network disk that hangs in a write or
an fsync. The aggregator keeps answering (status, task polls, metrics, health) while the round engine's own record
hangs; an upload is answered within --store-timeout, 503 spool-unavailable, never acknowledged unless it counts; a
round's close waits at most --store-timeout for the uploads still being written and goes on without them; and once
the disk answers, the round is recorded, published and followed by the next, exactly once.

The disk is played by holding one kind of write on an event until the test lets it go. The probes that must be
answered while a write is held run on a thread of their own with a plain HTTP client, so that a held event loop fails
them (their own generous timeout) instead of stopping the test with it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggregator_harness import Harness, run, running
from test_aggregator_tree import site_task, tree, wait_until

from aggregator import cli, rounds, upstream
from aggregator.app import SERVICES, WRITES_LEFT_BEHIND
from aggregator.buffered import BufferPolicy
from aggregator.rounds import RoundPolicy
from aggregator.store import Store
from appliance import wire

GUARD_SECONDS = 30.0  # reached only when the aggregator waits on the held write (and then the test fails)
PROBE_TIMEOUT = 10.0  # what a probe gives one answer: far more than an answer from memory takes
TOLERANCE = 1e-5


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """A GET from a thread of the test's own, bounded by PROBE_TIMEOUT; (status, headers, body)."""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def mean_delta(h: Harness, deltas: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.mean([h.flat(d) for d in deltas], axis=0)


def test_a_close_whose_commit_hangs_leaves_the_aggregator_answering_and_publishes_once_the_disk_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    commits: list[int] = []
    record = Store.finish_round

    def finish_round(self: Store, round_id: int, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("new_model") is not None:
            commits.append(round_id)
            entered.set()
            release.wait(GUARD_SECONDS)  # bounded: held on the event loop, it would hold the test's guard too
        record(self, round_id, *args, **kwargs)

    monkeypatch.setattr(Store, "finish_round", finish_round)
    answers: dict[str, Any] = {}

    def probe(base: str) -> None:
        """While the commit is held: each probe answered, and nothing of the new version served."""
        try:
            entered.wait(GUARD_SECONDS)
            status, _, body = get(f"{base}/v1/status")
            answers["status"] = (status, json.loads(body))
            answers["task"] = get(f"{base}/v1/task?after=1")[0]
            answers["health"] = get(f"{base}/healthz")[0]
            status, _, body = get(f"{base}/metrics")
            answers["metrics"] = (status, b"fl_aggregator_model_version 0.0" in body)
            answers["model 1"] = get(f"{base}/v1/models/1")[0]
            status, headers, _ = get(f"{base}/v1/models/latest")
            answers["latest"] = (status, headers.get("X-Model-Version"))
        except Exception as exc:  # a probe that got no answer in time: the event loop was held
            answers["failed"] = repr(exc)
        finally:
            release.set()

    async def go() -> None:
        async with running(tmp_path, devices=2) as h:
            task = await h.task()
            assert task is not None
            v0 = await h.model(0)
            prober = threading.Thread(target=probe, args=(str(h.client.make_url("")).rstrip("/"),))
            prober.start()
            deltas = [h.delta() for _ in h.devices]
            async with asyncio.timeout(GUARD_SECONDS):
                for device, delta in zip(h.devices, deltas, strict=True):
                    assert (await h.upload(device.update(task, delta)))[0] == 200  # the second closes the round
                following = await h.task(after=task.round_id, wait=GUARD_SECONDS)
            await asyncio.to_thread(prober.join)
            assert "failed" not in answers, f"the aggregator stopped answering while its commit hung: {answers}"
            status, body = answers["status"]
            assert status == 200 and body["model"]["version"] == 0 and body["current_round"]["closing"]
            assert body["disk"]["oldest_write"] == "the record of round 1's end", body["disk"]
            assert answers["task"] == 204  # the round is closing and the next is not recorded yet
            assert answers["health"] == 200 and answers["metrics"] == (200, True)
            assert answers["model 1"] == 404 and answers["latest"] == (200, "0")  # not served before its commit
            assert following is not None and (following.round_id, following.model_version) == (2, 1)
            np.testing.assert_allclose(await h.model(1), v0 + mean_delta(h, deltas), rtol=1e-5, atol=1e-6)
            rounds = (await (await h.client.get("/v1/status")).json())["rounds"]
            assert [(r["round"], r["status"], r["participants"]) for r in rounds] == [(2, "open", 0),
                                                                                       (1, "published", 2)]
            assert commits == [1]  # recorded once

    try:
        run(go())
    finally:
        release.set()


def test_an_upload_whose_spool_write_hangs_is_refused_in_time_and_the_close_goes_on_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Two updates are stored; the third's fdatasync hangs. Its device is answered 503 within --store-timeout (not
    acknowledged); once fl_aggregator_disk_wait_seconds shows the write hanging for longer than that, a fourth
    device's upload is refused at once, and both are counted; the round's close waits at most --store-timeout for the
    hanging one, then publishes the mean of the two. When the write lands, the third update counts nowhere, its resend
    is not acknowledged, and the status and the status page name it as stored too late."""
    release, armed = threading.Event(), threading.Event()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if armed.is_set() and threading.current_thread().name.startswith("spool-writer"):
            release.wait(GUARD_SECONDS)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    policy = RoundPolicy(min_clients=2, goal_clients=4, round_timeout=600, store_timeout=1)

    async def go() -> str:
        async with running(tmp_path, devices=4, policy=policy) as h:
            task = await h.task()
            assert task is not None
            v0 = await h.model(0)
            deltas = [h.delta() for _ in h.devices]
            updates = [d.update(task, delta) for d, delta in zip(h.devices, deltas, strict=True)]
            for update in updates[:2]:
                assert (await h.upload(update))[0] == 200
            armed.set()
            async with asyncio.timeout(GUARD_SECONDS):
                status, problem = await h.upload(updates[2])  # its fdatasync hangs
                assert (status, problem["reason"]) == (503, "spool-unavailable"), problem
                assert "not stored within 1 s" in problem["detail"], problem
                while h.counter("fl_aggregator_disk_wait_seconds") <= 1:  # the write has hung past --store-timeout
                    await asyncio.sleep(0.05)
                status, problem = await h.upload(updates[3])  # refused before it is read
                assert (status, problem["reason"]) == (503, "spool-unavailable"), problem
                assert "has not finished a write" in problem["detail"], problem
                disk = (await (await h.client.get("/v1/status")).json())["disk"]
                assert disk["stalled"] and disk["oldest_write"] == "the spool's write of 1 update", disk
                for path, code in (("/healthz", 200), ("/readyz", 503)):  # alive (a restart would not make the
                    probe = await h.client.get(path)  # disk answer), and not ready for uploads
                    health = await probe.json()
                    assert (probe.status, health["status"]) == (code, "disk-stalled"), (path, health)
                    assert health["disk"]["oldest_write"] == "the spool's write of 1 update", (path, health)
                capsys.readouterr()
                url = str(h.client.make_url("")).rstrip("/")
                assert await asyncio.to_thread(cli.main, ["status", "--url", url]) == 0
                assert "(the spool's write of 1 update): uploads are refused" in capsys.readouterr().out
                assert "The disk has not answered for" in await (await h.client.get("/")).text()
                await h.engine.close_round()  # waits at most --store-timeout for the hanging update
                following = await h.task(after=task.round_id)
            assert following is not None and following.model_version == 1
            np.testing.assert_allclose(await h.model(1), v0 + mean_delta(h, deltas[:2]), rtol=1e-5, atol=1e-6)
            assert h.counter("fl_aggregator_updates_unavailable_total", reason="spool-unavailable") == 2
            armed.clear()
            release.set()  # the disk answers: the third update's record lands, after its round closed without it
            async with asyncio.timeout(GUARD_SECONDS):
                while h.engine.store.receipt_for(wire.update_digest(updates[2])) is None:
                    await asyncio.sleep(0.05)
                while (ready := await h.client.get("/readyz")).status != 200:  # ready again once it answers
                    await asyncio.sleep(0.05)
                status, problem = await h.upload(updates[2])  # its record holds a receipt that was never given
            assert (await ready.json())["status"] == "ok"
            assert (status, problem["reason"]) == (410, "round-closed"), problem
            record = next(r for r in (await (await h.client.get("/v1/status")).json())["rounds"] if r["round"] == 1)
            assert (record["status"], record["participants"]) == ("published", 2)
            assert record["devices"] == [d.device_id for d in h.devices[:2]]
            assert (record["left_out_devices"], record["left_out_devices_total"]) == ([h.devices[2].device_id], 1)
            page = await (await h.client.get("/")).text()
            assert "1 update stored too late to count" in page
            return h.devices[2].device_id

    try:
        late = run(go())
    finally:
        release.set()
    capsys.readouterr()
    assert cli.main(["status", "--state", str(tmp_path)]) == 0  # read from the state: a plain round's updates
    text = capsys.readouterr().out
    assert f"1 update stored too late to count: {late}" in text and "masked input" not in text, text


def test_a_site_whose_forward_write_hangs_keeps_answering_and_forwards_once_the_disk_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site aggregator writes its forward (the signed update for its parent) before sending it; that write hangs.
    The site's status and health answer meanwhile, and once the disk answers the forward goes and the city publishes
    the mean of all four devices."""
    entered, release = threading.Event(), threading.Event()
    held = tmp_path / "site0"
    real_write = upstream.atomic_write

    def atomic_write(path: Path, data: bytes, *args: Any, **kwargs: Any) -> None:
        if path.suffix == ".forward" and path.is_relative_to(held):
            entered.set()
            release.wait(GUARD_SECONDS)  # bounded: held on the event loop, it would hold the test's guard too
        real_write(path, data, *args, **kwargs)

    monkeypatch.setattr(upstream, "atomic_write", atomic_write)
    answers: dict[str, Any] = {}

    def probe(base: str) -> None:
        try:
            entered.wait(GUARD_SECONDS)
            answers["status"] = get(f"{base}/v1/status")[0]
            answers["health"] = get(f"{base}/healthz")[0]
        except Exception as exc:  # no answer in time: the site's event loop was held
            answers["failed"] = repr(exc)
        finally:
            release.set()

    async def go() -> None:
        async with tree(tmp_path) as (city, sites):
            prober = threading.Thread(target=probe, args=(str(sites[0].client.make_url("")).rstrip("/"),))
            prober.start()
            async with asyncio.timeout(GUARD_SECONDS):
                for site in sites:
                    task = await site_task(site, 0)
                    for device in site.devices:
                        assert (await site.upload(device.update(task, site.delta())))[0] == 200
                await wait_until(lambda: city.engine.version == 1, timeout=GUARD_SECONDS, what="city version 1")
            await asyncio.to_thread(prober.join)
            assert answers == {"status": 200, "health": 200}, f"the site stopped answering: {answers}"
            assert city.engine.store.get_round(1).participants == 2  # both sites' forwards, each once

    try:
        run(go())
    finally:
        release.set()


def test_an_async_devices_next_update_waits_for_the_next_buffer_while_the_close_is_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Async mode: while a full buffer's record hangs, a device whose update is in it sends its next one. That one is
    for the next buffer: it waits for it and counts there, not refused as a duplicate of the one in the closing
    buffer (409, which an agent drops)."""
    entered, release = threading.Event(), threading.Event()
    record = Store.finish_round

    def finish_round(self: Store, round_id: int, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("new_model") is not None and round_id == 1:
            entered.set()
            release.wait(GUARD_SECONDS)
        record(self, round_id, *args, **kwargs)

    monkeypatch.setattr(Store, "finish_round", finish_round)
    policy = RoundPolicy(min_clients=1, round_timeout=600, buffer=BufferPolicy(size=2, weighting="constant"))

    async def go() -> None:
        async with running(tmp_path, devices=2, policy=policy) as h:
            task = await h.task()
            assert task is not None
            async with asyncio.timeout(GUARD_SECONDS):
                for device in h.devices:
                    assert (await h.upload(device.update(task, h.delta())))[0] == 200  # the buffer is full
                await asyncio.to_thread(entered.wait, GUARD_SECONDS)  # its record hangs
                uploads = h.app[SERVICES].uploads
                following = asyncio.ensure_future(h.upload(h.devices[0].update(task, h.delta())))
                while not following.done() and uploads.active == 0:
                    await asyncio.sleep(0.05)
                release.set()  # the disk answers: version 1 is recorded and buffer 2 opens
                status, answer = await following
            assert status == 200, answer
            assert (h.engine.version, h.engine.current.round_id, h.engine.current.accepted) == (1, 2, 1)

    try:
        run(go())
    finally:
        release.set()


def test_a_resend_while_an_update_is_committed_but_not_yet_counted_gets_no_receipt_the_close_then_cuts(
        tmp_path: Path) -> None:
    """An update's spool record is committed a moment before it is taken into its round (the spool's finisher
    thread). A resend checked against the stored records in that moment (the upload handler's check, on a
    verification thread) must not be given the record's receipt: the close may stop waiting for the update right
    then and leave it out as late, and the device would hold a receipt for an update that counts nowhere."""
    policy = RoundPolicy(min_clients=1, goal_clients=4, round_timeout=600, store_timeout=1)

    async def go() -> None:
        async with running(tmp_path, devices=2, policy=policy) as h:
            task = await h.task()
            assert task is not None
            assert (await h.upload(h.devices[0].update(task, h.delta())))[0] == 200
            held = h.devices[1].update(task, h.delta())
            digest = wire.update_digest(held)
            entered, release = threading.Event(), threading.Event()
            take = h.engine._take

            def held_take(round_: Any, update: bytes, *args: Any) -> None:
                if update == digest:  # its record is committed: it is about to be counted
                    entered.set()
                    release.wait(GUARD_SECONDS)
                take(round_, update, *args)

            h.engine._take = held_take  # type: ignore[method-assign]
            try:
                async with asyncio.timeout(GUARD_SECONDS):
                    upload = asyncio.ensure_future(h.upload(held))
                    await asyncio.to_thread(entered.wait, GUARD_SECONDS)
                    assert h.engine.store.receipt_for(digest) is not None  # committed
                    given = await asyncio.to_thread(h.engine.stored_receipt, digest)
                    await h.engine.close_round()  # stops waiting for it after --store-timeout
                    release.set()
                    status, problem = await upload
            finally:
                release.set()
            assert (status, problem["reason"]) == (503, "spool-unavailable"), problem
            record = h.engine.store.get_round(task.round_id)
            assert (record.status, record.participants) == ("published", 1)
            assert given is None, "a resend was given the receipt of an update its round then left out as late"
            status, problem = await h.upload(held)
            assert (status, problem["reason"]) == (410, "round-closed"), problem

    run(go())


def test_a_round_whose_close_failed_after_the_cut_takes_new_updates_into_its_sum(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A close stops waiting for an update whose fdatasync hangs, then fails to record the round's end (a disk
    error): the round clock opens the round to updates again until it retries. A new update stored then is
    acknowledged and counts in the model published, like any other (only the hanging one stays left out): it was
    refused 503 although stored, its resend given a receipt, and it was listed in the round but not in the mean."""
    release, armed, failed = threading.Event(), threading.Event(), threading.Event()
    real_fdatasync = os.fdatasync
    record = Store.finish_round

    def fdatasync(fd: int) -> None:
        if armed.is_set() and threading.current_thread().name.startswith("spool-writer"):
            release.wait(GUARD_SECONDS)
        real_fdatasync(fd)

    def finish_round(self: Store, round_id: int, *args: Any, **kwargs: Any) -> None:
        if not failed.is_set():
            failed.set()
            raise OSError(5, "Input/output error")
        record(self, round_id, *args, **kwargs)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(Store, "finish_round", finish_round)
    monkeypatch.setattr(rounds, "CLOSE_RETRY_SECONDS", 10 * GUARD_SECONDS)  # the test closes the round itself
    policy = RoundPolicy(min_clients=1, goal_clients=4, round_timeout=600, store_timeout=1)

    async def go() -> None:
        async with running(tmp_path, devices=3, policy=policy) as h:
            task = await h.task()
            assert task is not None
            v0 = await h.model(0)
            deltas = [h.delta() for _ in h.devices]
            updates = [d.update(task, delta) for d, delta in zip(h.devices, deltas, strict=True)]
            async with asyncio.timeout(GUARD_SECONDS):
                assert (await h.upload(updates[0]))[0] == 200
                armed.set()
                status, problem = await h.upload(updates[1])  # its fdatasync hangs
                assert (status, problem["reason"]) == (503, "spool-unavailable"), problem
                round_ = h.engine.current
                round_.full.set()  # the round clock closes it: the cut, then the failed record of its end
                await asyncio.to_thread(failed.wait, GUARD_SECONDS)
                while round_.closing:  # the clock gave up this close, and takes updates until its retry
                    await asyncio.sleep(0.05)
                armed.clear()
                release.set()  # the disk answers: the hanging update's record lands, late
                late = wire.update_digest(updates[1])
                while h.engine.store.receipt_for(late) is None or late in h.engine._inflight:
                    await asyncio.sleep(0.05)
                status, answer = await h.upload(updates[2])
                assert status == 200, answer
                await h.engine.close_round()
            np.testing.assert_allclose(await h.model(1), v0 + mean_delta(h, [deltas[0], deltas[2]]),
                                       rtol=1e-5, atol=1e-6)
            record_ = h.engine.store.get_round(task.round_id)
            assert (record_.status, record_.participants) == ("published", 2)
            status, problem = await h.upload(updates[1])
            assert (status, problem["reason"]) == (410, "round-closed"), problem

    try:
        run(go())
    finally:
        release.set()


def test_a_stop_leaves_a_write_that_never_returns_behind_names_it_and_loses_nothing_acknowledged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM (the app's cleanup) while an upload's fdatasync never returns: the stop waits for it at most
    --store-timeout, then leaves it behind and names it in the log (a stop used to wait for it for ever, and the
    kubelet or systemd killed the process without a word of why). The update acknowledged before is in the state the
    next start resumes: its resend gets its receipt."""
    armed, release, returned = threading.Event(), threading.Event(), threading.Event()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if armed.is_set() and threading.current_thread().name.startswith("spool-writer"):
            release.wait(2 * GUARD_SECONDS)  # the test lets it go only at its end
            returned.set()
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=600, store_timeout=1)

    async def stopped_while_a_write_hangs() -> tuple[Any, Any, wire.Task, bytes]:
        async with running(tmp_path, devices=3, policy=policy) as h:
            task = await h.task()
            assert task is not None
            acknowledged = h.devices[0].update(task, h.delta())
            assert (await h.upload(acknowledged))[0] == 200
            armed.set()
            status, problem = await h.upload(h.devices[1].update(task, h.delta()))  # its fdatasync never returns
            assert (status, problem["reason"]) == (503, "spool-unavailable"), problem
            assert h.app[WRITES_LEFT_BEHIND] == []
            return h.key, h.devices, task, acknowledged  # leaving the block stops the aggregator: the test

    async def restarted(key: Any, devices: Any, task: wire.Task, acknowledged: bytes) -> None:
        async with running(tmp_path, devices=3, policy=policy, key=key, enrolled=devices) as h:
            current = h.engine.current
            assert (current.round_id, current.accepted) == (task.round_id, 1)
            assert list(current.devices) == [devices[0].device_id]
            assert (await h.upload(acknowledged))[0] == 200  # its original receipt

    try:
        with caplog.at_level(logging.ERROR, logger="aggregator.app"):
            key, devices, task, acknowledged = run(stopped_while_a_write_hangs())
        assert not returned.is_set(), "the stop waited for the write that never returns"
        stops = [r.getMessage() for r in caplog.records if r.name == "aggregator.app"]
        assert len(stops) == 1 and "stopping with 1 write to" in stops[0], stops
        assert "the spool's write of 1 update (waiting for" in stops[0] and "None of them was acknowledged" in stops[0]
        armed.clear()
        run(restarted(key, devices, task, acknowledged))
    finally:
        release.set()
