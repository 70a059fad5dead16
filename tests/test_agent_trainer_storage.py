"""A trainer that fails because the card does (EIO reading its model package, as a dying SD card answers) is a storage
failure, not a failed training: the round is counted under ``io-error`` in ``fl_agent_rounds_skipped_total`` and
``fl_agent_storage_errors_total``, the log line, the status and the heartbeat say the data partition, and nothing is
left half-written in the outbox or the state. It was counted ``trainer-failed``, which points an operator at the
model, never at the card.

The trainer child really runs (tests/trainer_faults.py): its first run's read of the package fails with EIO; once the
card answers again, a restarted agent takes the round and delivers its update.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging

import numpy as np
import pytest
import trainer_faults
from agent_harness import FakeAggregator, run_agent_against, sample

from appliance.agent import STATE_FILE, trainer_storage_failure
from appliance.budget import TrainerFailed
from appliance.framebuffer import FrameBuffer
from appliance.secagg_client import SecAggDropped, take_part
from appliance.storage_errors import StorageFailure


def storage_skips(agent) -> float:
    return sample(agent, "fl_agent_rounds_skipped_total", {"reason": "io-error"})


async def test_a_trainer_the_card_fails_with_eio_is_a_storage_failure_and_leaves_nothing_damaged(
    signed_package, tmp_path, monkeypatch, caplog
):
    key, path = signed_package
    monkeypatch.setattr("appliance.agent.run_train_job", trainer_faults.train_on_a_card_failing_once)
    state = tmp_path / "state"
    with caplog.at_level(logging.ERROR, logger="fl_agent"):
        agent = await run_agent_against(
            FakeAggregator(key, path), tmp_path, at_most=120,
            until=lambda a: storage_skips(a) >= 1
            or sample(a, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) >= 1,
        )
    assert trainer_faults.events(state) == ["card failed"]
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) == 0
    assert storage_skips(agent) == 1 and sample(agent, "fl_agent_storage_errors_total", {"reason": "io-error"}) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 1:")]
    assert line.startswith(f"round 1: cannot train on the model package and the frames in {state}: Input/output "
                           "error (training failed in the trainer process: PackageError:"), line
    assert "skipped: cannot train on the model package and the frames" in agent.status
    assert agent.heartbeat().storage_errors == 1  # the fleet view shows the card failing (docs/protocol.md 13)
    # Nothing half-written: the outbox holds nothing, the state (if any) is whole, and the package is kept.
    assert agent.outbox.depth == 0 and not list((state / "outbox").glob("*.tmp*"))
    if (state / STATE_FILE).exists():
        assert isinstance(json.loads((state / STATE_FILE).read_text()), dict)

    # The card answers again: an agent started on the same state takes the round and delivers its update.
    fake = FakeAggregator(key, path)
    again = await run_agent_against(fake, tmp_path, at_most=120,
                                    until=lambda a: sample(a, "fl_agent_updates_delivered_total") >= 1)
    assert len(fake.updates) == 1 and again.last_round == 1 and again.outbox.depth == 0


class _RoundThatDrops:
    """The steps of a secure round (secagg_client.take_part) that drops out after the training has ended: the roster
    comes, and then the aggregator abandons the round (too few devices shared)."""

    def __init__(self, trained: asyncio.Event):
        self.trained = trained

    async def advertise(self) -> None:
        await self.trained.wait()

    async def join(self) -> None:
        raise SecAggDropped("too-few-shared", "the round was abandoned")


async def test_a_card_failing_the_training_of_a_secure_round_that_then_drops_is_not_lost(tmp_path):
    """In a secure round the training runs while the keys and shares go round. When the round then dropped out, the
    training's StorageFailure was never looked at: the round counted nowhere (trainer-failed counted it before
    828d1ef) and asyncio logged 'Task exception was never retrieved'. It now comes out of take_part, so the agent's
    round loop counts it io-error and says the card failed."""
    trained = asyncio.Event()
    failure = StorageFailure("the model package and the frames", tmp_path, OSError(errno.EIO, "Input/output error"),
                             "io-error", doing="train on")

    async def train():
        trained.set()
        raise failure

    async def deliver(body: bytes) -> None:
        raise AssertionError("nothing to deliver")

    with pytest.raises(StorageFailure) as raised:
        await take_part(_RoundThatDrops(trained), train(), deliver)
    assert raised.value is failure


@pytest.mark.parametrize("child_errno", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_trainer_failing_on_a_write_is_not_blamed_on_the_card(tmp_path, child_errno):
    """The trainer only reads the data partition (its package, the frames), and a read fails with EIO, never with
    ENOSPC, EDQUOT or EROFS: those come from somewhere else (a full tmpfs, the kernel's own limits), so counting them
    disk-full or read-only sent an operator to replace a healthy card. They stay trainer-failed; EIO is the card."""
    failed = TrainerFailed("training failed in the trainer process: OSError", "", child_errno)
    assert trainer_storage_failure(failed, tmp_path) is None
    card = trainer_storage_failure(TrainerFailed("training failed", "", errno.EIO), tmp_path)
    assert card is not None and card.reason == "io-error"


async def test_a_trainer_the_card_fails_reading_the_frames_is_a_storage_failure(signed_package, tmp_path, monkeypatch,
                                                                               caplog):
    """The trainer skips a segment the card fails to read (a failing card costs those frames); when that leaves too
    few for a batch, the round was counted trainer-failed ('0 readable labelled frames in the buffer'), pointing at the
    model while the card was failing. It is the card's failure: io-error, named in the log."""
    key, path = signed_package
    monkeypatch.setattr("appliance.agent.run_train_job", trainer_faults.train_on_frames_the_card_fails)
    buffer = FrameBuffer(tmp_path / "state" / "frames")
    for i in range(64):
        buffer.append(np.full((1, 32, 32), i, np.uint8), i % 4, boxes=np.zeros((0, 4), np.float32))
    buffer.flush()
    with caplog.at_level(logging.ERROR, logger="fl_agent"):
        agent = await run_agent_against(
            FakeAggregator(key, path), tmp_path, source="cameras", at_most=120,
            until=lambda a: storage_skips(a) >= 1
            or sample(a, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) >= 1,
        )
    assert trainer_faults.events(tmp_path / "state") == ["frames failed"]
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) == 0
    assert storage_skips(agent) == 1 and sample(agent, "fl_agent_storage_errors_total", {"reason": "io-error"}) == 1
    assert any(r.getMessage().startswith("round 1: cannot train on the model package and the frames") and
               "0 readable labelled frames in the buffer" in r.getMessage() for r in caplog.records)
