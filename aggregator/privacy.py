"""Differential privacy for the published models (DP-FedAvg, McMahan et al. 2018, device-level), central or
distributed.

What the aggregator does in a ``--dp central`` round (docs/privacy.md):

1. every accepted delta is clipped to the task's L2 bound S (devices clip already; the server clips again so
   the bound holds whatever a device sends) and counts with weight 1, whatever its sample count, so one device
   moves the sum by at most S;
2. when the round closes, Gaussian noise N(0, (z S)^2) is added to each coordinate of the sum, which is then
   divided by the number of participants; the server optimiser (FedAvg, FedAdam, FedYogi) runs on that mean;
3. the privacy spent is accounted by Google's ``dp-accounting`` (RDP), never by a formula written here.

Participation is *not* sampled: any enrolled device that asks may join a round, so there is no amplification by
sampling, and the accountant composes one Gaussian mechanism of noise multiplier z per published round. Who
took part (and how many) is public (the status lists it), so neighbouring runs differ in one device's clipped
update, present or replaced by zero (zero-out adjacency): that moves a round's sum by at most S. A swap of one
device's data for other data moves it by up to 2 S, which the same noise covers only at the epsilon of z / 2
(docs/privacy.md says so and gives both).

``--dp distributed`` (with ``--secure-aggregation``) moves step 2 to the devices: each adds discrete Gaussian
noise to its quantised update (Kairouz et al. 2021, "The Distributed Discrete Gaussian Mechanism";
appliance/protocol/discrete_gaussian.py), so the unmasked sum is already noised and nobody sees it without the
noise. The noise the sum holds depends on how many devices survived, which the aggregator knows before it asks
for the unmask: :func:`distributed_noise` gives the round's effective noise multiplier and the DDGauss slack,
and the ledger records those (aggregator/secagg_round.py).

With ``--dp-adaptive-clip`` (central only, aggregator/adaptive_clip.py) the clip norm follows a quantile of
the devices' update norms: each round adds a second Gaussian mechanism (the noised count of devices within the
clip norm), the model's sum gets the larger noise multiplier z_delta that leaves the pair worth z, and the ledger
keeps the clip norm with the rounds.

A noised round is counted in the ledger *before* its version is published, together with the noised model it
produced (:class:`PendingRelease`, one fsynced file): a crash in between leaves a round that is counted and
whose model is on disk, and the restart publishes exactly that model. Its noise is never drawn again (a second
draw would spend the round's privacy twice while the ledger counts it once), and the round's acknowledged updates
are in the model published.

Under ``--dp distributed`` the ledger is also written *ahead* of the unmask: before the aggregator takes the masks
off a round's sum, the ledger records that round and its noise (:class:`Unmasking`), and counts it from then on.
The round's publication turns that entry into a published round, its abandonment into an unpublished one (the
aggregator has seen the sum), each in one write, so a crash at any step can only over-count, never under-count.
"""

from __future__ import annotations

import io
import json
import math
import secrets
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.adaptive_clip import (
    AdaptiveClip,
    AdaptiveClipError,
    ClipStep,
    count_noise_multiplier,
    model_noise_multiplier,
    next_clip_norm,
)
from aggregator.norms import l2_norm
from aggregator.strategies import STRATEGIES, Strategy
from aggregator.strategies.fedavg import FedAvg
from appliance import strict_json
from appliance.durable import atomic_write, fsync_dir

ACCOUNTING = {
    "central": "rdp; zero-out adjacency (one device's clipped update present or zero); every device that asks may "
    "join (no sampling amplification)",
    "distributed": "rdp of the devices' discrete Gaussian noise actually summed (Kairouz et al. 2021, tau slack "
    "added); zero-out adjacency (one device's clipped update present or zero); every device that asks may join "
    "(no sampling amplification)",
}
LEDGER_FILE = "privacy.json"
PENDING_FILE = "privacy-pending.npz"  # a counted round whose version is not yet published (see PendingRelease)
MODES = ("central", "distributed")
#: The smallest --dp-noise-multiplier served. Below it one round alone spends an epsilon above half a million at
#: delta 1e-5 (5.5e5 at 0.001, 5.5e11 at 1e-6, no finite one below about 1e-154): a guarantee that bounds nothing, and
#: most often a delta typed into the wrong option. The smallest noise any run here uses is 0.005 (docs/privacy.md).
MIN_NOISE_MULTIPLIER = 1e-3


