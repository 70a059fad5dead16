"""What the agent tells the fleet view: its Heartbeat (docs/protocol.md section 13), built from the budget, the
cgroup's usage, the outbox and the model held, and how often it is sent.

Sent once at start and then every :data:`HEARTBEAT_SECONDS` ± 10 % (the jitter spreads a fleet that booted together),
well inside the aggregator's one hour before a device counts as silent and well above its 30 s rate limit.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable

from appliance.budget import Budget, Usage
from appliance.protocol.heartbeat import FIELD_RANGES, MAX_AGENT_VERSION_CHARS, MAX_STORAGE_ERRORS, Heartbeat

HEARTBEAT_SECONDS = 300.0


def next_delay(rng: random.Random | None = None) -> float:
    """Seconds until the next heartbeat."""
    return HEARTBEAT_SECONDS * (rng or random).uniform(0.9, 1.1)


class ThrottleMeter:
    """The share of wall-clock time cpu.max throttled the agent's cgroup between two readings of cpu.stat's
    ``throttled_usec``, in thousandths (0 for the first reading, or without a cgroup)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._last: tuple[float, int] | None = None

    def permille(self, throttled_usec: int | None) -> int:
        now = self._clock()
        last, self._last = self._last, (None if throttled_usec is None else (now, throttled_usec))
        if last is None or throttled_usec is None or now <= last[0]:
            return 0
        share = (throttled_usec - last[1]) / 1e6 / (now - last[0])
        return min(1000, max(0, round(share * 1000)))


def _clamp(name: str, value: int | float) -> int:
    return min(max(0, int(value)), FIELD_RANGES[name])


def build_heartbeat(*, device_id: str, agent_version: str, model_version: int | None, last_round: int, cameras: int,
                    budget: Budget, usage: Usage, cpu_throttled: int, oom_retries: int, outbox: int,
                    outbox_bytes: int, sent_at: float, storage_errors: int = 0) -> Heartbeat:
    """A Heartbeat whose every field is in the range the aggregator accepts (a value past its range is reported as
    the range's end: a device with more than 64 cameras says 64)."""
    version = "".join(c for c in agent_version if " " < c <= "~")[:MAX_AGENT_VERSION_CHARS] or "unknown"
    return Heartbeat(
        device_id=device_id,
        agent_version=version,
        model_version=model_version,
        last_round=_clamp("last_round", last_round),
        cameras=_clamp("cameras", cameras),
        memory=_clamp("memory", usage.memory_current or 0),
        memory_max=_clamp("memory_max", budget.memory_max or 0),
        cpu_max=_clamp("cpu_max", round((budget.cpu_quota or 0) * 1000)),
        cpu_throttled=_clamp("cpu_throttled", cpu_throttled),
        oom_retries=_clamp("oom_retries", oom_retries),
        outbox=_clamp("outbox", outbox),
        outbox_bytes=_clamp("outbox_bytes", outbox_bytes),
        sent_at=_clamp("sent_at", sent_at),
        storage_errors=min(max(0, int(storage_errors)), MAX_STORAGE_ERRORS),
    )


def restamped(heartbeat: Heartbeat, sent_at: float) -> Heartbeat:
    """The same report, stamped ``sent_at`` (within its range) instead."""
    return dataclasses.replace(heartbeat, sent_at=_clamp("sent_at", sent_at))
