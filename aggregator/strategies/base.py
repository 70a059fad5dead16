"""The one interface every aggregation rule implements.

A round's updates are parameter *deltas* (new - base). A strategy turns them into one aggregated delta and
applies it to the global parameters. Streaming rules (FedAvg and the FedOpt family) see each update once, as it
is accepted, through :meth:`Strategy.add` and hold O(model) memory whatever the number of clients. Robust
rules (median, trimmed mean, Multi-Krum) need every update at once: they read them back from the on-disk
spool in column chunks through an :class:`~aggregator.strategies.chunks.UpdateSet`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from aggregator.strategies.chunks import UpdateSet


class AggregationError(Exception):
    """A round's updates cannot be aggregated by this rule; the message says why, for the operator."""


class Strategy(ABC):
    """Aggregates one round's deltas into the next global parameters."""

    name: ClassVar[str]
    #: True when :meth:`aggregate` reads the spooled updates (robust rules); False for streaming rules.
    needs_all_updates: ClassVar[bool] = False

    def start_round(self, size: int) -> None:
        """Forget the previous round's accumulators; ``size`` is the number of model parameters."""
        self.size = size

    def add(self, delta: np.ndarray, weight: float) -> None:  # noqa: B027 - robust rules need nothing here
        """Take one accepted update (flat float32 delta, weight = its sample count). Thread-safe."""

    @abstractmethod
    def aggregate(self, updates: UpdateSet) -> np.ndarray:
        """The round's aggregated delta (float32, model size)."""

    def apply(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """New global parameters from the old ones and the aggregated delta (server learning rate 1)."""
        return (params + delta).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        """Server-side state that must survive a restart (FedOpt moments); saved with each model version."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 - stateless by default
        """Restore what :meth:`state` returned."""
