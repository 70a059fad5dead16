"""One device's download and check of a model release from a real aggregator on loopback: CPU and peak memory.

    .venv/bin/python bench/model_download.py [--params 1000000] [--downloads 40] [--repeats 3]

An aggregator (``aggregator.app.make_app``, the server options of ``fl-aggregator serve``) publishes a synthetic
model of ``--params`` float32 parameters and runs in a process of its own, so the figures are the device's
alone. Each way of downloading runs in a fresh process of its own (its allocations are its own), taking
``--downloads`` turns of ``GET /v1/models/0`` through one long-lived ``AggregatorClient`` session, and the ways
take turns ``--repeats`` times (this machine is shared: a neighbour's load shows up as a slow repeat). Each way
adds one step to the way above it:

* **before**: appliance/client.py until this benchmark: aiohttp's ``response.read()`` (the body's chunks held in
  a list, then joined into fresh memory) with aiohttp's 64 KiB ``read_bufsize``, no size limit before reading,
  and the envelope verified twice (``decode_model_answer`` checked it, then ``decode_model_release`` again);
* **+ verified once**: ``decode_model_answer`` hands its verified envelope on (``wire.release_from``);
* **+ one buffer**: ``client.read_body``: the announced length checked against the limit first, then each
  chunk copied once into one buffer of that length;
* **now**: ``AggregatorClient.model_release`` as the agent calls it (with the client's 1 MiB ``read_bufsize``).

Every way checks the same things: the Ed25519 signature over the release, the SHA-256 of the tensor section
against the signed one, names, shapes and finiteness against the package's specs. Printed per way: process CPU
milliseconds per download (the median of each repeat: the lowest, and the highest beside it), wall milliseconds
(the lowest median), and the peak of memory allocated during one download (tracemalloc, which numpy reports
to, in turns after the timed ones; the release downloaded, 4 MB at 1M parameters, is part of it). A last row
gives a small message's cost: ``GET /v1/task`` answered 204 (no round is open).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import multiprocessing.connection
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

from nacl.signing import SigningKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import wire
from appliance.client import AggregatorClient, read_body
from appliance.protocol import downlink

KEY_SEED = hashlib.sha256(b"bench model download").digest()
AIOHTTP_DEFAULT = 2**16  # aiohttp's read_bufsize, which appliance/client.py used before


def _serve(parameters: int, port_out: multiprocessing.connection.Connection) -> None:
    """The aggregator, in its own process: publishes version 0 of a synthetic model and serves until killed."""
    from aiohttp import web

    from aggregator.app import SERVER_OPTIONS, AggregatorConfig, make_app
    from aggregator.rounds import RoundPolicy
    from aggregator.simulate import synthetic_package

    async def main() -> None:
        with tempfile.TemporaryDirectory() as state:
            config = AggregatorConfig(state_dir=Path(state), package=synthetic_package(parameters, tensors=2),
                                      key=SigningKey(KEY_SEED), policy=RoundPolicy(min_clients=1000))
            runner = web.AppRunner(make_app(config), access_log=None, **SERVER_OPTIONS)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port_out.send(runner.addresses[0][1])
            await asyncio.Event().wait()

    asyncio.run(main())


async def _before(client: AggregatorClient, specs: list[wire.ParamSpec]) -> object:
    async with client.session.get(f"{client.base_url}/v1/models/0", read_bufsize=AIOHTTP_DEFAULT) as response:
        body = await response.read()
    wire.verify(body, wire.pinned(client.aggregator_key))  # decode_model_answer, to tell a release from a delta
    return wire.decode_model_release(body, client.aggregator_key, specs)


async def _verified_once(client: AggregatorClient, specs: list[wire.ParamSpec]) -> object:
    async with client.session.get(f"{client.base_url}/v1/models/0", read_bufsize=AIOHTTP_DEFAULT) as response:
        body = await response.read()
    return downlink.decode_model_answer(body, client.aggregator_key, specs, None)


async def _one_buffer(client: AggregatorClient, specs: list[wire.ParamSpec]) -> object:
    async with client.session.get(f"{client.base_url}/v1/models/0", read_bufsize=AIOHTTP_DEFAULT) as response:
        body = await read_body(response, wire.DEFAULT_LIMITS.max_bytes)
    return downlink.decode_model_answer(body, client.aggregator_key, specs, None)


async def _now(client: AggregatorClient, specs: list[wire.ParamSpec]) -> object:
    return await client.model_release(0, specs)


async def _small(client: AggregatorClient, specs: list[wire.ParamSpec]) -> object:
    return await client.next_task(after_round=0, wait_seconds=0)


# One step at a time: each way adds one change to the one above it.
WAYS: dict[str, Callable[[AggregatorClient, list[wire.ParamSpec]], Awaitable[object]]] = {
    "before": _before,
    "+ verified once": _verified_once,
    "+ one buffer": _one_buffer,
    "now (+ read_bufsize)": _now,
    "small GET (204)": _small,
}


def _measure(way: str, url: str, parameters: int, downloads: int, out: multiprocessing.connection.Connection) -> None:
    """One way of downloading, ``downloads`` times, in this fresh process; sends its figures to ``out``."""
    from aggregator.simulate import synthetic_package

    specs = synthetic_package(parameters, tensors=2).info.param_specs
    fetch = WAYS[way]

    async def main() -> dict[str, float]:
        cpu, wall, peak = [], [], []
        async with AggregatorClient(url, SigningKey(KEY_SEED).verify_key) as client:
            held = await fetch(client, specs)  # warm-up: connection, imports
            for _ in range(downloads):
                started, wall_started = time.process_time(), time.perf_counter()
                held = await fetch(client, specs)
                cpu.append(time.process_time() - started)
                wall.append(time.perf_counter() - wall_started)
            tracemalloc.start()  # after the timed turns: tracing slows allocation down
            for _ in range(5):
                before = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                held = await fetch(client, specs)
                peak.append(tracemalloc.get_traced_memory()[1] - before)
            tracemalloc.stop()
            del held
        return {"cpu_ms": statistics.median(cpu) * 1e3, "wall_ms": statistics.median(wall) * 1e3,
                "peak_mb": max(peak) / 1e6}

    out.send(asyncio.run(main()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--downloads", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if min(args.params, args.downloads, args.repeats) < 1:
        print("bench/model_download.py: --params, --downloads and --repeats must be positive", file=sys.stderr)
        return 2
    spawn = multiprocessing.get_context("spawn")
    port_in, port_out = spawn.Pipe(duplex=False)
    server = spawn.Process(target=_serve, args=(args.params, port_out), daemon=True)
    server.start()
    try:
        url = f"http://127.0.0.1:{port_in.recv()}"
        print(f"model of {args.params} float32 parameters from a real aggregator at {url}; {args.downloads} "
              f"downloads per way and repeat, each in a fresh process; {args.repeats} repeats")
        results: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                result_in, result_out = spawn.Pipe(duplex=False)
                worker = spawn.Process(target=_measure, args=(way, url, args.params, args.downloads, result_out))
                worker.start()
                results[way].append(result_in.recv())
                worker.join()
        print(f"{'way':>20} | {'CPU ms (highest)':>16} | {'wall ms':>7} | {'peak allocated MB':>17}")
        for way, runs in results.items():
            cpu = sorted(r["cpu_ms"] for r in runs)
            print(f"{way:>20} | {cpu[0]:>6.2f} ({cpu[-1]:>6.2f}) | {min(r['wall_ms'] for r in runs):>7.2f} | "
                  f"{max(r['peak_mb'] for r in runs):>17.1f}")
    finally:
        server.kill()
        server.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
