"""The aggregator reuses the buffers of answered uploads (aggregator/uploads.py, Buffers): a buffer is never
handed to two users at once, is aligned for the spool's direct I/O, and many uploads in a row each count exactly
what they sent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import running

from aggregator.app import SERVICES
from aggregator.store import SPOOL_ALIGNMENT
from aggregator.uploads import Buffers


def test_a_buffer_given_back_is_taken_again_and_never_shared() -> None:
    buffers = Buffers(keep=2)
    first = buffers.take(4_000_000)
    second = buffers.take(4_000_000)
    assert not np.shares_memory(first, second)
    assert first.ctypes.data % SPOOL_ALIGNMENT == 0 and first.size == 4_000_000
    buffers.give(first.view(np.float32))  # a view of it gives back the same buffer
    again = buffers.take(4_000_400)  # a body a few bytes longer fits the same buffer
    assert np.shares_memory(again, first) and again.ctypes.data % SPOOL_ALIGNMENT == 0
    assert not np.shares_memory(buffers.take(4_000_000), again)  # taken: not handed out twice
    buffers.give(second)
    assert not np.shares_memory(buffers.take(100), second)  # a small request does not take a big buffer
    assert np.shares_memory(buffers.take(4_000_000), second)


def test_a_kept_buffer_too_small_for_a_body_is_not_taken_for_it() -> None:
    """A body gets a buffer of at least its size: a smaller one kept from an earlier upload would cut it short."""
    buffers = Buffers(keep=2)
    buffers.give(buffers.take(100_000))
    body = buffers.take(150_000)
    assert body.size == 150_000 and body.ctypes.data % SPOOL_ALIGNMENT == 0


def test_only_buffers_it_handed_out_are_taken_back_and_at_most_keep_of_them() -> None:
    buffers = Buffers(keep=1)
    with pytest.raises(ValueError):
        buffers.give(np.zeros(10, dtype=np.float64))
    one, two = buffers.take(1000), buffers.take(1000)
    buffers.give(one)
    buffers.give(two)  # beyond keep: dropped
    buffers.give(one)  # given twice: kept once
    taken = [buffers.take(1000), buffers.take(1000)]
    assert sum(np.shares_memory(t, one) for t in taken) == 1
    assert not any(np.shares_memory(t, two) for t in taken)


def test_a_buffer_given_back_twice_is_kept_once_so_two_uploads_never_share_it() -> None:
    """With room to keep both, a buffer given back twice (or a view of it, then the buffer) would otherwise be handed
    to two uploads at once, each writing its body over the other's."""
    buffers = Buffers(keep=2)
    one = buffers.take(1000)
    buffers.give(one)
    buffers.give(one.view(np.float32))
    first, second = buffers.take(1000), buffers.take(1000)
    assert not np.shares_memory(first, second)


def test_uploads_through_reused_buffers_are_accumulated_exactly_as_sent(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=6, parameters=50_000) as h:
            task = await h.task()
            deltas = [h.delta() for _ in h.devices]
            for device, delta in zip(h.devices, deltas, strict=True):
                assert (await h.upload(device.update(task, delta)))[0] == 200
            assert h.app[SERVICES].uploads.buffers.kept >= 2  # bodies and deltas went back and were reused
            updates = h.engine.store.round_updates(task.round_id)
            for row, delta in zip(updates, deltas, strict=True):
                spooled = h.engine.store.read_delta(task.round_id, row.offset, row.length)
                expected = np.concatenate([delta[spec.name].reshape(-1) for spec in h.specs])
                assert spooled.tobytes() == expected.tobytes()

    asyncio.run(go())
