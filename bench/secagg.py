"""Secure aggregation against the plain protocol, in the same run, on one core.

For each number of devices N, model size P and dropout rate, one round of each protocol is played in this
process with the project's real code: appliance/protocol (keys, Feldman-verified Shamir shares, crypto_box,
ChaCha20 masks, quantisation) and the signed messages of docs/protocol.md section 12 for the secure round,
appliance.wire's signed float32 Update for the plain one. Printed per configuration:

* **device CPU**: one device's work in the round (process time, mean over the devices that finished): secure =
  making its keys, dealing its shares, checking the shares routed to it, quantising and masking its update,
  encoding and signing its four messages, decoding the aggregator's three, answering the unmask request;
  plain = encoding and signing its update. The target at N = 100, P = 1M is 0.25 s for the secure part.
* **device bytes** sent and received (HTTP bodies; the task and the model release, the same in both, are left
  out): the secure device's upload against the plain float32 update's (target: at most 1.1x).
* **aggregator CPU**: verifying and decoding every message, summing the masked inputs, planning the unmask,
  rebuilding the secrets and removing the masks (secure); verifying, decoding and accumulating every update
  (plain).
* **round**: the whole round on one core, every device's work and the aggregator's one after the other: their
  process time summed (CPU), and the wall time of the same steps. The process pins itself to one CPU first, so
  both are one core's; on this shared machine the wall clock also counts the neighbours' load.

**Flower** (``--flower-python``, or ``$FLWR_PYTHON``: a venv with ``pip install 'flwr[simulation]'``; its
protobuf, grpc and Ray pins are not forced on the project's venv): bench/flower_secaggplus.py runs Flower's
SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) on the same N and P in its simulation engine, with the same
number of shares (k + 1) and threshold, with one actor and its whole process tree pinned to the same CPU as this
process. Printed are its round's CPU time (user + system of the process tree: ServerApp, Ray, the actor; in
brackets the ServerApp's and the actor's only, without Ray's own services, whose share grows with the wall time) and
wall time (the best of two timed rounds after a warm-up round), and Flower's over ours for each: CPU over CPU,
wall over wall, one core each. Without dropouts only (its simulated clients do not vanish mid-protocol), and
only up to ``--flower-max-clients`` (100 by default: its simulation held 1.1-2.9 GB at N <= 100 here, growing
with N).

Dropouts: that fraction of the devices vanishes after the share phase (it could not train in time): their
masks with the survivors must come off, which is what secure aggregation is for. The plain round just gets
fewer updates. N = 1000 uses the SecAgg+ graph (as every N does by default: k = 2 ceil(log2 N)).

    python bench/secagg.py                                   # N = 10, 100, 1000; P = 100k, 1M; 0 and 30 %
    python bench/secagg.py --devices 100 --params 1000000 --dropout 0 0.3 --flower-python /tmp/flwr-venv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nacl.signing import SigningKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proctree import pin_threads

from appliance import wire
from appliance.protocol import graph
from appliance.protocol import messages as m
from appliance.protocol.quantise import dequantise, levels_for, quantise
from appliance.protocol.secagg import (
    DeviceRound,
    RoutedShare,
    masked_with,
    plan_unmask,
    threshold_for,
    unmask_total,
)

ROUND = 1
CLIP = 1.0
MAX_SAMPLES = 4096
DEADLINE = 2_000_000_000


@dataclass
class Device:
    key: SigningKey
    cpu: float = 0.0
    sent: int = 0
    received: int = 0
    device: DeviceRound | None = None
    roster: m.Roster | None = None
    index: int = -1
    rejected: list[int] = field(default_factory=list)

    @property
    def device_id(self) -> str:
        return wire.key_id(self.key.verify_key)


class Clock:
    """Process time charged to a device or to the aggregator, and the wall time of all of it."""

    def __init__(self) -> None:
        self.aggregator = 0.0
        self.wall = 0.0

    def device(self, d: Device, fn, *args, **kwargs):
        started, wall_started = time.process_time(), time.perf_counter()
        out = fn(*args, **kwargs)
        d.cpu += time.process_time() - started
        self.wall += time.perf_counter() - wall_started
        return out

    def server(self, fn, *args, **kwargs):
        started, wall_started = time.process_time(), time.perf_counter()
        out = fn(*args, **kwargs)
        self.aggregator += time.process_time() - started
        self.wall += time.perf_counter() - wall_started
        return out


def _update(rng: np.random.Generator, parameters: int) -> tuple[np.ndarray, int]:
    delta = rng.normal(0, 0.3 / np.sqrt(parameters), parameters).astype(np.float32)  # norm about 0.3 < CLIP
    return delta, int(rng.integers(100, 1000))


@dataclass
class Result:
    device_cpu: float
    sent: float
    received: float
    aggregator_cpu: float
    round_seconds: float
    round_wall: float  # the same work's wall time, on the one CPU this process is pinned to
    survivors: int
    exact: bool = True  # the unmasked sum is exactly the sum of the survivors' quantised inputs


def secure_round(n: int, parameters: int, dropout: float, seed: int) -> Result:
    rng = np.random.default_rng(seed)
    clock = Clock()
    aggregator_key = SigningKey(hashlib.sha256(b"bench aggregator").digest())
    devices = [Device(SigningKey(hashlib.sha256(f"bench device {i}".encode()).digest())) for i in range(n)]
    keys = {d.device_id: d.key.verify_key for d in devices}
    gone = set(rng.permutation(n)[: round(dropout * n)].tolist())

    # advertise
    advertised = {}
    for d in devices:
        d.device = clock.device(d, DeviceRound, ROUND)
        body = clock.device(d, m.encode_advertise, m.Advertise(ROUND, d.device_id, d.device.keys), d.key)
        d.sent += len(body)
        message = clock.server(m.decode_advertise, body, keys.get)
        advertised[message.device_id] = message.keys
    ids = tuple(sorted(advertised))
    k = graph.effective_neighbours(n, None)
    roster = m.Roster(ROUND, ids, tuple(advertised[i] for i in ids), k, threshold_for(k), levels_for(n),
                      MAX_SAMPLES, CLIP, DEADLINE)
    roster_body = clock.server(m.encode_roster, roster, aggregator_key)

    # share
    dealings = {}
    for d in devices:
        d.received += len(roster_body)
        d.roster = clock.device(d, m.decode_roster, roster_body, aggregator_key.verify_key)
        d.index = d.roster.index_of(d.device_id)
        dealing = clock.device(d, d.device.deal, d.roster.setup(), d.index)
        body = clock.device(d, m.encode_shares, m.Shares(ROUND, d.device_id, dealing), d.key)
        d.sent += len(body)
        dealings[d.index] = clock.server(m.decode_shares, body, keys.get).dealing
    setup = roster.setup()

    # masked inputs. Who will count is known here already (the bench decides who drops out, and nobody deals bad
    # shares), so excluded inputs (too few holders left) are not added: the aggregator adds every input as it
    # arrives and takes those few out again, one subtraction each.
    total = np.zeros(parameters + 1, dtype=np.uint32)
    rejections, expected = {}, np.zeros(parameters + 1, dtype=np.uint32)
    by_index = {d.index: d for d in devices}
    counted = set(plan_unmask(setup, set(dealings), {v: set() for v in set(dealings) - gone}).survivors)
    for d in devices:
        shares = tuple(RoutedShare(u, dealings[u].self_commitments, dealings[u].key_commitments,
                                   dealings[u].ciphertexts[d.index]) for u in setup.graph[d.index])
        routed_body = clock.server(m.encode_routed, m.Routed(ROUND, d.device_id, d.index, shares, DEADLINE),
                                   aggregator_key)
        d.received += len(routed_body)
        routed = clock.device(d, m.decode_routed, routed_body, aggregator_key.verify_key)
        d.rejected = clock.device(d, d.device.receive, routed.shares)
        if d.index in gone:
            continue
        delta, samples = _update(rng, parameters)
        words = clock.device(d, d.device.mask, delta, samples, np.random.default_rng(d.index))
        body = clock.device(d, m.encode_masked, m.MaskedInput(ROUND, d.device_id, words, tuple(d.rejected)), d.key)
        d.sent += len(body)
        message = clock.server(m.decode_masked, body, keys.get, parameters + 1)
        rejections[d.index] = set(message.rejected)
        if d.index in counted:
            clock.server(np.add, total, message.words, total)
            # not timed: the input before masking, from the same rounding draws, to check the sum is exact
            expected += quantise(delta, samples, clip_norm=CLIP, levels=setup.levels, max_samples=MAX_SAMPLES,
                                 rng=np.random.default_rng(d.index))

    # unmask
    plan = clock.server(plan_unmask, setup, set(dealings), rejections)
    assert set(plan.survivors) == counted
    request_body = clock.server(m.encode_unmask_request,
                                m.UnmaskRequest(ROUND, tuple(plan.survivors), tuple(plan.dropped), DEADLINE),
                                aggregator_key)
    answers = {}
    for v in rejections:
        d = by_index[v]
        d.received += len(request_body)
        request = clock.device(d, m.decode_unmask_request, request_body, aggregator_key.verify_key)
        answer = clock.device(d, d.device.answer, request.survivors, request.dropped)
        body = clock.device(d, m.encode_unmask, m.Unmask(ROUND, d.device_id, answer), d.key)
        d.sent += len(body)
        answers[v] = clock.server(m.decode_unmask, body, keys.get).answer
    commitments = {u: (x.self_commitments, x.key_commitments) for u, x in dealings.items()}
    partners = clock.server(masked_with, setup, set(dealings), rejections)
    clock.server(unmask_total, total, setup, plan, partners, commitments, answers)
    clock.server(dequantise, total, clip_norm=CLIP, levels=setup.levels, max_samples=MAX_SAMPLES)
    finished = [d for d in devices if d.index not in gone]
    return Result(
        device_cpu=float(np.mean([d.cpu for d in finished])),
        sent=float(np.mean([d.sent for d in finished])),
        received=float(np.mean([d.received for d in finished])),
        aggregator_cpu=clock.aggregator, round_seconds=clock.aggregator + sum(d.cpu for d in devices),
        round_wall=clock.wall, survivors=len(plan.survivors),
        exact=bool(np.array_equal(total, expected)),
    )


def plain_round(n: int, parameters: int, dropout: float, seed: int) -> Result:
    rng = np.random.default_rng(seed)
    clock = Clock()
    aggregator_key = SigningKey(hashlib.sha256(b"bench aggregator").digest())
    devices = [Device(SigningKey(hashlib.sha256(f"bench device {i}".encode()).digest())) for i in range(n)]
    keys = {d.device_id: d.key.verify_key for d in devices}
    gone = set(rng.permutation(n)[: round(dropout * n)].tolist())
    specs = [wire.ParamSpec("w", (parameters,))]
    acc, total = np.zeros(parameters, dtype=np.float64), 0
    for i, d in enumerate(devices):
        if i in gone:
            continue
        delta, samples = _update(rng, parameters)
        update = wire.Update(d.device_id, ROUND, 0, bytes(32), samples, {"w": delta}, nonce=bytes(16),
                             created_at=1)
        body = clock.device(d, wire.encode_update, update, d.key)
        d.sent += len(body)
        received = clock.server(wire.decode_update, body, keys.get, specs)
        clock.server(lambda u=received: np.add(acc, u.tensors["w"] * np.float32(u.num_samples), out=acc))
        total += samples
        receipt = clock.server(wire.encode_receipt, wire.Receipt(d.device_id, ROUND, wire.update_digest(body)),
                               aggregator_key)
        d.received += len(receipt)
    clock.server(lambda: acc / total)
    finished = [d for i, d in enumerate(devices) if i not in gone]
    return Result(
        device_cpu=float(np.mean([d.cpu for d in finished])), sent=float(np.mean([d.sent for d in finished])),
        received=float(np.mean([d.received for d in finished])), aggregator_cpu=clock.aggregator,
        round_seconds=clock.aggregator + sum(d.cpu for d in devices), round_wall=clock.wall,
        survivors=len(finished),
    )


FLOWER_SCRIPT = Path(__file__).resolve().with_name("flower_secaggplus.py")


@dataclass
class Flower:
    """Flower's SecAgg+ round on the same N and P (best of its timed rounds), or why there is none."""

    cpu: float = 0.0  # user + system seconds of its whole process tree (ServerApp, Ray, the actor)
    compute_cpu: float = 0.0  # of that, the ServerApp's and the actor's (without Ray's own services)
    wall: float = 0.0  # with one actor and the tree pinned to one CPU
    failure: str = ""


