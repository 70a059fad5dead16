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
from appliance.outbox import (
    READ_ATTEMPTS,
    READ_FAILURE_SPAN_SECONDS,
    SUFFIX,
    TMP_PREFIX,
    UNREADABLE,
    Backoff,
    Entry,
    Outbox,
    PermanentRejection,
)

WAIT_SECONDS = 10.0  # only reached when a put never waits for the other (and then the test fails)


def failure(code: int, path: Any = None) -> OSError:
    return OSError(code, os.strerror(code), *([str(path)] if path is not None else []))


def read_only(*args: Any, **kwargs: Any) -> None:
    """A write (rename, mkdir) on a card gone read-only."""
    raise failure(errno.EROFS, args[0])


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


class FakeTime:
    """The outbox's clock and the delivery's sleep: a sleep moves the clock on, at once."""

    def __init__(self) -> None:
        self.time = 0.0
        self.delays: list[float] = []

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.time += seconds


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
    """The two updates behind go first; the unreadable one is set aside once its reads have failed 3 times in a row
    and over a minute (the tries wait growing backoff delays meanwhile)."""
    time = FakeTime()
    outbox = Outbox(tmp_path, clock=time.now)
    bad = outbox.put(b"update of round 1")
    behind = [b"update of round 2", b"update of round 3"]
    for message in behind:
        outbox.put(message)
    bad_file = tmp_path / outbox.pending()[0].name
    card = UnreadableFiles(monkeypatch, {bad})
    aggregator = Aggregator()
    with caplog.at_level(logging.INFO, logger="appliance.outbox"):
        report = asyncio.run(outbox.deliver(aggregator.send, max_failures=1, sleep=time.sleep, rng=lambda: 1.0))
    assert aggregator.received == behind
    assert report.delivered == 2 and report.rejected == 1 and report.stopped == "empty"
    # rng 1.0: the waits are 1, 2, 4, ... 32 s, and the read after the one at 63 s sets it aside
    assert time.delays == [Backoff().ceiling(n) for n in range(6)] and card.failed == {bad: 9}
    assert outbox.depth == 0
    assert outbox.rejected() == [(bad, UNREADABLE)] and outbox.counters.rejected_total[UNREADABLE] == 1
    assert files(tmp_path) == [] and (tmp_path / "rejected" / bad_file.name).read_bytes() == b"update of round 1"
    assert errors(caplog) == [
        f"outbox: update {bad_file} is unreadable (9 reads in a row failed over 63 s: "
        f"{os.strerror(errno.EIO)}); moved to {tmp_path / 'rejected'}"
    ]


def test_a_card_that_fails_every_read_for_a_moment_sets_nothing_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A card that fails every read for a few seconds (a controller reset, a brownout) fails 3 reads in a row of
    every pending update within a second or two: none of them is bad, and each is delivered once the card reads
    again, none set aside."""
    time = FakeTime()
    outbox = Outbox(tmp_path, clock=time.now)
    messages = [b"update of round 1", b"update of round 2"]
    keys = {outbox.put(message) for message in messages}
    card = UnreadableFiles(monkeypatch, keys, healed_after=READ_ATTEMPTS + 1)
    aggregator = Aggregator()
    report = asyncio.run(outbox.deliver(aggregator.send, sleep=time.sleep, rng=lambda: 0.25))
    assert aggregator.received == messages and report.rejected == 0 and outbox.rejected() == []
    assert card.failed == {key: READ_ATTEMPTS + 1 for key in keys} and time.now() < 10


def test_a_read_that_fails_fewer_times_in_a_row_than_the_bound_delivers_the_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only update pending fails its first reads, spread over more than a minute: the next tries wait a backoff
    delay (no busy loop), and once the card reads it, it is delivered like any other (fewer than 3 in a row)."""
    time = FakeTime()
    outbox = Outbox(tmp_path, clock=time.now)
    key = outbox.put(b"update of round 1")
    card = UnreadableFiles(monkeypatch, {key}, healed_after=READ_ATTEMPTS - 1)
    aggregator, backoff = Aggregator(), Backoff(base=READ_FAILURE_SPAN_SECONDS, cap=10 * READ_FAILURE_SPAN_SECONDS)
    report = asyncio.run(outbox.deliver(aggregator.send, backoff=backoff, sleep=time.sleep, rng=lambda: 1.0))
    assert aggregator.received == [b"update of round 1"] and report.delivered == 1 and report.rejected == 0
    assert card.failed == {key: READ_ATTEMPTS - 1}
    assert time.delays == [backoff.ceiling(n) for n in range(READ_ATTEMPTS - 1)]  # rng 1.0: each ceiling
    assert outbox.rejected() == [] and outbox.counters.rejected_total[UNREADABLE] == 0


