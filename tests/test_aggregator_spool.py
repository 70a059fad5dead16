"""The update spool's group commit (aggregator/store.py): what a caller that stops waiting does to the others.

A queued update is written, fsynced and committed whether or not its caller is still there to hear about it. In
CI a handler cancelled while its upload waited for the commit once killed the thread that answers callers
(``InvalidStateError: CANCELLED`` in ``spool-finisher``), after which no upload was ever acknowledged again.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.store import SPOOL_ALIGNMENT, SpoolJob, Store, spool_vector


def _job(device: str, digest: bytes) -> SpoolJob:
    return SpoolJob(
        digest=digest, device_id=device, round_id=1, num_samples=1, metrics={},
        delta=np.full(1000, 0.5, dtype=np.float32), receipt=b"receipt", accepted_at=time.time(),
    )


def test_an_upload_whose_caller_went_away_does_not_stop_the_next_from_being_acknowledged(tmp_path: Path) -> None:
    async def go() -> None:
        store = Store(tmp_path)
        store.start_writer()
        try:
            with store._write_lock:  # the writer will stop at the commit of the first upload
                gone = asyncio.ensure_future(store.spool(_job("a", b"1" * 32)))
                await asyncio.sleep(0)  # queued
                gone.cancel()  # the client went away: its handler is cancelled while the upload waits
                await asyncio.gather(gone, return_exceptions=True)
            # The first upload still counts (it was queued), and the second gets its answer.
            offset = await asyncio.wait_for(store.spool(_job("b", b"2" * 32)), timeout=60)
            assert [row.device_id for row in store.round_updates(1)] == ["a", "b"]
            assert offset == store.round_updates(1)[1].offset
        finally:
            store.close()

    asyncio.run(go())


def _spool_all(store: Store, deltas: list[np.ndarray]) -> list[int]:
    async def go() -> list[int]:
        offsets = []
        for i, delta in enumerate(deltas):
            job = _job(f"d{i}", bytes([i]) * 32)
            job.delta = delta
            offsets.append(await store.spool(job))
        return offsets

    return asyncio.run(go())


def _deltas() -> list[np.ndarray]:
    """Sizes around the 4096-byte block, in a buffer the spool writes from directly and in ordinary arrays."""
    rng = np.random.default_rng(7)
    out = []
    for size in (1, 1023, 1024, 1025, 70_000):
        values = rng.normal(size=size).astype(np.float32)
        aligned = spool_vector(size)
        aligned[:] = values
        out += [aligned, values, np.repeat(values, 2)[::2], values.astype(">f4")]
    return out


def _read_back(store: Store, offsets: list[int], deltas: list[np.ndarray]) -> None:
    rows = store.round_updates(1)
    assert [row.offset for row in rows] == offsets
    for row, delta in zip(rows, deltas, strict=True):
        assert row.offset % SPOOL_ALIGNMENT == 0 and row.length == 4 * delta.size
        assert np.array_equal(store.read_delta(1, row.offset, row.length), delta)


def test_every_spooled_delta_reads_back_exactly_whatever_its_size_and_memory(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.start_writer()
    try:
        deltas = _deltas()
        _read_back(store, _spool_all(store, deltas), deltas)
        # written with direct I/O where the filesystem has it (ext4 and xfs do; tmpfs before Linux 6.6 does not)
        direct = fcntl.fcntl(store._segments[1].fd, fcntl.F_GETFL) & os.O_DIRECT
        assert direct or _refuses_direct_io(tmp_path)
    finally:
        store.close()


def _refuses_direct_io(directory: Path) -> bool:
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as exc:
        return exc.errno == errno.EINVAL
    return False


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_filesystem_that_refuses_direct_io_gets_the_same_records(tmp_path: Path, monkeypatch, refused_at) -> None:
    real_open, real_write = os.open, os.write

    def open_without_direct_io(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def write_without_direct_io(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    if refused_at == "open":
        monkeypatch.setattr(os, "open", open_without_direct_io)
    else:
        monkeypatch.setattr(os, "write", write_without_direct_io)
    store = Store(tmp_path)
    store.start_writer()
    try:
        deltas = _deltas()
        _read_back(store, _spool_all(store, deltas), deltas)
    finally:
        store.close()


def test_after_a_crash_mid_record_the_next_record_follows_the_last_committed_one(tmp_path: Path) -> None:
    deltas = _deltas()[:3]
    store = Store(tmp_path)
    store.start_writer()
    offsets = _spool_all(store, deltas[:2])
    store.close()
    with store.segment_path(1).open("ab") as segment:  # a record being written when the process was killed
        segment.write(b"\x7f" * 5000)
    store = Store(tmp_path)
    store.recover_segment(1)
    store.start_writer()
    try:
        job = _job("d2", b"\x02" * 32)
        job.delta = deltas[2]
        offsets.append(asyncio.run(store.spool(job)))
        _read_back(store, offsets, deltas)
    finally:
        store.close()
