"""The ``sent_at`` of the agent's heartbeats: the aggregator's time as the clock estimates it, and after a report the
fleet view already holds for this device.

The fleet view takes a heartbeat only when its ``sent_at`` is after that of the report it holds (``stale-report``, 409,
which keeps a captured report from being replayed). A board without a real-time clock that reboots mid-round knows
the aggregator's time only from the open round's task: its clock's estimate is the round's ``issued_at`` plus the time
since start, behind by the round's age. A heartbeat it sent before the reboot, after the round opened, is then newer
than any it can stamp, and every one was refused until the next round opened: the device showed as silent.

So the refusal names the held report's ``sent_at`` (``held_sent_at``), and the stamps run from one second after it on
the monotonic clock; the heartbeat is sent again once at once. The answer is not signed, and it need not be: a stamp
only orders this device's reports, and it moves nothing else. The clock (appliance/clock.py), by which the agent
judges deadlines and stamps its updates, is never moved by it. A hostile or buggy answer is bounded twice:

- it is followed only up to :data:`REPORT_AHEAD_SECONDS` past the latest time the signed tasks allow
  (:meth:`AggregatorClock.latest`: the round's deadline, plus the minute a round takes to close): the aggregator
  takes no report further ahead of its clock, so no report it holds is further ahead; before the first task, when
  nothing bounds it, it is not followed at all;
- stamps that turn out ahead of the aggregator's clock after all are refused ``expired``, and that refusal drops the
  floor: the next heartbeat is stamped by the clock again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from appliance.clock import AggregatorClock

# The fleet view takes a report at most this far ahead of its clock (aggregator/fleet.py, REPORT_MAX_AHEAD_SECONDS),
# so a report it holds is at most this far past the latest time the tasks allow.
REPORT_AHEAD_SECONDS = 300.0


class HeartbeatStamps:
    """``sent_at`` for each heartbeat: ``clock.now()``, or later after a ``stale-report`` that named the report held."""

    def __init__(self, clock: AggregatorClock, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._floor: tuple[float, float] | None = None  # (a stamp, the monotonic instant it holds at)

    def stamp(self) -> int:
        """The ``sent_at`` of a heartbeat sent now."""
        now = self._clock.now()
        if self._floor is not None:
            value, at = self._floor
            now = max(now, value + (self._monotonic() - at))
        return int(now)

    def after_stale(self, held_sent_at: int) -> bool:
        """A heartbeat was refused ``stale-report`` naming the report held: stamp the next ones after it. False (and
        nothing changes) when the answer is not followed: it is before this stamp, lies further ahead than the
        tasks allow, or no task has been seen."""
        latest = self._clock.latest()
        if latest is None or held_sent_at > latest + REPORT_AHEAD_SECONDS or held_sent_at < self.stamp():
            return False
        self._floor = (float(held_sent_at + 1), self._monotonic())
        return True

    def after_expired(self) -> None:
        """A heartbeat was refused ``expired`` (outside the aggregator's window): stamp by the clock again."""
        self._floor = None