def test_an_unreadable_update_the_card_refuses_to_move_is_set_aside_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The card went read-only: the move to rejected/ fails, delivery goes on without raising, and a restart finds
    the file where it was (nothing is lost)."""
    time = FakeTime()
    outbox = Outbox(tmp_path, clock=time.now)
    bad = outbox.put(b"update of round 1")
    outbox.put(b"update of round 2")
    bad_file = tmp_path / outbox.pending()[0].name
    card = UnreadableFiles(monkeypatch, {bad})

    monkeypatch.setattr(outbox_module.os, "rename", read_only)
    monkeypatch.setattr(Path, "mkdir", read_only)
    aggregator = Aggregator()
    with caplog.at_level(logging.INFO, logger="appliance.outbox"):
        report = asyncio.run(outbox.deliver(aggregator.send, max_failures=1, sleep=time.sleep, rng=lambda: 1.0))
    monkeypatch.undo()
    assert aggregator.received == [b"update of round 2"] and report.stopped == "empty"
    assert outbox.depth == 0 and outbox.counters.rejected_total[UNREADABLE] == 1
    assert errors(caplog) == [
        f"outbox: update {bad_file} is unreadable ({card.failed[bad]} reads in a row failed over 63 s: "
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


class SlowCall:
    """A file operation the card takes long over: it returns only once a heartbeat task on the event loop has run
    meanwhile (or after WAIT_SECONDS, when the loop was blocked: then ``loop_ran`` says False)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.heartbeat = threading.Event()
        self.loop_ran: list[bool] = []

    def __call__(self) -> None:
        self.started.set()
        self.loop_ran.append(self.heartbeat.wait(WAIT_SECONDS))

    async def heartbeat_task(self) -> None:
        while not self.started.is_set():
            await asyncio.sleep(0.001)
        self.heartbeat.set()


async def deliver_beside(slow: SlowCall, outbox: Outbox, aggregator: Aggregator) -> None:
    await asyncio.gather(outbox.deliver(aggregator.send, sleep=NoSleep()), slow.heartbeat_task())


def test_a_read_the_card_takes_long_over_does_not_stop_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing card can take seconds over one read. The agent's heartbeats and watchdog run on the same event loop
    as delivery, so the read must run in a worker thread."""
    outbox = Outbox(tmp_path)
    outbox.put(b"update of round 1")
    slow, read = SlowCall(), Outbox.read

    def slow_read(outbox: Outbox, entry: Entry) -> bytes:
        slow()
        return read(outbox, entry)

    monkeypatch.setattr(Outbox, "read", slow_read)
    aggregator = Aggregator()
    asyncio.run(deliver_beside(slow, outbox, aggregator))
    assert slow.loop_ran == [True] and aggregator.received == [b"update of round 1"]


def test_the_digest_check_of_an_update_read_does_not_stop_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each update read is hashed against its name before it is sent: about 40 ms for a 4 MB update on an appliance
    core, so in a worker thread as well."""
    outbox = Outbox(tmp_path)
    outbox.put(b"update of round 1")
    slow, digest = SlowCall(), outbox_module.digest

    def slow_digest(message: bytes) -> str:
        slow()
        return digest(message)

    monkeypatch.setattr(outbox_module, "digest", slow_digest)
    aggregator = Aggregator()
    asyncio.run(deliver_beside(slow, outbox, aggregator))
    assert slow.loop_ran == [True] and aggregator.received == [b"update of round 1"]


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


