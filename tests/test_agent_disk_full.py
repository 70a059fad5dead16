"""A full or read-only data partition does not end the agent.

An SD card's data partition fills up in the field. A write refused there (ENOSPC, EDQUOT, EROFS, EIO) used to
escape the round loop and end the agent, and systemd restarted it into the same refusal: a crash loop without
heartbeats, so the fleet view could not even show the device. Here the partition refuses writes into one
directory for a while (the fsync of a file there raises, as a full ext4 with delayed allocation does): the round
that needed the write is given up with one log line and counted, nothing half-written is left, the heartbeat goes
on, and once there is room again the next round trains and is delivered. Any other OSError still ends the agent.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_harness import FakeAggregator, run_agent_against, sample, small_package
from aiohttp import web
from nacl.signing import SigningKey
from storage_faults import FullDirectory, error_lines, trained

from appliance import agent as agent_module
from appliance import wire
from appliance.agent import MODELS_DIR, STATE_FILE, Agent
from appliance.held_release import RELEASE_FILE
from appliance.identity import load_or_create_device_key
from appliance.metrics import LABEL_VALUES
from appliance.outbox import Outbox
from appliance.storage_errors import STORAGE_ERRNO_REASONS

# Only a write that blocks the loop waits this long (and then fails the test).
LOOP_WAIT_SECONDS = 30.0


class RoundsAggregator(FakeAggregator):
    """The fake aggregator serving round ``after + 1`` up to ``rounds``, and taking heartbeats (counted)."""

    def __init__(self, key: SigningKey, package_path: Path, rounds: int):
        super().__init__(key, package_path)
        self.rounds = rounds
        self.heartbeats = 0

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def rounds_and_heartbeats(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
            if request.path == "/v1/heartbeat":
                self.heartbeats += 1
                return web.Response(status=204)
            after = int(request.query.get("after", "0"))
            if request.path == "/v1/task" and after < self.rounds:
                task = wire.Task(after + 1, 0, self.digest, self.package.digest, deadline=int(time.time()) + 300)
                return web.Response(body=wire.encode_task(task, self.key), content_type="application/cose")
            return await handler(request)

        app.middlewares.append(rounds_and_heartbeats)
        return app


def test_every_storage_reason_is_a_declared_label_value() -> None:
    reasons = set(STORAGE_ERRNO_REASONS.values())
    assert reasons <= set(LABEL_VALUES["fl_agent_storage_errors"])
    assert reasons <= set(LABEL_VALUES["fl_agent_rounds_skipped"])


@pytest.mark.parametrize(
    ("where", "what", "error", "reason"),
    [
        ("outbox", "the update", errno.ENOSPC, "disk-full"),
        (MODELS_DIR, "the model package", errno.ENOSPC, "disk-full"),
        ("outbox", "the update", errno.EROFS, "read-only"),
        (MODELS_DIR, "the model package", errno.EIO, "io-error"),
    ],
)
async def test_a_round_that_cannot_store_what_it_needs_is_skipped_and_the_next_one_is_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    where: str, what: str, error: int, reason: str,
) -> None:
    key = SigningKey.generate()
    fake = RoundsAggregator(key, small_package(tmp_path / "small.flpkg", key), rounds=1)
    directory = tmp_path / "state" / where
    disk = FullDirectory(directory, error)
    monkeypatch.setattr(os, "fsync", disk)
    monkeypatch.setattr(Agent, "_train", trained)
    monkeypatch.setattr(agent_module, "next_delay", lambda: 0.1)  # heartbeats every 0.1 s instead of 5 min
    heartbeats_at_skip: list[int] = []
    files_at_skip: list[list[str]] = []

    def until(agent: Agent) -> bool:
        if disk.full and sample(agent, "fl_agent_rounds_skipped_total", {"reason": reason}) >= 1:
            if not heartbeats_at_skip:
                heartbeats_at_skip.append(fake.heartbeats)
                files_at_skip.append(sorted(p.name for p in directory.iterdir() if p.is_file()))
            elif fake.heartbeats >= heartbeats_at_skip[0] + 2:
                disk.full = False  # room again, and the next round opens: it goes through
                fake.rounds = 2
        # Its receipt is counted before its removal from the outbox: wait for both.
        return sample(agent, "fl_agent_rounds_completed_total") >= 1 and agent.outbox.depth == 0

    with caplog.at_level(logging.INFO, logger="fl_agent"):
        agent = await run_agent_against(fake, tmp_path, until, at_most=120)

    assert disk.refused >= 1 and heartbeats_at_skip, "the partition never refused a write"
    assert files_at_skip == [[]], f"left in {directory} after the refusal: {files_at_skip}"
    lines = error_lines(caplog)
    assert lines == [f"round 1: cannot store {what} in {directory}: {os.strerror(error)}; skipping the round"]
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": reason}) == 1
    assert sample(agent, "fl_agent_storage_errors_total", {"reason": reason}) == 1
    assert fake.heartbeats >= heartbeats_at_skip[0] + 2, "the heartbeat stopped"
    # Room again: round 2 trained, queued and delivered; its update names round 2.
    assert sample(agent, "fl_agent_rounds_completed_total") == 1 and agent.outbox.depth == 0
    assert [wire.decode_update(body, fake.device_keys.get).round_id for body in fake.updates] == [2]
    assert agent._load_state()["last_round"] == 2


async def test_an_error_that_is_not_about_storage_still_ends_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A permission refused is a fault of the image, not of the card filling up: the agent ends (systemd says so)."""
    key = SigningKey.generate()
    fake = RoundsAggregator(key, small_package(tmp_path / "small.flpkg", key), rounds=1)
    monkeypatch.setattr(os, "fsync", FullDirectory(tmp_path / "state" / "outbox", errno.EACCES))
    monkeypatch.setattr(Agent, "_train", trained)
    with pytest.raises(PermissionError):
        await run_agent_against(fake, tmp_path, lambda agent: False, at_most=120)


