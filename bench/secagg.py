"""Secure aggregation against the plain protocol, in the same run, on one core.

For each number of devices N, model size P and dropout rate, one round of each protocol is played in this
process with the project's real code: appliance/protocol (keys, Feldman-verified Shamir shares, crypto_secretbox,
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
* **delivery CPU**: carrying every message over HTTP on 127.0.0.1 (aiohttp at both ends, client and server in
  this process, bodies read as the aggregator reads them), and every device's download and check of the model release
  (4 MB at P = 1M, the same in both protocols). Device and aggregator CPU above leave it out.
* **round**: the whole round on one core, every device's work, the aggregator's and delivery's one after the
  other: their process time summed (CPU), and the wall time of the same steps. The process pins itself, every
  thread of it, to one CPU first, so both are one core's; on this shared machine the wall clock also counts the
  neighbours' load. (Before every thread was pinned, OpenBLAS's helper thread, started at numpy's import, spun
  on the other core after each norm the quantiser took with np.dot and doubled our CPU figure; the quantiser
  no longer calls BLAS.)

Every figure is taken the way Flower's are: each configuration is played once untimed (a warm-up: first-touch
page faults, lazy imports, the allocator's growth), then ``--rounds`` times (2); the row is the round with the
least CPU, its wall time the least of the timed rounds'. One round of ours at N = 100, P = 1M takes ~5 s, short
enough that a neighbour's burst on this shared machine moved a single round's CPU figure by up to 20 %.

**Flower** (``--flower-python``, or ``$FLWR_PYTHON``: a venv with ``pip install 'flwr[simulation]'``; its
protobuf, grpc and Ray pins are not forced on the project's venv): bench/flower_secaggplus.py runs Flower's
SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) on the same N and P in its simulation engine, with the same
number of shares (k + 1) and threshold, with one actor and its whole process tree pinned to the same CPU as this
process, and then the same simulation without SecAgg+ (``--plain``). Its round's CPU time is user + system time
of the process tree (ServerApp, Ray, the actor; "compute": the ServerApp's and the actor's only, without Ray's
own services, whose share grows with the wall time), each the best of ``--rounds`` timed rounds after a warm-up.
Flower's round includes carrying its messages (ServerApp, in-memory state, Ray object store, the actor) and
sending the model to every client, so Flower / ours is printed for our whole round (delivery included: like for
like), for our protocol's work alone (flatters ours: Flower's message passing stays in its figure), and for what
secure aggregation adds to each side's plain round. Without dropouts only (its simulated clients do not vanish
mid-protocol), and only up to ``--flower-max-clients`` (100 by default: its simulation held 1.1-2.9 GB at
N <= 100 here, growing with N).

Dropouts: that fraction of the devices vanishes after the share phase (it could not train in time): their
masks with the survivors must come off, which is what secure aggregation is for. The plain round just gets
fewer updates. N = 1000 uses the SecAgg+ graph (as every N does by default: k = 2 ceil(log2 N)).

    python bench/secagg.py                                   # N = 10, 100, 1000; P = 100k, 1M; 0 and 30 %
    python bench/secagg.py --devices 100 --params 1000000 --dropout 0 0.3 --flower-python /tmp/flwr-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
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
from aiohttp import ClientSession, web
from nacl.signing import SigningKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proctree import pin_threads

from appliance import wire
from appliance.client import READ_BUFFER_BYTES, read_body
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
    """Process time charged to a device, to the aggregator or to delivery, and the wall time of all of it."""

    def __init__(self) -> None:
        self.aggregator = 0.0
        self.delivery = 0.0
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

    def deliver(self, fn, *args, **kwargs):
        started, wall_started = time.process_time(), time.perf_counter()
        out = fn(*args, **kwargs)
        self.delivery += time.process_time() - started
        self.wall += time.perf_counter() - wall_started
        return out


class Loopback:
    """Carries message bodies over HTTP on 127.0.0.1 with aiohttp, the stack the agent and the aggregator use,
    client and server on one event loop in this process: what moving the bytes costs both ends (the agent's
    requests, as appliance/client.py makes them; the server reads as the aggregator does, answers a Receipt's
    worth of bytes and does nothing else). Flower's round
    pays for its own message passing (ServerApp, its in-memory state, the Ray actor), so ours does too."""

    ANSWER = bytes(200)  # about a Receipt: what the aggregator answers an upload with

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._body = b""
        self._upload = np.empty(0, dtype=np.uint8)
        app = web.Application(client_max_size=2**31)
        app.router.add_post("/up", self._up)
        app.router.add_get("/down", self._down)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self._url = f"http://127.0.0.1:{port}"
        self._session = self._loop.run_until_complete(self._open())

    async def _open(self) -> ClientSession:
        return ClientSession(read_bufsize=READ_BUFFER_BYTES)

    async def _up(self, request: web.Request) -> web.Response:
        # as the aggregator reads an upload (aggregator/uploads.py): each chunk as it comes off the socket,
        # copied once into a buffer of the announced length that is kept for the next upload
        size = request.content_length or 0
        if self._upload.size < size:
            self._upload = np.empty(size, dtype=np.uint8)
        filled = 0
        while True:
            chunk, _ = await request.content.readchunk()
            if not chunk:
                break
            self._upload[filled : filled + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            filled += len(chunk)
        if filled != size:
            raise web.HTTPBadRequest(text=f"{filled} of {size} bytes")
        return web.Response(body=self.ANSWER)

    async def _down(self, request: web.Request) -> web.Response:
        return web.Response(body=self._body)

    async def _post(self, body: bytes) -> bytes:
        async with self._session.post(self._url + "/up", data=body) as response:
            answer = await response.read()
            response.raise_for_status()
            return answer

    async def _get(self) -> memoryview:
        async with self._session.get(self._url + "/down") as response:
            response.raise_for_status()
            return await read_body(response, wire.DEFAULT_LIMITS.max_bytes)

    def up(self, body: bytes) -> bytes:
        """A device's POST of ``body``; returns the body the aggregator received."""
        self._loop.run_until_complete(self._post(body))
        return body

    def down(self, body: bytes) -> memoryview:
        """A device's GET of ``body`` from the aggregator; returns the bytes it received."""
        self._body = body
        return self._loop.run_until_complete(self._get())

    def close(self) -> None:
        self._loop.run_until_complete(self._session.close())
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()