@pytest.mark.parametrize("reason", ["round-closed", "corrupt"])
def test_moving_an_update_aside_does_not_stop_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reason: str
) -> None:
    """The move of a refused or corrupt update to rejected/ (a rename and directory fsyncs) can take seconds on a
    failing card too: it runs in a worker thread."""
    outbox = Outbox(tmp_path)
    key = outbox.put(b"update of round 1")
    if reason == "corrupt":
        (tmp_path / outbox.pending()[0].name).write_bytes(b"update of round 1, damaged")
    slow, rename = SlowCall(), os.rename

    def slow_rename(source: Any, target: Any) -> None:
        if Path(target).parent.name == "rejected":
            slow()
        rename(source, target)

    monkeypatch.setattr(outbox_module.os, "rename", slow_rename)
    asyncio.run(deliver_beside(slow, outbox, Refusing()))
    assert slow.loop_ran == [True] and outbox.rejected() == [(key, reason)]


class ScriptedCard:
    """``Outbox.read`` answering from a script: each False is a read that fails with EIO, each True one that works."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, script: list[bool]):
        self.script = list(script)
        read = Outbox.read

        def scripted_read(outbox: Outbox, entry: Entry) -> bytes:
            if self.script and not self.script.pop(0):
                raise failure(errno.EIO, outbox.directory / entry.name)
            return read(outbox, entry)

        monkeypatch.setattr(Outbox, "read", scripted_read)


class BusyOnce(Aggregator):
    """Fails the first send (transient), takes the others."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = True

    async def send(self, message: bytes) -> str:
        if self.busy:
            self.busy = False
            raise ConnectionError("aggregator busy")
        return await super().send(message)


def test_a_read_that_works_starts_the_count_of_failed_reads_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two failed reads, one that works (its send fails: the update stays), two failed reads again: never three in
    a row, so the update is not set aside, and the next read delivers it. The backoff delays after failed reads
    start again too."""
    outbox = Outbox(tmp_path)
    outbox.put(b"update of round 1")
    ScriptedCard(monkeypatch, [False, False, True, False, False, True])
    aggregator, sleep = BusyOnce(), NoSleep()
    report = asyncio.run(outbox.deliver(aggregator.send, sleep=sleep, rng=lambda: 1.0))
    assert aggregator.received == [b"update of round 1"] and report.delivered == 1 and report.rejected == 0
    assert outbox.counters.rejected_total[UNREADABLE] == 0
    first, second = Backoff().ceiling(0), Backoff().ceiling(1)  # rng 1.0: each delay is its ceiling
    assert sleep.delays == [first, second, first, first, second]  # 2 failed reads, the busy send, 2 failed reads


def test_a_read_refused_for_another_reason_than_the_card_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A permission refused is a fault of the image, not of the card: it ends delivery (and the agent), the update
    is kept, never set aside."""
    outbox = Outbox(tmp_path)
    key = outbox.put(b"update of round 1")

    def refused(outbox: Outbox, entry: Entry) -> bytes:
        raise failure(errno.EACCES, outbox.directory / entry.name)

    monkeypatch.setattr(Outbox, "read", refused)
    with pytest.raises(PermissionError):
        asyncio.run(outbox.deliver(Aggregator().send, sleep=NoSleep()))
    assert key in outbox and outbox.counters.rejected_total[UNREADABLE] == 0


def test_an_update_whose_file_was_removed_behind_the_outbox_is_forgotten(tmp_path: Path) -> None:
    """A pending update's file deleted by hand (an operator freeing space): delivery forgets it and goes on with the
    next one, instead of retrying a file that is not there."""
    outbox = Outbox(tmp_path)
    outbox.put(b"update of round 1")
    outbox.put(b"update of round 2")
    (tmp_path / outbox.pending()[0].name).unlink()
    aggregator, sleep = Aggregator(), NoSleep()
    report = asyncio.run(outbox.deliver(aggregator.send, sleep=sleep, stop=lambda: len(sleep.delays) > 3))
    assert report.stopped == "empty" and aggregator.received == [b"update of round 2"] and outbox.depth == 0


