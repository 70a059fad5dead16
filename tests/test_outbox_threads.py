"""The outbox used from the event loop and from worker threads at once, as the agent does.

The agent puts an update in a worker thread (an fsync on an SD card can take seconds) while its delivery loop asks
the outbox for its pending updates on the event loop, and its heartbeat and the metrics endpoint read the bytes
pending. So a put must not hold the outbox's lock while its bytes are written and synced (the loop would wait
behind it), puts running at the same time must keep one copy of a message and the bounds, and reading the queue's
size must not fail while a put changes it. Each test makes the threads meet at the moment that matters (bounded
waits: a put that still blocks the loop fails the test instead of hanging it).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance import outbox as outbox_module
from appliance.outbox import TMP_PREFIX, Entry, Outbox

WAIT_SECONDS = 10.0  # only reached when the outbox makes a thread wait for another (and then the test fails)


def synced_while(monkeypatch: pytest.MonkeyPatch, meanwhile: Any) -> list[bool]:
    """Make each fsync of an update's temp file run ``meanwhile()`` first (it returns whether what the test waited
    for happened while the fsync was under way); returns what each call saw."""
    seen: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(TMP_PREFIX):
            seen.append(meanwhile())
        real_fsync(fd)

    monkeypatch.setattr(outbox_module.os, "fsync", fsync)
    return seen


def in_thread(target: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(target(*args)))
    thread.start()
    return thread, results


def files(outbox: Outbox) -> list[str]:
    return sorted(p.name for p in outbox.directory.iterdir())


def test_pending_answers_while_a_put_in_another_thread_syncs_its_update(tmp_path: Path, monkeypatch) -> None:
    outbox = Outbox(tmp_path / "outbox")
    first = outbox.put(b"update of round 1")
    syncing, answered = threading.Event(), threading.Event()

    def wait_for_the_loop() -> bool:
        syncing.set()
        return answered.wait(WAIT_SECONDS)

    seen = synced_while(monkeypatch, wait_for_the_loop)
    thread, keys = in_thread(outbox.put, b"update of round 2")
    assert syncing.wait(WAIT_SECONDS)
    pending = [entry.key for entry in outbox.pending()]  # what the delivery loop asks, on the event loop
    answered.set()
    thread.join()
    assert seen == [True], "pending() waited for the put's fsync"
    assert pending == [first]
    assert [entry.key for entry in outbox.pending()] == [first, *keys]


def test_puts_of_the_same_message_at_the_same_time_keep_one_copy(tmp_path: Path, monkeypatch) -> None:
    outbox = Outbox(tmp_path / "outbox")
    both_writing = threading.Barrier(2, timeout=WAIT_SECONDS)
    seen = synced_while(monkeypatch, lambda: both_writing.wait() >= 0)
    message = b"the same signed update " * 1000
    threads = [in_thread(outbox.put, message) for _ in range(2)]
    for thread, _ in threads:
        thread.join()
    assert all(results for _, results in threads), "a put failed (its error is printed above)"
    assert seen == [True, True]
    keys = [results[0] for _, results in threads]
    assert keys[0] == keys[1]
    assert outbox.depth == 1 and outbox.counters.put_total == 1
    assert files(outbox) == [outbox.pending()[0].name]  # one copy, no temp file left
    assert outbox.read(outbox.pending()[0]) == message
    assert files(Outbox(outbox.directory)) == files(outbox)  # and a restart finds the same


def test_puts_at_the_same_time_keep_the_bounds(tmp_path: Path, monkeypatch) -> None:
    outbox = Outbox(tmp_path / "outbox", max_messages=2)
    oldest = outbox.put(b"update of round 1")
    both_writing = threading.Barrier(2, timeout=WAIT_SECONDS)
    synced_while(monkeypatch, lambda: both_writing.wait() >= 0)
    threads = [in_thread(outbox.put, f"update of round {n}".encode()) for n in (2, 3)]
    for thread, _ in threads:
        thread.join()
    assert all(results for _, results in threads), "a put failed (its error is printed above)"
    newer = {results[0] for _, results in threads}
    pending = outbox.pending()
    assert {entry.key for entry in pending} == newer and oldest not in outbox
    assert outbox.counters.dropped_total == 1 and outbox.counters.put_total == 3
    assert len({entry.seq for entry in pending}) == 2
    assert files(outbox) == sorted(entry.name for entry in pending)


class PutWhileCounted(Entry):
    """A pending entry whose size, when first read, lets another thread put an update (and waits for it): a thread
    switch in the middle of a sum over the pending entries, at the one moment that tells."""

    def __init__(self, entry: Entry, put: Any):
        super().__init__(entry.seq, entry.key, entry.size)
        object.__setattr__(self, "puts", [put])

    def __getattribute__(self, name: str) -> Any:
        if name == "size":
            puts = object.__getattribute__(self, "puts")
            while puts:
                puts.pop()()
        return object.__getattribute__(self, name)


def test_the_bytes_pending_can_be_read_while_a_put_in_another_thread_changes_the_queue(tmp_path: Path) -> None:
    """The heartbeat (on the loop) and the metrics endpoint (its own thread) read the bytes pending while a round's
    put runs in a worker thread; a failure there ended the heartbeat loop, and with it the agent."""
    outbox = Outbox(tmp_path / "outbox")
    first = outbox.put(b"update of round 1")
    outbox._entries[first] = PutWhileCounted(
        outbox._entries[first], lambda: in_thread(outbox.put, b"update of round 2")[0].join()
    )
    assert outbox.pending_bytes == len(b"update of round 1")  # the queue as it was when it was read
    assert outbox.depth == 2 and outbox.pending_bytes == 2 * len(b"update of round 1")


def test_two_puts_on_a_full_outbox_keep_the_newer_when_the_older_is_durable_last(
    tmp_path: Path, monkeypatch
) -> None:
    """A put drops the oldest updates only once its own is durable. Two puts at once on an outbox bound to one
    update: the older-numbered one syncs its directory last, and by then it is the oldest update itself, so it is
    the one dropped (counted), never kept beside the newer one over the bound."""
    outbox = Outbox(tmp_path / "outbox", max_messages=1)
    older_syncing, newer_done = threading.Event(), threading.Event()
    real_fsync_dir = outbox_module.fsync_dir
    older_thread: list[threading.Thread] = []

    def fsync_dir(path: Any) -> None:
        if threading.current_thread() in older_thread:
            older_syncing.set()
            assert newer_done.wait(WAIT_SECONDS)
        real_fsync_dir(path)

    def put_the_older() -> str:
        older_thread.append(threading.current_thread())
        return outbox.put(b"update of round 1")

    monkeypatch.setattr(outbox_module, "fsync_dir", fsync_dir)
    thread, older = in_thread(put_the_older)
    assert older_syncing.wait(WAIT_SECONDS)
    newer = outbox.put(b"update of round 2")
    newer_done.set()
    thread.join()
    assert older, "the older put failed (its error is printed above)"
    assert [entry.key for entry in outbox.pending()] == [newer] and older[0] not in outbox
    assert outbox.counters.dropped_total == 1 and outbox.counters.put_total == 2
    assert files(outbox) == [outbox.pending()[0].name]
    assert [entry.key for entry in Outbox(outbox.directory).pending()] == [newer]
