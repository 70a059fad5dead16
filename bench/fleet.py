"""The fleet view at scale: N enrolled devices send one Heartbeat each to a real ``fl-aggregator serve`` process.

Prints the ingest time and rate, the server's CPU per heartbeat and its RSS before and after, the time and size of
``GET /v1/status/devices`` (one page of 50 and of 500, sorted by health) and of the status page, and, with
Chromium installed, the time headless Chromium takes to load and render the status page (minus its own start-up,
measured on ``/healthz``). Also one flush of N reports to SQLite, in process.

    .venv/bin/python bench/fleet.py --devices 10000

A tenth of the devices never report (silent), the model is at version 4 and the reports spread over the states:
a quarter hold version 0 or 1 (behind), a fifth are throttled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # its sibling proctree.py (after ROOT: bench/aggregator.py is no package)

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402
from proctree import process_status  # noqa: E402

from aggregator.cli import init_state, load_key  # noqa: E402
from aggregator.fleet import Enrolled, Fleet  # noqa: E402
from aggregator.simulate import synthetic_package  # noqa: E402
from aggregator.store import Store  # noqa: E402
from appliance import wire  # noqa: E402
from appliance.protocol.heartbeat import Heartbeat, encode_heartbeat  # noqa: E402
from flctl.ports import free_port  # noqa: E402

VERSIONS = 4  # published before the heartbeats, so that devices can be behind
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def enrol(state: Path, keys: list[SigningKey]) -> None:
    """Enrol every device in one transaction (``fl-aggregator enroll`` commits each device on its own)."""
    Store(state).close()
    with sqlite3.connect(state / "aggregator.db") as db:
        db.executemany(
            "INSERT INTO devices (device_id, public_key, name, enrolled_at) VALUES (?, ?, ?, ?)",
            [(wire.key_id(k.verify_key), bytes(k.verify_key), f"cam-{i:05d}", time.time()) for i, k in enumerate(keys)],
        )


def heartbeat(i: int, key: SigningKey, now: int) -> Heartbeat:
    rng = np.random.default_rng(i)
    throttled = i % 5 == 0
    return Heartbeat(
        device_id=wire.key_id(key.verify_key), agent_version=f"0.4.{i % 3}",
        model_version=int(rng.integers(0, 2)) if i % 4 == 0 else VERSIONS - int(rng.integers(0, 2)),
        last_round=VERSIONS - int(rng.integers(0, 3)), cameras=int(rng.integers(0, 4)),
        memory=int(rng.integers(100, 500)) << 20, memory_max=512 << 20, cpu_max=1500,
        cpu_throttled=int(rng.integers(200, 900)) if throttled else int(rng.integers(0, 100)), oom_retries=0,
        outbox=int(rng.integers(0, 3)), outbox_bytes=int(rng.integers(0, 3)) * 4096, sent_at=now,
    )  # fmt: skip


async def _publish_versions(session: aiohttp.ClientSession, url: str, keys: list[SigningKey], server_key: Any) -> None:
    specs = synthetic_package(100).info.param_specs
    after = 0
    for i in range(VERSIONS):
        async with session.get(url + "/v1/task", params={"after": str(after), "wait": "30"}) as r:
            task = wire.decode_task(await r.read(), server_key)
        update = wire.Update(device_id=wire.key_id(keys[i].verify_key), round_id=task.round_id,
                             model_version=task.model_version, base_digest=task.model_digest, num_samples=10,
                             tensors={s.name: np.full(s.shape, 0.001, np.float32) for s in specs})
        async with session.post(url + "/v1/updates", data=wire.encode_update(update, keys[i]),
                                headers={"Content-Type": wire.CONTENT_TYPE}) as r:
            assert r.status == 200, await r.text()
        after = task.round_id
    async with session.get(url + "/v1/task", params={"after": str(after), "wait": "30"}) as r:
        assert r.status == 200  # the round after the last: version VERSIONS is published


async def _timed_get(session: aiohttp.ClientSession, url: str, repeat: int = 5) -> tuple[float, bytes]:
    best, body = float("inf"), b""
    for _ in range(repeat):
        started = time.perf_counter()
        async with session.get(url) as r:
            body = await r.read()
            assert r.status == 200, body[:200]
        best = min(best, time.perf_counter() - started)
    return best, body


def chromium_seconds(url: str, baseline: str) -> tuple[float, str]:
    """Seconds headless Chromium takes to load and render ``url`` beyond what it takes for ``baseline`` (a tiny
    answer of the same server: start-up, network service, connection), and the DOM it rendered."""

    def dump(target: str) -> tuple[float, str]:
        profile = tempfile.mkdtemp(prefix="chromium-profile-")
        try:
            started = time.perf_counter()
            out = subprocess.run(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
                 "--dump-dom", target],
                capture_output=True, text=True, timeout=180, check=True,
            )  # fmt: skip
            return time.perf_counter() - started, out.stdout
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    blank = min(dump(baseline)[0] for _ in range(2))
    runs = [dump(url) for _ in range(2)]
    return max(0.0, min(t for t, _ in runs) - blank), runs[-1][1]


async def measure(devices: int, workdir: Path, concurrency: int = 32, browser: bool = True) -> dict[str, Any]:
    state = workdir / "state"
    init_state(state)
    keys = [SigningKey(np.random.default_rng(i).bytes(32)) for i in range(devices)]
    enrol(state, keys)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
         "--synthetic-parameters", "100", "--min-clients", "1", "--goal-clients", "1", "--round-timeout", "3600"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    result: dict[str, Any] = {"devices": devices}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
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
            await _publish_versions(session, url, keys, load_key(state).verify_key)
            now = int(time.time())
            reporting = [i for i in range(devices) if i % 10 != 9]  # a tenth never report
            bodies = [encode_heartbeat(heartbeat(i, keys[i], now), keys[i]) for i in reporting]
            result["heartbeat_bytes"] = sum(map(len, bodies)) / len(bodies)
            before = process_status(proc.pid)
            gate = asyncio.Semaphore(concurrency)
            statuses: dict[int, int] = {}

            async def send(body: bytes) -> None:
                async with gate, session.post(url + "/v1/heartbeat", data=body,
                                              headers={"Content-Type": "application/cose"}) as r:
                    statuses[r.status] = statuses.get(r.status, 0) + 1

            started = time.perf_counter()
            await asyncio.gather(*(send(b) for b in bodies))
            seconds = time.perf_counter() - started
            after = process_status(proc.pid)
            result.update(
                statuses=statuses, ingest_seconds=seconds, ingest_per_s=len(bodies) / seconds,
                server_cpu_ms_per_report=1000 * (after["cpu_seconds"] - before["cpu_seconds"]) / len(bodies),
                rss_before=before["VmRSS"], rss_after=after["VmRSS"], rss_peak=after["VmHWM"],
            )  # fmt: skip
            for per_page in (50, 500):
                t, body = await _timed_get(session, f"{url}/v1/status/devices?sort=-health&per_page={per_page}")
                result[f"json_{per_page}_seconds"], result[f"json_{per_page}_bytes"] = t, len(body)
                if per_page == 50:
                    result["counts"] = json.loads(body)["counts"]
            t, body = await _timed_get(session, f"{url}/?sort=-health")
            result["page_seconds"], result["page_bytes"], result["page_html"] = t, len(body), body.decode()
            t, body = await _timed_get(session, f"{url}/?sort=-health&per_page=500")
            result["page_500_seconds"], result["page_500_bytes"] = t, len(body)
            async with session.get(url + "/metrics") as r:
                result["metrics"] = await r.text()
            if browser and CHROMIUM:
                page, baseline = f"{url}/?sort=-health", f"{url}/healthz"
                result["chromium_seconds"], result["chromium_dom"] = chromium_seconds(page, baseline)
                result["chromium_500_seconds"], _ = chromium_seconds(page + "&per_page=500", baseline)
        result["rss_end"] = process_status(proc.pid)["VmRSS"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    # One flush of every report, in process, as the server does every 10 s (here all N at once: the worst case).
    fleet = Fleet(workdir / "flush.db", lambda: [Enrolled(wire.key_id(k.verify_key), "") for k in keys])
    now = int(time.time())
    for i in range(devices):
        fleet.accept(heartbeat(i, keys[i], now), now)
    started = time.perf_counter()
    fleet.write(fleet.take_dirty())
    result["flush_seconds"] = time.perf_counter() - started
    fleet.close()
    return result


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} kB"


def report(r: dict[str, Any]) -> str:
    lines = [
        f"devices {r['devices']:,}: heartbeats {r['heartbeat_bytes']:.0f} bytes each, answers {r['statuses']}",
        f"ingest  {r['ingest_seconds']:.2f} s ({r['ingest_per_s']:.0f}/s over HTTP), server CPU "
        f"{r['server_cpu_ms_per_report']:.3f} ms per heartbeat",
        f"RSS     {r['rss_before'] / 2**20:.1f} MB before, {r['rss_after'] / 2**20:.1f} MB after, peak "
        f"{r['rss_peak'] / 2**20:.1f} MB",
        f"flush   {r['flush_seconds'] * 1000:.0f} ms to write all {r['devices']:,} reports in one transaction",
        f"counts  {r['counts']}",
        f"GET /v1/status/devices  per_page=50: {_kb(r['json_50_bytes'])} in {r['json_50_seconds'] * 1000:.0f} ms; "
        f"per_page=500: {_kb(r['json_500_bytes'])} in {r['json_500_seconds'] * 1000:.0f} ms (sorted by health)",
        f"GET /                   50 rows: {_kb(r['page_bytes'])} in {r['page_seconds'] * 1000:.0f} ms; "
        f"500 rows: {_kb(r['page_500_bytes'])} in {r['page_500_seconds'] * 1000:.0f} ms",
    ]
    if "chromium_seconds" in r:
        lines.append(f"Chromium load + render of /: 50 rows {r['chromium_seconds'] * 1000:.0f} ms, 500 rows "
                     f"{r['chromium_500_seconds'] * 1000:.0f} ms (beyond its time for /healthz)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-browser", action="store_true", help="skip the Chromium measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as work:
        result = asyncio.run(measure(args.devices, Path(work), args.concurrency, not args.no_browser))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