def flower_round(python: str, n: int, parameters: int) -> Flower:
    k = graph.effective_neighbours(n, None)
    command = [python, str(FLOWER_SCRIPT), "--clients", str(n), "--params", str(parameters),
               "--shares", str(k + 1), "--threshold", str(threshold_for(k)), "--actors", "1", "--cpus", "1"]
    with tempfile.TemporaryDirectory() as scratch:  # Ray writes its session files under the working directory
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=scratch,
                                 env={**os.environ, "RAY_DEDUP_LOGS": "0"})
        except subprocess.TimeoutExpired:
            return Flower(failure="no result within an hour")
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        return Flower(failure=f"failed ({run.returncode}): "
                      f"{run.stderr.strip().splitlines()[-1:] or run.stdout[-200:]}")
    result = json.loads(lines[-1])
    cpu = min(result["round_cpu_seconds"], key=lambda parts: sum(parts.values()))
    return Flower(cpu=sum(cpu.values()), compute_cpu=cpu["serverapp"] + cpu["actors"],
                  wall=min(result["round_seconds"]))


def pin_to_one_cpu() -> int:
    """Run this process, every thread of it (and so every device and the aggregator it plays), on one CPU;
    returns which."""
    cpu = min(os.sched_getaffinity(0))
    pin_threads({cpu})
    return cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flower-python", default=os.environ.get("FLWR_PYTHON"),
                        help="the python of a venv with flwr[simulation]: also run Flower's SecAgg+ (default "
                        "$FLWR_PYTHON; without it, Flower is not run)")
    parser.add_argument("--flower-max-clients", type=int, default=100)
    args = parser.parse_args()
    cpu = pin_to_one_cpu()
    print(f"pinned to CPU {cpu}; Flower (one actor) runs pinned to it too")
    print(f"{'N':>5} {'P':>9} {'drop':>5} {'k':>3} {'t':>3} | {'device CPU s':>21} | {'device sent':>25} | "
          f"{'received':>10} | {'aggregator CPU s':>21} | {'round CPU s':>17} | {'round':>6} | "
          f"{'Flower SecAgg+ round':>27} | {'Flower / ours':>20} | sum of")
    print(f"{'':>29} | {'secure / plain':>21} | {'secure / plain (ratio)':>25} | {'secure':>10} | "
          f"{'secure / plain':>21} | {'secure / plain':>17} | {'wall s':>6} | {'CPU s (compute) / wall s':>27} | "
          f"{'CPU (compute) / wall':>20} |")
    for n in args.devices:
        for p in args.params:
            for drop in args.dropout:
                secure = secure_round(n, p, drop, args.seed)
                plain = plain_round(n, p, drop, args.seed)
                k = graph.effective_neighbours(n, None)
                flower, ratio = "-", "-"
                if args.flower_python and drop == 0 and n <= args.flower_max_clients:
                    run = flower_round(args.flower_python, n, p)
                    flower = run.failure or f"{run.cpu:.2f} ({run.compute_cpu:.2f}) / {run.wall:.2f}"
                    if not run.failure:
                        ours = secure.round_seconds
                        ratio = (f"{run.cpu / ours:.1f}x ({run.compute_cpu / ours:.1f}x) / "
                                 f"{run.wall / secure.round_wall:.1f}x")
                elif drop == 0 and args.flower_python:
                    flower = f"not run (N > {args.flower_max_clients})"
                print(
                    f"{n:>5} {p:>9} {drop:>5.0%} {k:>3} {threshold_for(k):>3} | "
                    f"{secure.device_cpu:>9.3f} / {plain.device_cpu:>9.4f} | "
                    f"{secure.sent / 1e6:>8.3f} / {plain.sent / 1e6:>6.3f} MB ({secure.sent / plain.sent:.3f}x) | "
                    f"{secure.received / 1e3:>7.1f} kB | "
                    f"{secure.aggregator_cpu:>9.2f} / {plain.aggregator_cpu:>9.2f} | "
                    f"{secure.round_seconds:>7.2f} / {plain.round_seconds:>7.2f} | {secure.round_wall:>6.2f} | "
                    f"{flower:>27} | {ratio:>20} | "
                    f"{secure.survivors} devices{'' if secure.exact else ' NOT EXACT'}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
