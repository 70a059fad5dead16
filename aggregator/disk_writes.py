"""The aggregator's writes under way on its own disk, and how long the oldest has waited.

A disk that stops answering (an SD card or a network disk that hangs in a write or an fsync) shows as a write that
does not return: the spool's group commit, a record of the round engine, a flush of the fleet's reports. Each runs
on a thread of its own, so nothing waits for it but what needs it; this is how the rest learns of it. An upload
arriving while the oldest write has waited longer than ``--store-timeout`` is refused at once (503
``spool-unavailable``), rather than queued behind it holding its body in memory, and the wait is exported
(``fl_aggregator_disk_wait_seconds``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


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

    def waited_seconds(self) -> float:
        """How long the oldest write under way has waited (0: none is): the metric's value."""
        oldest = self.oldest()
        return 0.0 if oldest is None else oldest[0]