async def test_an_update_is_read_its_receipt_saved_and_its_update_removed_while_the_loop_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delivery's read of the update (seconds on a failing SD card), the receipt's state save and the outbox's
    removal (each an fsync) run in worker threads: each waits here until a coroutine on the loop has run meanwhile
    (the heartbeats and the watchdog run there)."""
    key = SigningKey.generate()
    fake = RoundsAggregator(key, small_package(tmp_path / "small.flpkg", key), rounds=1)
    monkeypatch.setattr(Agent, "_train", trained)
    loop_ran: list[bool] = []
    delivering = threading.Event()

    def witnessed(write: Callable[..., Any]) -> Callable[..., Any]:
        def wait_for_the_loop(*args: Any) -> Any:
            ran = threading.Event()
            asyncio.run_coroutine_threadsafe(_set(ran), loop)
            loop_ran.append(ran.wait(LOOP_WAIT_SECONDS))
            return write(*args)

        return wait_for_the_loop

    async def _set(event: threading.Event) -> None:
        event.set()

    loop = asyncio.get_running_loop()
    save_state, remove, read = Agent._save_state, agent_module.Outbox.remove, agent_module.Outbox.read

    def saved_state(agent: Agent) -> None:
        if not delivering.is_set():  # the round's own save: not watched here
            return save_state(agent)
        return witnessed(save_state)(agent)

    def removed(outbox: Any, key: str) -> bool:
        return witnessed(remove)(outbox, key)

    monkeypatch.setattr(Agent, "_save_state", saved_state)
    monkeypatch.setattr(agent_module.Outbox, "remove", removed)
    monkeypatch.setattr(agent_module.Outbox, "read", witnessed(read))
    # The saves watched are those after the update was sent: the receipt's.
    send_update = agent_module.AggregatorClient.send_update

    async def sending(client: Any, body: bytes) -> wire.Receipt:
        receipt = await send_update(client, body)
        delivering.set()
        return receipt

    monkeypatch.setattr(agent_module.AggregatorClient, "send_update", sending)
    agent = await run_agent_against(
        fake, tmp_path, lambda a: a.outbox.depth == 0 and sample(a, "fl_agent_rounds_completed_total") >= 1
        and len(loop_ran) >= 3, at_most=120,
    )
    assert loop_ran == [True, True, True], "the update's read or a receipt's write ran on the event loop"
    assert agent._load_state()["acknowledged_at"] > 0


class OriginalReceipts(RoundsAggregator):
    """Answers every upload with the receipt it gave when it first took it, at ``accepted_at`` (as the real
    aggregator answers a resend: aggregator/app.py, ``known_receipt``)."""

    def __init__(self, key: SigningKey, package_path: Path, accepted_at: int):
        super().__init__(key, package_path, rounds=1)
        self.accepted_at = accepted_at

    def receipt(self, body: bytes, update: wire.Update) -> bytes:
        original = wire.Receipt(update.device_id, update.round_id, wire.update_digest(body), self.accepted_at)
        return wire.encode_receipt(original, self.key)


@pytest.mark.parametrize(
    "saved_after",
    [0, 540],
    ids=["stopped-between-the-receipt-and-the-removal", "removal-failed-and-a-later-round-saved"],
)
async def test_an_update_acknowledged_before_a_restart_and_sent_again_is_not_counted_again(
    tmp_path: Path, saved_after: int,
) -> None:
    """Round 1's update was acknowledged and its receipt saved, but its file stayed in the outbox: the agent was
    stopped between the receipt and the removal (both run in worker threads now), or the removal failed and a later
    round's receipt was saved ``saved_after`` seconds later. After a restart round 1's update is sent again and
    answered with its original receipt: it is not counted again, and the time of the last acknowledged round does not
    go back (on disk and in the metric: an alert on the time since the last round must not see the device go back in
    time)."""
    key = SigningKey.generate()
    first_accepted = int(time.time()) - 600
    saved = first_accepted + saved_after
    fake = OriginalReceipts(key, small_package(tmp_path / "small.flpkg", key), accepted_at=first_accepted)
    state = tmp_path / "state"
    identity = load_or_create_device_key(state)
    delta = {s.name: np.full(s.shape, 0.01, np.float32) for s in fake.package.param_specs}
    update = wire.Update(identity.device_id, 1, 0, fake.digest, 64, delta, created_at=first_accepted - 5)
    Outbox(state / "outbox").put(wire.encode_update(update, identity.signing_key))  # the file left behind
    (state / STATE_FILE).write_text(json.dumps({"last_round": 2, "acknowledged_at": saved}))

    agent = await run_agent_against(
        fake, tmp_path, lambda a: a.outbox.depth == 0 and len(fake.updates) == 1, at_most=120
    )
    assert len(fake.updates) == 1 and agent.outbox.depth == 0  # sent again and answered
    assert sample(agent, "fl_agent_rounds_completed_total") == 0  # counted before the restart
    assert sample(agent, "fl_agent_last_round_timestamp_seconds") == saved
    assert agent._load_state()["acknowledged_at"] == saved


async def test_a_damaged_package_on_a_read_only_partition_skips_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A card that hits errors is remounted read-only, and the package kept on it may be the damaged file: it cannot
    be removed to be downloaded again. The round is given up as for any write refused; the agent goes on."""
    key = SigningKey.generate()
    fake = RoundsAggregator(key, small_package(tmp_path / "small.flpkg", key), rounds=1)
    models = tmp_path / "state" / MODELS_DIR
    models.mkdir(parents=True)
    (models / f"{fake.package.digest.hex()}.flpkg").write_bytes(b"damaged on flash")
    unlink = Path.unlink

    def read_only_models(path: Path, missing_ok: bool = False) -> None:
        if path.parent == models:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only_models)
    monkeypatch.setattr(Agent, "_train", trained)
    with caplog.at_level(logging.INFO, logger="fl_agent"):
        agent = await run_agent_against(
            fake, tmp_path, lambda a: sample(a, "fl_agent_rounds_skipped_total", {"reason": "read-only"}) >= 1,
            at_most=120,
        )
    assert error_lines(caplog) == [
        f"round 1: cannot store the model package in {models}: {os.strerror(errno.EROFS)}; skipping the round"
    ]
    assert sample(agent, "fl_agent_storage_errors_total", {"reason": "read-only"}) == 1


