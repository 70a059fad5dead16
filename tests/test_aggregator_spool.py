"""The update spool's group commit (aggregator/store.py): what a caller that stops waiting does to the others.

A queued update is written, fsynced and committed whether or not its caller is still there to hear about it. In
CI a handler cancelled while its upload waited for the commit once killed the thread that answers callers
(``InvalidStateError: CANCELLED`` in ``spool-finisher``), after which no upload was ever acknowledged again.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from aggregator.store import SpoolJob, Store


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
