"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the deltas, accumulated in place as they arrive."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from aggregator.strategies.base import AggregationError, Strategy, StrategyOption
from aggregator.strategies.chunks import UpdateSet

if TYPE_CHECKING:
    from aggregator.privacy import GaussianSum


class FedAvg(Strategy):
    """Streaming weighted mean: a float64 accumulator and a float32 scratch of model size, whatever the number of
    clients."""

    name = "fedavg"
    summary = "sample-weighted mean of the deltas (McMahan et al. 2017), accumulated as updates arrive"
    sum_based = True  # FedAdam and FedYogi too: their pseudo-gradient is this mean
    options = (StrategyOption("--server-lr", "server_lr", float, "server learning rate on the mean delta (1.0)"),)

    def __init__(self, server_lr: float = 1.0):
        if not server_lr > 0:
            raise ValueError(f"the server learning rate must be positive, got {server_lr}")
        self.server_lr = server_lr
        self._lock = threading.Lock()
        self._acc: np.ndarray | None = None
        self._scratch: np.ndarray | None = None
        self._total = 0.0
        self._count = 0
        self.privacy: GaussianSum | None = None

    def make_private(self, privacy: GaussianSum) -> None:
        """Central DP (aggregator/privacy.py): clip each delta, weight every device 1, add noise to the sum."""
        self.privacy = privacy

    def start_round(self, size: int) -> None:
        super().start_round(size)
        with self._lock:
            self._acc = np.zeros(size, dtype=np.float64)
            self._scratch = np.empty(size, dtype=np.float32)
            self._total = 0.0
            self._count = 0

    def add(self, delta: np.ndarray, weight: float) -> None:
        if self.privacy is not None:  # one device moves the sum by at most the clip norm, whatever it claims
            delta, weight = self.privacy.clip(delta), 1.0
        with self._lock:
            if self._acc is None or self._scratch is None:
                raise RuntimeError("start_round() was not called")
            # the product rounds once to float32 (relative 6e-8); the sum over clients is kept in float64
            np.multiply(delta, np.float32(weight), out=self._scratch)
            np.add(self._acc, self._scratch, out=self._acc)
            self._total += weight
            self._count += 1

    def mean_delta(self) -> np.ndarray:
        """The weighted mean of the deltas added so far."""
        with self._lock:
            if self._acc is None or self._count == 0:
                raise AggregationError("no updates were accepted in this round, so there is nothing to average")
            if self._total <= 0:
                raise AggregationError(
                    "the total number of samples across the round's updates is zero, so a weighted mean is undefined"
                )
            if self.privacy is not None:
                return ((self._acc + self.privacy.noise(self._acc.size)) / self._count).astype(np.float32)
            return (self._acc / self._total).astype(np.float32)

    def aggregate(self, updates: UpdateSet) -> np.ndarray:
        if len(updates) != self._count:
            raise AggregationError(f"{self._count} updates were accumulated but the round has {len(updates)}")
        return (self.mean_delta() * np.float32(self.server_lr)).astype(np.float32)
