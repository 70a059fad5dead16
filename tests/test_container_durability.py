"""Killing the aggregator's container mid-round loses no acknowledged update: the durability test of
test_aggregator_durability.py, with `fl-aggregator serve` in the fl-aggregator image, its state on a mounted
directory, and `podman kill --signal KILL` then `podman start` instead of a process's SIGKILL and restart."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from container_harness import AGGREGATOR, images, podman  # noqa: F401 (fixture)
from nacl.signing import VerifyKey
from test_aggregator_durability import _post, upload_until_killed

from aggregator.simulate import SimulatedDevice
from appliance import wire
from flctl.container.payload import AGGREGATOR as SERVICE
from flctl.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("images")]
DEVICES = 20
PARAMETERS = 50_000
STATE = SERVICE.state_dir


def _in_container(state: Path, *args: str) -> str:
    return podman("run", "--rm", "--read-only", "-v", f"{state}:{STATE}", AGGREGATOR, "fl-aggregator", *args).stdout


async def _wait_healthy(session: aiohttp.ClientSession, url: str, name: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("the aggregator container did not become healthy:\n" + podman("logs", name).stderr)


def test_podman_kill_mid_stream_loses_no_acknowledged_update(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, SERVICE.uid, SERVICE.uid)
    aggregator_key = VerifyKey(bytes.fromhex(_in_container(state, "keygen", "--state", STATE).strip()))
    devices = [SimulatedDevice() for _ in range(DEVICES)]
    (state / "fleet.jsonl").write_text("".join(
        json.dumps({"device_id": d.device_id, "public_key": d.public_key_hex, "name": f"cam-{i}"}) + "\n"
        for i, d in enumerate(devices)
    ))
    out = _in_container(state, "enroll", "--state", STATE, "--from", f"{STATE}/fleet.jsonl")
    assert out.count(" enrolled") == DEVICES
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = f"fl-durability-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(3)
    podman("run", "-d", "--read-only", "--name", name, "-v", f"{state}:{STATE}", "-p", f"127.0.0.1:{port}:8080",
           AGGREGATOR, "fl-aggregator", "serve", "--state", STATE, "--listen", "0.0.0.0:8080",
           "--synthetic-parameters", str(PARAMETERS), "--min-clients", str(DEVICES), "--goal-clients", str(DEVICES),
           "--round-timeout", "900")  # fmt: skip

    async def go() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            await _wait_healthy(session, url, name)
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

            # A stream of uploads, at most 4 in flight; the container is killed once 8 receipts are back.
            receipts = await upload_until_killed(session, url, bodies, in_flight=4, kill_after=8,
                                                 kill=lambda: podman("kill", "--signal", "KILL", name))
            assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "137"
            assert 8 <= len(receipts) < DEVICES

        podman("start", name)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            await _wait_healthy(session, url, name)
            async with session.get(url + "/v1/status") as response:
                status = await response.json()
            current = status["current_round"]
            assert current["round"] == task.round_id and current["model_version"] == 0
            counted = next(r for r in status["rounds"] if r["round"] == task.round_id)["devices"]
            assert len(counted) == len(set(counted)) == current["accepted"]
            for i in receipts:
                assert devices[i].device_id in counted

            # Every device delivers again (an outbox resends what it has no receipt for); resending the
            # acknowledged ones changes nothing.
            for i, body in enumerate(bodies):
                code, answer = await _post(session, url, body)
                assert code == 200, answer
                if i in receipts:
                    assert answer == receipts[i]
            async with session.get(url + "/v1/task", params={"after": str(task.round_id), "wait": "60"}) as r:
                assert r.status == 200
                following = wire.decode_task(await r.read(), aggregator_key)
            assert following.model_version == 1
            async with session.get(url + "/v1/models/1") as response:
                release = wire.decode_model_release(await response.read(), aggregator_key)
            got = np.concatenate([release.tensors[k].ravel() for k in names]).astype(np.float64)
            start = np.concatenate([base.tensors[k].ravel() for k in names]).astype(np.float64)
            np.testing.assert_allclose(got, start + np.average(deltas, axis=0, weights=samples), rtol=1e-5, atol=1e-6)

    try:
        asyncio.run(go())
    finally:
        podman("rm", "-f", "-v", "-t", "5", name, check=False)
