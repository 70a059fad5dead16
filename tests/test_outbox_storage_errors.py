"""The outbox on a partition that refuses writes (full, read-only): a put that fails leaves nothing behind and
queues nothing; a removal after a receipt runs off the event loop, and when it fails the update is sent again
after a restart (the aggregator answers a resend with the same receipt). Writes fail here by injection."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from appliance import outbox as outbox_module
from appliance.outbox import Outbox


def disk_full(*args: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def test_a_put_that_does_not_fit_leaves_no_file_and_queues_nothing(tmp_path: Path, monkeypatch) -> None:
    outbox = Outbox(tmp_path)
    write = os.write
    calls = 0

    def full_after_the_first_chunk(fd: int, data: Any) -> int:  # part of the update is on disk when it fails
        nonlocal calls
        calls += 1
        if calls > 1:
            disk_full()
        return write(fd, bytes(data)[:100])

    monkeypatch.setattr(os, "write", full_after_the_first_chunk)
    with pytest.raises(OSError) as refused:
        outbox.put(b"u" * 1000)
    assert refused.value.errno == errno.ENOSPC
    assert files(tmp_path) == [] and outbox.depth == 0
    monkeypatch.setattr(os, "write", write)  # room again
    key = outbox.put(b"u" * 1000)
    assert outbox.depth == 1 and Outbox(tmp_path).pending()[0].key == key


def test_a_put_whose_directory_cannot_be_synced_is_withdrawn(tmp_path: Path, monkeypatch) -> None:
    """The rename happened but is not durable: the put raises, so its caller does not count the update as queued,
    and the update must not be delivered behind its back either."""
    outbox = Outbox(tmp_path)
    monkeypatch.setattr(outbox_module, "fsync_dir", disk_full)
    with pytest.raises(OSError):
        outbox.put(b"an update")
    assert outbox.depth == 0 and files(tmp_path) == []


def test_a_receipt_is_awaited_and_the_removal_runs_in_the_given_thread_runner(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    key = outbox.put(b"an update")
    noted: list[tuple[str, str, int]] = []
    ran_in_thread: list[str] = []

    async def send(message: bytes) -> str:
        return "receipt"

    async def on_receipt(k: str, receipt: str) -> None:
        await asyncio.sleep(0)
        noted.append((k, receipt, outbox.depth))

    async def in_thread(func: Any, *args: Any) -> Any:
        ran_in_thread.append(func.__name__)
        return await asyncio.to_thread(func, *args)

    report = asyncio.run(outbox.deliver(send, on_receipt=on_receipt, in_thread=in_thread))
    assert report.delivered == 1 and noted == [(key, "receipt", 1)]
    assert ran_in_thread == ["_first_readable", "digest", "remove"]
    assert outbox.depth == 0 and files(tmp_path) == []


def test_a_removal_that_fails_raises_and_a_restart_sends_the_update_again(tmp_path: Path, monkeypatch) -> None:
    outbox = Outbox(tmp_path)
    key = outbox.put(b"an update")
    receipts: list[str] = []

    async def send(message: bytes) -> str:
        return "receipt"

    def read_only(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as refused:
        asyncio.run(outbox.deliver(send, on_receipt=lambda k, r: receipts.append(k)))
    monkeypatch.undo()
    assert refused.value.errno == errno.EROFS
    assert receipts == [key] and outbox.depth == 0  # acknowledged: not sent again by this agent
    assert outbox.counters.delivered_total == 1
    assert [entry.key for entry in Outbox(tmp_path).pending()] == [key]  # the next start sends it again
