"""What the outbox acknowledges is on disk: the file and directory syncs, recorded on the host.

The QEMU power-cut test (tests/test_outbox_powercut.py) is the proof, but it is slow and marked ``qemu``;
SIGKILL (tests/test_outbox_crash.py) keeps the page cache and cannot tell. Here the calls are recorded in
order: ``put`` must fsync the update's bytes before the rename that publishes them, and fsync the directory
after it, all before it returns; ``remove`` must fsync the directory after the unlink before it returns (or the
delivered update comes back after a power cut and is sent again).
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from appliance import outbox as outbox_module
from appliance.outbox import Outbox, PermanentRejection


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(call, path) in the order they happen: fsync, rename, unlink, and the test's own 'returned' marks."""
    log: list[tuple[str, str]] = []
    real_fsync, real_rename, real_unlink = os.fsync, os.rename, os.unlink

    def fsync(fd: int) -> None:
        log.append(("fsync", _path_of(fd)))
        real_fsync(fd)

    def rename(src, dst, *args, **kwargs) -> None:
        real_rename(src, dst, *args, **kwargs)
        log.append(("rename", str(dst)))

    def unlink(path, *args, **kwargs) -> None:
        real_unlink(path, *args, **kwargs)
        log.append(("unlink", str(path)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "unlink", unlink)  # Path.unlink calls os.unlink
    return log


def test_put_syncs_the_file_before_its_rename_and_the_directory_after(tmp_path: Path, calls) -> None:
    outbox = Outbox(tmp_path / "outbox")
    directory = str(outbox.directory)
    calls.clear()
    key = outbox.put(b"signed update " * 100)
    calls.append(("returned", key))
    final = str(outbox.directory / outbox.pending()[0].name)
    temp_file = next(path for call, path in calls if call == "fsync" and path != directory)
    assert Path(temp_file).parent == outbox.directory and temp_file != final
    assert calls == [("fsync", temp_file), ("rename", final), ("fsync", directory), ("returned", key)]


def test_remove_syncs_the_directory_after_the_unlink(tmp_path: Path, calls) -> None:
    outbox = Outbox(tmp_path / "outbox")
    key = outbox.put(b"delivered update")
    path = str(outbox.directory / outbox.pending()[0].name)
    calls.clear()
    assert outbox.remove(key)
    calls.append(("returned", key))
    assert calls == [("unlink", path), ("fsync", str(outbox.directory)), ("returned", key)]



def test_an_update_a_full_outbox_dropped_while_it_was_sent_is_gone_durably_once_acknowledged(
    tmp_path: Path, calls
) -> None:
    """A put drops the oldest update from a full outbox while that update is being sent; the drop's unlink is not
    synced (the put has synced its own directory entry already). The aggregator acknowledges the update: its
    removal finds it dropped, and must still sync the directory before it returns, or after a power cut the
    acknowledged update would be back."""
    outbox = Outbox(tmp_path / "outbox", max_messages=1)
    sent = outbox.put(b"update of round 1")
    path = str(outbox.directory / outbox.pending()[0].name)
    acknowledged: list[str] = []

    async def send(message: bytes) -> str:
        outbox.put(b"update of round 2")  # drops round 1's update, on the way to the aggregator
        return "receipt"

    async def deliver_one() -> None:
        await outbox.deliver(send, on_receipt=lambda key, receipt: acknowledged.append(key),
                             stop=lambda: bool(acknowledged))

    calls.clear()
    asyncio.run(deliver_one())
    calls.append(("returned", sent))
    assert acknowledged == [sent] and outbox.counters.dropped_total == 1
    after_the_drop = calls[calls.index(("unlink", path)) + 1 :]
    assert after_the_drop[-2:] == [("fsync", str(outbox.directory)), ("returned", sent)]


def test_putting_a_message_already_pending_writes_nothing(tmp_path: Path, calls) -> None:
    """An SD card wears with every write: a put of a message already pending returns its key without writing a
    second copy to compare."""
    outbox = Outbox(tmp_path / "outbox")
    key = outbox.put(b"signed update")
    calls.clear()
    assert outbox.put(b"signed update") == key and calls == []


def test_a_refused_update_is_moved_aside_durably_with_its_note_whole(tmp_path: Path, calls) -> None:
    """The move to ``rejected/`` is made durable in both directories, and the note saying why is fsynced under a
    temp name before it takes its name: a power cut leaves the note whole or absent (reason "unknown"), never an
    empty note that reads as no reason at all."""
    outbox = Outbox(tmp_path / "outbox")
    key = outbox.put(b"update for a closed round")
    moved = str(outbox.rejected_directory / outbox.pending()[0].name)
    note = f"{moved}.reason"

    async def refuse(message: bytes) -> None:
        raise PermanentRejection("round-closed", "round 7 closed at 12:00")

    calls.clear()
    asyncio.run(outbox.deliver(refuse))
    rejected = str(outbox.rejected_directory)
    after_move = calls[calls.index(("rename", moved)) + 1 :]
    assert after_move[:2] == [("fsync", rejected), ("fsync", str(outbox.directory))]
    note_syncs = [path for call, path in after_move if call == "fsync" and Path(path).name.startswith(
        f".{Path(note).name}.")]
    assert note_syncs, "the note's bytes were not fsynced under a temp name before taking its name"
    assert after_move[-1] == ("fsync", rejected), "the note's name was not made durable"
    assert outbox.rejected() == [(key, "round-closed")]
    Path(note).write_text("")  # as a note left empty by a cut before this fix
    assert outbox.rejected() == [(key, "unknown")]


def test_a_directory_sync_the_card_refuses_costs_neither_the_note_nor_the_trim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The syncs after a move to ``rejected/`` are for inspection, and a failing card may refuse one (EIO): the
    note saying why, and the trim that keeps ``rejected/`` to ``max_rejected``, are still made, rather than each
    refused update reading as reason "unknown" and ``rejected/`` growing for good."""
    outbox = Outbox(tmp_path / "outbox", max_rejected=1)
    real_fsync_dir = outbox_module.fsync_dir

    def refused_for_the_outbox(path) -> None:
        if Path(path) == outbox.directory:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync_dir(path)

    async def refuse(message: bytes) -> None:
        raise PermanentRejection("round-closed", "round 7 closed at 12:00")

    outbox.put(b"update for round 6")
    newest = outbox.put(b"update for round 7")
    monkeypatch.setattr(outbox_module, "fsync_dir", refused_for_the_outbox)
    asyncio.run(outbox.deliver(refuse))
    assert outbox.rejected() == [(newest, "round-closed")]
