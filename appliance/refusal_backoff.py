"""How long the round loop leaves a task whose model it refused before taking it up again.

A refused model (a release whose digest does not match, a bad signature, a package refused) is downloaded again on
each retry: up to 64 MiB for a release, which on a cellular link is soon the device's whole data plan. So refusals
of the same task back off, growing with each one up to a cap, while the round loop goes on long-polling for a newer
round: a task that changes (a new round, a new model version) is taken at once, and a round taken starts the count
again. A download of the model that fails (cut mid-way, a timeout, a 404) is backed off the same way, in the same
count: its retry downloads the model again from its start.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from appliance import wire
from appliance.outbox import Backoff

# Refusals of one task wait up to 1, 2, 4 ... s, at most five minutes (the outbox's cap).
REFUSAL_BACKOFF = Backoff(base=1.0, cap=300.0)


def task_key(task: wire.Task) -> tuple[int, int, bytes, bytes]:
    """What makes a task another one for the backoff: its round, its model version and what it names."""
    return task.round_id, task.model_version, task.model_digest, task.package_digest


class RefusalBackoff:
    """The refusals in a row of one task, and when that task may be taken up again.

    Each wait is drawn between half and all of the backoff's ceiling for that refusal (jitter that spreads a fleet
    refusing the same release, never shorter than half the ceiling), so the waits grow with each refusal."""

    def __init__(self, backoff: Backoff = REFUSAL_BACKOFF, now: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random):
        self.backoff = backoff
        self.now = now
        self.rng = rng
        self._task: tuple[int, int, bytes, bytes] | None = None
        self._round_id = 0
        self._refusals = 0
        self._until = 0.0

    def refused(self, task: wire.Task) -> float:
        """Note that ``task``'s model was refused; the seconds to leave it before taking it up again."""
        key = task_key(task)
        if key != self._task:
            self._task, self._round_id, self._refusals = key, task.round_id, 0
        ceiling = self.backoff.ceiling(self._refusals)
        delay = ceiling / 2 + self.rng() * ceiling / 2
        self._refusals += 1
        self._until = self.now() + delay
        return delay

    def holds(self, task: wire.Task) -> bool:
        """Whether ``task`` is the task refused last and its wait has not run out."""
        return task_key(task) == self._task and self.now() < self._until

    def skip_through(self) -> int:
        """The round to poll after while a wait runs (the refused round: only a newer one answers at once), else 0."""
        return self._round_id if self._task is not None and self.now() < self._until else 0

    def wait_left(self) -> float:
        """The seconds before the task refused last may be taken up again (0 when no wait runs)."""
        return max(0.0, self._until - self.now()) if self._task is not None else 0.0

    @property
    def pending(self) -> bool:
        """Whether a refused task is remembered (until a round is taken, or the refused round is over)."""
        return self._task is not None

    def clear(self) -> None:
        """A round was taken, or the refused one is over: the next refusal starts from the first wait."""
        self._task, self._round_id, self._refusals, self._until = None, 0, 0, 0.0
