"""Central differential privacy for the published models (DP-FedAvg, McMahan et al. 2018, device-level).

What the aggregator does in a ``--dp central`` round (docs/privacy.md):

1. every accepted delta is clipped to the task's L2 bound S (devices clip already; the server clips again so
   the bound holds whatever a device sends) and counts with weight 1, whatever its sample count, so one device
   moves the sum by at most S;
2. when the round closes, Gaussian noise N(0, (z S)^2) is added to each coordinate of the sum, which is then
   divided by the number of participants; the server optimiser (FedAvg, FedAdam, FedYogi) runs on that mean;
3. the privacy spent is accounted by Google's ``dp-accounting`` (RDP), never by a formula written here.

Participation is *not* sampled: any enrolled device that asks may join a round, so there is no amplification by
sampling, and the accountant composes one Gaussian mechanism of noise multiplier z per published round. Who
took part (and how many) is public (the status lists it); what DP bounds is what any one device's data can
change in the published models.

The ledger of noised rounds is written to disk *before* the version they produced is published, so a crash in
between over-counts the privacy spent, never under-counts it.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.strategies import STRATEGIES, Strategy
from aggregator.strategies.fedavg import FedAvg
from appliance.durable import atomic_write

ACCOUNTING = "rdp; every device that asks may join (no sampling amplification)"
LEDGER_FILE = "privacy.json"


class PrivacyError(ValueError):
    """Differential-privacy settings that cannot give the guarantee they name; the message says why."""


@dataclass(frozen=True)
class DPConfig:
    """``fl-aggregator serve --dp central --dp-noise-multiplier Z --dp-delta D [--dp-epsilon-budget E]``."""

    noise_multiplier: float
    delta: float = 1e-5
    epsilon_budget: float | None = None
    mode: str = "central"

    def __post_init__(self) -> None:
        if self.mode != "central":
            raise PrivacyError(f"--dp {self.mode!r}: only 'central' is available")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacyError(f"--dp-noise-multiplier must be positive, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"--dp-delta must be in (0, 1), got {self.delta}")
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise PrivacyError(f"--dp-epsilon-budget must be positive, got {self.epsilon_budget}")

    def check_population(self, devices: int) -> None:
        """delta must be well below 1/N, or 'with probability delta, one device's data is published' is no
        guarantee at all for a fleet of N devices."""
        if devices > 0 and self.delta >= 1 / devices:
            raise PrivacyError(
                f"--dp-delta {self.delta:g} is not below 1/N = {1 / devices:.3g} for the {devices} enrolled devices: "
                "choose a delta much smaller than one over the fleet size (1e-5 is usual)"
            )


def epsilon(noise_multipliers: list[float], delta: float) -> float:
    """The epsilon at ``delta`` after one Gaussian mechanism per entry (sensitivity 1, noise std z), composed by
    dp-accounting's RDP accountant. Zero rounds spend nothing."""
    if not noise_multipliers:
        return 0.0
    import dp_accounting  # the aggregator's only user of it; keeps `import aggregator` light
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    for z, count in _runs(noise_multipliers):
        accountant.compose(dp_accounting.GaussianDpEvent(z), count)
    return float(accountant.get_epsilon(delta))


def _runs(values: list[float]) -> list[tuple[float, int]]:
    runs: list[tuple[float, int]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


class PrivacyLedger:
    """The noise multiplier of every noised round that produced a published version, on disk."""

    def __init__(self, state_dir: Path, config: DPConfig):
        self.path = Path(state_dir) / LEDGER_FILE
        self.config = config
        self.rounds: list[float] = []
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            self.rounds = [float(z) for z in saved["noise_multipliers"]]
            if float(saved["delta"]) != config.delta:
                raise PrivacyError(
                    f"{self.path} accounts with delta {saved['delta']}, not --dp-delta {config.delta}: "
                    "a guarantee's delta cannot change mid-way"
                )

    def spent(self) -> float:
        return epsilon(self.rounds, self.config.delta)

    def after_next_round(self) -> float:
        return epsilon([*self.rounds, self.config.noise_multiplier], self.config.delta)

    def budget_allows_next_round(self) -> bool:
        budget = self.config.epsilon_budget
        return budget is None or self.after_next_round() <= budget

    def record_round(self) -> float:
        """Count one more noised round (durably, before its version is published); returns epsilon after it."""
        rounds = [*self.rounds, self.config.noise_multiplier]
        atomic_write(self.path, json.dumps({"delta": self.config.delta, "noise_multipliers": rounds}).encode())
        self.rounds = rounds
        return self.spent()

    def release_metadata(self) -> dict[str, float | int]:
        """What each signed ModelRelease carries about the privacy spent up to and including it."""
        return {
            "epsilon": self.spent(),
            "delta": self.config.delta,
            "noise_multiplier": self.config.noise_multiplier,
            "rounds": len(self.rounds),
        }


class GaussianSum:
    """Clips each delta to ``clip_norm`` and adds N(0, (z * clip_norm)^2) noise to a sum.

    The noise comes from numpy's PCG64 seeded with 128 bits from the OS's CSPRNG at each draw, so it cannot be
    predicted from anything the aggregator publishes.
    """

    def __init__(self, clip_norm: float, noise_multiplier: float):
        if not clip_norm > 0:
            raise PrivacyError("differential privacy needs --clip-norm > 0: the noise is calibrated to it")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def clip(self, delta: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(delta.astype(np.float64)))
        if norm <= self.clip_norm:
            return delta
        return (delta * np.float32(self.clip_norm / norm)).astype(np.float32)

    def noise(self, size: int) -> np.ndarray:
        rng = np.random.default_rng(secrets.randbits(128))
        return rng.normal(0.0, self.noise_std, size)


def check_private_strategy(strategy: str, clip_norm: float, site: bool) -> None:
    """Refuse settings under which the noise would not bound one device's influence."""
    if not issubclass(STRATEGIES[strategy], FedAvg):
        raise PrivacyError(
            f"--dp needs a rule built on the sum of the deltas (fedavg, fedadam, fedyogi): {strategy} selects or "
            "ranks individual updates, so one device's influence is not bounded by the clip norm and the noise"
        )
    if not clip_norm > 0:
        raise PrivacyError("--dp needs --clip-norm > 0: the noise is calibrated to the clip norm")
    if site:
        raise PrivacyError(
            "--dp runs at the root of a tree, not on a site: a site forwards a mean over its devices, and the noise "
            "must be calibrated to one device's clipped delta at the aggregator that adds it"
        )


def make_private(strategy: Strategy, clip_norm: float, config: DPConfig) -> None:
    """Turn a FedAvg-family rule into DP-FedAvg (clip, weight 1, Gaussian noise on the sum)."""
    assert isinstance(strategy, FedAvg), "check_private_strategy() refuses other rules"
    strategy.make_private(GaussianSum(clip_norm, config.noise_multiplier))