@pytest.mark.parametrize("gone", ["dropped", "set aside in memory"])
def test_an_update_put_again_gets_a_count_of_failed_reads_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gone: str
) -> None:
    """An update whose reads failed leaves the queue (dropped from a full outbox after two failed reads, or set aside
    in memory after failing over a minute on a card that refused to move it), and the same message is put again: its
    new copy gets its own count of failed reads (and its own minute), not what was left of the other copy's."""
    time = FakeTime()
    outbox = Outbox(tmp_path, max_messages=2, clock=time.now)
    message = b"update of round 1"
    key = outbox.put(message)
    card = UnreadableFiles(monkeypatch, {key})
    if gone == "dropped":
        asyncio.run(outbox.deliver(Aggregator().send, sleep=time.sleep, stop=lambda: len(time.delays) == 2))
        outbox.put(b"update of round 2")
        outbox.put(b"update of round 3")  # drops round 1's update
    else:
        with monkeypatch.context() as card_gone_read_only:
            card_gone_read_only.setattr(outbox_module.os, "rename", read_only)
            asyncio.run(outbox.deliver(Aggregator().send, sleep=time.sleep))
        outbox.put(b"update of round 3")
    failed_reads = card.failed[key]
    assert failed_reads >= (READ_ATTEMPTS - 1 if gone == "dropped" else READ_ATTEMPTS) and key not in outbox
    card.healed_after = failed_reads + 1
    outbox.put(message)  # the card fails this copy's first read, then reads it
    aggregator = Aggregator()
    report = asyncio.run(outbox.deliver(aggregator.send, sleep=time.sleep))
    assert card.failed == {key: failed_reads + 1} and report.rejected == 0
    assert aggregator.received == [b"update of round 3", message]


def test_a_drop_the_card_refuses_keeps_that_update_and_drops_no_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The oldest update of a full outbox cannot be unlinked (EIO): it is kept, logged, and no newer update is
    dropped in its place; the outbox stays over its bound until a later put can drop it."""
    outbox = Outbox(tmp_path, max_messages=2)
    oldest = outbox.put(b"update of round 1")
    older = outbox.put(b"update of round 2")
    oldest_file = str(tmp_path / outbox.pending()[0].name)
    unlink = os.unlink

    def bad_block(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path) == oldest_file:
            raise failure(errno.EIO, path)
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(outbox_module.os, "unlink", bad_block)
    with caplog.at_level(logging.WARNING, logger="appliance.outbox"):
        newest = outbox.put(b"update of round 3")
    assert [entry.key for entry in outbox.pending()] == [oldest, older, newest]
    assert outbox.counters.dropped_total == 0 and "cannot be dropped" in caplog.text


def test_an_update_dropped_while_it_was_refused_is_counted_once(tmp_path: Path) -> None:
    """A put drops the oldest update from a full outbox while the aggregator is refusing it: it was dropped (and
    counted so), so it is not counted as rejected too, nor said to be set aside."""
    outbox = Outbox(tmp_path, max_messages=1)
    outbox.put(b"update of round 1")

    class RefusingWhileDropped(Aggregator):
        async def send(self, message: bytes) -> str:
            if message == b"update of round 1":
                outbox.put(b"update of round 2")  # drops round 1's update, on its way
                raise PermanentRejection("round-closed")
            return await super().send(message)

    aggregator = RefusingWhileDropped()
    report = asyncio.run(outbox.deliver(aggregator.send, sleep=NoSleep()))
    assert aggregator.received == [b"update of round 2"] and report.rejected == 0
    assert outbox.counters.dropped_total == 1 and sum(outbox.counters.rejected_total.values()) == 0
    assert outbox.rejected() == []


def test_an_update_moved_aside_whose_note_the_card_refuses_is_counted_and_delivery_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move to rejected/ worked, but the card refuses the note and the directory syncs after it (EIO): the
    update is set aside and counted all the same, and the next one is delivered."""
    outbox = Outbox(tmp_path)
    refused = outbox.put(b"update of round 1")
    outbox.put(b"update of round 2")

    real_fsync_dir = outbox_module.fsync_dir

    def io_error(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).parent.name == "rejected" or Path(path).name == "rejected":
            raise failure(errno.EIO, path)
        return real_fsync_dir(path)

    monkeypatch.setattr(outbox_module, "fsync_dir", io_error)
    monkeypatch.setattr(Path, "write_text", io_error)
    aggregator = Refusing()
    report = asyncio.run(outbox.deliver(aggregator.send, sleep=NoSleep()))
    monkeypatch.undo()
    assert aggregator.received == [b"update of round 1", b"update of round 2"] and report.rejected == 1
    assert outbox.counters.rejected_total["round-closed"] == 1 and [key for key, _ in outbox.rejected()] == [refused]


