"""FedAdam and FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization").

The round's pseudo-gradient is the FedAvg mean delta (accumulated in place). The server keeps first and second
moments across rounds and steps the global model::

    m = b1*m + (1-b1)*d
    FedAdam: v = b2*v + (1-b2)*d^2
    FedYogi: v = v - (1-b2)*d^2*sign(v - d^2)
    x = x + eta * m / (sqrt(v) + tau)

``v`` starts at tau^2 as in the paper. The moments are saved with every model version, so a restart resumes
the optimiser where it was.
"""

from __future__ import annotations

import numpy as np

from aggregator.strategies.base import StrategyOption
from aggregator.strategies.chunks import UpdateSet
from aggregator.strategies.fedavg import FedAvg


class FedOpt(FedAvg):
    """Common part of the adaptive server optimisers."""

    name = "fedopt"
    options = (
        StrategyOption("--server-lr", "eta", float, "server step size eta (0.01)"),
        StrategyOption("--tau", "tau", float, "adaptivity tau (0.001)"),
    )

    def __init__(self, eta: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__()
        if not (eta > 0 and tau > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"{self.name} needs eta > 0, tau > 0 and betas in [0, 1); got eta={eta}, tau={tau}")
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def aggregate(self, updates: UpdateSet) -> np.ndarray:
        mean = super().aggregate(updates).astype(np.float64)
        if self.m is None or self.v is None or len(self.m) != len(mean):
            self.m = np.zeros_like(mean)
            self.v = np.full_like(mean, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * mean
        self.v = self._second_moment(self.v, mean)
        return (self.eta * self.m / (np.sqrt(self.v) + self.tau)).astype(np.float32)

    def _second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.m is None or self.v is None else {"m": self.m, "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """The moments :meth:`state` returned; none (before the first step) starts the optimiser afresh."""
        if "m" in state and "v" in state:
            self.m = np.asarray(state["m"], dtype=np.float64)
            self.v = np.asarray(state["v"], dtype=np.float64)
        else:
            self.m = self.v = None


class FedAdam(FedOpt):
    name = "fedadam"
    summary = "FedAvg's mean as pseudo-gradient, server Adam step (Reddi et al. 2021); moments saved per version"

    def __init__(self, eta: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(eta, beta1, beta2, tau)

    def _second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * d * d


class FedYogi(FedOpt):
    name = "fedyogi"
    summary = "FedAvg's mean as pseudo-gradient, server Yogi step (Reddi et al. 2021); moments saved per version"

    def _second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        d2 = d * d
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)
