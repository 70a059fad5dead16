"""Federated-learning quality: our FedAvg and FedAdam against Flower's FedAvg, on a non-IID split of digits;
with ``--dp``, our central differential privacy against Flower's, at the same noise.

The data: scikit-learn's bundled digits (1,797 8x8 images, offline), a stratified held-out test set, and the
rest split over ``--clients`` clients by a Dirichlet(``--alpha``) draw per class (alpha 0.3: most clients hold
a few classes). Every round the same ``--per-round`` clients (a seeded draw) train the same MLP with the same
hyper-parameters, in the same run, for every method:

* **local training, both sides**: the reference package ``digits-mlp`` (``flctl.model.build_reference_package``);
  its ONNX training graph run by ``appliance.trainer.Trainer`` with the package's optimiser (SGD, momentum
  0.9), ``--epochs`` local epochs, batch ``--batch``, learning rate ``--lr``, the same seed per (client, round).
  Only aggregation and the wire differ between methods.
* **ours**: each round the aggregator signs a model release (``wire.encode_model_release``); each device
  verifies and decodes it, trains, and encodes its delta as a signed update (``wire.encode_update``, float32,
  float16 or int8); the aggregator verifies and decodes it (``aggregator.verify.decode_delta``, so quantisation
  is real) and streams it into the strategy (``aggregator.strategies``: ``FedAvg`` or ``FedAdam``, ``add`` per
  update, then ``aggregate`` and ``apply``). In process: no HTTP.
* **Flower** (flwr, a bench-only dependency in its own interpreter: ``--flower-python`` or ``$FLWR_PYTHON``):
  what runs is Flower's server-side code: ``flwr.server.strategy.FedAvg.aggregate_fit`` (its in-place
  sample-weighted mean of the clients' parameters), its NumPy tensor serialisation
  (``ndarrays_to_parameters`` / ``parameters_to_ndarrays``) and its protobuf serde for the messages. Not run:
  Flower's client sampling, transport (gRPC), SuperLink/SuperNodes or simulation engine (Ray).

Bytes on the wire, per round (one hop, payload only: no HTTP/gRPC framing):

* ours: **up** = the sum of the signed update bodies (COSE_Sign1 envelope + tensor section) as POSTed;
  **down** = the signed model release x participants.
* Flower: **up** = each client's ``FitRes`` as the ``RecordDict`` the Deployment Engine carries
  (``fitres_to_recorddict`` then ``serde.recorddict_to_proto(...).SerializeToString()``); **down** = the
  ``FitIns`` the same way, x participants. Message metadata and the extra hops of the Deployment Engine
  (SuperNode <-> ClientApp) are not counted.

``--seeds`` repeats everything with other splits and training seeds: the spread across seeds is the noise
against which "ours matches Flower" is judged.

``--dp`` measures differential privacy instead (docs/fl-quality.md, "Differential privacy"): 300 clients of 4-5
images each (each client's class mix drawn from Dirichlet(alpha): split per class, 1,437 images cannot give
hundreds of clients data), 150 drawn per round, 20 rounds. For noise multipliers chosen so that the run spends
epsilon 1, 3 and 8 (delta 1e-5), the same participants, local training and clip norm on both sides:

* **ours**: the path above with FedAvg made private by ``aggregator.privacy.make_private`` (server-side clip,
  weight 1 per device, Gaussian noise of std z*S on the sum), the devices clipping as the agent does; epsilon
  from ``aggregator.privacy.epsilon``, as the aggregator reports it: no amplification by sampling, since the
  real aggregator lets any device that asks join. Beside it, for information only, what dp-accounting gives if
  each round were a Poisson sample at the bench's rate: not what fl-edge claims.
* **Flower**: ``DifferentialPrivacyServerSideFixedClipping`` around its ``FedAvg`` (clip each update to S, the
  sample-weighted mean, noise of std z*S/n on it), with ``configure_fit`` and ``aggregate_fit`` run for real on
  the round's drawn clients. It reports no epsilon.
* a reference: ours without DP or clipping;
* with ``--dp-adaptive-clip GAMMA``, also ours with adaptive clipping (``serve --dp-adaptive-clip``, starting at
  the clip norm) at each noise multiplier, so at the same epsilon, against ours at the fixed clip norm
  (docs/privacy.md, "Adaptive clipping").

    .venv/bin/python bench/fl_quality.py --flower-python /path/to/flwr-venv/bin/python
    .venv/bin/python bench/fl_quality.py --clients 4 --per-round 4 --rounds 2 --seeds 1   # a smoke run
    .venv/bin/python bench/fl_quality.py --dp --flower-python /path/to/flwr-venv/bin/python

``--downlink`` measures the compressed downlink instead: bytes per device per round (up + down) and final
accuracy for float32 updates with full float32 models against int8 updates with full, float16, int8 and sparse
model deltas (``fl-aggregator serve --downlink``); bench/fl_downlink.py says how.

    .venv/bin/python bench/fl_quality.py --downlink

``--stragglers`` measures simulated wall-clock time to 90 % with slow devices instead: synchronous FedAvg (ours
and Flower's) against buffered asynchronous aggregation (FedBuff, ``fl-aggregator serve --mode async``);
bench/fl_stragglers.py says how (docs/fl-quality.md, "Stragglers").

    .venv/bin/python bench/fl_quality.py --stragglers --flower-python /path/to/flwr-venv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.90
OUR_METHODS = {  # name -> (strategy, wire encoding)
    "ours-fedavg-f32": ("fedavg", "float32"),
    "ours-fedavg-f16": ("fedavg", "float16"),
    "ours-fedavg-int8": ("fedavg", "int8"),
    "ours-fedadam-f32": ("fedadam", "float32"),
    "ours-fedadam-int8": ("fedadam", "int8"),
}
FLOWER = "flower-fedavg"
DEFAULT_METHODS = [*OUR_METHODS, FLOWER]


# ------------------------------------------------------------------------------------------------- framing
# The Flower worker runs in another interpreter; the two sides exchange npz files, length-prefixed, over pipes.


def send(stream: BinaryIO, arrays: dict[str, Any]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    data = buf.getvalue()
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def receive(stream: BinaryIO) -> dict[str, np.ndarray]:
    head = stream.read(8)
    if len(head) != 8:
        raise EOFError("the other side closed the pipe")
    (size,) = struct.unpack("<Q", head)
    with np.load(io.BytesIO(stream.read(size)), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _arrays(msg: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    count = sum(1 for k in msg if k.startswith(prefix))
    return [msg[f"{prefix}{j}"] for j in range(count)]


# ------------------------------------------------------------------------------------- Flower (its venv)


def flower_worker(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Runs inside the Flower interpreter: holds the global parameters in Flower's form and aggregates."""
    import flwr
    from flwr.common import (
        Code,
        FitIns,
        FitRes,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
        serde,
    )
    from flwr.compat.common import recorddict_compat as compat
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto
    from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

    logging.getLogger("flwr").setLevel(logging.ERROR)  # its advice on unused options would drown the table
    init = receive(stdin)
    parameters = ndarrays_to_parameters(_arrays(init, "p"))
    strategy: Strategy = FedAvg(fraction_fit=1.0, min_fit_clients=1, min_available_clients=1,
                                initial_parameters=parameters)
    sampled = int(init["dp_sampled"]) if "dp_sampled" in init else 0
    if sampled:  # --dp: Flower's central DP, server-side clipping, around its FedAvg
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, float(init["dp_noise_multiplier"]), float(init["dp_clip_norm"]), sampled)
    parameters = strategy.initialize_parameters(client_manager=None)  # type: ignore[arg-type]
    send(stdout, {"version": flwr.__version__})
    server_round = 0
    while True:
        try:
            msg = receive(stdin)
        except EOFError:
            return
        op = str(msg["op"])
        if op == "fit_ins":
            server_round += 1
            if sampled:  # the wrapper keeps the round's parameters in configure_fit, to clip the updates against
                pairs = strategy.configure_fit(server_round, parameters, SampledClients(sampled))  # type: ignore[arg-type]
                fit_ins = pairs[0][1]
            else:
                fit_ins = FitIns(parameters, {"server_round": server_round})
            down = serde.recorddict_to_proto(compat.fitins_to_recorddict(fit_ins, keep_input=True))
            send(stdout, {"fit_ins_bytes": len(down.SerializeToString()),
                          **{f"p{j}": a for j, a in enumerate(parameters_to_ndarrays(parameters))}})
        elif op == "fit_res":
            results, up_bytes = [], []
            for i in range(int(msg["clients"])):
                fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(_arrays(msg, f"c{i}_")),
                                 int(msg[f"n{i}"]), {})
                wire_form = serde.recorddict_to_proto(compat.fitres_to_recorddict(fit_res, keep_input=True))
                data = wire_form.SerializeToString()
                up_bytes.append(len(data))
                # the server works on what it received: parse the bytes back, as the SuperLink would
                received = RecordDictProto()
                received.ParseFromString(data)
                results.append((None, compat.recorddict_to_fitres(serde.recorddict_from_proto(received),
                                                                  keep_input=False)))
            aggregated, _ = strategy.aggregate_fit(server_round, results, [])
            if aggregated is None:
                raise RuntimeError("Flower's FedAvg returned no parameters")
            parameters = aggregated
            send(stdout, {"up_bytes": np.array(up_bytes, dtype=np.int64),
                          **{f"p{j}": a for j, a in enumerate(parameters_to_ndarrays(parameters))}})
        else:
            raise ValueError(f"unknown op {op!r}")


