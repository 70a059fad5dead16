"""Multi-Krum (Blanchard et al. 2017): keep the ``m`` updates closest to their ``n - f - 2`` nearest neighbours
and average those (weighted by samples). With ``m = 1`` it is Krum.

Pairwise distances are summed over column chunks read from the spool, so memory is O(n^2 + chunk), never
O(n * model).
"""

from __future__ import annotations

import numpy as np

from aggregator.strategies.base import AggregationError, Strategy, StrategyOption
from aggregator.strategies.chunks import UpdateSet


class MultiKrum(Strategy):
    name = "krum"
    summary = "Multi-Krum (Blanchard et al. 2017): mean of the updates closest to their neighbours"
    options = (
        StrategyOption("--byzantine", "byzantine", int, "Byzantine updates tolerated, f (default (n-3)//2)"),
        StrategyOption("--krum-keep", "keep", int, "updates averaged, m (default n - f)"),
    )
    needs_all_updates = True

    def __init__(self, byzantine: int | None = None, keep: int | None = None):
        """``byzantine`` (f): updates assumed malicious, default the most Krum tolerates, (n - 3) // 2.
        ``keep`` (m): updates averaged, default n - f."""
        if (byzantine is not None and byzantine < 0) or (keep is not None and keep < 1):
            raise ValueError(f"krum needs byzantine >= 0 and keep >= 1, got byzantine={byzantine}, keep={keep}")
        self.byzantine = byzantine
        self.keep = keep

    def scores(self, updates: UpdateSet, f: int) -> np.ndarray:
        n = len(updates)
        distances = np.zeros((n, n), dtype=np.float64)
        for _start, _stop, matrix in updates.chunks():
            x = matrix.astype(np.float64)
            sq = np.einsum("ij,ij->i", x, x)
            distances += sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
        np.maximum(distances, 0.0, out=distances)
        neighbours = n - f - 2
        ordered = np.sort(distances, axis=1)[:, 1 : neighbours + 1]  # column 0 is the distance to itself
        return ordered.sum(axis=1)

    def select(self, updates: UpdateSet) -> list[int]:
        """Indices of the updates Multi-Krum keeps."""
        n = len(updates)
        f = (n - 3) // 2 if self.byzantine is None else self.byzantine
        if f < 0 or n < 2 * f + 3:
            raise AggregationError(
                f"Krum needs at least 2f+3 updates to tolerate f={max(f, 0)} Byzantine ones; the round has {n}"
            )
        keep = n - f if self.keep is None else min(self.keep, n)
        order = np.argsort(self.scores(updates, f), kind="stable")
        return sorted(int(i) for i in order[:keep])

    def aggregate(self, updates: UpdateSet) -> np.ndarray:
        chosen = self.select(updates)
        weights = updates.weights[chosen]
        total = float(weights.sum())
        if total <= 0:
            raise AggregationError("the selected updates carry no samples, so a weighted mean is undefined")
        out = np.empty(updates.size, dtype=np.float32)
        for start, stop, matrix in updates.chunks(chosen):
            out[start:stop] = (weights @ matrix.astype(np.float64)) / total
        return out