# -- opening the outbox on a failing card -----------------------------------------------------------------


def stale_temp_file(directory: Path) -> Path:
    """What a put interrupted by a crash (or refused by the card) leaves behind."""
    path = directory / f"{TMP_PREFIX}0123456789abcdef-x1y2z3"
    path.write_bytes(b"half an upd")
    return path


def test_an_outbox_opens_on_a_read_only_card_that_holds_a_half_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A put failed as the card went read-only and could not remove its temp file. The agent starts again (a restart,
    a reboot) on the card still read-only: the outbox opens with its updates, leaves the file (logged), and a later
    start on a writable card removes it. Ending the agent instead would make systemd restart it into the same
    refusal, without heartbeats."""
    outbox = Outbox(tmp_path)
    key = outbox.put(b"update of round 1")
    stale = stale_temp_file(tmp_path)
    monkeypatch.setattr(Path, "unlink", read_only)
    with caplog.at_level(logging.WARNING, logger="appliance.outbox"):
        reopened = Outbox(tmp_path)
    monkeypatch.undo()
    assert [entry.key for entry in reopened.pending()] == [key] and stale.exists()
    assert reopened.counters.stale_temp_files_removed == 0
    assert f"cannot remove the half-written file {stale}" in caplog.text
    assert Outbox(tmp_path).counters.stale_temp_files_removed == 1 and not stale.exists()


def test_an_outbox_opens_when_the_card_fails_the_sync_after_removing_a_half_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = Outbox(tmp_path)
    key = outbox.put(b"update of round 1")
    stale = stale_temp_file(tmp_path)

    def io_error(path: Any) -> None:
        raise failure(errno.EIO, path)

    monkeypatch.setattr(outbox_module, "fsync_dir", io_error)
    reopened = Outbox(tmp_path)
    assert [entry.key for entry in reopened.pending()] == [key] and not stale.exists()


@pytest.mark.parametrize("step", ["unlink", "stat", "sync"])
def test_opening_the_outbox_still_fails_for_a_refusal_that_is_not_the_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A permission refused (removing a half-written file, reading an update's size, syncing the directory) is a
    fault of the image: the agent ends, as before, and says why."""
    Outbox(tmp_path).put(b"update of round 1")
    stale_temp_file(tmp_path)
    stat = Path.stat

    def refused(path: Any, *args: Any, **kwargs: Any) -> None:
        raise failure(errno.EACCES, path)

    def refused_for_updates(path: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        return refused(path) if path.suffix == SUFFIX else stat(path, *args, **kwargs)

    if step == "unlink":
        monkeypatch.setattr(Path, "unlink", refused)
    elif step == "stat":
        monkeypatch.setattr(Path, "stat", refused_for_updates)
    else:
        monkeypatch.setattr(outbox_module, "fsync_dir", refused)
    with pytest.raises(PermissionError):
        Outbox(tmp_path)


def test_an_update_the_card_cannot_stat_at_start_is_set_aside_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The card fails even the size of an update (its inode, EIO) when the agent starts: the outbox opens with the
    others, sets that one aside until the next start (its file kept), counts it as unreadable, and numbers a new
    update after it."""
    outbox = Outbox(tmp_path)
    readable = outbox.put(b"update of round 1")
    outbox.put(b"update of round 2")
    bad_file = tmp_path / outbox.pending()[1].name
    stat = Path.stat

    def failing_stat(path: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        if path == bad_file:
            raise failure(errno.EIO, path)
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", failing_stat)
    with caplog.at_level(logging.INFO, logger="appliance.outbox"):
        reopened = Outbox(tmp_path)
    monkeypatch.undo()
    assert [entry.key for entry in reopened.pending()] == [readable] and bad_file.exists()
    assert reopened.counters.rejected_total[UNREADABLE] == 1
    assert errors(caplog) == [
        f"outbox: update {bad_file} is unreadable ({os.strerror(errno.EIO)}); set aside until the agent restarts"
    ]
    reopened.put(b"update of round 3")
    assert reopened.pending()[-1].seq > outbox.pending()[1].seq
