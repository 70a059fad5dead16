"""Torn appends to the update spool (aggregator/store.py): what a power cut or a failed write leaves at the end of a
round's segment, and what the aggregator makes of it.

Every acknowledged update was fdatasynced before its receipt, so a power cut can tear only a record nobody got a
receipt for: the restart keeps every acknowledged record byte for byte, cuts what follows the last one (and says
how much, in the log), and the next record starts at the next aligned offset. A write that fails half-way
(``ENOSPC``) leaves the same kind of tail while the aggregator keeps running: the next record starts aligned past
it, where the round engine reads it (its float32 view of the whole segment, ``RoundEngine._spooled``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.store import SPOOL_ALIGNMENT, SpoolJob, SpoolRecovery, Store


def _job(index: int, delta: np.ndarray) -> SpoolJob:
    return SpoolJob(
        digest=bytes([index]) * 32, device_id=f"d{index}", round_id=1, num_samples=1, metrics={}, delta=delta,
        receipt=b"receipt", accepted_at=time.time(),
    )


def _deltas(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.normal(size=size).astype(np.float32) for size in (1500, 2049, 700)[:count]]


def _spool(store: Store, first: int, deltas: list[np.ndarray]) -> list[int]:
    async def go() -> list[int]:
        return [await store.spool(_job(first + i, delta)) for i, delta in enumerate(deltas)]

    return asyncio.run(go())


def _as_the_round_reads_them(store: Store) -> list[np.ndarray]:
    """The round's acknowledged deltas as the round engine reads them to aggregate."""
    spool = np.memmap(store.segment_path(1), dtype="<f4", mode="r")
    return [np.array(spool[r.offset // 4 : (r.offset + r.length) // 4]) for r in store.round_updates(1)]


def _assert_round_holds(store: Store, deltas: list[np.ndarray]) -> None:
    read = _as_the_round_reads_them(store)
    assert len(read) == len(deltas)
    for got, delta in zip(read, deltas, strict=True):
        assert np.array_equal(got, delta)


@pytest.mark.parametrize(
    "torn",
    [
        pytest.param(lambda delta: delta.tobytes()[:5001], id="part-of-a-record"),
        pytest.param(lambda delta: b"\0" * 8192, id="zeros-of-a-size-that-outran-its-data"),
        pytest.param(lambda delta: delta.tobytes()[:7], id="a-few-bytes"),
    ],
)
def test_a_power_cut_mid_append_loses_only_the_record_without_a_receipt(
    tmp_path: Path, torn, caplog: pytest.LogCaptureFixture
) -> None:
    deltas = _deltas(3)
    store = Store(tmp_path)
    store.start_writer()
    _spool(store, 0, deltas[:2])
    store.close()
    tail = torn(deltas[2])
    with store.segment_path(1).open("ab") as segment:  # the third record, being appended when the power went
        segment.write(tail)

    store = Store(tmp_path)
    with caplog.at_level(logging.WARNING, logger="aggregator.store"):
        assert store.recover_segment(1).cut_bytes == len(tail)
    assert f"round 1: cut {len(tail)} bytes" in caplog.text
    store.start_writer()
    try:
        _assert_round_holds(store, deltas[:2])
        # the third device sends again (it got no receipt): its record follows the last acknowledged one
        [offset] = _spool(store, 2, deltas[2:])
        assert offset == -(-(store.round_updates(1)[1].offset + deltas[1].nbytes) // SPOOL_ALIGNMENT) * SPOOL_ALIGNMENT
        _assert_round_holds(store, deltas)
    finally:
        store.close()

    store = Store(tmp_path)  # a clean restart cuts nothing and says nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aggregator.store"):
        assert store.recover_segment(1) == SpoolRecovery(cut_bytes=0, lost=[], cause="")
    assert caplog.text == ""
    _assert_round_holds(store, deltas)
    store.close()


def test_after_an_append_that_failed_half_way_the_next_record_is_read_back_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the page cache (no direct I/O), a write that runs out of space half-way leaves an unaligned tail
    in the open segment; the next record must still start aligned, or the round reads it shifted."""
    real_open, real_write = os.open, os.write

    def open_without_direct_io(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_without_direct_io)
    deltas = _deltas(3)
    store = Store(tmp_path)
    store.start_writer()
    try:
        _spool(store, 0, deltas[:1])
        written: list[int] = []

        def disk_fills_up(fd: int, data) -> int:
            if not os.readlink(f"/proc/self/fd/{fd}").endswith(".seg"):
                return real_write(fd, data)
            if not written:
                written.append(real_write(fd, bytes(data)[:1001]))
                return written[0]
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", disk_fills_up)
        with pytest.raises(OSError, match="No space left"):
            _spool(store, 1, deltas[1:2])
        monkeypatch.setattr(os, "write", real_write)
        _spool(store, 2, deltas[2:])
        _assert_round_holds(store, [deltas[0], deltas[2]])
    finally:
        store.close()
    store = Store(tmp_path)
    assert store.recover_segment(1) == SpoolRecovery(cut_bytes=0, lost=[], cause="")
    _assert_round_holds(store, [deltas[0], deltas[2]])
    store.close()
