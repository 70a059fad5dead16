"""The outbox on a failing SD card: reads that fail with EIO, and puts whose rename or directory fsync fail.

An update whose file the card cannot read must not hold up the updates behind it, and after a few failed reads in
a row it is set aside in one log line and counted (``fl_agent_updates_rejected_total{reason="unreadable"}``), even
when the card refuses to move it. A put is visible to delivery only once it is durable, and a put that fails has
changed nothing: it was not sent, and it dropped no older update from a full outbox. Faults are injected into the
outbox's read seam (``Outbox.read``), ``os.rename``, ``Path.mkdir`` and the directory fsync.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance import outbox as outbox_module
from appliance.outbox import READ_ATTEMPTS, UNREADABLE, Backoff, Entry, Outbox, PermanentRejection

WAIT_SECONDS = 10.0  # only reached when a put never waits for the other (and then the test fails)


def failure(code: int, path: Any = None) -> OSError:
    return OSError(code, os.strerror(code), *([str(path)] if path is not None else []))


class Aggregator:
    """Takes every update; records what it received."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def send(self, message: bytes) -> str:
        self.received.append(message)
        return "receipt"


class NoSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class UnreadableFiles:
    """``Outbox.read`` failing with EIO for the given keys, ``healed_after`` failed reads each (None: never)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, keys: set[str], healed_after: int | None = None):
        self.keys = keys
        self.healed_after = healed_after
        self.failed: dict[str, int] = {}
        read = Outbox.read

        def failing_read(outbox: Outbox, entry: Entry) -> bytes:
            failed = self.failed.get(entry.key, 0)
            if entry.key in self.keys and (self.healed_after is None or failed < self.healed_after):
                self.failed[entry.key] = failed + 1
                raise failure(errno.EIO, outbox.directory / entry.name)
            return read(outbox, entry)

        monkeypatch.setattr(Outbox, "read", failing_read)


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- an update the card cannot read ------------------------------------------------------------------------


def test_an_unreadable_update_does_not_hold_up_the_ones_behind_it_and_is_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(tmp_path)
    bad = outbox.put(b"update of round 1")
    behind = [b"update of round 2", b"update of round 3"]
    for message in behind:
        outbox.put(message)
    bad_file = tmp_path / outbox.pending()[0].name
    card = UnreadableFiles(monkeypatch, {bad})
    aggregator = Aggregator()
    with caplog.at_level(logging.INFO, logger="appliance.outbox"):
        report = asyncio.run(outbox.deliver(aggregator.send, max_failures=1, sleep=NoSleep()))
    assert aggregator.received == behind
    assert report.delivered == 2 and report.rejected == 1 and report.stopped == "empty"
    assert card.failed == {bad: READ_ATTEMPTS} and outbox.depth == 0
    assert outbox.rejected() == [(bad, UNREADABLE)] and outbox.counters.rejected_total[UNREADABLE] == 1
    assert files(tmp_path) == [] and (tmp_path / "rejected" / bad_file.name).read_bytes() == b"update of round 1"
    assert errors(caplog) == [
        f"outbox: update {bad_file} is unreadable ({READ_ATTEMPTS} reads in a row failed: "
        f"{os.strerror(errno.EIO)}); moved to {tmp_path / 'rejected'}"
    ]


def test_a_read_that_fails_fewer_times_in_a_row_than_the_bound_delivers_the_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only update pending fails its first reads: the next tries wait a backoff delay (no busy loop), and
    once the card reads it, it is delivered like any other."""
    outbox = Outbox(tmp_path)
    key = outbox.put(b"update of round 1")
    card = UnreadableFiles(monkeypatch, {key}, healed_after=READ_ATTEMPTS - 1)
    aggregator, sleep = Aggregator(), NoSleep()
    report = asyncio.run(outbox.deliver(aggregator.send, sleep=sleep, rng=lambda: 1.0))
    assert aggregator.received == [b"update of round 1"] and report.delivered == 1 and report.rejected == 0
    assert card.failed == {key: READ_ATTEMPTS - 1}
    assert sleep.delays == [Backoff().ceiling(n) for n in range(READ_ATTEMPTS - 1)]  # rng 1.0: each ceiling
    assert outbox.rejected() == [] and outbox.counters.rejected_total[UNREADABLE] == 0