async def test_a_removal_refused_after_a_receipt_is_logged_and_counted_and_the_agent_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The card went read-only between the receipt and the removal of the update's file: the receipt counts, the
    refusal is said in one line and counted, and the agent goes on (the file left is sent again after a restart)."""
    key = SigningKey.generate()
    fake = RoundsAggregator(key, small_package(tmp_path / "small.flpkg", key), rounds=1)
    outbox = tmp_path / "state" / "outbox"
    unlink = Path.unlink

    def read_only_outbox(path: Path, missing_ok: bool = False) -> None:
        if path.parent == outbox and path.suffix == ".upd":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only_outbox)
    monkeypatch.setattr(Agent, "_train", trained)
    monkeypatch.setattr(agent_module, "next_delay", lambda: 0.1)
    heartbeats_at_refusal: list[int] = []

    def until(agent: Agent) -> bool:
        if sample(agent, "fl_agent_storage_errors_total", {"reason": "read-only"}) >= 1 and not heartbeats_at_refusal:
            heartbeats_at_refusal.append(fake.heartbeats)
        return bool(heartbeats_at_refusal) and fake.heartbeats >= heartbeats_at_refusal[0] + 2

    with caplog.at_level(logging.INFO, logger="fl_agent"):
        agent = await run_agent_against(fake, tmp_path, until, at_most=120)

    lines = error_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith(f"outbox {outbox}: {os.strerror(errno.EROFS)}; delivery goes on")
    assert sample(agent, "fl_agent_storage_errors_total", {"reason": "read-only"}) == 1
    assert sample(agent, "fl_agent_rounds_completed_total") == 1 and agent.outbox.depth == 0
    assert [p.suffix for p in outbox.iterdir() if p.is_file()] == [".upd"]  # sent again after a restart


async def test_a_state_that_cannot_be_saved_after_a_round_keeps_the_round_and_its_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The update is in the outbox but ``agent-state.json`` cannot be written, nor after the receipt: each is said in
    one line and counted, the round is not given up (its update is delivered and leaves the outbox) and not trained
    again, the receipt counts, and no temp file is left."""
    key = SigningKey.generate()
    fake = RoundsAggregator(key, small_package(tmp_path / "small.flpkg", key), rounds=1)
    state = tmp_path / "state"

    # Only the state file's writes: the device key is written at start.
    monkeypatch.setattr(os, "fsync", FullDirectory(state, matches=lambda path: STATE_FILE in path))
    monkeypatch.setattr(Agent, "_train", trained)
    with caplog.at_level(logging.INFO, logger="fl_agent"):
        agent = await run_agent_against(
            fake, tmp_path,
            lambda a: sample(a, "fl_agent_storage_errors_total", {"reason": "disk-full"}) >= 2 and a.outbox.depth == 0,
            at_most=120,
        )
    refused = f"cannot store the agent's state in {state}: {os.strerror(errno.ENOSPC)}"
    assert error_lines(caplog) == [
        f"round 1: update queued, but {refused}; it is saved with the next round or receipt",
        f"round 1: receipt taken, but {refused}; it is saved with the next round or receipt",
    ]
    assert sample(agent, "fl_agent_storage_errors_total", {"reason": "disk-full"}) == 2
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "disk-full"}) == 0
    assert len(fake.updates) == 1 and sample(agent, "fl_agent_rounds_completed_total") == 1
    assert agent.last_round == 1 and agent.acknowledged_at > 0 and agent._load_state() == {}  # in memory only
    assert [p.name for p in state.iterdir() if p.name.startswith(".agent-state")] == []
    assert not list((state / "outbox").glob(".tmp-*"))


