"""Aggregator throughput and memory against Flower, on loopback.

For each model size P and client count N: a real ``fl-aggregator serve`` process (synthetic model of P float32
parameters, FedAvg, round goal N) receives N signed updates from N simulated devices over HTTP on 127.0.0.1,
with ``--concurrency`` uploads in flight. Measured: updates/s from the first upload to the last receipt (every
update verified, hashed, decoded, fsynced to the spool and accumulated), the time to close the round and
publish the next model, and the server's peak RSS (VmHWM).

Flower on the same work, in the same run: its server-side FedAvg (``FedAvg.aggregate_fit``, in-place
aggregation, the default) on N ``FitRes`` carrying the same-shaped updates in Flower's wire form
(``ndarrays_to_parameters``), timed from the list of results to the aggregated parameters, with the peak RSS of
that process. Flower runs in its own interpreter (``--flower-python``, default ``$FLWR_PYTHON`` or this one):
flwr pins protobuf/grpc versions the project's venv should not be forced onto.

What each ratio is: **ours end to end over HTTP (network, signature, two SHA-256 passes, decode, fsync,
accumulate) versus Flower's server-side decode + FedAvg alone** (no network, no authentication, no disk).
Flower's Deployment Engine (SuperLink + N SuperNodes) is not run here; see ``--help`` and docs/aggregator.md.

    python bench/aggregator.py                          # P = 100k, 1M; N = 10, 100, 1000
    python bench/aggregator.py --params 100000 --clients 10,100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ Flower


def flower_worker(parameters: int, clients: int, seed: int = 0) -> dict[str, float]:
    """Runs inside the Flower interpreter: server-side FedAvg over ``clients`` results of ``parameters``."""
    import resource

    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy import FedAvg

    sizes = [parameters // 2, parameters - parameters // 2]  # the synthetic model's two tensors
    rng = np.random.default_rng(seed)
    pool = [[rng.normal(0, 0.01, s).astype(np.float32) for s in sizes] for _ in range(4)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results = []
    for i in range(clients):
        wire_form = ndarrays_to_parameters(pool[i % len(pool)])
        # each client's bytes are its own object, as they are when they arrive from the network
        wire_form.tensors = [bytes(bytearray(t)) for t in wire_form.tensors]
        results.append((None, FitRes(Status(Code.OK, ""), wire_form, int(rng.integers(1, 100)), {})))
    strategy = FedAvg()
    started = time.perf_counter()
    aggregated, _ = strategy.aggregate_fit(1, results, [])
    seconds = time.perf_counter() - started
    assert aggregated is not None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import flwr

    return {"seconds": seconds, "updates_per_s": clients / seconds, "peak_rss": peak, "rss_before": before,
            "version": flwr.__version__}


def run_flower(python: str, parameters: int, clients: int) -> dict[str, float] | str:
    """Flower's figures, or a sentence saying why they are missing."""
    done = subprocess.run(
        [python, __file__, "--flower-worker", str(parameters), str(clients)],
        capture_output=True, text=True, timeout=3600,
    )
    if done.returncode != 0:
        return f"Flower run failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def find_flower_python(requested: str | None) -> str | None:
    for candidate in (requested, os.environ.get("FLWR_PYTHON"), sys.executable, "/work/flwr-venv/bin/python"):
        if (candidate and shutil.which(candidate)) or (candidate and Path(candidate).exists()):
            probe = subprocess.run([candidate, "-c", "import flwr"], capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


# --------------------------------------------------------------------------------------------------- ours


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                name, value = line.split(":")
                out[name] = int(value.split()[0]) * 1024
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    out["cpu_seconds"] = (int(fields[11]) + int(fields[12])) / ticks
    return out


async def _run_ours(parameters: int, clients: int, concurrency: int, workdir: Path) -> dict[str, float]:
    import aiohttp
    import numpy as np
    from nacl.signing import SigningKey

    from aggregator.cli import load_or_create_key
    from aggregator.simulate import synthetic_package
    from aggregator.store import Store
    from appliance import wire

    state = workdir / f"state-{parameters}-{clients}"
    state.mkdir(parents=True)
    key = load_or_create_key(state)
    devices = [SigningKey.generate() for _ in range(clients)]
    store = Store(state)
    for d in devices:
        store.enroll(wire.key_id(d.verify_key), bytes(d.verify_key))
    store.close()
    specs = synthetic_package(parameters).info.param_specs
    rng = np.random.default_rng(1)
    sections = [
        wire.encode_tensors({s.name: rng.normal(0, 0.01, s.shape).astype(np.float32) for s in specs})
        for _ in range(4)
    ]
    section_digests = [wire.tensors_digest(s) for s in sections]

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (workdir / f"server-{parameters}-{clients}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
         "--synthetic-parameters", str(parameters), "--min-clients", str(clients), "--goal-clients", str(clients),
         "--round-timeout", "3600"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
            for _ in range(600):
                try:
                    async with session.get(url + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"aggregator exited; see {log.name}")
                time.sleep(0.1)
            async with session.get(url + "/v1/task") as r:
                task = wire.decode_task(await r.read(), key.verify_key)
            idle = _proc_status(proc.pid)
            gate = __import__("asyncio").Semaphore(concurrency)
            sent = 0

            async def upload(i: int) -> None:
                nonlocal sent
                device = devices[i]
                kid = wire.key_id(device.verify_key)
                payload = {
                    "v": wire.PROTOCOL_VERSION, "type": "update", "device": kid, "round": task.round_id,
                    "model_version": task.model_version, "base_digest": task.model_digest,
                    "num_samples": 1 + i % 97, "metrics": {"loss": 1.0}, "encoding": "float32",
                    "nonce": os.urandom(16), "created_at": int(time.time()),
                    "tensors_sha256": section_digests[i % len(sections)],
                }
                async with gate:
                    body = wire.sign(payload, device, kid) + sections[i % len(sections)]
                    async with session.post(url + "/v1/updates", data=body,
                                            headers={"Content-Type": wire.CONTENT_TYPE}) as r:
                        answer = await r.read()
                        if r.status != 200:
                            raise RuntimeError(f"upload {i} refused: {r.status} {answer[:200]!r}")
                        sent += 1

            asyncio = __import__("asyncio")
            started = time.perf_counter()
            await asyncio.gather(*(upload(i) for i in range(clients)))
            upload_seconds = time.perf_counter() - started
            async with session.get(url + "/v1/task", params={"after": str(task.round_id), "wait": "60"}) as r:
                if r.status != 200:
                    raise RuntimeError("the round did not close after all updates arrived")
            close_seconds = time.perf_counter() - started - upload_seconds
            busy = _proc_status(proc.pid)
            async with session.get(url + "/metrics") as r:
                scraped = _histogram_means(await r.text())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    shutil.rmtree(state, ignore_errors=True)
    return {
        "updates_per_s": clients / upload_seconds,
        "upload_seconds": upload_seconds,
        "close_seconds": close_seconds,
        "peak_rss": busy["VmHWM"],
        "idle_rss": idle["VmRSS"],
        "server_cpu_ms_per_update": 1000 * (busy["cpu_seconds"] - idle["cpu_seconds"]) / clients,
        "update_bytes": len(sections[0]),
        "verify_ms": 1000 * scraped.get("fl_aggregator_verify_seconds", 0.0),
        "spool_ms": 1000 * scraped.get("fl_aggregator_spool_seconds", 0.0),
    }


def _histogram_means(text: str) -> dict[str, float]:
    """Mean of each histogram in a Prometheus text exposition (sum / count)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.endswith("_sum"):
            sums[name[:-4]] = float(value)
        elif name.endswith("_count"):
            counts[name[:-6]] = float(value)
    return {k: sums[k] / counts[k] for k in sums if counts.get(k)}


def run_ours(parameters: int, clients: int, concurrency: int, workdir: Path) -> dict[str, float]:
    import asyncio

    sys.path.insert(0, str(ROOT))
    return asyncio.run(_run_ours(parameters, clients, concurrency, workdir))


# --------------------------------------------------------------------------------------------------- main


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--flower-worker":
        print(json.dumps(flower_worker(int(sys.argv[2]), int(sys.argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="100000,1000000", help="model sizes P (comma-separated)")
    parser.add_argument("--clients", default="10,100,1000", help="client counts N (comma-separated)")
    parser.add_argument("--concurrency", type=int, default=8, help="uploads in flight")
    parser.add_argument("--flower-python", help="interpreter with flwr installed (default $FLWR_PYTHON or this one)")
    parser.add_argument("--no-flower", action="store_true", help="measure only the fl-edge aggregator")
    parser.add_argument("--flower-max-bytes", type=float, default=8e9,
                        help="skip Flower runs whose results would hold more than this many bytes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    flower_python = None if args.no_flower else find_flower_python(args.flower_python)
    if not args.no_flower and flower_python is None:
        print("flwr not found (pip install flwr into a venv and pass --flower-python); measuring ours only")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fl-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        for p in (int(x) for x in args.params.split(",")):
            for n in (int(x) for x in args.clients.split(",")):
                ours = run_ours(p, n, args.concurrency, Path(tmp))
                flower: dict[str, float] | str = "not run"
                if flower_python is not None:
                    if 4 * p * n * 2 > args.flower_max_bytes:
                        flower = f"skipped: holding {n} results needs ~{4 * p * n * 2 / 1e9:.0f} GB"
                    else:
                        flower = run_flower(flower_python, p, n)
                rows.append({"parameters": p, "clients": n, "ours": ours, "flower": flower})
                line = (f"P={p:>9,} N={n:>5}  ours {ours['updates_per_s']:7.1f} upd/s  peak RSS {_mb(ours['peak_rss'])}"
                        f"  close {ours['close_seconds']:.2f} s  cpu {ours['server_cpu_ms_per_update']:.1f} ms/upd"
                        f"  verify {ours['verify_ms']:.1f} ms  spool {ours['spool_ms']:.1f} ms")
                if isinstance(flower, dict):
                    ratio = ours["updates_per_s"] / flower["updates_per_s"]
                    line += (f"  | Flower FedAvg {flower['updates_per_s']:7.1f} upd/s"
                             f" peak RSS {_mb(flower['peak_rss'])}"
                             f"  | ratio {ratio:.2f}x (ours end-to-end HTTP vs Flower server-side decode+FedAvg)")
                else:
                    line += f"  | Flower: {flower}"
                print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
