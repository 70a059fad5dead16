"""A secure round's answer to the unmask request is retried while the aggregator cannot be reached, until the
request's signed deadline, bounded by the round's own: the device waits for the request at most
UNMASK_WAIT_SECONDS past the task's deadline, and retries its answer no longer than that, and at least
RETRY_AT_LEAST_SECONDS however early the request says the phase ends. A signed deadline was trusted as given: one
years away kept the device retrying for years, one already past gave up after a single try. Its shares likewise, until
the roster's deadline, never past the task's.

A real aggregator on loopback runs the round; between it and one device, a path that re-signs the unmask request (or
the roster) with another deadline (the aggregator's key: a compromised or broken aggregator) and loses that device's
answers (or shares).
The device's clock is a stand-in that each lost answer moves on, so the test waits for no real time."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from secagg_harness import flat_delta, secure_rounds, secure_running, until_masked

from appliance import secagg_client
from appliance.protocol import messages as m
from appliance.secagg_client import SecAggDropped, SecureRound, Transport

TOO_MANY_POSTS = 1000  # a device still retrying then would go on for ever


class Clock:
    def __init__(self, start: float):
        self.at = start

    def __call__(self) -> float:
        return self.at


class LossyPath:
    """The aggregator as ``device`` sees it: the ``phase``'s deadline (the unmask request's, or the roster's for
    "shares") re-signed as ``deadline``, and its first ``lost`` messages of that phase lost (each moving its clock on
    by ``step`` s); the rest goes through."""

    def __init__(self, real: Transport, key: SigningKey, deadline: int, lost: int, clock: Clock, step: float,
                 phase: str = "unmask"):
        self.real, self.key, self.deadline, self.lost, self.clock, self.step = real, key, deadline, lost, clock, step
        self.phase = phase
        self.aggregator_key = real.aggregator_key
        self.lost_posts = 0
        self.answered = False

    async def get(self, path: str, wait: float) -> bytes | None:
        body = await self.real.get(path, wait)
        if body is not None and self.phase == "unmask" and path.endswith("/unmask"):
            request = m.decode_unmask_request(body, self.aggregator_key)
            return m.encode_unmask_request(dataclasses.replace(request, deadline=self.deadline), self.key)
        if body is not None and self.phase == "shares" and path.endswith("/roster"):
            roster = m.decode_roster(body, self.aggregator_key)
            return m.encode_roster(dataclasses.replace(roster, deadline=self.deadline), self.key)
        return body

    async def post(self, phase: str, body: bytes) -> None:
        if phase == self.phase and self.lost_posts < self.lost:
            self.lost_posts += 1
            assert self.lost_posts < TOO_MANY_POSTS, f"the device retries its {self.phase} message without end"
            self.clock.at += self.step
            raise ConnectionError(f"POST /v1/secagg/{phase}: the aggregator cannot be reached")
        await self.real.post(phase, body)
        self.answered = self.answered or phase == self.phase


async def _masked(h) -> list[SecureRound]:
    task = await h.task()
    rounds = secure_rounds(h, task)
    await until_masked(rounds)
    for r in rounds:
        status, receipt = await h.upload(r.masked_input(flat_delta(h), 32))
        assert status == 200, receipt
    return rounds


def _lossy(h, device: SecureRound, deadline: int, lost: int, step: float, phase: str = "unmask") -> LossyPath:
    clock = Clock(device.now())
    path = LossyPath(device.transport, h.key, deadline, lost, clock, step, phase)
    device.transport, device.now = path, clock
    return path


def test_an_unmask_deadline_years_away_is_retried_no_longer_than_the_round_allows(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(secagg_client, "RETRY_SECONDS", 0.01)

    async def go() -> None:
        async with secure_running(tmp_path, devices=3) as h:
            rounds = await _masked(h)
            device = rounds[0]
            path = _lossy(h, device, deadline=2**62, lost=TOO_MANY_POSTS, step=60.0)
            with pytest.raises(SecAggDropped, match="unreachable"):
                await device.unmask()
            # The request came before the task's deadline + UNMASK_WAIT_SECONDS (660 s from the round's start here):
            # a minute per lost answer, so about a dozen, not a thousand.
            window = device.task.deadline + secagg_client.UNMASK_WAIT_SECONDS
            assert path.lost_posts <= 20 and path.clock.at >= window - 60, (path.lost_posts, path.clock.at - window)

    asyncio.run(go())


def test_an_unmask_deadline_already_past_is_still_retried_for_a_while(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(secagg_client, "RETRY_SECONDS", 0.01)

    async def go() -> None:
        async with secure_running(tmp_path, devices=3) as h:
            rounds = await _masked(h)
            path = _lossy(h, rounds[0], deadline=1, lost=3, step=2.0)  # 1970: passed before the request was made
            await asyncio.gather(*(r.unmask() for r in rounds))
            assert path.lost_posts == 3 and path.answered
            record = await h.task(after=rounds[0].task.round_id, wait=30)
            assert record is not None, "the round did not publish with every device's answer"

    asyncio.run(go())


def test_a_roster_deadline_years_away_is_retried_no_longer_than_the_task_allows(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(secagg_client, "RETRY_SECONDS", 0.01)

    async def go() -> None:
        async with secure_running(tmp_path, devices=3) as h:
            rounds = secure_rounds(h, await h.task())
            device = rounds[0]
            path = _lossy(h, device, deadline=2**62, lost=TOO_MANY_POSTS, step=60.0, phase="shares")
            await until_masked(rounds, stop_after="join")
            with pytest.raises(SecAggDropped, match="unreachable"):
                await device.share()
            assert path.lost_posts <= 5 and path.clock.at >= device.task.deadline - 60, path.lost_posts

    asyncio.run(go())
