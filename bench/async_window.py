"""Many devices, one asynchronous window: how long a FedBuff aggregator takes to take N small updates, and its memory.

A real ``fl-aggregator serve --mode async --buffer K`` process (synthetic model of P float32 parameters) and N
enrolled simulated devices on 127.0.0.1, ``--concurrency`` requests in flight. Each device asks for the current
task (``GET /v1/task``), trains on nothing (a fixed small delta) and uploads its signed update; a version is
published every K updates, so devices that ask later train on newer versions and some updates arrive stale. An
update refused (the device's round closed while it uploaded, say) is retried once with a fresh task and counted.
Printed: the time from the first request to the last receipt, updates/s, versions published, refusals, and the
server's peak RSS (VmHWM) and CPU time per update. The synchronous figure for comparison is bench/aggregator.py's
(one round with goal N).

    python bench/async_window.py                                 # N = 10,000, P = 1,000, K = 1,000
    python bench/async_window.py --devices 10000 --params 1000 --buffer 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from nacl.signing import SigningKey
from proctree import cpu_seconds, status_bytes

from flctl.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aggregator.cli import init_state, load_key  # noqa: E402
from aggregator.simulate import synthetic_package  # noqa: E402
from aggregator.store import Store  # noqa: E402
from appliance import wire  # noqa: E402


async def run_window(devices: int, parameters: int, buffer: int, concurrency: int, workdir: Path) -> dict[str, float]:
    state = workdir / "state"
    init_state(state)
    key = load_key(state)
    keys = [SigningKey.generate() for _ in range(devices)]
    store = Store(state)
    for k in keys:
        store.enroll(wire.key_id(k.verify_key), bytes(k.verify_key))
    store.close()
    specs = synthetic_package(parameters).info.param_specs
    rng = np.random.default_rng(1)
    section = wire.encode_tensors({s.name: rng.normal(0, 0.01, s.shape).astype(np.float32) for s in specs})
    digest = wire.tensors_digest(section)
    port = free_port()
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
             "--synthetic-parameters", str(parameters), "--mode", "async", "--buffer", str(buffer),
             "--min-clients", "1", "--round-timeout", "3600"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    refusals: dict[str, int] = {}
    versions: set[int] = set()

    def update(i: int, task: wire.Task) -> bytes:
        kid = wire.key_id(keys[i].verify_key)
        payload = {
            "v": wire.PROTOCOL_VERSION, "type": "update", "device": kid, "round": task.round_id,
            "model_version": task.model_version, "base_digest": task.model_digest, "num_samples": 1 + i % 97,
            "metrics": {"loss": 1.0}, "encoding": "float32", "nonce": os.urandom(16), "created_at": int(time.time()),
            "tensors_sha256": digest,
        }  # fmt: skip
        return wire.sign(payload, keys[i], kid) + section

    try:
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as http:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the aggregator exited; see {log_path}")
                if await _healthy(http, url):
                    break
                await asyncio.sleep(0.1)
            gate = asyncio.Semaphore(concurrency)

            async def current_task() -> wire.Task:
                while True:  # 204: the buffer is being published; the next task comes with the new version
                    async with http.get(url + "/v1/task", params={"wait": "30"}) as r:
                        if r.status == 200:
                            return wire.decode_task(await r.read(), key.verify_key)
                        if r.status != 204:
                            raise SystemExit(f"GET /v1/task answered {r.status}: {(await r.read())[:200]!r}")

            async def device(i: int) -> None:
                async with gate:
                    for _attempt in range(2):
                        task = await current_task()
                        versions.add(task.model_version)
                        async with http.post(url + "/v1/updates", data=update(i, task),
                                             headers={"Content-Type": wire.CONTENT_TYPE}) as r:
                            answer = await r.read()
                        if r.status == 200:
                            return
                        reason = f"{r.status} {answer[:80]!r}"
                        refusals[reason] = refusals.get(reason, 0) + 1
                    raise SystemExit(f"device {i}: refused twice, last {reason}")

            before = cpu_seconds(proc.pid)
            started = time.perf_counter()
            await asyncio.gather(*(device(i) for i in range(devices)))
            seconds = time.perf_counter() - started
            cpu = cpu_seconds(proc.pid) - before
            peak = status_bytes(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    shutil.rmtree(state, ignore_errors=True)
    return {"seconds": seconds, "cpu_ms_per_update": 1000 * cpu / devices, "peak_rss": peak,
            "versions_trained_on": len(versions), "refusals": refusals}  # fmt: skip


async def _healthy(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url + "/healthz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--params", type=int, default=1_000)
    parser.add_argument("--buffer", type=int, default=1_000, help="K: a new version every K updates")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    args = parser.parse_args()
    if min(args.devices, args.params, args.buffer, args.concurrency) < 1:
        raise SystemExit("bench/async_window.py: --devices, --params, --buffer and --concurrency must be positive")
    with tempfile.TemporaryDirectory(prefix="fl-async-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        r = asyncio.run(run_window(args.devices, args.params, args.buffer, args.concurrency, Path(tmp)))
    print(f"N={args.devices} P={args.params} K={args.buffer}: all updates acknowledged in {r['seconds']:.1f} s "
          f"({args.devices / r['seconds']:.0f} upd/s), devices trained on {r['versions_trained_on']} versions, "
          f"server peak RSS {r['peak_rss'] / 1e6:.0f} MB, server CPU {r['cpu_ms_per_update']:.2f} ms/update, "
          f"refusals retried: {r['refusals'] or 'none'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
