"""Stragglers (``bench/fl_quality.py --stragglers``): simulated wall-clock time to 90 % held-out accuracy for
synchronous FedAvg (ours and Flower's) against buffered asynchronous aggregation (FedBuff, ``fl-aggregator serve
--mode async``), on the same non-IID digits split, the same model and the same local training as the quality
comparison.

Device speeds: each client's time per sample and local epoch is ``--seconds-per-sample`` x a log-normal draw
(median 1, ``--speed-sigma`` 0.5: a heavy right tail), and a seeded ``--slow-fraction`` (30 %) of the clients are
``--slowdown`` (10x) slower on top. A local training takes that time x samples x epochs. Uploads, downloads and
aggregation take no simulated time (on the digits MLP they are milliseconds against training seconds).

* **sync** (ours, and Flower's FedAvg driven exactly as in the quality comparison): each round the same seeded
  draw of ``--per-round`` clients trains on the round's model; the round ends when the slowest of them is done
  (Flower's synchronous round waits for every sampled client; so does ours with the goal at the sampled count).
* **async** (ours): ``--per-round`` clients train at any time. Whenever one finishes, its update goes through the
  same wire path as in the quality comparison (signed, verified, decoded), is scaled by the staleness weight of
  ``aggregator.buffered.BufferPolicy`` (the aggregator's own code), refused past ``--max-staleness``, and added
  to the buffer; every ``--buffer`` K updates the rule (FedAvg) publishes a version; then a client drawn
  uniformly from the idle ones starts on the newest version.

Both sides run the same number of local trainings (``--rounds`` x ``--per-round``): equal device work. Reported:
simulated seconds to 90 %, the final accuracy, and the ratio sync / async.
"""

from __future__ import annotations

import heapq
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fl_quality import (
    FLOWER,
    TARGET,
    Federation,
    Run,
    Settings,
    client_seed,
    participants,
    run_flower,
    run_ours,
    signed_fleet,
)

SYNC = "ours-fedavg-f32"
ASYNC = "ours-fedbuff"


