"""An upload whose handler is cancelled while its update is being stored (aiohttp's test servers cancel a handler
whose client went away; so does a shutdown; ``fl-aggregator serve`` does not) still counts in its round exactly
as if its handler had waited: the update was queued, so it is stored and accumulated, and the round's count must
say so. One short, a round waited past its goal for an update it already had, and an async buffer of K updates
took K + 1.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from aggregator_harness import Harness, run, running

from aggregator.buffered import BufferPolicy
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.verify import UpdateHeader
from appliance import wire


async def _commit_cancelled_while_stored(h: Harness, device: SimulatedDevice, task: wire.Task) -> None:
    """Device ``device``'s update reaches RoundEngine.commit, and its handler is cancelled while the spool writer
    stores it (held at the database commit until the cancellation is done)."""
    engine = h.engine
    header = UpdateHeader(device.device_id, task.round_id, task.model_version, task.model_digest, 32, task.issued_at)
    delta = np.full(engine.models.layout.size, 0.01, dtype=np.float32)
    with engine.store._write_lock:
        handler = asyncio.ensure_future(engine.commit(header, b"\x01" * 32, delta, {}))
        while not engine._inflight:
            await asyncio.sleep(0.01)  # queued for the writer, which cannot commit it while the lock is held
        handler.cancel()
        await asyncio.gather(handler, return_exceptions=True)
    while engine.store.receipt_for(b"\x01" * 32) is None:
        await asyncio.sleep(0.01)  # committed, once the writer has the lock


def test_a_round_reaches_its_goal_with_an_update_whose_handler_was_cancelled(tmp_path: Path) -> None:
    async def go() -> None:
        policy = RoundPolicy(min_clients=2, goal_clients=2, round_timeout=600)
        async with running(tmp_path, devices=2, policy=policy) as h:
            task = await h.task(wait=10)
            assert task is not None
            await _commit_cancelled_while_stored(h, h.devices[0], task)
            assert (await h.upload(h.devices[1].update(task, h.delta())))[0] == 200
            assert await h.task(after=task.round_id, wait=30) is not None, "the round did not close at its goal"
            status = await (await h.client.get("/v1/status")).json()
            first = next(r for r in status["rounds"] if r["round"] == task.round_id)
            assert (first["status"], first["participants"], status["model"]["version"]) == ("published", 2, 1)

    run(go())


def test_an_async_buffer_takes_exactly_k_updates_when_a_handler_was_cancelled(tmp_path: Path) -> None:
    async def go() -> None:
        policy = RoundPolicy(min_clients=1, round_timeout=600, buffer=BufferPolicy(size=2))
        async with running(tmp_path, devices=3, policy=policy) as h:
            task = await h.task(wait=10)
            assert task is not None
            await _commit_cancelled_while_stored(h, h.devices[0], task)
            for device in h.devices[1:]:
                assert (await h.upload(device.update(task, h.delta())))[0] == 200
            assert await h.task(after=task.round_id, wait=30) is not None, "the buffer did not publish"
            status = await (await h.client.get("/v1/status")).json()
            first = next(r for r in status["rounds"] if r["round"] == task.round_id)
            assert (first["status"], first["participants"]) == ("published", 2)

    run(go())
