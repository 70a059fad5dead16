"""The aggregator's time, as the device learns it from the signed tasks it receives.

Boards without a real-time clock boot with the time of their image build or of their last shutdown and keep
it until time sync succeeds, which on a network that reaches only the aggregator may be never. The aggregator
judges an update's ``created_at`` and a round's ``deadline`` by its own clock, so the agent stamps and judges
in the aggregator's time rather than its own.

Every signed Task carries two of the aggregator's times that bound its clock when the task arrives:
``issued_at`` (when the round opened: the aggregator's clock is at least that) and ``deadline`` (a task is
served only while its round is open: the clock is at most that, give or take the moment it takes to close
the round). Each bound is kept as an anchor on the monotonic clock, so it stays right when the wall clock is
stepped (time sync succeeding at last), and the tightest bound seen within the last hour is kept, so a late
fetch of a round that opened long ago does not pull the estimate back.

The device's own clock is trusted while it lies between the bounds (a synchronised board reads an offset of
exactly 0); otherwise the aggregator's time is the lower bound. That bound is exact for a task that arrives
through a waiting long-poll as its round opens, the usual case, and behind by the task's age otherwise: an
update is then stamped a little in the past (within the aggregator's window) but never in its future.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

# A bound this old is replaced by a newer one even if the newer one is looser: monotonic clocks drift (tens
# of ppm: a fraction of a second per hour), and the aggregator's own clock may have been corrected.
BOUND_MAX_AGE_SECONDS = 3600.0
# The aggregator closes a round at its deadline, but closing takes a moment: a task can be served just after.
DEADLINE_SLACK_SECONDS = 60.0


@dataclass(frozen=True)
class _Anchor:
    """An aggregator time known at a monotonic instant."""

    value: float
    at: float

    def at_instant(self, monotonic: float) -> float:
        return self.value + (monotonic - self.at)


class AggregatorClock:
    """The aggregator's current time, estimated from the tasks observed; the device clock until the first."""

    def __init__(
        self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._lower: _Anchor | None = None
        self._upper: _Anchor | None = None

    @property
    def known(self) -> bool:
        """True once a task has been observed."""
        return self._lower is not None

    def observe(self, issued_at: float, deadline: float) -> None:
        """Learn from a verified task that has just arrived."""
        mono = self._monotonic()
        fresh_lower = _Anchor(float(issued_at), mono)
        fresh_upper = _Anchor(float(deadline) + DEADLINE_SLACK_SECONDS, mono)
        lower, upper = fresh_lower, fresh_upper
        if self._lower is not None and mono - self._lower.at < BOUND_MAX_AGE_SECONDS:
            lower = max(self._lower, fresh_lower, key=lambda a: a.at_instant(mono))
        if self._upper is not None and mono - self._upper.at < BOUND_MAX_AGE_SECONDS:
            upper = min(self._upper, fresh_upper, key=lambda a: a.at_instant(mono))
        if lower.at_instant(mono) > upper.at_instant(mono):
            # The bounds contradict each other (the aggregator's clock was stepped): start again from this task.
            lower, upper = fresh_lower, fresh_upper
        self._lower, self._upper = lower, upper

    def _estimate(self, wall: float) -> float:
        if self._lower is None or self._upper is None:
            return wall
        mono = self._monotonic()
        lower = self._lower.at_instant(mono)
        return wall if lower <= wall <= self._upper.at_instant(mono) else lower

    def latest(self) -> float | None:
        """The latest the aggregator's time can be now, by the deadlines of the tasks observed (plus the slack a round
        takes to close); None before the first task. Bounds what the agent believes of unsigned answers."""
        if self._upper is None:
            return None
        return self._upper.at_instant(self._monotonic())

    def now(self) -> float:
        """The aggregator's time now (Unix seconds): the device clock while it agrees with what the tasks said."""
        return self._estimate(self._wall())

    def offset(self) -> float:
        """Aggregator time minus device time in seconds (positive: the device clock is behind); NaN before the
        first task, when nothing is known."""
        if not self.known:
            return math.nan
        wall = self._wall()
        return self._estimate(wall) - wall