def test_an_unreadable_update_the_card_refuses_to_move_is_set_aside_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The card went read-only: the move to rejected/ fails, delivery goes on without raising, and a restart finds
    the file where it was (nothing is lost)."""
    outbox = Outbox(tmp_path)
    bad = outbox.put(b"update of round 1")
    outbox.put(b"update of round 2")
    bad_file = tmp_path / outbox.pending()[0].name
    UnreadableFiles(monkeypatch, {bad})

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise failure(errno.EROFS, args[0])

    monkeypatch.setattr(outbox_module.os, "rename", read_only)
    monkeypatch.setattr(Path, "mkdir", read_only)
    aggregator = Aggregator()
    with caplog.at_level(logging.INFO, logger="appliance.outbox"):
        report = asyncio.run(outbox.deliver(aggregator.send, max_failures=1, sleep=NoSleep()))
    monkeypatch.undo()
    assert aggregator.received == [b"update of round 2"] and report.stopped == "empty"
    assert outbox.depth == 0 and outbox.counters.rejected_total[UNREADABLE] == 1
    assert errors(caplog) == [
        f"outbox: update {bad_file} is unreadable ({READ_ATTEMPTS} reads in a row failed: "
        f"{os.strerror(errno.EIO)}); set aside until the agent restarts (it cannot be moved to "
        f"{tmp_path / 'rejected'}: {os.strerror(errno.EROFS)})"
    ]
    assert [entry.key for entry in Outbox(tmp_path).pending()] == [bad]  # tried again after a restart


# -- a put that fails part-way ---------------------------------------------------------------------------


def test_a_put_is_not_delivered_before_its_directory_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delivery loop runs while a put (in a worker thread) syncs the directory, and that sync fails: the put
    raises (the agent skips the round), so the update must not have gone out (or the round would also count as
    completed)."""
    outbox = Outbox(tmp_path)
    aggregator = Aggregator()
    real_fsync_dir = outbox_module.fsync_dir
    delivered_meanwhile: list[int] = []

    def delivery_runs_then_the_sync_fails(path: Any) -> None:
        if delivered_meanwhile:  # the delivery's own directory syncs
            return real_fsync_dir(path)
        delivered_meanwhile.append(-1)
        report = asyncio.run(outbox.deliver(aggregator.send, max_failures=1, sleep=NoSleep()))
        delivered_meanwhile[0] = report.delivered
        raise failure(errno.EIO)

    monkeypatch.setattr(outbox_module, "fsync_dir", delivery_runs_then_the_sync_fails)
    with pytest.raises(OSError) as refused:
        outbox.put(b"update of round 1")
    assert refused.value.errno == errno.EIO
    assert delivered_meanwhile == [0] and aggregator.received == []
    assert outbox.depth == 0 and outbox.counters.delivered_total == 0 and files(tmp_path) == []


@pytest.mark.parametrize("step", ["rename", "directory fsync"])
def test_a_put_that_fails_leaves_a_full_outbox_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    outbox = Outbox(tmp_path, max_messages=2)
    older = [outbox.put(b"update of round 1"), outbox.put(b"update of round 2")]
    before = files(tmp_path)

    def io_error(*args: Any, **kwargs: Any) -> None:
        raise failure(errno.EIO)

    if step == "rename":
        monkeypatch.setattr(outbox_module.os, "rename", io_error)
    else:
        monkeypatch.setattr(outbox_module, "fsync_dir", io_error)
    with pytest.raises(OSError):
        outbox.put(b"update of round 3")
    monkeypatch.undo()
    assert [entry.key for entry in outbox.pending()] == older and files(tmp_path) == before
    assert outbox.counters.dropped_total == 0 and outbox.counters.put_total == 2
    assert [entry.key for entry in Outbox(tmp_path).pending()] == older
    newest = outbox.put(b"update of round 3")  # the card recovered: the oldest goes now, as the bound says
    assert [entry.key for entry in outbox.pending()] == [older[1], newest] and outbox.counters.dropped_total == 1


class WatchedEvent(threading.Event):
    """A put's ``settled`` event that says when another put starts waiting on it."""

    waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        WatchedEvent.waiting.set()
        return super().wait(timeout)


@dataclass
class WatchedStaged(outbox_module._Staged):
    settled: threading.Event = field(default_factory=WatchedEvent)


