"""Aggregator throughput and memory against Flower, on loopback.

For each model size P and client count N, a real ``fl-aggregator serve`` process (synthetic model of P float32
parameters, FedAvg, round goal N) and N simulated devices on 127.0.0.1 (``--concurrency`` requests in flight):

* **round**: every device fetches the signed task and the full model release, then uploads its signed update;
  timed from the first request until the next round's task is published (the model went out to N devices, N
  updates came in, were verified, fsynced, aggregated, and the new version was signed and published).
* **upload**: the next round, updates only (bodies prepared beforehand): updates/s from the first upload to the
  last receipt. Also the server's CPU time per update, mean verify/spool latency, and peak RSS (VmHWM).
* **bound**: in the same run, on one core of this process, what an update cannot cost less than: one SHA-256
  pass over the body, one float32 add of P values and one copy of the body (medians of repeated runs, taken
  before and after the upload round so they see the machine as the server did). Printed with the server's CPU
  per update and their ratio.

Flower, in the same run (its own interpreter: ``--flower-python`` or ``$FLWR_PYTHON``; flwr pins protobuf/grpc
versions the project's venv should not be forced onto):

* **Deployment Engine** (N <= ``--max-supernodes``): a SuperLink and N SuperNodes on loopback running a Flower
  App whose ClientApp returns the received model plus noise; the ServerApp runs FedAvg for a warm-up round, then
  one timed round (``strategy.start``). Peak RSS is sampled over the SuperLink's process tree.
* **server-side FedAvg** (every N): ``FedAvg.aggregate_fit`` (in-place aggregation, the default) on N
  ``FitRes`` in Flower's wire form (``ndarrays_to_parameters``), from the list of results to the aggregate
  (bench/flower_fedavg.py, which needs nothing of this project: Flower's interpreter does not have it).

Ratios printed: ``round`` = our round vs Flower's Deployment Engine round (the same work end to end);
``server`` = our upload path over HTTP (network, signature, one SHA-256 pass, decode, fsync, accumulate) vs
Flower's server-side decode + FedAvg alone (no network, no authentication, no disk: Flower's best case).

    python bench/aggregator.py                          # P = 100k, 1M; N = 10, 100, 1000
    python bench/aggregator.py --params 100000 --clients 10 --flower-python /path/to/venv/bin/python
    python bench/aggregator.py --params 1000000 --clients 100 --no-flower --encoding int8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proctree import descendants, process_status, status_bytes

from flctl.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
FLOWER_FEDAVG = Path(__file__).resolve().with_name("flower_fedavg.py")


def _tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants."""
    return sum(status_bytes(pid, "VmRSS") for pid in [root, *descendants(root)])


# ------------------------------------------------------------------------------------- Flower (its venv)


FLOWER_APP = {
    "pyproject.toml": """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "flbench"
version = "1.0.0"
description = "fl-edge aggregator benchmark peer"
license = "MIT"
dependencies = ["flwr>=1.20", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "flbench"

[tool.flwr.app.components]
serverapp = "flbench.server_app:app"
clientapp = "flbench.client_app:app"

[tool.flwr.app.config]
params = 100000
clients = 2
""",
    "flbench/__init__.py": "",
    "flbench/server_app.py": """\
import json
import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    p, n = int(context.run_config["params"]), int(context.run_config["clients"])
    arrays = ArrayRecord([np.zeros(p // 2, np.float32), np.zeros(p - p // 2, np.float32)])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    warm = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=1)  # every SuperNode up and connected
    started = time.time()
    strategy.start(grid=grid, initial_arrays=warm.arrays, num_rounds=1)
    print("FLBENCH " + json.dumps({"seconds": time.time() - started, "clients": n}), flush=True)
""",
    "flbench/client_app.py": """\
import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    rng = np.random.default_rng()
    arrays = [a + rng.normal(0, 0.01, a.shape).astype(np.float32) for a in msg.content["arrays"].to_numpy_ndarrays()]
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 32})})
    return Message(content=content, reply_to=msg)
""",
}


