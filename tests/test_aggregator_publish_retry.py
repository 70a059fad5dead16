"""A publication whose SQLite commit fails (a full disk, say) is retried by the round clock. Until it is recorded
the new version is not published: GET /v1/models/{v} is 404 and the status still names the old version. The retry
steps the model once from the updates it holds: not from the version that failed to be recorded (which added the
buffer's delta twice), and with FedAdam's moments as they were before the failed attempt (not moved twice). Once the
commit succeeds, a failure after it is retried without closing the round again: the version recorded stands."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from secagg_harness import secure_rounds, secure_running

from aggregator import privacy, rounds
from aggregator.buffered import BufferPolicy
from aggregator.privacy import DPConfig
from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.secagg_round import SecureRounds
from aggregator.store import Store
from appliance import wire
from tests.aggregator_harness import Harness, async_city_and_site, run, running, site_task, wait_until

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


class FailingAfterCommit:
    """Store.finish_round recording each committed version's digest, and Store.drop_segment (a step after the commit:
    the closed round's spool segment is deleted) failing with EIO while ``failing``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing = True
        self.failures = 0
        self.committed: list[tuple[int, bytes]] = []
        record, drop = Store.finish_round, Store.drop_segment

        def finish_round(store: Store, round_id: int, *args: object, **kwargs: object) -> None:
            record(store, round_id, *args, **kwargs)
            if kwargs.get("new_model") is not None:
                self.committed.append(kwargs["new_model"])  # type: ignore[arg-type]

        def drop_segment(store: Store, round_id: int) -> None:
            if self.failing:
                self.failures += 1
                raise OSError(errno.EIO, "Input/output error")
            drop(store, round_id)

        monkeypatch.setattr(Store, "finish_round", finish_round)
        monkeypatch.setattr(Store, "drop_segment", drop_segment)
        monkeypatch.setattr(rounds, "CLOSE_RETRY_SECONDS", 0.05)