def _update(rng: np.random.Generator, parameters: int) -> tuple[np.ndarray, int]:
    delta = rng.normal(0, 0.3 / np.sqrt(parameters), parameters).astype(np.float32)  # norm about 0.3 < CLIP
    return delta, int(rng.integers(100, 1000))


def _model_release(parameters: int, aggregator_key: SigningKey) -> bytes:
    """The signed model release every device fetches before it trains (the same in both protocols)."""
    release = wire.ModelRelease(1, bytes(32), {"w": np.zeros(parameters, dtype=np.float32)}, created_at=1)
    return wire.encode_model_release(release, aggregator_key)[0]


def _download_model(carry: Loopback, body: bytes, aggregator_key) -> wire.ModelRelease:
    return wire.decode_model_release(carry.down(body), aggregator_key)


@dataclass
class Result:
    device_cpu: float
    sent: float
    received: float
    aggregator_cpu: float
    delivery: float  # HTTP on loopback for every message, and each device's download and check of the model
    round_seconds: float  # every device's CPU + the aggregator's + delivery's
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
    carry = Loopback()
    model = clock.deliver(_model_release, parameters, aggregator_key)

    # advertise
    advertised = {}
    for d in devices:
        d.device = clock.device(d, DeviceRound, ROUND)
        body = clock.device(d, m.encode_advertise, m.Advertise(ROUND, d.device_id, d.device.keys,
                                                                   d.device.cipher_key_proof(d.device_id)), d.key)
        d.sent += len(body)
        body = clock.deliver(carry.up, body)
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
        received = clock.deliver(carry.down, roster_body)
        d.roster = clock.device(d, m.decode_roster, received, aggregator_key.verify_key)
        d.index = d.roster.index_of(d.device_id)
        dealing = clock.device(d, d.device.deal, d.roster.setup(), d.index)
        body = clock.device(d, m.encode_shares, m.Shares(ROUND, d.device_id, dealing), d.key)
        d.sent += len(body)
        body = clock.deliver(carry.up, body)
        dealings[d.index] = clock.server(m.decode_shares, body, keys.get).dealing
    setup = roster.setup()

    # masked inputs. Who will count is known here already (the bench decides who drops out, and nobody deals bad
    # shares), so excluded inputs (too few holders left) are not added: the aggregator adds every input as it
    # arrives and takes those few out again, one subtraction each.
    total = np.zeros(parameters + 1, dtype=np.uint32)
    rejections, expected = {}, np.zeros(parameters + 1, dtype=np.uint32)
    by_index = {d.index: d for d in devices}
    counted = set(plan_unmask(setup, dealings, {v: () for v in set(dealings) - gone}).survivors)
    for d in devices:
        shares = tuple(RoutedShare(u, dealings[u].self_commitments, dealings[u].key_commitments,
                                   dealings[u].ciphertexts[d.index]) for u in setup.graph[d.index])
        routed_body = clock.server(m.encode_routed, m.Routed(ROUND, d.device_id, d.index, shares, DEADLINE),
                                   aggregator_key)
        d.received += len(routed_body)
        received = clock.deliver(carry.down, routed_body)
        routed = clock.device(d, m.decode_routed, received, aggregator_key.verify_key)
        d.rejected = clock.device(d, d.device.receive, routed.shares)
        if d.index in gone:
            continue
        clock.deliver(_download_model, carry, model, aggregator_key.verify_key)
        delta, samples = _update(rng, parameters)
        words = clock.device(d, d.device.mask, delta, samples, np.random.default_rng(d.index))
        accusations = clock.device(d, lambda d=d: tuple(d.device.accusation(u) for u in d.rejected))
        body = clock.device(d, m.encode_masked, m.MaskedInput(ROUND, d.device_id, words, accusations), d.key)
        d.sent += len(body)
        body = clock.deliver(carry.up, body)
        message = clock.server(m.decode_masked, body, keys.get, parameters + 1)
        rejections[d.index] = message.rejected
        if d.index in counted:
            clock.server(np.add, total, message.words, total)
            # not timed: the input before masking, from the same rounding draws, to check the sum is exact
            expected += quantise(delta, samples, clip_norm=CLIP, levels=setup.levels, max_samples=MAX_SAMPLES,
                                 rng=np.random.default_rng(d.index))

    # unmask
    plan = clock.server(plan_unmask, setup, dealings, rejections)
    assert set(plan.survivors) == counted
    request_body = clock.server(m.encode_unmask_request,
                                m.UnmaskRequest(ROUND, tuple(plan.survivors), tuple(plan.dropped), DEADLINE),
                                aggregator_key)
    answers = {}
    for v in rejections:
        d = by_index[v]
        d.received += len(request_body)
        received = clock.deliver(carry.down, request_body)
        request = clock.device(d, m.decode_unmask_request, received, aggregator_key.verify_key)
        answer = clock.device(d, d.device.answer, request.survivors, request.dropped)
        body = clock.device(d, m.encode_unmask, m.Unmask(ROUND, d.device_id, answer), d.key)
        d.sent += len(body)
        body = clock.deliver(carry.up, body)
        answers[v] = clock.server(m.decode_unmask, body, keys.get).answer
    commitments = {u: (x.self_commitments, x.key_commitments) for u, x in dealings.items()}
    partners = clock.server(masked_with, setup, set(dealings), rejections)
    clock.server(unmask_total, total, setup, plan, partners, commitments, answers)
    clock.server(dequantise, total, clip_norm=CLIP, levels=setup.levels, max_samples=MAX_SAMPLES)
    carry.close()
    finished = [d for d in devices if d.index not in gone]
    return Result(
        device_cpu=float(np.mean([d.cpu for d in finished])),
        sent=float(np.mean([d.sent for d in finished])),
        received=float(np.mean([d.received for d in finished])),
        aggregator_cpu=clock.aggregator, delivery=clock.delivery,
        round_seconds=clock.aggregator + clock.delivery + sum(d.cpu for d in devices),
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
    carry = Loopback()
    model = clock.deliver(_model_release, parameters, aggregator_key)
    acc, total = np.zeros(parameters, dtype=np.float64), 0
    for i, d in enumerate(devices):
        if i in gone:
            continue
        clock.deliver(_download_model, carry, model, aggregator_key.verify_key)
        delta, samples = _update(rng, parameters)
        update = wire.Update(d.device_id, ROUND, 0, bytes(32), samples, {"w": delta}, nonce=bytes(16),
                             created_at=1)
        body = clock.device(d, wire.encode_update, update, d.key)
        d.sent += len(body)
        body = clock.deliver(carry.up, body)
        received = clock.server(wire.decode_update, body, keys.get, specs)
        clock.server(lambda u=received: np.add(acc, u.tensors["w"] * np.float32(u.num_samples), out=acc))
        total += samples
        receipt = clock.server(wire.encode_receipt, wire.Receipt(d.device_id, ROUND, wire.update_digest(body)),
                               aggregator_key)
        d.received += len(receipt)
    clock.server(lambda: acc / total)
    carry.close()
    finished = [d for i, d in enumerate(devices) if i not in gone]
    return Result(
        device_cpu=float(np.mean([d.cpu for d in finished])), sent=float(np.mean([d.sent for d in finished])),
        received=float(np.mean([d.received for d in finished])), aggregator_cpu=clock.aggregator,
        delivery=clock.delivery, round_seconds=clock.aggregator + clock.delivery + sum(d.cpu for d in devices),
        round_wall=clock.wall, survivors=len(finished),
    )


FLOWER_SCRIPT = Path(__file__).resolve().with_name("flower_secaggplus.py")


@dataclass
class Flower:
    """Flower's round on the same N and P (best of its timed rounds), or why there is none."""

    cpu: float = 0.0  # user + system seconds of its whole process tree (ServerApp, Ray, the actor)
    compute_cpu: float = 0.0  # of that, the ServerApp's and the actor's (without Ray's own services)
    wall: float = 0.0  # with one actor and the tree pinned to one CPU
    failure: str = ""


def flower_round(python: str, n: int, parameters: int, rounds: int, plain: bool = False) -> Flower:
    """Flower's SecAgg+ round (``plain``: its FedAvg round without SecAgg+) in Flower's own venv: the best of
    ``rounds`` timed ones after a warm-up."""
    k = graph.effective_neighbours(n, None)
    command = [python, str(FLOWER_SCRIPT), "--clients", str(n), "--params", str(parameters),
               "--shares", str(k + 1), "--threshold", str(threshold_for(k)), "--actors", "1", "--cpus", "1",
               "--rounds", str(rounds), *(["--plain"] if plain else [])]
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


def flower_comparison(secure: Result, plain: Result, flower: Flower, flower_plain: Flower) -> list[str]:
    """Flower against ours, one core each, three ways: the whole round (ours with its delivery: HTTP on loopback
    and the model download, as Flower's round carries its messages and sends the model to every client); the
    protocol's work alone (ours without delivery: Flower's message passing cannot be taken out of its figure, so
    this one flatters ours); and what secure aggregation adds to each side's plain round."""
    if flower.failure:
        return [f"  Flower SecAgg+: {flower.failure}"]
    protocol = secure.round_seconds - secure.delivery
    lines = [
        f"  Flower SecAgg+ round: {flower.cpu:.2f} CPU s (ServerApp + actor {flower.compute_cpu:.2f}) / "
        f"{flower.wall:.2f} wall s",
        f"  ours, secure round:   {secure.round_seconds:.2f} CPU s / {secure.round_wall:.2f} wall s = protocol "
        f"{protocol:.2f} (devices {protocol - secure.aggregator_cpu:.2f}, aggregator {secure.aggregator_cpu:.2f}) "
        f"+ delivery {secure.delivery:.2f}",
        f"  Flower / ours, whole round:      {flower.cpu / secure.round_seconds:.1f}x CPU "
        f"({flower.compute_cpu / secure.round_seconds:.1f}x) / {flower.wall / secure.round_wall:.1f}x wall",
        f"  Flower / ours, protocol's work:  {flower.cpu / protocol:.1f}x CPU ({flower.compute_cpu / protocol:.1f}x) "
        "(our delivery left out, Flower's message passing not)",
    ]
    if flower_plain.failure:
        lines.append(f"  Flower without SecAgg+: {flower_plain.failure}")
    else:
        added, ours_added = flower.cpu - flower_plain.cpu, secure.round_seconds - plain.round_seconds
        lines += [
            f"  Flower without SecAgg+: {flower_plain.cpu:.2f} CPU s ({flower_plain.compute_cpu:.2f}) / "
            f"{flower_plain.wall:.2f} wall s; ours plain: {plain.round_seconds:.2f} CPU s",
            f"  what secure aggregation adds: Flower {added:.2f} CPU s, ours {ours_added:.2f}: "
            f"{added / ours_added:.1f}x",
        ]
    return lines


def best_round(play, rounds: int, *args) -> Result:
    """One warm-up round of ``play`` (untimed), then ``rounds`` timed ones: the one with the least CPU, and the
    least wall time of them, as Flower's figures are taken (bench/flower_secaggplus.py: a warm-up round, then
    the best of ``--rounds``). The sum must be exact in every round."""
    play(*args)
    timed = [play(*args) for _ in range(rounds)]
    best = min(timed, key=lambda r: r.round_seconds)
    best.round_wall = min(r.round_wall for r in timed)
    best.exact = all(r.exact for r in timed)
    return best


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
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed rounds per configuration, after one warm-up round, for ours and Flower's "
                        "alike; the best is printed (default 2)")
    args = parser.parse_args()
    cpu = pin_to_one_cpu()
    print(f"pinned to CPU {cpu}; Flower (one actor) runs pinned to it too")
    print(f"{'N':>5} {'P':>9} {'drop':>5} {'k':>3} {'t':>3} | {'device CPU s':>21} | {'device sent':>25} | "
          f"{'received':>10} | {'aggregator CPU s':>21} | {'delivery CPU s':>15} | {'round CPU s':>17} | "
          f"{'round':>6} | sum of")
    print(f"{'':>29} | {'secure / plain':>21} | {'secure / plain (ratio)':>25} | {'secure':>10} | "
          f"{'secure / plain':>21} | {'secure / plain':>15} | {'secure / plain':>17} | {'wall s':>6} |")
    for n in args.devices:
        for p in args.params:
            for drop in args.dropout:
                secure = best_round(secure_round, args.rounds, n, p, drop, args.seed)
                plain = best_round(plain_round, args.rounds, n, p, drop, args.seed)
                k = graph.effective_neighbours(n, None)
                print(
                    f"{n:>5} {p:>9} {drop:>5.0%} {k:>3} {threshold_for(k):>3} | "
                    f"{secure.device_cpu:>9.3f} / {plain.device_cpu:>9.4f} | "
                    f"{secure.sent / 1e6:>8.3f} / {plain.sent / 1e6:>6.3f} MB ({secure.sent / plain.sent:.3f}x) | "
                    f"{secure.received / 1e3:>7.1f} kB | "
                    f"{secure.aggregator_cpu:>9.2f} / {plain.aggregator_cpu:>9.2f} | "
                    f"{secure.delivery:>6.2f} / {plain.delivery:>6.2f} | "
                    f"{secure.round_seconds:>7.2f} / {plain.round_seconds:>7.2f} | {secure.round_wall:>6.2f} | "
                    f"{secure.survivors} devices{'' if secure.exact else ' NOT EXACT'}",
                    flush=True,
                )
                if not args.flower_python or drop != 0:
                    continue
                if n > args.flower_max_clients:
                    print(f"  Flower: not run (N > {args.flower_max_clients})")
                    continue
                flower = flower_round(args.flower_python, n, p, args.rounds)
                flower_plain = flower_round(args.flower_python, n, p, args.rounds, plain=True)
                print("\n".join(flower_comparison(secure, plain, flower, flower_plain)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
