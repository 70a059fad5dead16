"""Aggregation rules, one per module behind :class:`~aggregator.strategies.base.Strategy`."""

from __future__ import annotations

from typing import Any

from aggregator.strategies.base import AggregationError, Strategy
from aggregator.strategies.chunks import UpdateSet
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedopt import FedAdam, FedYogi
from aggregator.strategies.krum import MultiKrum
from aggregator.strategies.median import Median
from aggregator.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "median": Median,
    "trimmed-mean": TrimmedMean,
    "krum": MultiKrum,
}

__all__ = ["STRATEGIES", "AggregationError", "Strategy", "UpdateSet", "make_strategy"]


def make_strategy(name: str, **options: Any) -> Strategy:
    """A fresh strategy by its CLI name; unknown names list the known ones."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
    return cls(**options)