def _flower_bin(python: str, name: str) -> str:
    return str(Path(python).parent / name)


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def run_flower_deployment(python: str, parameters: int, clients: int, workdir: Path) -> dict[str, Any] | str:
    """One timed FedAvg round through Flower's SuperLink and ``clients`` SuperNodes on loopback."""
    base = workdir / f"flower-{parameters}-{clients}"
    for name, text in FLOWER_APP.items():
        (base / "app" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "app" / name).write_text(text)
    port = free_port()
    home = base / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # the SuperLink and SuperNodes start flower-superexec and flwr-* helpers by name
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{Path(python).parent}{os.pathsep}{os.environ['PATH']}"}
    logs = [(base / f"{n}.log").open("wb") for n in ("superlink", *(f"supernode{i}" for i in range(clients)))]
    procs: list[subprocess.Popen] = []

    def spawn(cmd: list[str], log: Any) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, cwd=base, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        superlink = spawn([_flower_bin(python, "flower-superlink"), "--insecure", "--database", str(base / "sl.db"),
                           "--port", str(port)], logs[0])
        _wait_listening(port, superlink)
        for i in range(clients):
            spawn([_flower_bin(python, "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                   "--port", str(free_port())], logs[i + 1])
        run = subprocess.Popen(
            [_flower_bin(python, "flwr"), "run", str(base / "app"), "bench", "--stream",
             "--run-config", f"params={parameters} clients={clients}"],
            env=env, cwd=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(run)
        peak_server = peak_all = 0
        deadline = time.monotonic() + 1800
        while run.poll() is None and time.monotonic() < deadline:
            peak_server = max(peak_server, _tree_rss(superlink.pid))
            peak_all = max(peak_all, sum(_tree_rss(p.pid) for p in procs[:-1]))
            time.sleep(0.25)
        output = run.stdout.read().decode(errors="replace") if run.stdout else ""
        for line in output.splitlines():
            if line.startswith("FLBENCH "):
                figures = json.loads(line[len("FLBENCH "):])
                return {"seconds": figures["seconds"], "updates_per_s": clients / figures["seconds"],
                        "peak_rss_superlink": peak_server, "peak_rss_all": peak_all}
        (base / "flwr-run.log").write_text(output)
        lines = [line for line in output.splitlines() if line.strip() and not set(line.strip()) <= set("─╭╮╰╯│ ")]
        return f"Flower run gave no timing ({base / 'flwr-run.log'}): " + (lines or ["(no output)"])[-1][:300]
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(2)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for log in logs:
            log.close()


def run_flower_serverside(python: str, parameters: int, clients: int) -> dict[str, Any] | str:
    done = subprocess.run([python, str(FLOWER_FEDAVG), str(parameters), str(clients)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return "Flower run failed: " + (done.stderr.strip().splitlines() or [str(done.returncode)])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def find_flower_python(requested: str | None) -> str | None:
    for candidate in (requested, os.environ.get("FLWR_PYTHON"), sys.executable):
        probe = candidate and Path(candidate).exists() and subprocess.run([candidate, "-c", "import flwr"])
        if probe and probe.returncode == 0:
            return candidate
    return None


# --------------------------------------------------------------------------------------------------- ours


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


#: The server's threads by what they do with an upload, by their kernel names (aggregator/threadnames.py); the
#: main thread is the event loop.
THREAD_STAGES = {
    "verify": "workers",  # the tensors' SHA-256, decoding into the delta, its norm
    "spool-writer": "spool",  # the spool write, fdatasync, the SQLite commit
    "spool-finisher": "accumulate",  # the strategy's add (FedAvg: multiply-add into its float32 block)
}


def _stage_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s threads summed by stage: ``event_loop`` (HTTP, the envelope's signature, the
    commit and the receipt's signature), then :data:`THREAD_STAGES`, then ``other``."""
    stages = dict.fromkeys(["event_loop", *THREAD_STAGES.values(), "other"], 0.0)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        stage = "event_loop" if tid == str(pid) else next(
            (v for k, v in THREAD_STAGES.items() if name.startswith(k)), "other"
        )
        stages[stage] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return stages


def _median_cpu_ms(work: Any, repeats: int) -> float:
    """Median thread CPU time of ``work()`` in ms (thread CPU: what it costs one core, whatever else runs)."""
    work()
    times = []
    for _ in range(repeats):
        started = time.thread_time()
        work()
        times.append(time.thread_time() - started)
    times.sort()
    return 1000 * times[len(times) // 2]


def measure_bound(body: bytes, parameters: int, repeats: int = 15) -> dict[str, float]:
    """What one update of ``body`` (``parameters`` values) cannot cost less than, on one core: one SHA-256 pass
    over the body, one float32 add of the parameters, one memory copy of the body (ms each, medians)."""
    import hashlib

    import numpy as np

    source = np.frombuffer(body, dtype=np.uint8)
    copy = np.empty_like(source)
    total = np.zeros(parameters, dtype=np.float32)
    values = np.random.default_rng(0).normal(0, 0.01, parameters).astype(np.float32)
    return {
        "sha256_ms": _median_cpu_ms(lambda: hashlib.sha256(body).digest(), repeats),
        "add_ms": _median_cpu_ms(lambda: np.add(total, values, out=total), repeats),
        "copy_ms": _median_cpu_ms(lambda: np.copyto(copy, source), repeats),
    }


def _bound_of(samples: list[dict[str, float]]) -> dict[str, float]:
    steps = {name: sorted(s[name] for s in samples)[len(samples) // 2] for name in samples[0]}
    bound = steps["sha256_ms"] + steps["add_ms"] + steps["copy_ms"]
    return {**steps, "bound_ms": bound}


async def _run_ours(
    parameters: int, clients: int, concurrency: int, workdir: Path, encoding: str = "float32"
) -> dict[str, float]:
    import aiohttp
    import numpy as np
    from nacl.signing import SigningKey

    from aggregator.cli import init_state, load_key
    from aggregator.simulate import synthetic_package
    from aggregator.store import Store
    from appliance import wire

    state = workdir / f"state-{parameters}-{clients}"
    init_state(state)
    key = load_key(state)
    devices = [SigningKey.generate() for _ in range(clients)]
    store = Store(state)
    for d in devices:
        store.enroll(wire.key_id(d.verify_key), bytes(d.verify_key))
    store.close()
    specs = synthetic_package(parameters).info.param_specs
    rng = np.random.default_rng(1)
    sections = [
        wire.encode_tensors({s.name: rng.normal(0, 0.01, s.shape).astype(np.float32) for s in specs}, encoding)
        for _ in range(4)
    ]
    digests = [wire.tensors_digest(s) for s in sections]
    port = free_port()
    log = (workdir / f"server-{parameters}-{clients}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
         "--synthetic-parameters", str(parameters), "--min-clients", str(clients), "--goal-clients", str(clients),
         "--round-timeout", "3600", "--encoding", encoding],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def body(i: int, task: wire.Task) -> bytes:
        device = devices[i]
        kid = wire.key_id(device.verify_key)
        payload = {
            "v": wire.PROTOCOL_VERSION, "type": "update", "device": kid, "round": task.round_id,
            "model_version": task.model_version, "base_digest": task.model_digest, "num_samples": 1 + i % 97,
            "metrics": {"loss": 1.0}, "encoding": encoding, "nonce": os.urandom(16), "created_at": int(time.time()),
            "tensors_sha256": digests[i % len(sections)],
        }
        return wire.sign(payload, device, kid) + sections[i % len(sections)]

    try:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
            for _ in range(600):
                try:
                    async with session.get(url + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"aggregator exited; see {log.name}")
                await asyncio.sleep(0.1)
            gate = asyncio.Semaphore(concurrency)

            async def post(data: bytes) -> None:
                async with session.post(url + "/v1/updates", data=data,
                                        headers={"Content-Type": wire.CONTENT_TYPE}) as r:
                    answer = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"upload refused: {r.status} {answer[:200]!r}")

            async def next_task(after: int) -> wire.Task:
                async with session.get(url + "/v1/task", params={"after": str(after), "wait": "60"}) as r:
                    if r.status != 200:
                        raise RuntimeError(f"no round after {after}")
                    return wire.decode_task(await r.read(), key.verify_key)

            # Round 1: the whole cycle per device (task, model, update) until the next version is out.
            async def device_cycle(i: int) -> None:
                async with gate:
                    async with session.get(url + "/v1/task") as r:
                        task = wire.decode_task(await r.read(), key.verify_key)
                    async with session.get(url + f"/v1/models/{task.model_version}") as r:
                        await r.read()
                    await post(body(i, task))

            idle = process_status(proc.pid)
            started = time.perf_counter()
            await asyncio.gather(*(device_cycle(i) for i in range(clients)))
            second = await next_task(1)
            round_seconds = time.perf_counter() - started

            # Round 2: uploads only.
            async def upload(i: int) -> None:
                async with gate:
                    await post(body(i, second))

            sample = body(0, second)
            bounds = [measure_bound(sample, parameters)]
            before = process_status(proc.pid)
            stages_before = _stage_cpu(proc.pid)
            started = time.perf_counter()
            await asyncio.gather(*(upload(i) for i in range(clients)))
            upload_seconds = time.perf_counter() - started
            received = process_status(proc.pid)
            stages_received = _stage_cpu(proc.pid)
            await next_task(second.round_id)
            close_seconds = time.perf_counter() - started - upload_seconds
            after = process_status(proc.pid)
            bounds.append(measure_bound(sample, parameters))
            async with session.get(url + "/metrics") as r:
                scraped = _histogram_means(await r.text())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    shutil.rmtree(state, ignore_errors=True)
    return {
        "round_seconds": round_seconds,
        "round_updates_per_s": clients / round_seconds,
        "updates_per_s": clients / upload_seconds,
        "upload_seconds": upload_seconds,
        "close_seconds": close_seconds,
        "peak_rss": after["VmHWM"],
        "idle_rss": idle["VmRSS"],
        "server_cpu_ms_per_update": 1000 * (after["cpu_seconds"] - before["cpu_seconds"]) / clients,
        "ingest_cpu_ms_per_update": 1000 * (received["cpu_seconds"] - before["cpu_seconds"]) / clients,
        **{f"{stage}_cpu_ms_per_update": 1000 * (stages_received[stage] - stages_before[stage]) / clients
           for stage in stages_before},
        **_bound_of(bounds),
        "encoding": encoding,
        "update_bytes": len(sample),
        "verify_ms": 1000 * scraped.get("fl_aggregator_verify_seconds", 0.0),
        "spool_ms": 1000 * scraped.get("fl_aggregator_spool_seconds", 0.0),
    }


def run_ours(
    parameters: int, clients: int, concurrency: int, workdir: Path, encoding: str = "float32"
) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    return asyncio.run(_run_ours(parameters, clients, concurrency, workdir, encoding))


def bound_line(ours: dict[str, Any]) -> str:
    """The server's CPU per update next to the bound measured in the same run, and their ratios."""
    cpu, bound = ours["server_cpu_ms_per_update"], ours["bound_ms"]
    stages = ", ".join(f"{ours[f'{stage}_cpu_ms_per_update']:.2f} {label}" for stage, label in STAGE_LABELS.items())
    return (f"bound {bound:.2f} ms/upd (one core: SHA-256 {ours['sha256_ms']:.2f} + float32 add "
            f"{ours['add_ms']:.2f} + copy {ours['copy_ms']:.2f} of the {ours['update_bytes'] / 1e6:.2f} MB "
            f"{ours['encoding']} update); server cpu {cpu:.2f} ms/upd ({ours['ingest_cpu_ms_per_update']:.2f} "
            f"receiving: {stages}; the rest closing the round) = {cpu / bound:.2f}x the bound")


#: How :func:`bound_line` names each stage of the receiving CPU (:func:`_stage_cpu`).
STAGE_LABELS = {
    "event_loop": "event loop",
    "workers": "hash+decode+norm",
    "spool": "spool write+fdatasync+commit",
    "accumulate": "accumulate",
    "other": "other",
}


# --------------------------------------------------------------------------------------------------- main


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="100000,1000000", help="model sizes P (comma-separated)")
    parser.add_argument("--clients", default="10,100,1000", help="client counts N (comma-separated)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--encoding", choices=("float32", "float16", "int8"), default="float32",
                        help="tensor encoding of the updates (the server's task asks for it)")
    parser.add_argument("--flower-python", help="interpreter with flwr installed (default $FLWR_PYTHON or this one)")
    parser.add_argument("--no-flower", action="store_true", help="measure only the fl-edge aggregator")
    parser.add_argument("--max-supernodes", type=int, default=10,
                        help="run Flower's Deployment Engine only up to this N (~0.3-0.45 GB per SuperNode)")
    parser.add_argument("--flower-max-bytes", type=float, default=8e9,
                        help="skip Flower server-side runs whose results would hold more than this many bytes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    flower_python = None if args.no_flower else find_flower_python(args.flower_python)
    if not args.no_flower and flower_python is None:
        print("flwr not found (pip install flwr into a venv and pass --flower-python); measuring ours only")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fl-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        for p in (int(x) for x in args.params.split(",")):
            for n in (int(x) for x in args.clients.split(",")):
                ours = run_ours(p, n, args.concurrency, Path(tmp), args.encoding)
                row: dict[str, Any] = {"parameters": p, "clients": n, "ours": ours}
                print(f"P={p:>9,} N={n:>5}  ours: round {ours['round_seconds']:6.2f} s "
                      f"({ours['round_updates_per_s']:6.1f} upd/s), upload {ours['updates_per_s']:6.1f} upd/s, "
                      f"close {ours['close_seconds']:.2f} s, peak RSS {_mb(ours['peak_rss'])}, "
                      f"server cpu {ours['server_cpu_ms_per_update']:.1f} ms/upd "
                      f"(verify {ours['verify_ms']:.1f} ms, spool {ours['spool_ms']:.1f} ms mean latency)",
                      flush=True)
                print(f"{'':17}{bound_line(ours)}", flush=True)
                if flower_python is not None:
                    if n <= args.max_supernodes:
                        dep = run_flower_deployment(flower_python, p, n, Path(tmp))
                        row["flower_deployment"] = dep
                        if isinstance(dep, dict):
                            print(f"{'':17}Flower Deployment Engine: round {dep['seconds']:6.2f} s "
                                  f"({dep['updates_per_s']:6.2f} upd/s), peak RSS SuperLink "
                                  f"{_mb(dep['peak_rss_superlink'])}, all {_mb(dep['peak_rss_all'])}  "
                                  f"-> round ratio {ours['round_updates_per_s'] / dep['updates_per_s']:.1f}x "
                                  "(ours full round vs Flower SuperLink+SuperNodes round)", flush=True)
                        else:
                            print(f"{'':17}Flower Deployment Engine: {dep}", flush=True)
                    else:
                        row["flower_deployment"] = f"not run: N > --max-supernodes {args.max_supernodes}"
                    if 4 * p * n * 2 > args.flower_max_bytes:
                        side: dict[str, Any] | str = f"skipped: holding {n} results needs ~{8 * p * n / 1e9:.0f} GB"
                    else:
                        side = run_flower_serverside(flower_python, p, n)
                    row["flower_serverside"] = side
                    if isinstance(side, dict):
                        print(f"{'':17}Flower server-side FedAvg: {side['updates_per_s']:7.1f} upd/s, peak RSS "
                              f"{_mb(side['peak_rss'])}  -> server ratio "
                              f"{ours['updates_per_s'] / side['updates_per_s']:.2f}x (ours upload path over HTTP "
                              "vs Flower decode+FedAvg in memory)", flush=True)
                    else:
                        print(f"{'':17}Flower server-side FedAvg: {side}", flush=True)
                rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
