"""An update is acknowledged only once it is on disk: the receipt follows the spool's fdatasync and the commit.

SIGKILL keeps the page cache, so tests/test_aggregator_durability.py cannot tell a durable aggregator from one
that never syncs; a power cut can (tests/test_aggregator_powercut.py, in QEMU). Here, on the host, the calls
themselves are recorded in the order they happen: every write to the round's spool segment, every
``fdatasync``/``fsync`` (with the file it names), the SQL the store's writer connection runs, and the moment
the client holds its receipt. The receipt must come after the segment's write, its ``fdatasync``, the fsync of
the spool directory that made the new segment's name durable, and the COMMIT of the update's row; and SQLite
must sync that commit (``synchronous=FULL`` in WAL mode: ``NORMAL`` leaves a committed row in an unsynced WAL).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from aggregator_harness import Harness, run, running

from appliance import wire

SYNCHRONOUS_FULL = 2


class CallLog:
    """One ordered list of what touched the disk, filled from the event loop and the spool writer thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def record(self, kind: str, what: str) -> None:
        self.events.append((kind, what))

    def index(self, kind: str, matches: Callable[[str], bool], after: int = -1) -> int:
        """Position of the first ``kind`` event after ``after`` whose subject ``matches``; -1 if none."""
        for i, (k, what) in enumerate(self.events):
            if i > after and k == kind and matches(what):
                return i
        return -1


def _path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> CallLog:
    log = CallLog()
    real_write, real_fsync, real_fdatasync = os.write, os.fsync, os.fdatasync

    def write(fd: int, data: bytes) -> int:
        path = _path_of(fd)
        if path.endswith(".seg"):
            log.record("write", path)
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        log.record("fsync", _path_of(fd))
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        log.record("fdatasync", _path_of(fd))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return log


def _trace_writer_sql(h: Harness, log: CallLog) -> None:
    h.engine.store._conn.set_trace_callback(lambda statement: log.record("sql", statement))


def test_the_receipt_follows_the_spool_fdatasync_and_the_commit(tmp_path: Path, calls: CallLog) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2) as h:
            store = h.engine.store
            assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert store._conn.execute("PRAGMA synchronous").fetchone()[0] >= SYNCHRONOUS_FULL
            _trace_writer_sql(h, calls)
            task = await h.task()
            segment = str(store.segment_path(task.round_id))
            spool_dir = str(store.spool_dir)
            for device in h.devices:
                body = device.update(task, h.delta())
                start = len(calls.events) - 1  # events after this index belong to this upload
                status, receipt = await h.upload(body)
                assert status == 200
                assert wire.decode_receipt(receipt, h.key.verify_key).update_digest == wire.update_digest(body)
                calls.record("receipt", device.device_id)

                received = calls.index("receipt", lambda who, d=device: who == d.device_id, after=start)
                wrote = calls.index("write", lambda p: p == segment, after=start)
                synced = calls.index("fdatasync", lambda p: p == segment, after=wrote)
                inserted = calls.index("sql", lambda s, d=device: s.startswith("INSERT INTO updates"), after=synced)
                committed = calls.index("sql", lambda s: s == "COMMIT", after=inserted)
                assert -1 < wrote < synced < inserted < committed < received, calls.events[start + 1 :]
            # The first update created the segment: its name was made durable before that update's receipt.
            dir_synced = calls.index("fsync", lambda p: p == spool_dir)
            first_receipt = calls.index("receipt", lambda who: who == h.devices[0].device_id)
            assert -1 < dir_synced < first_receipt, calls.events

    run(go())