async def served_digest(h: Harness, version: int) -> bytes:
    response = await h.client.get(f"/v1/models/{version}")
    assert response.status == 200
    return wire.decode_model_release(await response.read(), h.key.verify_key).digest


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failure_after_the_commit_keeps_the_published_version_and_the_next_round_opens_once_it_clears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The commit of version 1 succeeds and a step after it fails (the closed round's segment cannot be deleted): the
    retries complete the publication without closing the round again, so version 1 is recorded once, served with the
    digest recorded and stepped once (a retry used to aggregate the same updates onto it and rewrite it), each
    failure is counted, and the next round opens once the step succeeds (a retry used to fail on the next round's row
    forever, and no round opened until a restart)."""
    disk = FailingAfterCommit(monkeypatch)

    async def go() -> None:
        async with running(tmp_path, devices=DEVICES, policy=POLICIES[mode], strategy="fedadam") as h:
            task = await h.task()
            assert task is not None
            v0 = await h.model(0)
            deltas = [h.delta() for _ in h.devices]
            for device, delta in zip(h.devices, deltas, strict=True):
                status, answer = await h.upload(device.update(task, delta))
                assert status == 200, answer
            await wait_until(lambda: disk.failures >= 3, what="three failed attempts after version 1's commit")
            assert h.counter("fl_aggregator_publication_failures_total") >= 3
            assert h.engine.version == 1
            assert await h.task() is None, "a task was handed out while the next round is not open"

            disk.failing = False
            task1 = await h.task(after=task.round_id, wait=10)
            assert task1 is not None and (task1.round_id, task1.model_version) == (task.round_id + 1, 1)
            assert [version for version, _ in disk.committed] == [1]
            assert await served_digest(h, 1) == disk.committed[0][1] == task1.model_digest
            mean = np.mean([h.flat(delta) for delta in deltas], axis=0)
            np.testing.assert_allclose(await h.model(1), one_step("fedadam", v0, mean), rtol=1e-5, atol=1e-7)

    run(go())


def test_a_failure_after_the_last_rounds_commit_publishes_nothing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--rounds 1: there is no next round whose row would stop a retry, and a retry used to publish version 1 again,
    stepped a second time from the first one. Now the version recorded first stays, and no round opens."""
    disk = FailingAfterCommit(monkeypatch)

    async def go() -> None:
        policy = RoundPolicy(min_clients=DEVICES, goal_clients=DEVICES, round_timeout=600, max_rounds=1)
        async with running(tmp_path, devices=DEVICES, policy=policy) as h:
            task = await h.task()
            assert task is not None
            v0 = await h.model(0)
            deltas = [h.delta() for _ in h.devices]
            for device, delta in zip(h.devices, deltas, strict=True):
                status, answer = await h.upload(device.update(task, delta))
                assert status == 200, answer
            await wait_until(lambda: disk.failures >= 3, what="three failed attempts after version 1's commit")
            disk.failing = False
            await wait_until(lambda: h.engine.current is None, what="the publication of the last version completed")

            assert [version for version, _ in disk.committed] == [1]
            assert await served_digest(h, 1) == disk.committed[0][1] == h.engine.store.model_digest(1)
            mean = np.mean([h.flat(delta) for delta in deltas], axis=0)
            np.testing.assert_allclose(await h.model(1), v0 + mean, rtol=1e-5, atol=1e-7)
            assert h.counter("fl_aggregator_rounds_total", outcome="published") == 1
            assert h.engine.store.last_round_id() == task.round_id

    run(go())


def test_a_private_publication_whose_ledger_cannot_be_settled_stands_and_counts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Central DP: version 1 is recorded, then forgetting the counted model fails (the ledger directory's fsync: EIO).
    The retry does not close the round again (which failed on the next round's row forever, and no round opened until
    a restart): it settles the ledger, the next round opens on version 1, and the round is counted once in epsilon."""
    failures: list[int] = []
    committed: list[tuple[int, bytes]] = []
    record, fsync = Store.finish_round, privacy.fsync_dir

    def finish_round(store: Store, round_id: int, *args: object, **kwargs: object) -> None:
        record(store, round_id, *args, **kwargs)
        if kwargs.get("new_model") is not None:
            committed.append(kwargs["new_model"])  # type: ignore[arg-type]

    def fsync_dir(path: Path) -> None:
        if not failures:
            failures.append(1)
            raise OSError(errno.EIO, "Input/output error")
        fsync(path)

    monkeypatch.setattr(Store, "finish_round", finish_round)
    monkeypatch.setattr(privacy, "fsync_dir", fsync_dir)
    monkeypatch.setattr(rounds, "CLOSE_RETRY_SECONDS", 0.05)

    async def go() -> None:
        async with running(tmp_path, devices=DEVICES, policy=POLICIES["sync"], plan=TrainingPlan(clip_norm=1.0),
                           privacy=DPConfig(noise_multiplier=0.01, delta=1e-5)) as h:
            task = await h.task()
            assert task is not None
            for device in h.devices:
                status, answer = await h.upload(device.update(task, h.delta()))
                assert status == 200, answer
            await wait_until(lambda: bool(failures), what="the failed attempt to settle the ledger")
            task1 = await h.task(after=task.round_id, wait=10)
            assert task1 is not None and (task1.round_id, task1.model_version) == (task.round_id + 1, 1)
            assert [version for version, _ in committed] == [1]
            assert await served_digest(h, 1) == committed[0][1]
            assert len(h.engine.privacy.rounds) == 1 and h.engine.privacy.pending is None

    run(go())


def test_an_abandoned_round_whose_next_round_cannot_open_is_not_recorded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round below its quorum at its deadline is recorded abandoned together with the next round, then deleting its
    spool segment fails (EIO). The retry completes the steps after that record: the next round opens once the step
    succeeds (a retry used to record the abandoned round again and fail on the next round's row forever, so no round
    opened until a restart), and the failures are counted."""
    disk = FailingAfterCommit(monkeypatch)

    async def go() -> None:
        policy = RoundPolicy(min_clients=DEVICES, goal_clients=DEVICES, round_timeout=0.2)
        async with running(tmp_path, devices=DEVICES, policy=policy) as h:
            first = h.engine.current
            assert first is not None
            await wait_until(lambda: disk.failures >= 3, timeout=10,
                             what="three failed attempts after the abandoned round's end")
            assert h.counter("fl_aggregator_publication_failures_total") >= 2
            assert await h.task() is None, "a task was handed out while the next round is not open"
            disk.failing = False
            await wait_until(lambda: h.engine.current is not None and h.engine.current.round_id > first.round_id,
                             timeout=10, what="the round after the abandoned one")
            assert h.engine.store.get_round(first.round_id).status == "abandoned"
            assert h.engine.store.get_round(first.round_id + 1) is not None

    run(go())


def test_an_async_sites_forwarded_buffer_whose_next_buffer_cannot_open_is_forwarded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async site under an async city forwards its full buffer and records it together with its next buffer, then
    deleting the buffer's spool segment fails (EIO). The retry completes the steps after that record: the next buffer
    opens once the step succeeds, and the city holds the site's forward once (a retry used to forward and record the
    buffer again and fail on the next buffer's row forever, so the site took no more updates until a restart)."""
    disk = FailingAfterCommit(monkeypatch)

    async def go() -> None:
        async with async_city_and_site(tmp_path, city_buffer=2, devices=DEVICES) as (city, site, task):
            await wait_until(lambda: disk.failures >= 3, timeout=10,
                             what="three failed attempts after the forwarded buffer's end")
            assert site.counter("fl_aggregator_publication_failures_total") >= 2
            disk.failing = False
            following = await site_task(site, task.round_id)
            assert following.round_id == task.round_id + 1
            assert site.engine.store.get_round(task.round_id).status == "published"
            assert city.engine.current is not None and city.engine.current.accepted == 1
            assert city.engine.version == 0

    run(go())


def test_a_secure_round_whose_phases_fail_to_start_after_the_round_before_ended_is_started_by_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Secure aggregation: round 1 is closed outside the round clock (as a site closes its round when its parent's
    next task comes) and ends abandoned (no masked input); round 2, recorded with it, is installed, but starting its
    secure phases fails once. The clock retries at once and starts them: round 2's task is handed out with its phases
    running. The engine used to point at round 2 before its phases started, so the retry never came: round 2's task
    went out with no phases behind it, and every device's advertisement was refused until its deadline abandoned it;
    and a close failing outside the clock was retried only at the round's deadline."""
    failures: list[int] = []
    start = SecureRounds.opened

    async def opened(self: SecureRounds, round_: rounds.OpenRound) -> None:
        if round_.round_id == 2 and not failures:
            failures.append(round_.round_id)
            raise OSError(errno.EIO, "Input/output error")
        await start(self, round_)

    monkeypatch.setattr(SecureRounds, "opened", opened)
    monkeypatch.setattr(rounds, "CLOSE_RETRY_SECONDS", 0.05)

    async def go() -> None:
        async with secure_running(tmp_path, devices=DEVICES, round_timeout=600) as h:
            task = await h.task()
            assert task is not None and task.round_id == 1
            with pytest.raises(OSError, match="Input/output error"):
                await h.engine.close_round()
            task2 = await h.task(after=1, wait=10)
            assert task2 is not None and task2.round_id == 2 and task2.secure_aggregation
            for device in secure_rounds(h, task2):
                await device.advertise()  # refused when round 2 has no phases running
            assert h.engine.store.get_round(1).status == "abandoned"

    run(go())


def test_a_restart_while_the_steps_after_a_publication_are_retried_opens_the_next_round_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aggregator stops while it retries the steps after version 1's commit (the next round recorded with it, not
    yet open). The restart resumes that next round (it does not open another, nor publish version 1 again) and
    deletes the published round's segment."""
    disk = FailingAfterCommit(monkeypatch)

    async def go() -> None:
        async with running(tmp_path, devices=DEVICES, policy=POLICIES["sync"]) as h:
            task = await h.task()
            assert task is not None
            for device in h.devices:
                status, answer = await h.upload(device.update(task, h.delta()))
                assert status == 200, answer
            await wait_until(lambda: disk.failures >= 2, what="failed attempts after version 1's commit")
            segment = h.engine.store.segment_path(task.round_id)
            assert segment.exists()
        disk.failing = False
        async with running(tmp_path, devices=0, enrolled=h.devices, key=h.key, policy=POLICIES["sync"]) as again:
            task1 = await again.task(after=task.round_id, wait=10)
            assert task1 is not None and (task1.round_id, task1.model_version) == (task.round_id + 1, 1)
            assert again.engine.store.last_round_id() == task1.round_id
            assert [version for version, _ in disk.committed] == [1]
            assert not segment.exists()

    run(go())


def test_an_async_sites_superseded_buffer_whose_segment_cannot_be_deleted_is_counted_once_and_moves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async site forwards its full buffer, its next buffer opens empty, and the city publishes version 1: the
    empty buffer is recorded superseded, then deleting its spool segment fails (EIO). The retry completes the steps
    after that record without recording it again (it was counted superseded once per attempt), the failures are
    counted in fl_aggregator_publication_failures_total (a failure outside the round clock was not), and once the
    step succeeds the site opens its round on the city's version 1."""
    superseded: set[int] = set()
    disk = {"failing": True, "failures": 0}
    record, drop = Store.finish_round, Store.drop_segment

    def finish_round(store: Store, round_id: int, status: str, *args: object, **kwargs: object) -> None:
        record(store, round_id, status, *args, **kwargs)
        if status == "superseded":
            superseded.add(round_id)

    def drop_segment(store: Store, round_id: int) -> None:
        if round_id in superseded and disk["failing"]:
            disk["failures"] += 1
            raise OSError(errno.EIO, "Input/output error")
        drop(store, round_id)

    monkeypatch.setattr(Store, "finish_round", finish_round)
    monkeypatch.setattr(Store, "drop_segment", drop_segment)
    monkeypatch.setattr(rounds, "CLOSE_RETRY_SECONDS", 0.05)

    async def go() -> None:
        async with async_city_and_site(tmp_path, city_buffer=1, devices=DEVICES) as (city, site, _):
            await wait_until(lambda: city.engine.version == 1, what="the city's version 1")
            await wait_until(lambda: site.counter("fl_aggregator_publication_failures_total") >= 3, timeout=10,
                             what="three failed attempts after the superseded buffer's end, counted")
            disk["failing"] = False
            await wait_until(lambda: site.engine.version == 1 and site.engine.current is not None,
                             what="the site's round on the city's version 1")
            (empty,) = superseded
            assert site.engine.store.get_round(empty).status == "superseded"
            assert site.counter("fl_aggregator_rounds_total", outcome="superseded") == 1
            assert site.counter("fl_aggregator_publication_failures_total") == disk["failures"]
            following = await site_task(site, empty)
            assert following.model_version == 1

    run(go())