class SampledClients:
    """What Flower's ``configure_fit`` asks of a ClientManager, for a round whose clients the bench has already
    drawn (the same draw for every method): that many clients, available and sampled."""

    def __init__(self, count: int):
        self.count = count

    def num_available(self) -> int:
        return self.count

    def sample(self, num_clients: int, min_num_clients: int | None = None) -> list[None]:
        return [None] * num_clients


@dataclass(frozen=True)
class Privacy:
    """One setting of the --dp comparison, the same for ours and Flower's: Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm`` on the sum of the deltas, each clipped to ``clip_norm``."""

    noise_multiplier: float
    clip_norm: float
    delta: float
    adaptive_quantile: float | None = None  # ours only: adaptive clipping from clip_norm (--dp-adaptive-clip)


class FlowerServer:
    """The parent's handle on the Flower worker process."""

    def __init__(self, python: str, initial: Sequence[np.ndarray], privacy: Privacy | None = None,
                 sampled_clients: int = 0):
        self.proc = subprocess.Popen([python, __file__, "--flower-worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        init: dict[str, Any] = {f"p{j}": a for j, a in enumerate(initial)}
        if privacy is not None:
            init.update(dp_noise_multiplier=privacy.noise_multiplier, dp_clip_norm=privacy.clip_norm,
                        dp_sampled=sampled_clients)
        send(self.stdin, init)
        self.version = str(receive(self.stdout)["version"])

    def fit_ins(self) -> tuple[list[np.ndarray], int]:
        """The global parameters as Flower hands them to clients, and the FitIns bytes per client."""
        send(self.stdin, {"op": "fit_ins"})
        msg = receive(self.stdout)
        return _arrays(msg, "p"), int(msg["fit_ins_bytes"])

    def fit_res(self, results: Sequence[tuple[Sequence[np.ndarray], int]]) -> tuple[list[int], list[np.ndarray]]:
        """Hand the clients' new parameters and sample counts to Flower's FedAvg: the bytes of each FitRes
        and the aggregated parameters."""
        arrays: dict[str, Any] = {"op": "fit_res", "clients": len(results)}
        for i, (params, n) in enumerate(results):
            arrays[f"n{i}"] = n
            arrays.update({f"c{i}_{j}": a for j, a in enumerate(params)})
        send(self.stdin, arrays)
        msg = receive(self.stdout)
        return [int(b) for b in msg["up_bytes"]], _arrays(msg, "p")

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=30)


def find_flower_python(requested: str | None) -> str | None:
    """An interpreter that can import flwr: the one asked for, $FLWR_PYTHON, or this one."""
    for candidate in (requested, os.environ.get("FLWR_PYTHON"), sys.executable):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import flwr"], capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


# --------------------------------------------------------------------------------------------------- data


@dataclass
class Federation:
    """One seed's data: each client's sample indices, and the held-out set."""

    x: np.ndarray
    y: np.ndarray
    clients: list[np.ndarray]
    x_test: np.ndarray
    y_test: np.ndarray


def dirichlet_split(y: np.ndarray, clients: int, alpha: float, rng: np.random.Generator,
                    min_size: int = 8) -> list[np.ndarray]:
    """Per class, shares drawn from Dirichlet(alpha) over the clients (the usual label-skew split). Redrawn
    until every client holds at least ``min_size`` samples, so every client can train."""
    if clients < 1 or alpha <= 0:
        raise ValueError(f"need clients >= 1 and alpha > 0, got {clients} and {alpha}")
    if clients * min_size > len(y):
        raise ValueError(f"{len(y)} samples cannot give {clients} clients {min_size} samples each")
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.array(sorted(p), dtype=np.int64) for p in parts]
    raise RuntimeError(f"no Dirichlet({alpha}) split gave every one of {clients} clients {min_size} samples")


