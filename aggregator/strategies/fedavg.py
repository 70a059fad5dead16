"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the deltas, accumulated in place as they arrive."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from aggregator.strategies.base import AggregationError, Strategy, StrategyOption
from aggregator.strategies.chunks import UpdateSet

if TYPE_CHECKING:
    from aggregator.privacy import GaussianSum


#: Updates summed in float32 before their block is folded into the float64 total (the error bound of
#: :meth:`FedAvg.add` grows with it; the cost of a fold is spread over it).
BLOCK_UPDATES = 16


class FedAvg(Strategy):
    """Streaming weighted mean: a float64 total, a float32 block and a float32 scratch of model size, whatever the
    number of clients."""

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
        self._block: np.ndarray | None = None
        self._scratch: np.ndarray | None = None
        self._in_block = 0
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
            self._block = np.empty(size, dtype=np.float32)
            self._scratch = np.empty(size, dtype=np.float32)
            self._in_block = 0
            self._total = 0.0
            self._count = 0

    def add(self, delta: np.ndarray, weight: float) -> None:
        """Add ``weight * delta`` to the sum: in float32 into the current block of up to :data:`BLOCK_UPDATES`
        updates, which is then folded into the float64 total.

        Why: a float64 add of every update costs a widening pass and twice the memory traffic (about 1 ms per
        million parameters, four times a float32 add), on the path of every upload.

        Error, with u = 2^-24 (float32 unit roundoff) and B = :data:`BLOCK_UPDATES`: each product ``w d`` rounds
        once (relative u, as before); summing a block of B of them in float32 adds at most (B - 1) u times the
        block's sum of |w d| (recursive summation, Higham, "Accuracy and Stability of Numerical Algorithms",
        section 4.2), and the float64 fold of the blocks adds nothing that matters (u64 = 2^-53). So each
        coordinate of the mean is off by at most B u = 9.5e-7 times the weighted mean of its |delta|, and
        typically by about sqrt(B) u = 2.4e-7 of it: under 16 float32 ulps, where the published float32 mean
        itself rounds by half of one, and far below what a device's float16 (2^-11) or int8 (1/254 of the
        peak) encoding already gave up. Nothing overflows: a delta within ``MAX_UPDATE_NORM`` (1e15) times
        the largest weight (2^31), B times over, stays below 4e25, far inside float32 (3.4e38).
        """
        if self.privacy is not None:  # one device moves the sum by at most the clip norm, whatever it claims
            delta, weight = self.privacy.clip(delta), 1.0
        with self._lock:
            if self._acc is None:
                raise RuntimeError("start_round() was not called")
            if self._in_block == 0:  # the block starts as this product: no add, no scratch
                np.multiply(delta, np.float32(weight), out=self._block)
            else:
                np.multiply(delta, np.float32(weight), out=self._scratch)
                np.add(self._block, self._scratch, out=self._block)
            self._in_block += 1
            if self._in_block == BLOCK_UPDATES:
                self._fold()
            self._total += weight
            self._count += 1

    def _fold(self) -> None:
        """Add the float32 block to the float64 total and start a new block (the lock is held)."""
        if self._in_block:
            np.add(self._acc, self._block, out=self._acc)
            self._in_block = 0

    def mean_delta(self) -> np.ndarray:
        """The weighted mean of the deltas added so far."""
        with self._lock:
            if self._acc is None or self._count == 0:
                raise AggregationError("no updates were accepted in this round, so there is nothing to average")
            self._fold()
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
