"""Aggregation rules, one per module behind :class:`~aggregator.strategies.base.Strategy`."""

from __future__ import annotations

from typing import Any

from aggregator.strategies.base import AggregationError, Strategy, StrategyOption
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

__all__ = [
    "STRATEGIES", "AggregationError", "Strategy", "StrategyOption", "UpdateSet", "make_strategy", "option_flags",
    "options_from_flags",
]


def make_strategy(name: str, **options: Any) -> Strategy:
    """A fresh strategy by its CLI name; unknown names list the known ones."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
    return cls(**options)


def option_flags() -> dict[str, tuple[type[int] | type[float], str]]:
    """Every rule's command-line flags: flag -> (value type, help naming the rules that take it)."""
    flags: dict[str, tuple[type[int] | type[float], list[str]]] = {}
    for name, cls in STRATEGIES.items():
        for option in cls.options:
            kind, helps = flags.setdefault(option.flag, (option.kind, []))
            if kind is not option.kind:
                raise TypeError(f"{option.flag} is {kind.__name__} for one rule and {option.kind.__name__} for {name}")
            helps.append(f"{name}: {option.help}")
    return {flag: (kind, "; ".join(helps)) for flag, (kind, helps) in flags.items()}


def options_from_flags(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The constructor keywords of rule ``name`` from the flags the user gave (``None`` values: not given).

    A flag the rule does not take is refused, naming the rules that do."""
    cls = STRATEGIES[name]
    own = {option.flag: option.parameter for option in cls.options}
    options = {}
    for flag, value in given.items():
        if value is None:
            continue
        if flag not in own:
            takers = [n for n, c in STRATEGIES.items() if any(o.flag == flag for o in c.options)]
            raise ValueError(f"{flag} applies to --strategy {' or '.join(takers)}, not {name}")
        options[own[flag]] = value
    return options
