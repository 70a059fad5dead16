"""The aggregator's writes under way on its own disk, and how long the oldest has waited.

A disk that stops answering (an SD card or a network disk that hangs in a write or an fsync) shows as a write that
does not return: the spool's group commit, a record of the round engine, a flush of the fleet's reports. Each runs
on a thread of its own, so nothing waits for it but what needs it; this is how the rest learns of it. An upload
arriving while the oldest write has waited longer than ``--store-timeout`` is refused at once (503
``spool-unavailable``), rather than queued behind it holding its body in memory, and the wait is exported
(``fl_aggregator_disk_wait_seconds``).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any


class WritesUnderWay:
    """Writes started and not yet returned, each with what it is and when it started (monotonic clock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[int, tuple[float, str]] = {}
        self._tokens = itertools.count()

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Around one write (any thread): ``what`` names it in the refusals, e.g. ``the record of round 7's end``."""
        token = next(self._tokens)
        with self._lock:
            self._started[token] = (time.monotonic(), what)
        try:
            yield
        finally:
            with self._lock:
                del self._started[token]

    def oldest(self) -> tuple[float, str] | None:
        """(seconds it has waited, what it is) of the oldest write under way; None when none is."""
        with self._lock:
            if not self._started:
                return None
            started, what = min(self._started.values())
        return time.monotonic() - started, what

    def under_way(self) -> list[tuple[float, str]]:
        """(seconds it has waited, what it is) of every write under way, the oldest first."""
        now = time.monotonic()
        with self._lock:
            started = sorted(self._started.values())
        return [(now - at, what) for at, what in started]

    def waited_seconds(self) -> float:
        """How long the oldest write under way has waited (0: none is): the metric's value."""
        oldest = self.oldest()
        return 0.0 if oldest is None else oldest[0]


# A stop (SIGTERM) waits for the writes under way at most until a deadline: one that has not returned by then (a disk
# that stopped answering) is left behind, named in the log. Nothing it holds was acknowledged (an update, a device
# message, a model version exists for others once its write is committed, never before), so leaving it loses nothing
# anyone was told is stored; the next start resumes from what is committed.


async def within(deadline: float, awaitable: Awaitable[Any]) -> bool:
    """Await ``awaitable`` until ``deadline`` (``time.monotonic``): True once it is done (its error, if any, raised),
    False if it is not by then: it is cancelled, and work it started on a thread goes on there, landing or failing on
    its own."""
    try:
        await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return False
    return True


async def drained(executor: ThreadPoolExecutor, deadline: float) -> bool:
    """Shut down the one-thread ``executor`` after the work queued on it, waiting for that work until ``deadline``:
    True when it is all done; False when it is not (a write hanging there is left behind, with what was queued after
    it)."""
    done = await within(deadline, asyncio.wrap_future(executor.submit(lambda: None)))  # runs after all queued before
    executor.shutdown(wait=False)
    return done
