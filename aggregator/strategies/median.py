"""Coordinate-wise median (Yin et al. 2018): robust to a minority of arbitrary updates; unweighted."""

from __future__ import annotations

import numpy as np

from aggregator.strategies.base import AggregationError, Strategy
from aggregator.strategies.chunks import UpdateSet


class Median(Strategy):
    name = "median"
    summary = "coordinate-wise median (Yin et al. 2018), unweighted"
    needs_all_updates = True

    def aggregate(self, updates: UpdateSet) -> np.ndarray:
        if len(updates) == 0:
            raise AggregationError("no updates were accepted in this round, so there is no median")
        out = np.empty(updates.size, dtype=np.float32)
        for start, stop, matrix in updates.chunks():
            out[start:stop] = np.median(matrix, axis=0)
        return out