@dataclass(frozen=True)
class SpeedModel:
    """Seconds per sample and local epoch for each client: log-normal speeds, a fraction of them slowed down."""

    sigma: float = 0.5
    slow_fraction: float = 0.3
    slowdown: float = 10.0
    seconds_per_sample: float = 0.01

    def draw(self, clients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(seconds per sample-epoch, the slow clients' indices), the same for every method of a seed."""
        rng = np.random.default_rng([seed, 7919])
        speed = self.seconds_per_sample * rng.lognormal(0.0, self.sigma, clients)
        slow = np.sort(rng.choice(clients, size=round(self.slow_fraction * clients), replace=False))
        speed[slow] *= self.slowdown
        return speed, slow


def training_seconds(speed: np.ndarray, fed: Federation, client: int, epochs: int) -> float:
    return float(speed[client] * len(fed.clients[client]) * epochs)


@dataclass
class TimedRun:
    """One method's accuracy against simulated time for one seed."""

    method: str
    seed: int
    times: list[float] = field(default_factory=list)  # when each version was published (simulated seconds)
    accuracy: list[float] = field(default_factory=list)
    trainings: int = 0
    refused: int = 0  # async: updates past --max-staleness
    staleness: list[int] = field(default_factory=list)  # async: of every update folded in
    slow_trainings: int = 0  # local trainings done by the slowed clients
    seconds: float = 0.0  # real time the run took

    def time_to(self, target: float) -> float | None:
        return next((t for t, a in zip(self.times, self.accuracy, strict=True) if a >= target), None)

    def time_held(self, target: float) -> float | None:
        """From when on every later version stays at or above ``target`` (async curves oscillate)."""
        held = None
        for t, a in zip(reversed(self.times), reversed(self.accuracy), strict=True):
            if a < target:
                break
            held = t
        return held

    def versions_to(self, target: float) -> int | None:
        return next((i + 1 for i, a in enumerate(self.accuracy) if a >= target), None)


def sync_timed(run: Run, fed: Federation, settings: Settings, speed: np.ndarray,
               slow: Sequence[int] = ()) -> TimedRun:
    """A synchronous run's curve against time: each round lasts as long as its slowest sampled client."""
    timed = TimedRun(run.method, run.seed, accuracy=list(run.accuracy), seconds=run.seconds)
    now = 0.0
    for round_no in range(1, len(run.accuracy) + 1):
        picked = participants(settings, run.seed, round_no)
        now += max(training_seconds(speed, fed, c, settings.epochs) for c in picked)
        timed.times.append(now)
        timed.trainings += len(picked)
        timed.slow_trainings += sum(1 for c in picked if c in slow)
    return timed


def run_async(seed: int, fed: Federation, settings: Settings, package: Any, trainer: Any, speed: np.ndarray,
              buffer: Any, server_lr: float = 1.0, slow: Sequence[int] = ()) -> TimedRun:
    """FedBuff as ``fl-aggregator serve --mode async`` runs it, with ``settings.per_round`` clients training at
    once, every message through appliance.wire, until as many local trainings as the synchronous run's."""

    from aggregator.models import Layout
    from aggregator.strategies import UpdateSet, make_strategy
    from aggregator.verify import decode_delta
    from appliance import wire

    specs = [wire.ParamSpec(s.name, tuple(s.shape)) for s in package.param_specs]
    layout = Layout(specs)
    fleet = signed_fleet(settings.clients, seed)
    aggregator_key, device_keys, device_ids, registry = (fleet.aggregator_key, fleet.device_keys, fleet.device_ids,
                                                         fleet.registry)
    limits = wire.Limits()
    strategy = make_strategy("fedavg", server_lr=server_lr)
    strategy.start_round(layout.size)
    global_flat = layout.flatten(package.initial_params)
    version = 0
    releases = {0: wire.encode_model_release(wire.ModelRelease(0, package.digest, layout.unflatten(global_flat)),
                                             aggregator_key)}
    rng = np.random.default_rng([seed, 104729])
    run = TimedRun(ASYNC, seed)
    started = time.perf_counter()
    flight: list[tuple[float, int, int, int]] = []  # (finishes at, start order, client, base version)
    busy: set[int] = set()
    begun = 0

    def begin(client: int, now: float) -> None:
        nonlocal begun
        heapq.heappush(flight, (now + training_seconds(speed, fed, client, settings.epochs), begun, client, version))
        busy.add(client)
        begun += 1

    for client in rng.choice(settings.clients, size=settings.per_round, replace=False):
        begin(int(client), 0.0)
    deltas: list[np.ndarray] = []
    weights: list[int] = []
    total = settings.rounds * settings.per_round
    while run.trainings < total:
        now, order, client, base = heapq.heappop(flight)
        busy.discard(client)
        release, digest = releases[base]
        params = wire.decode_model_release(release, aggregator_key.verify_key, specs, limits).tensors
        idx = fed.clients[client]
        result = trainer.train(params, fed.x[idx], fed.y[idx], settings.epochs, settings.batch, settings.lr,
                               seed=client_seed(seed, order, client), measure=False)
        body = wire.encode_update(wire.Update(device_ids[client], base + 1, base, digest, result.num_samples,
                                              result.delta, dict(result.metrics), "float32"), device_keys[client])
        run.trainings += 1
        run.slow_trainings += client in slow
        staleness = version - base
        if staleness > buffer.max_staleness:
            run.refused += 1
        else:
            update, flat, _ = decode_delta(body, registry.get, layout, limits)
            flat = buffer.scaled(flat, staleness)
            strategy.add(flat, float(update.num_samples))
            deltas.append(flat)
            weights.append(update.num_samples)
            run.staleness.append(staleness)
        if len(deltas) == buffer.size:
            global_flat = strategy.apply(global_flat, strategy.aggregate(UpdateSet(deltas, np.array(weights))))
            version += 1
            releases[version] = wire.encode_model_release(
                wire.ModelRelease(version, package.digest, layout.unflatten(global_flat)), aggregator_key)
            in_use = {b for *_, b in flight} | {version}
            for old in [v for v in releases if v not in in_use]:
                del releases[old]
            strategy.start_round(layout.size)
            deltas, weights = [], []
            scores = trainer.evaluate(layout.unflatten(global_flat), fed.x_test, fed.y_test)
            run.times.append(now)
            run.accuracy.append(scores["accuracy"])
        idle = [c for c in range(settings.clients) if c not in busy]
        begin(int(rng.choice(idle)), now)
    run.seconds = time.perf_counter() - started
    return run


def run_stragglers(fed_for_seed: Any, seeds: Sequence[int], settings: Settings, package: Any, trainer: Any,
                   speeds: SpeedModel, buffer: Any, server_lr: float, flower_python: str | None) -> list[TimedRun]:
    """Every method on every seed: ours sync, Flower's sync (when flwr is there), ours async."""
    runs: list[TimedRun] = []
    for seed in seeds:
        fed = fed_for_seed(seed)
        speed, slow = speeds.draw(settings.clients, seed)
        work = [training_seconds(speed, fed, c, settings.epochs) for c in range(settings.clients)]
        print(f"seed {seed}: local training {min(work):.1f}..{max(work):.1f} s "
              f"(median {statistics.median(work):.1f} s); slow clients {', '.join(map(str, slow))}", flush=True)
        slow_set = set(slow.tolist())
        mine = [sync_timed(run_ours(SYNC, seed, fed, settings, package, trainer), fed, settings, speed, slow_set)]
        if flower_python is not None:
            mine.append(sync_timed(run_flower(flower_python, seed, fed, settings, package, trainer), fed, settings,
                                   speed, slow_set))
        mine.append(run_async(seed, fed, settings, package, trainer, speed, buffer, server_lr, slow_set))
        for run in mine:
            reached = run.time_to(TARGET)
            print(f"  {run.method:<16} {run.trainings} trainings ({run.slow_trainings} by slow clients), "
                  f"{len(run.times)} versions over {run.times[-1]:.0f} s "
                  f"simulated; {TARGET:.0%} at {'-' if reached is None else f'{reached:.0f} s'} "
                  f"(version {run.versions_to(TARGET) or '-'}), final accuracy {run.accuracy[-1]:.4f}"
                  + (f"; refused as too stale {run.refused}, staleness median "
                     f"{statistics.median(run.staleness) if run.staleness else 0:g} max "
                     f"{max(run.staleness, default=0)}" if run.method == ASYNC else ""), flush=True)
        runs.extend(mine)
    return runs


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def straggler_report(runs: Sequence[TimedRun], seeds: Sequence[int], settings: Settings, speeds: SpeedModel,
                     buffer: Any, server_lr: float) -> dict[str, Any]:
    """The table, the ratios sync / async, and the figures as a dict for the JSON file."""
    methods = [m for m in (SYNC, FLOWER, ASYNC) if any(r.method == m for r in runs)]
    summary: dict[str, dict[str, Any]] = {}
    print(f"\nstragglers: log-normal speeds (sigma {speeds.sigma:g}), {speeds.slow_fraction:.0%} of clients "
          f"{speeds.slowdown:g}x slower; {settings.per_round} clients at a time; async buffer K={buffer.size}, "
          f"max staleness {buffer.max_staleness}, {buffer.weighting} weighting, server lr {server_lr:g}")
    print(f"{'method':<16} {'time to ' + format(TARGET, '.0%') + ' per seed (s)':>30} {'mean':>8} "
          f"{'versions to ' + format(TARGET, '.0%'):>16} {'stays above from':>17} {'final acc':>16} "
          f"{'sim. time, all':>15} {'by slow':>8}")
    for m in methods:
        mine = [r for r in runs if r.method == m]
        reached = [r.time_to(TARGET) for r in mine]
        finals = [r.accuracy[-1] for r in mine]
        summary[m] = {
            "time_to_target": reached,
            "time_to_target_mean": _mean([t for t in reached if t is not None]) if None not in reached else None,
            "versions_to_target": [r.versions_to(TARGET) for r in mine],
            "time_held_above_target": [r.time_held(TARGET) for r in mine],
            "final_accuracy": statistics.fmean(finals),
            "final_accuracy_sd": statistics.pstdev(finals),
            "simulated_seconds": statistics.fmean([r.times[-1] for r in mine]),
            "trainings": mine[0].trainings,
            "slow_client_share": statistics.fmean([r.slow_trainings / r.trainings for r in mine]),
            "refused": sum(r.refused for r in mine),
        }
        s = summary[m]
        per_seed = ", ".join("-" if t is None else f"{t:.0f}" for t in reached)
        mean = "-" if s["time_to_target_mean"] is None else f"{s['time_to_target_mean']:.0f}"
        versions = ", ".join("-" if v is None else str(v) for v in s["versions_to_target"])
        held = ", ".join("-" if t is None else f"{t:.0f}" for t in s["time_held_above_target"])
        print(f"{m:<16} {per_seed:>30} {mean:>8} {versions:>16} {held:>17} "
              f"{s['final_accuracy']:>9.4f}±{s['final_accuracy_sd']:.4f} {s['simulated_seconds']:>14.0f}s "
              f"{s['slow_client_share']:>8.0%}")
    lines = []
    if ASYNC in summary:
        fast = summary[ASYNC]
        for m in (SYNC, FLOWER):
            if m not in summary:
                continue
            slow = summary[m]
            pairs = [(a.time_to(TARGET), b.time_to(TARGET)) for a in runs for b in runs
                     if a.method == m and b.method == ASYNC and a.seed == b.seed]
            ratios = [a / b for a, b in pairs if a is not None and b is not None]
            held = [(a.time_held(TARGET), b.time_held(TARGET)) for a in runs for b in runs
                    if a.method == m and b.method == ASYNC and a.seed == b.seed]
            held_ratios = [a / b for a, b in held if a is not None and b is not None]
            gap = fast["final_accuracy"] - slow["final_accuracy"]
            slow["speedup_of_async"] = ratios
            slow["speedup_of_async_held"] = held_ratios
            slow["final_accuracy_gap_async_minus_this"] = gap
            lines.append(f"  {m} / async time to {TARGET:.0%}: " + ", ".join(f"{r:.2f}x" for r in ratios)
                         + (f" (mean {statistics.fmean(ratios):.2f}x)" if ratios else "")
                         + "; staying above it: " + ", ".join(f"{r:.2f}x" for r in held_ratios)
                         + f"; final accuracy async - {m}: {gap * 100:+.2f} points at equal trainings")
    print("\n".join(lines))
    return {"scenario": "stragglers", "settings": settings.__dict__, "seeds": list(seeds),
            "speeds": speeds.__dict__, "buffer": buffer.describe(), "server_lr": server_lr, "summary": summary,
            "runs": [r.__dict__ for r in runs]}


def plot_stragglers(runs: Sequence[TimedRun], path: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {SYNC: "tab:blue", FLOWER: "black", ASYNC: "tab:red"}
    for run in runs:
        first = run.seed == min(r.seed for r in runs if r.method == run.method)
        ax.plot(run.times, run.accuracy, color=colours.get(run.method, "grey"), linewidth=1.2,
                linestyle="--" if run.method == FLOWER else "-", label=run.method if first else None)
    ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
    ax.set(xlabel="simulated wall-clock time (s)", ylabel="held-out accuracy", xscale="log",
           title="accuracy against time (one line per seed)")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
