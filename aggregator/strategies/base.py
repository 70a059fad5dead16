"""The one interface every aggregation rule implements.

A round's updates are parameter *deltas* (new - base). A strategy turns them into one aggregated delta and
applies it to the global parameters. Streaming rules (FedAvg and the FedOpt family) see each update once, as it
is accepted, through :meth:`Strategy.add` and hold O(model) memory whatever the number of clients. Robust
rules (median, trimmed mean, Multi-Krum) need every update at once: they read them back from the on-disk
spool in column chunks through an :class:`~aggregator.strategies.chunks.UpdateSet`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from aggregator.strategies.chunks import UpdateSet


@dataclass(frozen=True)
class StrategyOption:
    """One tunable of a rule, as the command line offers it: ``--flag VALUE`` becomes ``parameter=VALUE``."""

    flag: str  # e.g. "--server-lr"; several rules may share a flag (each maps it to its own parameter)
    parameter: str  # the rule's constructor keyword
    kind: type[int] | type[float]
    help: str


class AggregationError(Exception):
    """A round's updates cannot be aggregated by this rule; the message says why, for the operator."""


class Strategy(ABC):
    """Aggregates one round's deltas into the next global parameters."""

    name: ClassVar[str]
    #: One line for ``--help`` and the docs' table of rules.
    summary: ClassVar[str]
    #: The options ``fl-aggregator serve`` offers for this rule (the CLI, the demo and the docs derive from these).
    options: ClassVar[tuple[StrategyOption, ...]] = ()
    #: True when :meth:`aggregate` reads the spooled updates (robust rules); False for streaming rules.
    needs_all_updates: ClassVar[bool] = False
    #: True when the rule's result depends on the updates only through their weighted sum, so it runs on what
    #: secure aggregation gives the aggregator (aggregator/secagg_round.py); rules that rank or select individual
    #: updates are refused with ``--secure-aggregation``.
    sum_based: ClassVar[bool] = False

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

    def saved_state(self) -> dict[str, np.ndarray]:
        """:meth:`state` with each key namespaced by the rule (``fedadam/m``), as it is written to disk."""
        return {f"{self.name}/{key}": value for key, value in self.state().items()}

    def restore(self, saved: dict[str, np.ndarray]) -> None:
        """Load this rule's own entries of what :meth:`saved_state` wrote; another rule's are ignored, so
        switching rules (fedadam -> fedyogi, say) starts fresh instead of inheriting foreign moments."""
        prefix = f"{self.name}/"
        own = {key[len(prefix) :]: value for key, value in saved.items() if key.startswith(prefix)}
        if own:
            self.load_state(own)