def client_mix_split(y: np.ndarray, clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Clients of equal size (within one sample), each with its own class mix drawn from Dirichlet(alpha) and
    filled from it without replacement (Hsu et al. 2019, "Measuring the effects of non-identical data
    distribution for federated visual classification"). The same label skew per client as
    :func:`dirichlet_split`, for federations too large for it: split per class, 1,437 images cannot give each of
    300 clients a sample."""
    if clients < 1 or alpha <= 0:
        raise ValueError(f"need clients >= 1 and alpha > 0, got {clients} and {alpha}")
    if clients > len(y):
        raise ValueError(f"{len(y)} samples cannot give {clients} clients one sample each")
    classes = np.unique(y)
    pools = [rng.permutation(np.flatnonzero(y == label)).tolist() for label in classes]
    sizes = np.full(clients, len(y) // clients)
    sizes[: len(y) % clients] += 1
    parts = []
    for size in sizes:
        mix = rng.dirichlet(np.full(len(classes), alpha))
        mine = []
        for _ in range(size):
            left = np.array([len(pool) > 0 for pool in pools], dtype=np.float64)
            weights = mix * left
            weights = weights / weights.sum() if weights.sum() > 0 else left / left.sum()  # its classes ran out
            mine.append(pools[rng.choice(len(classes), p=weights)].pop())
        parts.append(np.array(sorted(mine), dtype=np.int64))
    return parts


def make_federation(clients: int, alpha: float, seed: int, test_fraction: float = 0.2,
                    client_mix: bool = False) -> Federation:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # the package's input range [0, 1]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                                        random_state=seed)
    split = client_mix_split if client_mix else dirichlet_split
    parts = split(y_train, clients, alpha, np.random.default_rng(seed))
    return Federation(x_train, y_train, parts, x_test, y_test)


# ------------------------------------------------------------------------------------------------- runs


@dataclass
class Settings:
    clients: int
    per_round: int
    rounds: int
    epochs: int
    batch: int
    lr: float
    alpha: float
    fedadam_eta: float
    fedadam_tau: float


@dataclass
class Run:
    """One method's curve for one seed."""

    method: str
    seed: int
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    up_bytes: list[int] = field(default_factory=list)
    down_bytes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    final: np.ndarray | None = field(default=None, repr=False)  # the last global parameters, flat
    clip_norms: list[float] = field(default_factory=list)  # adaptive clipping: the clip norm of each round

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "final"}

    def rounds_to(self, target: float) -> int | None:
        return next((i + 1 for i, a in enumerate(self.accuracy) if a >= target), None)


def participants(settings: Settings, seed: int, round_no: int) -> list[int]:
    """The round's clients: the same seeded draw for every method."""
    rng = np.random.default_rng([seed, round_no])
    return sorted(rng.choice(settings.clients, size=settings.per_round, replace=False).tolist())


def client_seed(seed: int, round_no: int, client: int) -> int:
    return (seed * 1_000_003 + round_no) * 1_009 + client


@dataclass(frozen=True)
class SignedFleet:
    """The keys of one simulated run, derived from its seed so that every method signs alike: the aggregator's,
    one per client, and the device id -> verify key lookup the aggregator's decoder takes."""

    aggregator_key: Any  # nacl SigningKey (imported lazily: Flower's interpreter loads this module too)
    device_keys: list[Any]
    device_ids: list[str]
    registry: dict[str, Any]


def signed_fleet(clients: int, seed: int) -> SignedFleet:
    from nacl.signing import SigningKey

    from appliance.identity import device_id_for

    device_keys = [SigningKey(hashlib.sha256(f"device {seed} {c}".encode()).digest()) for c in range(clients)]
    device_ids = [device_id_for(k.verify_key) for k in device_keys]
    registry = {d: k.verify_key for d, k in zip(device_ids, device_keys, strict=True)}
    return SignedFleet(SigningKey(bytes(range(32))), device_keys, device_ids, registry)


def run_ours(method: str, seed: int, fed: Federation, settings: Settings, package: Any, trainer: Any,
             privacy: Privacy | None = None) -> Run:
    """Devices and aggregator of fl-edge, in process, every message through appliance.wire. With ``privacy``:
    FedAvg made private as ``fl-aggregator serve --dp central`` makes it (aggregator.privacy.make_private), the
    devices clipping their deltas as the agent does; with its ``adaptive_quantile``, the clip norm moves each
    round as ``--dp-adaptive-clip`` moves it (aggregator/adaptive_clip.py)."""

    from aggregator.adaptive_clip import AdaptiveClip, next_clip_norm
    from aggregator.models import Layout
    from aggregator.privacy import DPConfig, clip_round, make_private
    from aggregator.strategies import UpdateSet, make_strategy
    from aggregator.verify import decode_delta
    from appliance import wire
    from appliance.agent import clip_update

    strategy_name, encoding = OUR_METHODS[method] if privacy is None else ("fedavg", "float32")
    options = {"eta": settings.fedadam_eta, "tau": settings.fedadam_tau} if strategy_name == "fedadam" else {}
    strategy = make_strategy(strategy_name, **options)
    clip_norm = 0.0
    adaptive = None
    if privacy is not None:
        if privacy.adaptive_quantile is not None:
            adaptive = AdaptiveClip(privacy.adaptive_quantile)
        make_private(strategy, privacy.clip_norm, DPConfig(privacy.noise_multiplier, privacy.delta, adaptive=adaptive))
        clip_norm = privacy.clip_norm
    specs = [wire.ParamSpec(s.name, tuple(s.shape)) for s in package.param_specs]
    layout = Layout(specs)
    fleet = signed_fleet(settings.clients, seed)
    aggregator_key, device_keys, device_ids, registry = (fleet.aggregator_key, fleet.device_keys, fleet.device_ids,
                                                         fleet.registry)
    limits = wire.Limits()
    global_flat = layout.flatten(package.initial_params)
    run = Run(method, seed)
    started = time.perf_counter()
    for round_no in range(1, settings.rounds + 1):
        release, digest = wire.encode_model_release(
            wire.ModelRelease(round_no - 1, package.digest, layout.unflatten(global_flat)), aggregator_key)
        picked = participants(settings, seed, round_no)
        strategy.start_round(layout.size)
        if adaptive is not None:
            clip_round(strategy, clip_norm)
            run.clip_norms.append(clip_norm)
        deltas, weights, up, norms = [], [], 0, []
        for c in picked:
            # device: verify the release against the pinned key, train, sign the delta
            params = wire.decode_model_release(release, aggregator_key.verify_key, specs, limits).tensors
            idx = fed.clients[c]
            result = trainer.train(params, fed.x[idx], fed.y[idx], settings.epochs, settings.batch, settings.lr,
                                   seed=client_seed(seed, round_no, c), measure=False)
            delta, norm = clip_update(result.delta, clip_norm)  # the agent's own clipping (0: none)
            norms.append(norm)
            body = wire.encode_update(wire.Update(device_ids[c], round_no, round_no - 1, digest, result.num_samples,
                                                  delta, dict(result.metrics), encoding), device_keys[c])
            up += len(body)
            # aggregator: verify, decode (dequantise) against the layout, stream into the strategy
            update, flat, _ = decode_delta(body, registry.get, layout, limits)
            strategy.add(flat, float(update.num_samples))
            deltas.append(flat)
            weights.append(update.num_samples)
        aggregated = strategy.aggregate(UpdateSet(deltas, np.array(weights)))
        global_flat = strategy.apply(global_flat, aggregated)
        if adaptive is not None and privacy is not None:
            clip_norm = next_clip_norm(clip_norm, norms, adaptive.target_quantile, adaptive.learning_rate,
                                       adaptive.count_stddev_for(privacy.noise_multiplier)).next_clip_norm
        scores = trainer.evaluate(layout.unflatten(global_flat), fed.x_test, fed.y_test)
        run.accuracy.append(scores["accuracy"])
        run.loss.append(scores["loss"])
        run.up_bytes.append(up)
        run.down_bytes.append(len(release) * len(picked))
    run.seconds = time.perf_counter() - started
    run.final = global_flat
    return run


def run_flower(python: str, seed: int, fed: Federation, settings: Settings, package: Any, trainer: Any,
               privacy: Privacy | None = None, method: str = FLOWER) -> Run:
    """Flower's FedAvg (in its own interpreter) aggregating clients trained by our Trainer; with ``privacy``,
    wrapped in its ``DifferentialPrivacyServerSideFixedClipping`` (the clients send unclipped weights)."""
    names = [s.name for s in package.param_specs]
    server = FlowerServer(python, [package.initial_params[n] for n in names], privacy, settings.per_round)
    run = Run(method, seed)
    started = time.perf_counter()
    try:
        for round_no in range(1, settings.rounds + 1):
            arrays, fit_ins_bytes = server.fit_ins()
            params = dict(zip(names, arrays, strict=True))
            picked = participants(settings, seed, round_no)
            results = []
            for c in picked:
                idx = fed.clients[c]
                result = trainer.train(params, fed.x[idx], fed.y[idx], settings.epochs, settings.batch,
                                       settings.lr, seed=client_seed(seed, round_no, c), measure=False)
                results.append(([params[n] + result.delta[n] for n in names], result.num_samples))
            up, arrays = server.fit_res(results)
            scores = trainer.evaluate(dict(zip(names, arrays, strict=True)), fed.x_test, fed.y_test)
            run.accuracy.append(scores["accuracy"])
            run.loss.append(scores["loss"])
            run.up_bytes.append(sum(up))
            run.down_bytes.append(fit_ins_bytes * len(picked))
    finally:
        server.close()
    run.seconds = time.perf_counter() - started
    run.final = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32)
    return run