@pytest.mark.parametrize(("error", "reason"), [(errno.ENOSPC, "disk-full"), (errno.EROFS, "read-only")])
async def test_a_model_release_that_cannot_be_stored_is_counted_and_the_round_goes_on_with_it_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: int, reason: str,
) -> None:
    """``model-release.cose`` cannot be written: one warning, counted in ``fl_agent_storage_errors_total`` (an alert
    on it sees the partition refusing writes), and the round trains on the release held in memory and is
    delivered; no temp file is left."""
    key = SigningKey.generate()
    fake = RoundsAggregator(key, small_package(tmp_path / "small.flpkg", key), rounds=1)
    state = tmp_path / "state"
    monkeypatch.setattr(os, "fsync", FullDirectory(state, error, matches=lambda path: RELEASE_FILE in path))
    monkeypatch.setattr(Agent, "_train", trained)
    with caplog.at_level(logging.INFO, logger="fl_agent"):
        agent = await run_agent_against(
            fake, tmp_path, lambda a: sample(a, "fl_agent_rounds_completed_total") >= 1 and a.outbox.depth == 0,
            at_most=120,
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"model version 0 not stored in {state / RELEASE_FILE}: {os.strerror(error)}; going on with "
                        "it in memory"]
    assert error_lines(caplog) == []
    assert sample(agent, "fl_agent_storage_errors_total", {"reason": reason}) == 1
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": reason}) == 0
    assert [wire.decode_update(body, fake.device_keys.get).round_id for body in fake.updates] == [1]
    assert agent.heartbeat().model_version == 0  # held in memory
    assert sorted(p.name for p in state.iterdir() if RELEASE_FILE in p.name) == []
