"""kill -9 of a real ``fl-aggregator serve`` keeps the device reports it had written (aggregator/fleet.py writes them
every 10 s without an fsync): after a restart the devices are still active with their reports, and a device that
reported just before the crash is still held to the rate limit."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from test_aggregator_durability import ROOT, _wait_healthy

from aggregator.cli import init_state
from aggregator.simulate import SimulatedDevice
from aggregator.store import Store
from appliance.protocol.heartbeat import Heartbeat, encode_heartbeat
from flctl.ports import free_port


def _serve(state: Path, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
         "--synthetic-parameters", "100", "--min-clients", "5", "--round-timeout", "600"],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _heartbeat(device: SimulatedDevice, last_round: int) -> bytes:
    report = Heartbeat(device_id=device.device_id, agent_version="0.4.0", model_version=0, last_round=last_round,
                       cameras=1, memory=1 << 20, memory_max=0, cpu_max=0, cpu_throttled=0, oom_retries=0, outbox=0,
                       outbox_bytes=0, sent_at=int(time.time()))
    return encode_heartbeat(report, device.key)


def _rows(state: Path) -> int:
    with sqlite3.connect(state / "aggregator.db") as db:
        return db.execute("SELECT count(*) FROM device_reports").fetchone()[0]


def test_reports_written_before_a_sigkill_are_there_after_the_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init_state(state)
    devices = [SimulatedDevice() for _ in range(3)]
    store = Store(state)
    for d in devices:
        store.enroll(d.device_id, bytes(d.key.verify_key))
    store.close()
    log = tmp_path / "server.log"

    async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
        async with session.post(url + "/v1/heartbeat", data=body, headers={"Content-Type": "application/cose"}) as r:
            return r.status

    async def go() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = _serve(state, port, log)
            try:
                await _wait_healthy(session, url, proc)
                for i, d in enumerate(devices):
                    assert await post(session, url, _heartbeat(d, last_round=10 + i)) == 204
                deadline = time.monotonic() + 120
                while _rows(state) < len(devices) and time.monotonic() < deadline:  # the next 10 s flush
                    await asyncio.sleep(0.2)
                assert _rows(state) == len(devices), "the reports were never written"
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                assert proc.returncode == -signal.SIGKILL
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                proc = _serve(state, port, log)
                await _wait_healthy(session, url, proc)
                again = await post(session, url, _heartbeat(devices[0], last_round=20))
                async with session.get(url + "/v1/status/devices", params={"sort": "last_round"}) as r:
                    return again, await r.json()
            finally:
                proc.kill()
                proc.wait(timeout=30)

    again, listing = asyncio.run(go())
    assert again == 429  # too-frequent: its report from before the crash is held, with when it arrived
    assert listing["counts"]["active"] == 3 and listing["counts"]["silent"] == 0
    assert [d["last_round"] for d in listing["devices"]] == [10, 11, 12]