# ------------------------------------------------------------------------------------------------ report


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def curves(runs: Sequence[Run], method: str) -> np.ndarray:
    """Accuracy per round, one row per seed."""
    return np.array([r.accuracy for r in runs if r.method == method])


def summarise(runs: Sequence[Run], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        mine = [r for r in runs if r.method == m]
        if not mine:
            continue
        reached = [r.rounds_to(TARGET) for r in mine]
        to_target = [sum(r.up_bytes[:n]) for r, n in zip(mine, reached, strict=True) if n is not None]
        out[m] = {
            "final_accuracy": _mean([r.accuracy[-1] for r in mine]),
            "final_accuracy_sd": statistics.pstdev([r.accuracy[-1] for r in mine]),
            "final_loss": _mean([r.loss[-1] for r in mine]),
            "best_accuracy": _mean([max(r.accuracy) for r in mine]),
            "rounds_to_target": reached,
            "rounds_to_target_mean": _mean([n for n in reached if n is not None]) if None not in reached else None,
            "up_bytes_per_round": _mean([_mean(r.up_bytes) for r in mine]),
            "down_bytes_per_round": _mean([_mean(r.down_bytes) for r in mine]),
            "up_bytes_to_target": _mean(to_target) if len(to_target) == len(mine) else None,
            "seconds": _mean([r.seconds for r in mine]),
        }
    return out


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def print_report(runs: Sequence[Run], methods: Sequence[str], settings: Settings, seeds: Sequence[int],
                 flower_version: str | None) -> dict[str, Any]:
    present = [m for m in methods if any(r.method == m for r in runs)]
    print(f"\naccuracy on the held-out set per round (mean of {len(seeds)} seed(s)):")
    print("round  " + "  ".join(f"{m:>17}" for m in present))
    for i in range(settings.rounds):
        row = [float(curves(runs, m)[:, i].mean()) for m in present]
        print(f"{i + 1:>5}  " + "  ".join(f"{a:>17.4f}" for a in row))
    summary = summarise(runs, present)
    target = f"{TARGET:.0%}"
    print(f"\n{'method':<18} {'final acc':>15} {'loss':>6} {'best':>7} {'rounds to ' + target:>15} {'up/round':>10} "
          f"{'down/round':>11} {'up to ' + target:>11} {'seconds':>8}")
    for m, s in summary.items():
        reached = ",".join("-" if n is None else str(n) for n in s["rounds_to_target"])
        print(f"{m:<18} {s['final_accuracy']:>8.4f}±{s['final_accuracy_sd']:.4f} {s['final_loss']:>6.3f} "
              f"{s['best_accuracy']:>7.4f} "
              f"{reached:>15} {_fmt_bytes(s['up_bytes_per_round']):>10} "
              f"{_fmt_bytes(s['down_bytes_per_round']):>11} {_fmt_bytes(s['up_bytes_to_target']):>11} "
              f"{s['seconds']:>8.1f}")
    verdicts = compare(runs, summary)
    for line in verdicts["lines"]:
        print(line)
    return {"settings": settings.__dict__, "seeds": list(seeds), "flower_version": flower_version,
            "summary": summary, "comparison": {k: v for k, v in verdicts.items() if k != "lines"},
            "runs": [r.figures() for r in runs]}


def compare(runs: Sequence[Run], summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Our FedAvg against Flower's (gap vs seed-to-seed noise), and who beats Flower on rounds or bytes."""
    out: dict[str, Any] = {"lines": ["\nagainst Flower's FedAvg:"]}
    ours = curves(runs, "ours-fedavg-f32")
    if FLOWER not in summary:
        out["lines"].append("  (Flower not run)")
        return out
    flower = curves(runs, FLOWER)
    if len(ours):
        gap = float(np.abs(ours - flower).max())
        noise = float(flower.std(axis=0).mean()) if len(flower) > 1 else None
        pairs = [(a.final, b.final) for a in runs for b in runs if a.method == "ours-fedavg-f32"
                 and b.method == FLOWER and a.seed == b.seed and a.final is not None and b.final is not None]
        weight_gap = max(float(np.abs(a - b).max()) for a, b in pairs) if pairs else float("nan")
        out.update(max_gap=gap, noise=noise, max_weight_gap=weight_gap)
        noise_text = f"{noise:.4f}" if noise is not None else "n/a (one seed)"
        out["lines"].append(
            f"  ours-fedavg-f32 vs flower-fedavg, same seed: largest accuracy gap over all rounds {gap:.4f}; "
            f"seed-to-seed noise (mean per-round s.d. of Flower's curve) {noise_text}"
            + ("" if noise is None else f" -> {'within' if gap <= noise else 'OUTSIDE'} noise"))
        out["lines"].append(f"  largest difference between the two final global models: {weight_gap:.3g} "
                            "(float32 rounding of the two weighted means)")
    base = summary[FLOWER]
    for m, s in summary.items():
        if m == FLOWER:
            continue
        bytes_ratio = base["up_bytes_per_round"] / s["up_bytes_per_round"]
        rounds_b, rounds_m = base["rounds_to_target_mean"], s["rounds_to_target_mean"]
        rounds = "-" if rounds_b is None or rounds_m is None else f"{rounds_b / rounds_m:.2f}x"
        to_target = ("-" if base["up_bytes_to_target"] is None or s["up_bytes_to_target"] is None
                     else f"{base['up_bytes_to_target'] / s['up_bytes_to_target']:.2f}x")
        both_ratio = ((base["up_bytes_per_round"] + base["down_bytes_per_round"])
                      / (s["up_bytes_per_round"] + s["down_bytes_per_round"]))
        out[m] = {"up_bytes_ratio": bytes_ratio, "up_down_bytes_ratio": both_ratio, "rounds_ratio": rounds,
                  "up_to_target_ratio": to_target}
        out["lines"].append(f"  {m:<18} Flower/ours: up bytes per round {bytes_ratio:.2f}x (up+down "
                            f"{both_ratio:.2f}x), rounds to {TARGET:.0%} {rounds}, "
                            f"up bytes to {TARGET:.0%} {to_target}")
    return out


def plot(runs: Sequence[Run], methods: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        acc = curves(runs, m)
        if not len(acc):
            continue
        loss = np.array([r.loss for r in runs if r.method == m])
        x = np.arange(1, acc.shape[1] + 1)
        style = {"linestyle": "--", "linewidth": 2.5, "color": "black"} if m == FLOWER else {"linewidth": 1.5}
        line = acc_ax.plot(x, acc.mean(axis=0), label=m, **style)[0]
        if len(acc) > 1:
            acc_ax.fill_between(x, acc.min(axis=0), acc.max(axis=0), color=line.get_color(), alpha=0.12)
        loss_ax.plot(x, loss.mean(axis=0), label=m, **style)
    acc_ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
    acc_ax.set(xlabel="round", ylabel="held-out accuracy", title="accuracy (band: min-max over seeds)")
    loss_ax.set(xlabel="round", ylabel="held-out cross-entropy", title="loss", yscale="log")
    acc_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ differential privacy
# --dp: DP-FedAvg as the aggregator runs it, against Flower's DifferentialPrivacyServerSideFixedClipping around
# its FedAvg, at the same clip norm, noise multiplier and participants, on the same split.

DP_TARGETS = "1,3,8"
DP_REFERENCE = "ours-fedavg-f32"  # no DP, no clipping: what the privacy costs
DP_DEFAULTS = {"clients": 300, "per_round": 150, "rounds": 20, "epochs": 5, "seeds": 3}
QUALITY_DEFAULTS = {"clients": 20, "per_round": 10, "rounds": 40, "epochs": 2, "seeds": 3}


def ours_dp(z: float, adaptive: bool = False) -> str:
    return f"ours z={z:g}" + (" adaptive" if adaptive else "")


def flower_dp(z: float) -> str:
    return f"flower z={z:g}"


def noise_multiplier_for(target: float, rounds: int, delta: float) -> float:
    """The noise multiplier, rounded up to 0.01, whose epsilon after ``rounds`` noised rounds is at most
    ``target``, as the aggregator accounts it (``aggregator.privacy.epsilon``: no sampling amplification)."""
    from aggregator.privacy import epsilon

    low, high = 0.01, 1000.0
    if epsilon([high] * rounds, delta) > target:
        raise ValueError(f"no noise multiplier up to {high:g} gives epsilon {target:g} over {rounds} rounds")
    while high - low > 0.002:
        mid = (low + high) / 2
        if epsilon([mid] * rounds, delta) <= target:
            high = mid
        else:
            low = mid
    return math.ceil(high * 100) / 100


def poisson_epsilon(noise_multiplier: float, rounds: int, rate: float, delta: float) -> float:
    """For information only, NOT what fl-edge claims: the epsilon dp-accounting's RDP accountant gives if every
    round were a Poisson sample of the clients at ``rate`` (amplification by sampling). The aggregator lets any
    device that asks join a round, so it accounts without amplification (``aggregator.privacy.epsilon``)."""
    import dp_accounting
    from dp_accounting import rdp

    # It warns for each fractional RDP order whose series does not converge and leaves that order out; the
    # epsilon of the remaining orders is still a valid bound.
    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
                       rounds)
    return float(accountant.get_epsilon(delta))


@dataclass
class DPSetting:
    """One noise level of the --dp comparison, with what each side can say about its privacy."""

    target: float | None  # the epsilon the noise multiplier was chosen for (None: given with --dp-noise-multipliers)
    privacy: Privacy
    epsilon: list[float]  # ours, after each round: aggregator.privacy.epsilon, as /v1/status and releases say
    epsilon_if_poisson: float  # information only: with amplification at the bench's participation rate


def dp_settings(noise_multipliers: Sequence[float], targets: Sequence[float | None], clip_norm: float,
                delta: float, settings: Settings) -> list[DPSetting]:
    from aggregator.privacy import epsilon

    rate = settings.per_round / settings.clients
    out = []
    for z, target in zip(noise_multipliers, targets, strict=True):
        spent = [epsilon([z] * r, delta) for r in range(1, settings.rounds + 1)]
        out.append(DPSetting(target, Privacy(z, clip_norm, delta), spent,
                             poisson_epsilon(z, settings.rounds, rate, delta)))
    return out


def _last(values: Sequence[float], count: int = 5) -> float:
    return statistics.fmean(values[-count:])


def print_dp_report(runs: Sequence[Run], dps: Sequence[DPSetting], settings: Settings, seeds: Sequence[int],
                    flower_version: str | None, adaptive_quantile: float | None = None) -> dict[str, Any]:
    zs = [d.privacy.noise_multiplier for d in dps]
    columns = [DP_REFERENCE] + [m for z in zs for m in (ours_dp(z), flower_dp(z), ours_dp(z, adaptive=True))]
    present = [m for m in columns if any(r.method == m for r in runs)]
    print(f"\naccuracy on the held-out set per round (mean of {len(seeds)} seed(s)); {DP_REFERENCE} is without DP:")
    print("round  " + "  ".join(f"{m:>16}" for m in present) + "  " +
          "  ".join(f"{'eps z=' + format(z, 'g'):>12}" for z in zs))
    for i in range(settings.rounds):
        accuracy = [float(curves(runs, m)[:, i].mean()) for m in present]
        print(f"{i + 1:>5}  " + "  ".join(f"{a:>16.4f}" for a in accuracy) + "  "
              + "  ".join(f"{d.epsilon[i]:>12.3f}" for d in dps))
    reference = curves(runs, DP_REFERENCE)
    print(f"\nclip norm {dps[0].privacy.clip_norm:g}, delta {dps[0].privacy.delta:g}, {settings.per_round} of "
          f"{settings.clients} clients per round (rate {settings.per_round / settings.clients:.3g}); without DP: "
          f"final accuracy {reference[:, -1].mean():.4f}")
    print(f"{'target':>6} {'z':>6} {'noise/coord':>11} {'ours final':>15} {'Flower final':>15} {'gap':>7} "
          f"{'gap last 5':>10} {'ours epsilon':>12} {'if Poisson*':>11} {'Flower epsilon':>14}")
    rows = []
    for d in dps:
        z = d.privacy.noise_multiplier
        ours, flower = curves(runs, ours_dp(z)), curves(runs, flower_dp(z))
        row: dict[str, Any] = {
            "target_epsilon": d.target, "noise_multiplier": z,
            "noise_std_on_mean": z * d.privacy.clip_norm / settings.per_round,
            "ours_final_accuracy": float(ours[:, -1].mean()), "ours_final_accuracy_sd": float(ours[:, -1].std()),
            "ours_last5_accuracy": float(np.mean([_last(a) for a in ours])),
            "epsilon": d.epsilon[-1], "epsilon_per_round": d.epsilon, "epsilon_if_poisson": d.epsilon_if_poisson,
        }
        if len(flower):
            row.update(flower_final_accuracy=float(flower[:, -1].mean()),
                       flower_final_accuracy_sd=float(flower[:, -1].std()),
                       flower_last5_accuracy=float(np.mean([_last(a) for a in flower])))
            row["gap"] = row["ours_final_accuracy"] - row["flower_final_accuracy"]
            row["gap_last5"] = row["ours_last5_accuracy"] - row["flower_last5_accuracy"]
            # same split, participants and local training per seed: only the noise draws differ, so the paired
            # differences' standard error says how far the gap could be from zero by the noise alone
            paired = ours[:, -1] - flower[:, -1]
            row["gap_se"] = float(paired.std(ddof=1) / math.sqrt(len(paired))) if len(paired) > 1 else None
        rows.append(row)
        flower_text = (f"{row['flower_final_accuracy']:>8.4f}±{row['flower_final_accuracy_sd']:.4f}" if len(flower)
                       else f"{'-':>15}")
        gaps = f"{row['gap']:>+7.4f} {row['gap_last5']:>+10.4f}" if len(flower) else f"{'-':>7} {'-':>10}"
        print(f"{'-' if d.target is None else format(d.target, 'g'):>6} {z:>6g} {row['noise_std_on_mean']:>11.3g} "
              f"{row['ours_final_accuracy']:>8.4f}±{row['ours_final_accuracy_sd']:.4f} {flower_text} {gaps} "
              f"{d.epsilon[-1]:>12.3f} {d.epsilon_if_poisson:>11.3f} {'none' if len(flower) else '-':>14}")
    print("  ours epsilon: what the aggregator reports (/v1/status, fl_aggregator_dp_epsilon, each signed release):\n"
          "  dp-accounting RDP, one Gaussian mechanism per round, NO sampling amplification (any device may join).\n"
          "  * if Poisson: for information only, NOT claimed: dp-accounting with Poisson sampling at the bench's "
          "participation rate.\n  Flower's wrapper adds the noise and reports no epsilon.")
    lines = []
    for row in rows:
        if "gap" not in row:
            continue
        within = abs(row["gap"]) <= 0.01
        se = row["gap_se"]
        noise = ("" if se is None else f"; standard error of the paired gap {se:.4f}: the gap is "
                 f"{'within' if abs(row['gap']) <= 2 * se else 'OUTSIDE'} 2 s.e. of the noise")
        lines.append(f"  z={row['noise_multiplier']:g}: ours - Flower = {row['gap']:+.4f} final "
                     f"({row['gap_last5']:+.4f} over the last 5 rounds): {'within' if within else 'NOT within'} "
                     f"1 point{noise}")
    print("\nagainst Flower's DifferentialPrivacyServerSideFixedClipping(FedAvg), same noise:")
    print("\n".join(lines) if lines else "  (Flower not run)")
    if adaptive_quantile is not None:
        _adaptive_report(runs, dps, rows, adaptive_quantile)
    return {"settings": settings.__dict__, "seeds": list(seeds), "flower_version": flower_version,
            "clip_norm": dps[0].privacy.clip_norm, "delta": dps[0].privacy.delta,
            "reference_final_accuracy": float(reference[:, -1].mean()), "dp": rows,
            "runs": [r.figures() for r in runs]}


def _adaptive_report(runs: Sequence[Run], dps: Sequence[DPSetting], rows: list[dict[str, Any]],
                     quantile: float) -> None:
    """--dp-adaptive-clip: ours with the clip norm following a quantile against ours at the fixed clip norm, at
    the same noise multiplier z and so the same epsilon (the ledger composes both of a round's mechanisms in
    dp-accounting; they are worth one of multiplier z)."""
    from aggregator.adaptive_clip import AdaptiveClip
    from aggregator.privacy import DPConfig, epsilon

    printed = False
    for d, row in zip(dps, rows, strict=True):
        z = d.privacy.noise_multiplier
        adaptive_runs = [r for r in runs if r.method == ours_dp(z, adaptive=True)]
        if not adaptive_runs:
            continue
        if not printed:
            print(f"\nadaptive clipping (quantile {quantile:g}, from clip norm "
                  f"{d.privacy.clip_norm:g}) against the fixed clip norm, same z and epsilon:")
            printed = True
        adaptive, fixed = curves(runs, ours_dp(z, adaptive=True)), curves(runs, ours_dp(z))
        config = DPConfig(z, d.privacy.delta, adaptive=AdaptiveClip(quantile))
        assert config.count_noise_multiplier is not None
        rounds = len(d.epsilon)
        spent = epsilon([config.model_noise_multiplier] * rounds + [config.count_noise_multiplier] * rounds,
                        d.privacy.delta)
        final_clips = [r.clip_norms[-1] for r in adaptive_runs]
        paired = adaptive[:, -1] - fixed[:, -1]
        se = float(paired.std(ddof=1) / math.sqrt(len(paired))) if len(paired) > 1 else None
        row.update(adaptive_final_accuracy=float(adaptive[:, -1].mean()),
                   adaptive_final_accuracy_sd=float(adaptive[:, -1].std()),
                   adaptive_gap=float(paired.mean()), adaptive_gap_se=se, adaptive_epsilon=spent,
                   adaptive_model_noise_multiplier=config.model_noise_multiplier,
                   adaptive_clip_norms=[r.clip_norms for r in adaptive_runs])
        print(f"  z={z:g}: adaptive {row['adaptive_final_accuracy']:.4f}±{row['adaptive_final_accuracy_sd']:.4f}, "
              f"fixed {row['ours_final_accuracy']:.4f}: {row['adaptive_gap']:+.4f}"
              + ("" if se is None else f" (s.e. {se:.4f})")
              + f"; clip norm after the last round {min(final_clips):.3g}..{max(final_clips):.3g}; sum noised at "
              f"z_delta {config.model_noise_multiplier:.4g}; epsilon {spent:.3f} (fixed: {d.epsilon[-1]:.3f})")


def plot_dp(runs: Sequence[Run], dps: Sequence[DPSetting], path: Path, title: str) -> None:
    """Accuracy per round at each noise level (ours solid, Flower dashed), and ours against the epsilon spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (round_ax, eps_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    reference = curves(runs, DP_REFERENCE)
    x = np.arange(1, reference.shape[1] + 1)
    round_ax.plot(x, reference.mean(axis=0), color="black", linestyle=":", label="ours, no DP")
    for i, d in enumerate(dps):
        z, color = d.privacy.noise_multiplier, f"C{i}"
        ours, flower = curves(runs, ours_dp(z)), curves(runs, flower_dp(z))
        round_ax.plot(x, ours.mean(axis=0), color=color, label=f"ours z={z:g} (eps {d.epsilon[-1]:.2g})")
        eps_ax.plot(d.epsilon, ours.mean(axis=0), color=color, marker=".", label=f"ours z={z:g}")
        if len(flower):
            round_ax.plot(x, flower.mean(axis=0), color=color, linestyle="--", label=f"Flower z={z:g}")
            eps_ax.plot([d.epsilon[-1]], [flower[:, -1].mean()], color=color, marker="x", markersize=9,
                        linestyle="none", label=f"Flower z={z:g}, final (reports no epsilon)")
    round_ax.set(xlabel="round", ylabel="held-out accuracy", ylim=(0, 1), title="accuracy per round")
    eps_ax.set(xlabel=f"epsilon spent at delta {dps[0].privacy.delta:g} (no sampling amplification)",
               ylabel="held-out accuracy", xscale="log", ylim=(0, 1),
               title="accuracy against the epsilon the aggregator reports")
    spent = [e for d in dps for e in d.epsilon]
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 3, 5, 8, 10, 20, 50, 100) if min(spent) <= t <= max(spent) * 1.1]
    eps_ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    eps_ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    round_ax.legend(fontsize=7, loc="best")
    eps_ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--flower-worker"]:
        flower_worker(sys.stdin.buffer, sys.stdout.buffer)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, help="clients in the federation (20; --dp: 300)")
    ap.add_argument("--per-round", type=int, help="clients drawn each round (10; --dp: 150)")
    ap.add_argument("--rounds", type=int, help="rounds (40; --dp: 20)")
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the label split")
    ap.add_argument("--epochs", type=int, help="local epochs per round (2; --dp: 5)")
    ap.add_argument("--batch", type=int, default=16, help="local batch size")
    ap.add_argument("--lr", type=float, default=0.05, help="local learning rate (SGD, momentum 0.9)")
    ap.add_argument("--fedadam-eta", type=float, default=0.03,
                    help="FedAdam server learning rate (chosen from 0.01/0.03/0.1 on seeds 10-12, not the seeds run)")
    ap.add_argument("--fedadam-tau", type=float, default=1e-3, help="FedAdam adaptivity")
    ap.add_argument("--seeds", type=int, help="repeat with this many splits/training seeds (3)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, from {', '.join(DEFAULT_METHODS)} (not with --dp)")
    ap.add_argument("--dp", action="store_true",
                    help="differential privacy: ours (fl-aggregator's --dp central) against Flower's "
                    "DifferentialPrivacyServerSideFixedClipping at the same noise")
    ap.add_argument("--clip-norm", type=float, default=0.5,
                    help="--dp: L2 clip norm of each delta (0.5: chosen from 0.5/1/2 on seed 10, not a seed run)")
    ap.add_argument("--dp-epsilons", default=DP_TARGETS,
                    help="--dp: the epsilons over the run that choose the noise multipliers (default 1,3,8)")
    ap.add_argument("--dp-noise-multipliers", help="--dp: these noise multipliers instead of --dp-epsilons")
    ap.add_argument("--dp-delta", type=float, default=1e-5, help="--dp: the delta epsilon is given at")
    ap.add_argument("--dp-adaptive-clip", type=float, metavar="GAMMA",
                    help="--dp: also run ours with adaptive clipping to the GAMMA quantile, from --clip-norm, at "
                    "each noise level (the same epsilon)")
    ap.add_argument("--downlink", action="store_true",
                    help="compressed downlink: bytes per device per round and final accuracy, float32 updates and "
                    "models against int8 updates with full/float16/int8/sparse model deltas (bench/fl_downlink.py)")
    ap.add_argument("--stragglers", action="store_true",
                    help="stragglers: simulated time to 90 %% for sync FedAvg (ours, Flower's) and async FedBuff "
                    "(ours), device speeds log-normal with a slow fraction (bench/fl_stragglers.py)")
    ap.add_argument("--buffer", type=int, default=5, help="--stragglers: async buffer K (5)")
    ap.add_argument("--max-staleness", type=int, default=10,
                    help="--stragglers: async staleness bound (10, as fl-aggregator serve)")
    ap.add_argument("--staleness-weight", choices=("constant", "polynomial"), default="polynomial",
                    help="--stragglers: async staleness weighting (polynomial: (1 + s)^-0.5)")
    ap.add_argument("--server-lr", type=float, default=1.0, help="--stragglers: async FedAvg server learning rate")
    ap.add_argument("--speed-sigma", type=float, default=0.5,
                    help="--stragglers: sigma of the log-normal device speeds (median 1)")
    ap.add_argument("--slow-fraction", type=float, default=0.3, help="--stragglers: fraction of slowed clients")
    ap.add_argument("--slowdown", type=float, default=10.0, help="--stragglers: how much slower they are")
    ap.add_argument("--flower-python", help="interpreter with flwr (default $FLWR_PYTHON, then this one)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fl-quality",
                    help="directory for the plot and the JSON figures")
    args = ap.parse_args(argv)
    for name, default in (DP_DEFAULTS if args.dp else QUALITY_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(DEFAULT_METHODS))
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(DEFAULT_METHODS)}")
    if not 1 <= args.per_round <= args.clients:
        ap.error(f"--per-round must be between 1 and --clients ({args.clients}), got {args.per_round}")
    if args.rounds < 1 or args.seeds < 1 or args.epochs < 1 or args.batch < 1:
        ap.error("--rounds, --seeds, --epochs and --batch must be >= 1")
    settings = Settings(args.clients, args.per_round, args.rounds, args.epochs, args.batch, args.lr, args.alpha,
                        args.fedadam_eta, args.fedadam_tau)
    sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
    if args.downlink:
        return _downlink(args, settings)
    if args.stragglers:
        return _stragglers(ap, args, settings)
    dps: list[DPSetting] = []
    if args.dp:
        dps = _dp_settings_from(ap, args, settings)
        methods = [DP_REFERENCE, FLOWER]

    flower_python = None
    if FLOWER in methods:
        flower_python = find_flower_python(args.flower_python)
        if flower_python is None:
            print("flwr not found (pip install flwr into a venv and pass --flower-python or set FLWR_PYTHON); "
                  "running ours only")
            methods.remove(FLOWER)

    # what runs for each seed: (method, None) or, with --dp, ours without DP then each noise level on both sides
    jobs: list[tuple[str, Privacy | None]] = [(m, None) for m in methods]
    if args.dp:
        jobs = [(DP_REFERENCE, None)] + [(m, d.privacy) for d in dps for m in ("ours", FLOWER)
                                         if m != FLOWER or flower_python is not None]
        if args.dp_adaptive_clip is not None:  # the same noise levels, the clip norm moving from --clip-norm
            jobs += [("ours", replace(d.privacy, adaptive_quantile=args.dp_adaptive_clip)) for d in dps]

    from appliance.trainer import Trainer
    from flctl.model import build_reference_package

    package, _ = build_reference_package("mlp")
    trainer = Trainer(package, threads=1)
    seeds = list(range(args.seeds))
    split = "each client's class mix" if args.dp else "per class"
    print(f"digits, Dirichlet(alpha={args.alpha}, {split}) over {args.clients} clients, {args.per_round} per round, "
          f"{args.rounds} rounds, seeds {seeds}; model {package.name} "
          f"({sum(s.size for s in package.param_specs):,} parameters), local: {args.epochs} epochs, batch "
          f"{args.batch}, SGD lr {args.lr} momentum {package.optimizer.get('momentum', 0)}"
          + (f"; FedAdam eta {args.fedadam_eta} tau {args.fedadam_tau}" if not args.dp else
             f"; DP clip norm {args.clip_norm:g}, noise multipliers "
             f"{', '.join(format(d.privacy.noise_multiplier, 'g') for d in dps)}, delta {args.dp_delta:g}"))
    runs: list[Run] = []
    flower_version = None
    started = time.perf_counter()
    for seed in seeds:
        fed = make_federation(args.clients, args.alpha, seed, client_mix=args.dp)
        sizes = [len(c) for c in fed.clients]
        print(f"seed {seed}: client sizes {min(sizes)}..{max(sizes)} samples, "
              f"classes per client {statistics.median(len(np.unique(fed.y[c])) for c in fed.clients)} median, "
              f"held-out {len(fed.y_test)}", flush=True)
        for m, privacy in jobs:
            if m == FLOWER:
                assert flower_python is not None
                name = FLOWER if privacy is None else flower_dp(privacy.noise_multiplier)
                run = run_flower(flower_python, seed, fed, settings, package, trainer, privacy, name)
            elif privacy is None:
                run = run_ours(m, seed, fed, settings, package, trainer)
            else:
                name = ours_dp(privacy.noise_multiplier, privacy.adaptive_quantile is not None)
                run = run_ours(name, seed, fed, settings, package, trainer, privacy)
            runs.append(run)
            print(f"  {run.method:<18} final accuracy {run.accuracy[-1]:.4f}, rounds to {TARGET:.0%} "
                  f"{run.rounds_to(TARGET) or '-'}, {run.seconds:.1f} s", flush=True)
        if flower_version is None and flower_python is not None:
            flower_version = _flower_version(flower_python)
    args.out.mkdir(parents=True, exist_ok=True)
    flower_text = f"; Flower {flower_version}" if flower_version else ""
    if args.dp:
        report = print_dp_report(runs, dps, settings, seeds, flower_version, args.dp_adaptive_clip)
        png, js = args.out / "fl_quality_dp.png", args.out / "fl_quality_dp.json"
        plot_dp(runs, dps, png, f"digits, DP-FedAvg: {args.clients} clients, {args.per_round}/round, clip "
                f"{args.clip_norm:g}, delta {args.dp_delta:g}, {len(seeds)} seed(s){flower_text}")
    else:
        report = print_report(runs, methods, settings, seeds, flower_version)
        png, js = args.out / "fl_quality.png", args.out / "fl_quality.json"
        plot(runs, methods, png, f"digits, Dirichlet({args.alpha}) over {args.clients} clients, "
             f"{args.per_round}/round, {len(seeds)} seed(s){flower_text}")
    js.write_text(json.dumps(report, indent=1))
    print(f"\nplot: {png}\nfigures: {js}\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def _dp_settings_from(ap: argparse.ArgumentParser, args: argparse.Namespace, settings: Settings) -> list[DPSetting]:
    """The noise levels to compare: from --dp-noise-multipliers, or solved from --dp-epsilons."""
    from aggregator.adaptive_clip import AdaptiveClip
    from aggregator.privacy import DPConfig, PrivacyError

    if not args.clip_norm > 0:
        ap.error(f"--clip-norm must be positive, got {args.clip_norm}")
    try:
        if args.dp_noise_multipliers:
            zs = [float(z) for z in args.dp_noise_multipliers.split(",")]
            targets: list[float | None] = [None] * len(zs)
        else:
            targets = [float(e) for e in args.dp_epsilons.split(",")]
            if not all(e > 0 for e in targets):
                ap.error(f"--dp-epsilons must be positive, got {args.dp_epsilons}")
            zs = [noise_multiplier_for(e, settings.rounds, args.dp_delta) for e in targets]  # type: ignore[arg-type]
        for z in zs:
            DPConfig(z, args.dp_delta).check_population(settings.clients)
            if args.dp_adaptive_clip is not None:
                DPConfig(z, args.dp_delta, adaptive=AdaptiveClip(args.dp_adaptive_clip))
    except (ValueError, PrivacyError) as exc:
        ap.error(str(exc))
    return dp_settings(zs, targets, args.clip_norm, args.dp_delta, settings)


def _stragglers(ap: argparse.ArgumentParser, args: argparse.Namespace, settings: Settings) -> int:
    """--stragglers: sync FedAvg (ours, Flower's) against async FedBuff (ours) in simulated wall-clock time."""
    from fl_stragglers import SpeedModel, plot_stragglers, run_stragglers, straggler_report

    from aggregator.buffered import BufferConfigError, BufferPolicy
    from appliance.trainer import Trainer
    from flctl.model import build_reference_package

    if not 0 <= args.slow_fraction <= 1 or args.slowdown < 1 or args.speed_sigma < 0:
        ap.error("--slow-fraction must be in [0, 1], --slowdown >= 1, --speed-sigma >= 0")
    try:
        buffer = BufferPolicy(args.buffer, args.max_staleness, args.staleness_weight)
    except BufferConfigError as exc:
        ap.error(str(exc))
    speeds = SpeedModel(args.speed_sigma, args.slow_fraction, args.slowdown)
    flower_python = find_flower_python(args.flower_python)
    if flower_python is None:
        print("flwr not found (pass --flower-python or set FLWR_PYTHON); running ours only")
    package, _ = build_reference_package("mlp")
    trainer = Trainer(package, threads=1)
    seeds = list(range(args.seeds))
    print(f"stragglers: digits, Dirichlet(alpha={args.alpha}) over {args.clients} clients, {args.per_round} "
          f"training at a time, {args.rounds * args.per_round} local trainings per method, seeds {seeds}; local: "
          f"{args.epochs} epochs, batch {args.batch}, SGD lr {args.lr}")
    started = time.perf_counter()
    runs = run_stragglers(lambda seed: make_federation(args.clients, args.alpha, seed), seeds, settings, package,
                          trainer, speeds, buffer, args.server_lr, flower_python)
    report = straggler_report(runs, seeds, settings, speeds, buffer, args.server_lr)
    report["flower_version"] = _flower_version(flower_python) if flower_python else None
    args.out.mkdir(parents=True, exist_ok=True)
    png, js = args.out / "fl_stragglers.png", args.out / "fl_stragglers.json"
    plot_stragglers(runs, png, f"digits, Dirichlet({args.alpha}), {args.clients} clients, "
                    f"{args.slow_fraction:.0%} {args.slowdown:g}x slower, buffer K={args.buffer}")
    js.write_text(json.dumps(report, indent=1))
    print(f"\nplot: {png}\nfigures: {js}\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def _downlink(args: argparse.Namespace, settings: Settings) -> int:
    """--downlink: bytes per device per round (up + down) and final accuracy of each downlink encoding."""
    from fl_downlink import DOWNLINK_METHODS, downlink_report, run_all

    from appliance.trainer import Trainer
    from flctl.model import build_reference_package

    package, _ = build_reference_package("mlp")
    trainer = Trainer(package, threads=1)
    seeds = list(range(args.seeds))
    print(f"downlink: digits, Dirichlet(alpha={args.alpha}) over {args.clients} clients, {args.per_round} per round, "
          f"{args.rounds} rounds, seeds {seeds}; model {package.name} "
          f"({sum(s.size for s in package.param_specs):,} parameters), FedAvg; local: {args.epochs} epochs, batch "
          f"{args.batch}, SGD lr {args.lr}")
    started = time.perf_counter()
    runs = run_all(lambda seed: make_federation(args.clients, args.alpha, seed), seeds, settings, package, trainer,
                   list(DOWNLINK_METHODS))
    report = downlink_report(runs, settings, seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    js = args.out / "fl_downlink.json"
    js.write_text(json.dumps(report, indent=1))
    print(f"\nfigures: {js}\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def _flower_version(python: str) -> str:
    done = subprocess.run([python, "-c", "import flwr; print(flwr.__version__)"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


if __name__ == "__main__":
    raise SystemExit(main())
