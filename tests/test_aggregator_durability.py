"""kill -9 in the middle of a stream of uploads: every update that got a receipt counts exactly once.

A real `fl-aggregator serve` process on loopback, SIGKILLed while uploads are in flight, then restarted on
the same state directory. The round then completes, and the published model proves the count: version 1
must equal version 0 plus the sample-weighted mean of all deltas, each counted once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
from aggregator_harness import running
from nacl.signing import SigningKey, VerifyKey

from aggregator.simulate import SimulatedDevice
from appliance import wire
from flctl.ports import free_port

DEVICES = 30
PARAMETERS = 100_000
ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aggregator.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=True,
    )


def _serve(state: Path, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
            "--synthetic-parameters", str(PARAMETERS), "--min-clients", str(DEVICES),
            "--goal-clients", str(DEVICES), "--round-timeout", "600",
        ],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )


async def _wait_healthy(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "aggregator exited during start-up"
        try:
            async with session.get(url + "/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("aggregator did not become healthy")


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    async with session.post(url + "/v1/updates", data=body, headers={"Content-Type": wire.CONTENT_TYPE}) as r:
        return r.status, await r.read()


async def upload_until_killed(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], *, in_flight: int, kill_after: int,
    kill: Callable[[], object],
) -> dict[int, bytes]:
    """A stream of uploads, at most ``in_flight`` at a time; ``kill()`` the aggregator once ``kill_after``
    receipts are back (uploads not yet sent are then not sent). The receipts, by index in ``bodies``."""
    receipts: dict[int, bytes] = {}
    gate = asyncio.Semaphore(in_flight)
    killed = False

    async def upload(i: int) -> None:
        nonlocal killed
        async with gate:
            if killed:
                return
            try:
                status, answer = await _post(session, url, bodies[i])
            except (TimeoutError, aiohttp.ClientError):
                return  # the aggregator died under this request: no receipt, so it may or may not count
            if status == 200:
                receipts[i] = answer
                if len(receipts) == kill_after and not killed:
                    killed = True
                    kill()

    await asyncio.gather(*(upload(i) for i in range(len(bodies))))
    return receipts


def test_sigkill_mid_stream_loses_no_acknowledged_update(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = tmp_path / "aggregator.log"
    aggregator_key = VerifyKey(bytes.fromhex(_cli("keygen", "--state", str(state)).stdout.strip()))
    devices = [SimulatedDevice() for _ in range(DEVICES)]
    enrol_file = tmp_path / "fleet.jsonl"
    enrol_file.write_text(
        "".join(
            json.dumps({"device_id": d.device_id, "public_key": d.public_key_hex, "name": f"cam-{i}"}) + "\n"
            for i, d in enumerate(devices)
        )
    )
    assert _cli("enroll", "--state", str(state), "--from", str(enrol_file)).stdout.count("enrolled") == DEVICES
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(3)

    async def go() -> None:
        proc = _serve(state, port, log)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                await _wait_healthy(session, url, proc)
                async with session.get(url + "/v1/task") as response:
                    task = wire.decode_task(await response.read(), aggregator_key)
                async with session.get(url + "/v1/models/0") as response:
                    base = wire.decode_model_release(await response.read(), aggregator_key)
                names = sorted(base.tensors)
                samples = [int(s) for s in rng.integers(1, 200, DEVICES)]
                deltas, bodies = [], []
                for device, n in zip(devices, samples, strict=True):
                    delta = {k: rng.normal(0, 0.01, base.tensors[k].shape).astype(np.float32) for k in names}
                    deltas.append(np.concatenate([delta[k].ravel() for k in names]).astype(np.float64))
                    bodies.append(device.update(task, delta, num_samples=n))

                # A stream of uploads, at most 6 in flight; SIGKILL once 12 receipts are back.
                receipts = await upload_until_killed(session, url, bodies, in_flight=6, kill_after=12,
                                                     kill=lambda: os.kill(proc.pid, signal.SIGKILL))
                proc.wait(timeout=30)
                assert proc.returncode == -signal.SIGKILL
                assert 12 <= len(receipts) < DEVICES

            restarted = _serve(state, port, log)
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                    await _wait_healthy(session, url, restarted)
                    async with session.get(url + "/v1/status") as response:
                        status = await response.json()
                    current = status["current_round"]
                    assert current["round"] == task.round_id and current["model_version"] == 0
                    counted = next(r for r in status["rounds"] if r["round"] == task.round_id)["devices"]
                    assert len(counted) == len(set(counted)) == current["accepted"]
                    for i in receipts:
                        assert devices[i].device_id in counted

                    # Every device delivers again (an outbox resends what it has no receipt for; resending
                    # the acknowledged ones too must change nothing).
                    for i, body in enumerate(bodies):
                        code, answer = await _post(session, url, body)
                        assert code == 200, answer
                        if i in receipts:
                            assert answer == receipts[i]
                    async with session.get(url + "/v1/task", params={"after": str(task.round_id), "wait": "30"}) as r:
                        assert r.status == 200
                        following = wire.decode_task(await r.read(), aggregator_key)
                    assert following.model_version == 1
                    async with session.get(url + "/v1/models/1") as response:
                        release = wire.decode_model_release(await response.read(), aggregator_key)
                    got = np.concatenate([release.tensors[k].ravel() for k in names]).astype(np.float64)
                    start = np.concatenate([base.tensors[k].ravel() for k in names]).astype(np.float64)
                    expected = start + np.average(deltas, axis=0, weights=samples)
                    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
                    async with session.get(url + "/v1/status") as response:
                        done = next(r for r in (await response.json())["rounds"] if r["round"] == task.round_id)
                    assert done["status"] == "published" and done["participants"] == DEVICES
                    assert done["samples"] == sum(samples)
            finally:
                restarted.terminate()
                restarted.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    asyncio.run(go())


def test_restart_cuts_bytes_no_receipt_was_given_for(tmp_path: Path) -> None:
    """A writer killed between its append and its commit leaves bytes past the last record: they are dropped,
    and updates appended after the restart land where the database says they are."""
    key = SigningKey.generate()

    async def go() -> None:
        async with running(tmp_path, devices=3, key=key) as h:
            devices = h.devices
            task = await h.task()
            deltas = [h.delta() for _ in devices]
            assert (await h.upload(devices[0].update(task, deltas[0])))[0] == 200
            segment = tmp_path / "spool" / f"round-{task.round_id:08d}.seg"
            committed = segment.stat().st_size
        with segment.open("ab") as fh:
            fh.write(b"\xff" * 1000)  # a torn append that never got a receipt
        stale = tmp_path / "spool" / "round-00000000.seg"  # a closed round's segment a crash left behind
        stale.write_bytes(b"\0" * 64)
        async with running(tmp_path, key=key, enrolled=devices) as h:
            assert segment.stat().st_size == committed
            assert not stale.exists()
            for device, delta in zip(devices[1:], deltas[1:], strict=True):
                assert (await h.upload(device.update(task, delta)))[0] == 200
            assert await h.task(after=task.round_id, wait=10) is not None
            response = await h.client.get("/v1/models/0")
            base = wire.decode_model_release(await response.read(), key.verify_key)
            response = await h.client.get("/v1/models/1")
            new = wire.decode_model_release(await response.read(), key.verify_key)
            for name in base.tensors:
                expected = base.tensors[name] + np.mean([d[name] for d in deltas], axis=0)
                np.testing.assert_allclose(new.tensors[name], expected, rtol=1e-5, atol=1e-6)

    asyncio.run(go())