def test_a_put_of_the_same_message_stores_its_own_copy_when_the_first_is_withdrawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two puts of one message: the first's directory fsync fails while the second waits for it. The second must
    not return on the strength of the withdrawn copy: it stores its own, which stays pending."""
    outbox = Outbox(tmp_path)
    message = b"update of round 1"
    real_fsync_dir = outbox_module.fsync_dir
    second: list[threading.Thread] = []
    keys: list[str] = []
    WatchedEvent.waiting.clear()

    def second_put_waits_then_the_sync_fails(path: Any) -> None:
        if second:
            return real_fsync_dir(path)
        second.append(threading.Thread(target=lambda: keys.append(outbox.put(message))))
        second[0].start()
        assert WatchedEvent.waiting.wait(WAIT_SECONDS), "the second put did not wait for the first"
        raise failure(errno.EIO)

    monkeypatch.setattr(outbox_module, "_Staged", WatchedStaged)
    monkeypatch.setattr(outbox_module, "fsync_dir", second_put_waits_then_the_sync_fails)
    with pytest.raises(OSError):
        outbox.put(message)
    second[0].join()
    assert len(keys) == 1 and [entry.key for entry in outbox.pending()] == keys
    assert files(tmp_path) == [outbox.pending()[0].name] and outbox.read(outbox.pending()[0]) == message
    assert [entry.key for entry in Outbox(tmp_path).pending()] == keys


# -- off the event loop, and never raising for a move the card refuses -------------------------------------


def test_a_read_the_card_takes_long_over_does_not_stop_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing card can take seconds over one read. The agent's heartbeats and watchdog run on the same event loop
    as delivery, so the read must run in a worker thread: here it returns only once another task on the loop ran."""
    outbox = Outbox(tmp_path)
    outbox.put(b"update of round 1")
    heartbeat_ran = threading.Event()
    loop_ran_during_the_read: list[bool] = []
    read = Outbox.read

    def slow_read(outbox: Outbox, entry: Entry) -> bytes:
        loop_ran_during_the_read.append(heartbeat_ran.wait(WAIT_SECONDS))
        return read(outbox, entry)

    async def heartbeat_while_delivering() -> None:
        delivery = asyncio.create_task(outbox.deliver(aggregator.send, sleep=NoSleep()))
        await asyncio.sleep(0)  # the delivery starts and reads
        heartbeat_ran.set()
        await delivery

    monkeypatch.setattr(Outbox, "read", slow_read)
    aggregator = Aggregator()
    asyncio.run(heartbeat_while_delivering())
    assert loop_ran_during_the_read == [True] and aggregator.received == [b"update of round 1"]


class Refusing(Aggregator):
    """Refuses the first update for good, takes the others."""

    async def send(self, message: bytes) -> str:
        if not self.received:
            self.received.append(message)
            raise PermanentRejection("round-closed", "round 1 closed")
        return await super().send(message)


@pytest.mark.parametrize("reason", ["round-closed", "corrupt"])
def test_an_update_set_aside_on_a_read_only_card_is_counted_and_delivery_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    """An update the aggregator refused for good, or whose stored bytes no longer match their digest, cannot be moved
    to rejected/ on a card gone read-only. It is set aside in memory, counted, in one ERROR line; delivery goes on
    with the next update instead of raising, and a restart finds the file where it was."""
    outbox = Outbox(tmp_path)
    first = outbox.put(b"update of round 1")
    outbox.put(b"update of round 2")
    if reason == "corrupt":
        (tmp_path / outbox.pending()[0].name).write_bytes(b"update of round 1, damaged")
    aggregator = Aggregator() if reason == "corrupt" else Refusing()

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise failure(errno.EROFS, args[0])

    monkeypatch.setattr(outbox_module.os, "rename", read_only)
    monkeypatch.setattr(Path, "mkdir", read_only)
    with caplog.at_level(logging.INFO, logger="appliance.outbox"):
        report = asyncio.run(outbox.deliver(aggregator.send, max_failures=1, sleep=NoSleep()))
    monkeypatch.undo()
    assert aggregator.received[-1] == b"update of round 2" and report.stopped == "empty"
    assert report.delivered == 1 and report.rejected == 1 and outbox.counters.rejected_total[reason] == 1
    assert outbox.depth == 0 and outbox.rejected() == []
    assert [message for message in errors(caplog) if "set aside until the agent restarts" in message] == [
        f"outbox: update {first} permanently rejected ({reason}: "
        f"{'stored bytes do not match their SHA-256 name' if reason == 'corrupt' else 'round 1 closed'}); set aside "
        f"until the agent restarts (it cannot be moved to {tmp_path / 'rejected'}: {os.strerror(errno.EROFS)})"
    ]
    assert [entry.key for entry in Outbox(tmp_path).pending()] == [first]  # tried again after a restart