class PrivacyError(ValueError):
    """Differential-privacy settings that cannot give the guarantee they name; the message says why."""


class NoFiniteEpsilon(PrivacyError):
    """Noise so small that dp-accounting's epsilon is infinite: no round is counted, published or reported on it."""


@dataclass(frozen=True)
class DPConfig:
    """``fl-aggregator serve --dp central --dp-noise-multiplier Z --dp-delta D [--dp-epsilon-budget E]
    [--dp-adaptive-clip GAMMA ...]``."""

    noise_multiplier: float
    delta: float = 1e-5
    epsilon_budget: float | None = None
    mode: str = "central"
    adaptive: AdaptiveClip | None = None  # the clip norm follows a quantile of the update norms (central only)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PrivacyError(f"--dp {self.mode!r}: choose one of {', '.join(MODES)}")
        if not math.isfinite(self.noise_multiplier):  # flctl demo takes inf: "must be positive" named no problem
            raise PrivacyError(f"--dp-noise-multiplier must be a finite number, got {self.noise_multiplier}")
        if not self.noise_multiplier > 0:
            raise PrivacyError(f"--dp-noise-multiplier must be positive, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"--dp-delta must be in (0, 1), got {self.delta}")
        if self.noise_multiplier < MIN_NOISE_MULTIPLIER:
            raise PrivacyError(self._below_the_floor())
        if self.epsilon_budget is not None and not (math.isfinite(self.epsilon_budget) and self.epsilon_budget > 0):
            raise PrivacyError(f"--dp-epsilon-budget must be positive and finite, got {self.epsilon_budget} (leave "
                               "it out for no budget)")
        if self.adaptive is not None:
            if self.mode != "central":
                raise PrivacyError(
                    f"--dp-adaptive-clip needs --dp central, not {self.mode}: under secure aggregation nobody sees a "
                    "device's norm, and the count of devices within the clip norm would need its own secure sum"
                )
            try:
                self.model_noise_multiplier  # noqa: B018 - refuses a count noise that leaves the model none
            except AdaptiveClipError as exc:
                raise PrivacyError(str(exc)) from None

    def _below_the_floor(self) -> str:
        """Why a noise multiplier under :data:`MIN_NOISE_MULTIPLIER` is refused, with what one round would spend."""
        try:
            spent = f"one round alone would spend epsilon {epsilon([self.noise_multiplier], self.delta):.2g}"
        except NoFiniteEpsilon:
            spent = "dp-accounting gives no finite epsilon for one round"
        return (f"--dp-noise-multiplier {self.noise_multiplier:g} is below {MIN_NOISE_MULTIPLIER:g}: {spent} at "
                f"--dp-delta {self.delta:g}, which bounds nothing (docs/privacy.md, \"Choosing the noise\"); to train "
                "without noise, leave differential privacy off")

    @property
    def count_noise_multiplier(self) -> float | None:
        """Adaptive clipping: the noise multiplier of each round's count of devices within the clip norm."""
        if self.adaptive is None:
            return None
        return count_noise_multiplier(self.adaptive.count_stddev_for(self.noise_multiplier))

    @property
    def model_noise_multiplier(self) -> float:
        """The noise multiplier of the model's sum: z, or with adaptive clipping z_delta, so that the sum and the
        count together are worth z (Andrew et al. 2021, Theorem 1)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return model_noise_multiplier(self.noise_multiplier, self.adaptive.count_stddev_for(self.noise_multiplier))

    def check_population(self, devices: int) -> None:
        """delta must be well below 1/N, or 'with probability delta, one device's data is published' is no
        guarantee at all for a fleet of N devices."""
        if devices > 0 and self.delta >= 1 / devices:
            raise PrivacyError(
                f"--dp-delta {self.delta:g} is not below 1/N = {1 / devices:.3g} for the {devices} enrolled devices: "
                "choose a delta much smaller than one over the fleet size (1e-5 is usual)"
            )


def check_mode(config: DPConfig, secure_aggregation: bool) -> None:
    """Distributed DP needs secure aggregation (the devices' noise is only worth anything summed, and without
    masks each device's noised update would be seen alone); central DP cannot run under it (the aggregator
    clips each update before it adds noise, and under secure aggregation it never sees one)."""
    if config.mode == "distributed" and not secure_aggregation:
        raise PrivacyError("--dp distributed needs --secure-aggregation: each device adds only its share of the noise, "
                           "which protects it only inside the masked sum")


@dataclass(frozen=True)
class RoundNoise:
    """The noise one distributed-DP round's sum actually holds."""

    noise_multiplier: float  # sqrt(survivors) * sigma / sensitivity
    rdp_slack: float  # tau * d of Kairouz et al. 2021: added to the RDP of every order (and so to epsilon)


def distributed_noise(noise_sigma: float, survivors: int, sensitivity: float, dimension: int) -> RoundNoise:
    """What the sum of ``survivors`` devices' discrete Gaussian noise N_Z(0, sigma^2) is worth, for a sensitivity
    (one device's largest L2 norm, quantised) ``sensitivity`` over ``dimension`` coordinates.

    Kairouz et al. 2021 (Proposition 14 with Theorem 1): the sum of n independent N_Z(0, sigma^2) is
    (alpha, alpha Delta^2 / (2 n sigma^2) + tau d)-RDP for every order alpha, with
    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)). The first term is the RDP of the Gaussian
    mechanism of noise multiplier sqrt(n) sigma / Delta, which dp-accounting composes; tau d is returned as the
    slack the ledger adds to epsilon. (With sigma in the millions of quantisation steps, tau underflows to 0.)
    """
    tau = 10 * sum(math.exp(-2 * math.pi**2 * noise_sigma**2 * k / (k + 1)) for k in range(1, survivors))
    return RoundNoise(math.sqrt(survivors) * noise_sigma / sensitivity, tau * dimension)


def epsilon(noise_multipliers: list[float], delta: float, rdp_slack: float = 0.0) -> float:
    """The epsilon at ``delta`` after one Gaussian mechanism per entry (sensitivity 1, noise std z), composed by
    dp-accounting's RDP accountant, plus ``rdp_slack``: a constant added to the composed RDP at every order
    raises dp-accounting's RDP-to-DP conversion (a minimum over orders of RDP plus terms of the order alone) by
    exactly that constant. Zero rounds spend nothing. NoFiniteEpsilon when the result is infinite (a noise multiplier
    whose square underflows, say): an epsilon nobody can publish, sign or compare with a budget."""
    if not noise_multipliers:
        return 0.0
    import dp_accounting  # the aggregator's only user of it; keeps `import aggregator` light
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    with np.errstate(divide="ignore", over="ignore"):  # 1 / z^2 overflows for the smallest z: the check below says so
        for z, count in _runs(noise_multipliers):
            accountant.compose(dp_accounting.GaussianDpEvent(z), count)
        spent = float(accountant.get_epsilon(delta)) + rdp_slack
    if not math.isfinite(spent):
        raise NoFiniteEpsilon(f"dp-accounting gives no finite epsilon at delta {delta:g} for {len(noise_multipliers)} "
                              f"Gaussian mechanisms, the least noisy of noise multiplier {min(noise_multipliers):g}")
    return spent


def _runs(values: list[float]) -> list[tuple[float, int]]:
    """Each distinct value with how often it occurs, in the order first seen. Composition is order-free, and each
    compose costs the same whatever its count: a distributed run alternates between the few noise multipliers its
    survivor counts give, and composing it one change of value at a time grew with the number of rounds."""
    return list(Counter(values).items())


def _epsilon_of(saved: dict[str, Any]) -> float:
    """The epsilon a ledger file's fields (as :meth:`PrivacyLedger._saved` writes them) count: the published rounds,
    the sums unmasked but not published, the one being unmasked and the adaptive rounds' counts."""
    unmasking = saved.get("unmasking")
    being_unmasked = [] if unmasking is None else [unmasking["noise_multiplier"]]
    slack = saved.get("rdp_slack", 0.0) + (0.0 if unmasking is None else unmasking["rdp_slack"])
    return epsilon([*saved["noise_multipliers"], *saved.get("unpublished_noise_multipliers", []), *being_unmasked,
                    *saved.get("clip_count_noise_multipliers", [])], saved["delta"], slack)


@dataclass(frozen=True)
class PendingRelease:
    """What a noised round produced, kept with its ledger entry until its version is published: the restart
    after a crash in between publishes exactly this (aggregator/rounds.py), with the round record it closes."""

    round_id: int
    version: int
    closed_at: float
    participants: int
    samples: int
    note: str
    params: np.ndarray  # the new model, noise included
    strategy_state: dict[str, np.ndarray]  # the server optimiser's state after the round (FedAdam's moments)

    def encode(self, ledger: dict[str, Any]) -> bytes:
        """One .npz holding this release and the ledger that counts its round."""
        record = {"round_id": self.round_id, "version": self.version, "closed_at": self.closed_at,
                  "participants": self.participants, "samples": self.samples, "note": self.note}
        arrays = {f"state.{name}": value for name, value in self.strategy_state.items()}
        out = io.BytesIO()
        np.savez(out, params=self.params, ledger=_json_array(ledger), release=_json_array(record), **arrays)
        return out.getvalue()

    @staticmethod
    def decode(data: bytes) -> tuple[PendingRelease, dict[str, Any]]:
        """The release and the ledger of :meth:`encode`."""
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            record = json.loads(saved["release"].tobytes())
            state = {name.removeprefix("state."): saved[name] for name in saved.files if name.startswith("state.")}
            release = PendingRelease(params=saved["params"], strategy_state=state, **record)
            return release, json.loads(saved["ledger"].tobytes())


def _json_array(value: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(strict_json.dumps(value).encode(), dtype=np.uint8)


@dataclass(frozen=True)
class Unmasking:
    """Distributed DP: the round whose noised sum the aggregator is about to unmask (or has unmasked) and the noise
    it holds; counted in epsilon until the round's publication or abandonment settles it."""

    round_id: int
    noise: RoundNoise

    def saved(self) -> dict[str, Any]:
        return {"round": self.round_id, "noise_multiplier": self.noise.noise_multiplier,
                "rdp_slack": self.noise.rdp_slack}


class _Fields:
    """Reads the ledger file's fields, refusing a damaged or hand-edited one in one line (PrivacyError)."""

    def __init__(self, saved: Any, source: Path):
        if not isinstance(saved, dict):
            raise self._bad(source, "is not a JSON object")
        self.saved, self.source = saved, source

    @staticmethod
    def _bad(source: Path, problem: str) -> PrivacyError:
        return PrivacyError(f"{source} {problem}: the privacy ledger is damaged or was edited by hand; restore it "
                            "from a backup (a guarantee cannot be rebuilt from a guess)")

    def number(self, name: str, value: Any, positive: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not (
                value > 0 if positive else value >= 0):
            raise self._bad(self.source, f"holds {name} {json.dumps(value)[:40]}, not a finite "
                            f"{'positive' if positive else 'non-negative'} number")
        return float(value)

    def multipliers(self, name: str, required: bool = False) -> list[float]:
        if name not in self.saved and not required:
            return []
        value = self.saved.get(name)
        if not isinstance(value, list):
            raise self._bad(self.source, f"holds {name} {json.dumps(value)[:40]}, not a list of noise multipliers")
        return [self.number(f"an entry of {name}", z, positive=True) for z in value]

    def optional(self, name: str) -> float | None:
        """A positive number, or None."""
        value = self.saved.get(name)
        return None if value is None else self.number(name, value, positive=True)

    def mode(self) -> str | None:
        """The --dp mode the ledger was written under; None for a ledger written before it recorded its mode."""
        value = self.saved.get("mode")
        if value is not None and value not in MODES:
            raise self._bad(self.source, f"holds mode {json.dumps(value)[:40]}, not one of {', '.join(MODES)}")
        return value

    def clip_history(self) -> list[dict[str, float]]:
        """Adaptive clipping's history, shown in /v1/status as it is: a list of {version, clip_norm, within}."""
        history = self.saved.get("clip_history", [])
        if not isinstance(history, list):
            raise self._bad(self.source, "holds a clip_history that is not a list")
        for entry in history:
            if not isinstance(entry, dict) or not isinstance(entry.get("version"), int):
                raise self._bad(self.source, f"holds a clip_history entry {json.dumps(entry)[:60]}, not a version's "
                                "clip norm and fraction within it")
            self.number("a clip_history clip_norm", entry.get("clip_norm"), positive=True)
            within = entry.get("within")
            if isinstance(within, bool) or not isinstance(within, int | float) or not math.isfinite(within):
                raise self._bad(self.source, f"holds a clip_history entry {json.dumps(entry)[:60]}, whose within "
                                "is not a finite number")
        return history

    def unmasking(self) -> Unmasking | None:
        value = self.saved.get("unmasking")
        if value is None:
            return None
        round_id = value.get("round") if isinstance(value, dict) else None
        if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 1:
            raise self._bad(self.source, f"holds unmasking {json.dumps(value)[:60]}, not a round and its noise")
        noise = RoundNoise(self.number("unmasking's noise_multiplier", value.get("noise_multiplier"), positive=True),
                           self.number("unmasking's rdp_slack", value.get("rdp_slack"), positive=False))
        return Unmasking(round_id, noise)


class PrivacyLedger:
    """The noise multiplier of every noised round that produced a published version, on disk (with the DDGauss
    slack of distributed rounds); with adaptive clipping, the noise multiplier of each round's count too, the clip
    norm of each adaptive round and the clip norm of the next one.

    ``pending``: the last counted round's model while its version is not yet published (after a crash, until the
    restart publishes it).

    ``unpublished``: distributed rounds whose noised sum the aggregator unmasked and then did not publish (a sum
    outside the bounds of honest rounds, aggregator/secagg_bounds.py). Under distributed DP the aggregator is
    the party the noise protects against, and it has seen that sum: such a round spends privacy like a published
    one, so it counts in epsilon and the budget, though it made no version.

    ``unmasking``: the distributed round whose sum is being unmasked, written before the unmask (write-ahead) and
    counted until :meth:`record_round` or :meth:`unmask_abandoned` settles it."""

    def __init__(self, state_dir: Path, config: DPConfig):
        self.path = Path(state_dir) / LEDGER_FILE
        self.pending_path = Path(state_dir) / PENDING_FILE
        self.config = config
        self.rounds: list[float] = []
        self.rdp_slack = 0.0
        self.counts: list[float] = []  # the noise multipliers of the adaptive rounds' counts
        self.clip_norm: float | None = None  # where adaptive clipping has moved the clip norm (None: not yet)
        self.clip_history: list[dict[str, float]] = []  # per adaptive round: version, clip norm, noised fraction
        self.pending: PendingRelease | None = None
        self.unpublished: list[float] = []
        self.unmasking: Unmasking | None = None
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_bytes())
            except ValueError as exc:  # not UTF-8, or not JSON
                raise _Fields._bad(self.path, f"is not JSON ({exc})") from None
            self._load(saved, self.path)
        if self.pending_path.exists():
            try:
                self.pending, saved = PendingRelease.decode(self.pending_path.read_bytes())
            except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
                raise _Fields._bad(self.pending_path, f"cannot be read ({exc})") from None
            fields = _Fields(saved, self.pending_path)
            if len(fields.multipliers("noise_multipliers", required=True)) > len(self.rounds):
                # the crash came before the ledger's own file
                self._load(saved, self.pending_path)
                atomic_write(self.path, strict_json.dumps(saved).encode())

    def _load(self, saved: Any, source: Path) -> None:
        fields = _Fields(saved, source)
        delta = fields.number("delta", saved.get("delta"), positive=True)
        if delta != self.config.delta:
            raise PrivacyError(
                f"{source} accounts with delta {saved['delta']}, not --dp-delta {self.config.delta}: "
                "a guarantee's delta cannot change mid-way"
            )
        mode = fields.mode()
        if mode is not None and mode != self.config.mode:
            raise PrivacyError(f"{source} counts rounds of --dp {mode}, not --dp {self.config.mode}: "
                               "a guarantee's mode cannot change mid-way")
        self.rounds = fields.multipliers("noise_multipliers", required=True)
        self.rdp_slack = fields.number("rdp_slack", saved.get("rdp_slack", 0.0), positive=False)
        self.counts = fields.multipliers("clip_count_noise_multipliers")
        self.clip_norm = fields.optional("clip_norm")
        self.clip_history = fields.clip_history()
        self.unpublished = fields.multipliers("unpublished_noise_multipliers")
        self.unmasking = fields.unmasking()
        try:
            self.spent()
        except NoFiniteEpsilon as exc:
            raise PrivacyError(f"{source} counts rounds whose noise bounds nothing ({exc}): no epsilon can be "
                               "published for its models; serve a new --state") from None

    def spent(self) -> float:
        """Every round's Gaussian mechanisms (the model's sum, the count of an adaptive round, the sums unmasked
        but not published, the sum being unmasked) composed by dp-accounting: composition is order-free, so the
        counts are composed after the sums."""
        return self._epsilon(self.rounds, self.counts, self.rdp_slack)

    def _epsilon(self, rounds: list[float], counts: list[float], slack: float) -> float:
        """Epsilon of ``rounds`` and ``counts`` with ``slack``, and of the unpublished sums and the one being
        unmasked."""
        entry = self.unmasking  # read once: a worker thread may settle it meanwhile
        unmasking = [] if entry is None else [entry.noise.noise_multiplier]
        slack += 0.0 if entry is None else entry.noise.rdp_slack
        return epsilon([*rounds, *self.unpublished, *unmasking, *counts], self.config.delta, slack)

    def round_clip_norm(self, configured: float) -> float:
        """The clip norm of the round that opens: with adaptive clipping, where the estimate has moved it (a
        restart continues from there); else, or before the first adaptive round, ``configured`` (--clip-norm)."""
        if self.config.adaptive is not None and self.clip_norm is not None:
            return self.clip_norm
        return configured

    def adapt_clip(self, clip_norm: float, unclipped_norms: list[float]) -> ClipStep | None:
        """Adaptive clipping: the noised count of ``unclipped_norms`` within ``clip_norm`` and the next clip norm
        (None without adaptive clipping). Recorded by :meth:`record_round` with the round it belongs to."""
        adaptive = self.config.adaptive
        if adaptive is None:
            return None
        return next_clip_norm(clip_norm, unclipped_norms, adaptive.target_quantile, adaptive.learning_rate,
                              adaptive.count_stddev_for(self.config.noise_multiplier))

    def _next_round(self, noise: RoundNoise | None, counted: bool) -> tuple[list[float], list[float], float]:
        """The ledger's lists after one more round: its sum's noise (``noise``, or the configured central one),
        and its count's noise multiplier when ``counted`` (adaptive clipping)."""
        z, slack = (self.config.model_noise_multiplier, 0.0) if noise is None else (
            noise.noise_multiplier, noise.rdp_slack)
        count = self.config.count_noise_multiplier
        counts = [*self.counts, count] if counted and count is not None else self.counts
        return [*self.rounds, z], counts, self.rdp_slack + slack

    def after_next_round(self, noise: RoundNoise | None = None) -> float:
        """Epsilon after one more round with ``noise`` (None: the configured noise multiplier, no slack; with
        adaptive clipping, its count too)."""
        rounds, counts, slack = self._next_round(noise, counted=True)
        return self._epsilon(rounds, counts, slack)

    def budget_allows_next_round(self, noise: RoundNoise | None = None) -> bool:
        return self.next_round_refusal(noise) is None

    def next_round_refusal(self, noise: RoundNoise | None = None) -> str | None:
        """Why one more round with ``noise`` may not be counted, or None when it may: it would take epsilon past
        the budget, or its noise gives no finite epsilon."""
        try:
            after = self.after_next_round(noise)
        except NoFiniteEpsilon as exc:
            return f"{exc} after one more round"
        budget = self.config.epsilon_budget
        if budget is not None and after > budget:
            return f"epsilon would reach {after:.4g} after one more round, past the budget of {budget:g}"
        return None

    def record_round(
        self, noise: RoundNoise | None = None, clip: ClipStep | None = None, release: PendingRelease | None = None
    ) -> float:
        """Count one more noised round (durably, before its version is published); returns epsilon after it.
        ``noise``: what a distributed round's sum held; None: the configured noise multiplier (central).
        ``clip``: an adaptive round's count and next clip norm (:meth:`adapt_clip`), kept with it.
        ``release``: the round's noised model, written in the same file as its count (``pending`` until
        :meth:`published`), so that a crash before its version is published never loses or re-draws it. The
        round's :meth:`begin_unmask` entry becomes this count in the same write."""
        rounds, counts, slack = self._next_round(noise, counted=clip is not None)
        clip_norm, history = self.clip_norm, self.clip_history
        if clip is not None:
            clip_norm = clip.next_clip_norm
            history = [*history, {"version": len(rounds), "clip_norm": clip.clip_norm, "within": clip.within}]
        unmasking = self.unmasking
        if unmasking is not None and release is not None and unmasking.round_id == release.round_id:
            unmasking = None
        changes = {"rounds": rounds, "counts": counts, "rdp_slack": slack, "clip_norm": clip_norm,
                   "clip_history": history, "unmasking": unmasking}
        saved = self._saved(**changes)
        if release is not None:  # the commit point: the round is counted once this file is in place
            atomic_write(self.pending_path, release.encode(saved), mode=0o600)
        self._commit(saved, changes)
        self.pending = release
        return self.spent()

    def begin_unmask(self, round_id: int, noise: RoundNoise) -> bool:
        """Distributed DP, before the aggregator unmasks round ``round_id``'s noised sum: count it (durably) from now
        on. False when it is counted already (written before a restart): nothing is written again."""
        if self.unmasking is not None and self.unmasking.round_id == round_id:
            return False
        assert self.unmasking is None, "the entry of the round before is settled before the next round opens"
        changes = {"unmasking": Unmasking(round_id, noise)}
        self._commit(self._saved(**changes), changes)
        return True

    def unmask_abandoned(self) -> float:
        """The round being unmasked ends without a version: it stays counted, as a sum unmasked but not published
        (durably); returns epsilon, unchanged."""
        assert self.unmasking is not None
        noise = self.unmasking.noise
        changes = {"unpublished": [*self.unpublished, noise.noise_multiplier],
                   "rdp_slack": self.rdp_slack + noise.rdp_slack, "unmasking": None}
        self._commit(self._saved(**changes), changes)
        return self.spent()

    def unmask_failed(self) -> None:
        """The unmask written ahead by this process failed before any mask came off (too few shares): the
        aggregator saw nothing of the sum, so the round is not counted (durably)."""
        changes = {"unmasking": None}
        self._commit(self._saved(**changes), changes)

    def _saved(self, **changes: Any) -> dict[str, Any]:
        """The ledger file's fields: this ledger with ``changes`` (attribute name: new value). A field the previous
        versions did not write is written only when it holds something (``mode`` always: a restart compares it), so
        a central ledger reads as it always did. NoFiniteEpsilon when they would count a round without a finite
        epsilon: every writer builds its file here, so none is ever written."""
        state = {"rounds": self.rounds, "rdp_slack": self.rdp_slack, "counts": self.counts,
                 "clip_norm": self.clip_norm, "clip_history": self.clip_history, "unpublished": self.unpublished,
                 "unmasking": self.unmasking} | changes
        saved: dict[str, Any] = {"mode": self.config.mode, "delta": self.config.delta,
                                 "noise_multipliers": state["rounds"]}
        if state["rdp_slack"]:
            saved["rdp_slack"] = state["rdp_slack"]
        if state["counts"] or state["clip_norm"] is not None:
            saved.update(clip_count_noise_multipliers=state["counts"], clip_norm=state["clip_norm"],
                         clip_history=state["clip_history"])
        if state["unpublished"]:
            saved["unpublished_noise_multipliers"] = state["unpublished"]
        if state["unmasking"] is not None:
            saved["unmasking"] = state["unmasking"].saved()
        try:
            _epsilon_of(saved)
        except NoFiniteEpsilon as exc:
            raise NoFiniteEpsilon(f"{exc}: {self.path} stays as it was, a round without a finite epsilon is never "
                                  "counted") from None
        return saved

    def _commit(self, saved: dict[str, Any], changes: dict[str, Any]) -> None:
        """Write ``saved`` (atomically, fsynced), then take ``changes`` in memory: a write that fails changes
        nothing."""
        atomic_write(self.path, strict_json.dumps(saved).encode())
        for name, value in changes.items():
            setattr(self, name, value)

    def published(self) -> None:
        """The pending round's version is published (recorded in the database): forget its model."""
        if self.pending_path.exists():
            self.pending_path.unlink()
            fsync_dir(self.pending_path.parent)
        self.pending = None

    def release_metadata(self) -> dict[str, float | int | str]:
        """What each signed ModelRelease carries about the privacy spent up to and including it; the noise
        multiplier is that of the round that made it (distributed: the noise its survivors' sum held)."""
        metadata: dict[str, float | int | str] = {
            "epsilon": self.spent(),
            "delta": self.config.delta,
            "noise_multiplier": self.rounds[-1] if self.rounds else self.config.noise_multiplier,
            "rounds": len(self.rounds),
        }
        if self.config.mode == "distributed":
            metadata["mode"] = "distributed"
        return metadata



@dataclass(frozen=True)
class RecordedDP:
    """What a state's ledger says about the differential privacy its published models were trained under."""

    source: Path  # privacy.json, or privacy-pending.npz when a crash came before the ledger's own file
    mode: str | None  # None: written before the ledger recorded its mode
    delta: float
    rounds: int  # noised rounds counted: published, unmasked but not published, and one being unmasked
    last_noise_multiplier: float | None

    def flags(self) -> str:
        """The recorded settings in the words of the flags that made them."""
        return f"--dp {self.mode or '(mode not recorded)'} --dp-delta {self.delta:g}"

    def describe(self) -> str:
        """:meth:`flags` and what the ledger counted under them."""
        last = "" if self.last_noise_multiplier is None else f", last noise multiplier {self.last_noise_multiplier:g}"
        return f"{self.flags()} ({self.rounds} noised rounds counted{last})"


def recorded_dp(state_dir: Path) -> RecordedDP | None:
    """The DP settings ``state_dir``'s ledger counts rounds under, or None when it holds no ledger (no round of it
    was ever noised). A damaged ledger is refused in one line (PrivacyError), as :class:`PrivacyLedger` does."""
    path, pending_path = Path(state_dir) / LEDGER_FILE, Path(state_dir) / PENDING_FILE
    candidates: list[tuple[Path, Any]] = []
    if path.exists():
        try:
            candidates.append((path, json.loads(path.read_bytes())))
        except ValueError as exc:
            raise _Fields._bad(path, f"is not JSON ({exc})") from None
    if pending_path.exists():
        try:
            candidates.append((pending_path, PendingRelease.decode(pending_path.read_bytes())[1]))
        except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise _Fields._bad(pending_path, f"cannot be read ({exc})") from None
    recorded: RecordedDP | None = None
    for source, saved in candidates:  # the pending file's ledger is the newer one when it counts more rounds
        fields = _Fields(saved, source)
        rounds = fields.multipliers("noise_multipliers", required=True)
        counted = len(rounds) + len(fields.multipliers("unpublished_noise_multipliers")) + (
            fields.unmasking() is not None)
        if recorded is None or counted > recorded.rounds:
            recorded = RecordedDP(source, fields.mode(), fields.number("delta", saved.get("delta"), positive=True),
                                  counted, rounds[-1] if rounds else None)
    return recorded


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
        norm = l2_norm(delta)
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
    """Turn a FedAvg-family rule into DP-FedAvg (clip, weight 1, Gaussian noise on the sum); with adaptive
    clipping the sum's noise multiplier is z_delta, and :func:`clip_round` sets each round's clip norm."""
    assert isinstance(strategy, FedAvg), "check_private_strategy() refuses other rules"
    strategy.make_private(GaussianSum(clip_norm, config.model_noise_multiplier))


def clip_round(strategy: Strategy, clip_norm: float) -> None:
    """Adaptive clipping: the private rule clips this round's deltas to ``clip_norm`` and calibrates the sum's
    noise to it (the task asks the devices for the same norm)."""
    assert isinstance(strategy, FedAvg) and strategy.privacy is not None, "make_private() first"
    strategy.privacy.clip_norm = clip_norm
