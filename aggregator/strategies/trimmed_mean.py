"""Coordinate-wise trimmed mean (Yin et al. 2018): drop the ``beta`` fraction of largest and of smallest values
of every coordinate, average the rest; unweighted."""

from __future__ import annotations

import numpy as np

from aggregator.strategies.base import AggregationError, Strategy, StrategyOption
from aggregator.strategies.chunks import UpdateSet


class TrimmedMean(Strategy):
    name = "trimmed-mean"
    summary = "coordinate-wise mean after cutting a fraction of each end (Yin et al. 2018), unweighted"
    options = (StrategyOption("--trim", "beta", float, "fraction cut from each end, in [0, 0.5) (0.2)"),)
    needs_all_updates = True

    def __init__(self, beta: float = 0.2):
        if not 0 <= beta < 0.5:
            raise ValueError(f"trimmed mean beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate(self, updates: UpdateSet) -> np.ndarray:
        n = len(updates)
        if n == 0:
            raise AggregationError("no updates were accepted in this round, so there is nothing to average")
        cut = int(self.beta * n)  # < n / 2 because beta < 0.5, so something is always left
        out = np.empty(updates.size, dtype=np.float32)
        for start, stop, matrix in updates.chunks():
            ordered = np.sort(matrix, axis=0)
            out[start:stop] = ordered[cut : n - cut].mean(axis=0, dtype=np.float64)
        return out
