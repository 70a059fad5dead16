"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022): which late updates count, and how much.

In async mode (``fl-aggregator serve --mode async --buffer K``) a round is a *buffer*: it opens on the newest
model version, takes updates trained on that version or on any of the ``max_staleness`` versions before it,
and publishes the next version as soon as it holds K updates. Devices never wait for each other: a device
trains on whatever version is current when it asks, and its update counts in whichever buffer is open when
it arrives.

An update's *staleness* s is the number of versions published between its base and the buffer it lands in.
Its delta is scaled by the staleness weight w(s) before it is spooled (constant: 1; polynomial:
(1 + s)^-a, a = 0.5 as in FedBuff), and the buffer's rule then takes the sample-weighted mean of the scaled
deltas: sum(n_i w_i delta_i) / sum(n_i). The weights are not renormalised, so a buffer full of stale updates
moves the model less, which is FedBuff's point. Because the spool holds the scaled deltas, the buffer is
rebuilt after a restart exactly as a synchronous round is (aggregator/rounds.py), with no weight to recompute.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import numpy as np

from appliance.errors import ProtocolError

STALENESS_WEIGHTINGS = ("constant", "polynomial")
#: FedBuff's polynomial staleness exponent: w(s) = (1 + s)^-0.5.
POLYNOMIAL_EXPONENT = 0.5
#: Rules that compose with staleness-scaled deltas: they aggregate a (weighted) sum. The robust rules rank
#: individual updates, whose scale here depends on their staleness, and are refused in async mode.
BUFFERED_STRATEGIES = ("fedavg", "fedadam", "fedyogi")
#: The largest --buffer K: K is the goal of each buffer's round, which aggregator.db holds as a 64-bit integer.
MAX_BUFFER = 2**63 - 1


class BufferConfigError(ValueError):
    """Async-mode settings that cannot work together; the message names the flags."""


@dataclass(frozen=True)
class BufferPolicy:
    """The async mode's settings: buffer size K, the oldest base accepted, and the staleness weighting."""

    size: int
    max_staleness: int = 10
    weighting: str = "polynomial"
    exponent: float = POLYNOMIAL_EXPONENT

    def __post_init__(self) -> None:
        if self.size < 1:
            raise BufferConfigError("--buffer K must be at least 1")
        if self.size > MAX_BUFFER:
            raise BufferConfigError(f"--buffer K must be at most {MAX_BUFFER} (a round's goal is a 64-bit integer), "
                                    f"got {self.size}")
        if self.max_staleness < 0:
            raise BufferConfigError("--max-staleness must be 0 or more versions")
        if self.weighting not in STALENESS_WEIGHTINGS:
            raise BufferConfigError(
                f"--staleness-weight {self.weighting!r}: expected one of {', '.join(STALENESS_WEIGHTINGS)}"
            )
        if not self.exponent > 0:
            raise BufferConfigError("the polynomial staleness exponent must be positive")

    def weight(self, staleness: int) -> float:
        """w(s): the factor an update's delta is scaled by, given the versions elapsed since its base."""
        if self.weighting == "constant":
            return 1.0
        return float((1.0 + staleness) ** -self.exponent)

    def scaled(self, delta: np.ndarray, staleness: int) -> np.ndarray:
        """The delta times w(staleness), as it is spooled and accumulated (float32, like every spooled delta; in
        place when the array allows it)."""
        weight = self.weight(staleness)
        if weight == 1.0:
            return delta
        if delta.flags.writeable and delta.dtype == np.float32:
            delta *= np.float32(weight)
            return delta
        return (delta * np.float32(weight)).astype(np.float32)

    def oldest_kept(self, newest: int) -> int:
        """The oldest version whose release is kept once ``newest`` is published: the oldest an update may still be
        based on. Older ones are deleted, so that the disk holds max_staleness + 1 models however fast versions
        come (a version every K updates: a busy or hostile fleet publishes hundreds a minute)."""
        return max(0, newest - self.max_staleness)

    def check(self, staleness: int, base_version: int, current_version: int) -> None:
        """Refuse an update whose base is more than ``max_staleness`` versions old (410 ``too-stale``)."""
        if staleness > self.max_staleness:
            raise ProtocolError(
                "too-stale",
                f"the update is based on model version {base_version}, {staleness} versions behind the current "
                f"version {current_version}; this aggregator takes updates at most {self.max_staleness} versions "
                "old (--max-staleness): fetch the current task",
            )

    def describe(self) -> dict[str, object]:
        return {"buffer": self.size, "max_staleness": self.max_staleness, "weighting": self.weighting,
                "exponent": self.exponent if self.weighting == "polynomial" else None}


def check_buffered_strategy(strategy: str, secure: bool, private: bool) -> None:
    """Refuse, before anything starts, what async mode does not combine with."""
    if secure:
        raise BufferConfigError("--mode async cannot be combined with --secure-aggregation (a secure round needs "
                                "its devices at the same time)")
    if private:
        raise BufferConfigError("--mode async cannot be combined with --dp (the accountant counts synchronous "
                                "rounds)")
    if strategy not in BUFFERED_STRATEGIES:
        raise BufferConfigError(f"--mode async needs a sum-based --strategy ({', '.join(BUFFERED_STRATEGIES)}), "
                                f"not {strategy}: robust rules rank individual updates, which are "
                                "staleness-scaled here")


class AsyncActivity:
    """What the status page and the metrics say of async mode: staleness of accepted updates, versions per hour."""

    WINDOW = 3600.0

    def __init__(self) -> None:
        self.staleness: collections.Counter[int] = collections.Counter()
        self._published: collections.deque[float] = collections.deque()

    def accepted(self, staleness: int) -> None:
        self.staleness[staleness] += 1

    def published(self, at: float) -> None:
        """Count a version published at ``at`` (called on the event loop, in time order), forgetting those that
        have left the window."""
        self._published.append(at)
        while self._published[0] < at - self.WINDOW:
            self._published.popleft()

    def versions_per_hour(self, now: float | None = None) -> int:
        """Versions published in the last hour. Only reads: the status is built on worker threads."""
        now = time.time() if now is None else now
        return sum(1 for at in tuple(self._published) if now - self.WINDOW <= at <= now)

    def describe(self) -> dict[str, object]:
        return {"staleness": {str(s): n for s, n in sorted(self.staleness.items())},
                "versions_per_hour": self.versions_per_hour()}
