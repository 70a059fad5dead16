"""kill -9 in the middle of an async buffer that holds stale updates: every acknowledged update counts once, with
its staleness weight.

A real `fl-aggregator serve --mode async` process on loopback publishes version 1 from a first buffer, then is
SIGKILLed while a second buffer fills with updates trained on version 0 (staleness 1) and version 1. After the
restart every device delivers again (an outbox resends what it has no receipt for), and version 2 must be
version 1 plus sum(n_i w_i delta_i) / sum(n_i), w = (1 + s)^-0.5, each update counted exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
from nacl.signing import VerifyKey
from test_aggregator_durability import _cli, _post, _wait_healthy, upload_until_killed

from aggregator.simulate import SimulatedDevice
from appliance import wire
from flctl.ports import free_port

K = 20
PARAMETERS = 20_000
ROOT = Path(__file__).resolve().parent.parent


def _serve(state: Path, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
            "--synthetic-parameters", str(PARAMETERS), "--mode", "async", "--buffer", str(K), "--max-staleness", "3",
            "--round-timeout", "600",
        ],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )


def test_sigkill_mid_buffer_loses_no_acknowledged_update_and_keeps_its_staleness_weight(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = tmp_path / "aggregator.log"
    aggregator_key = VerifyKey(bytes.fromhex(_cli("keygen", "--state", str(state)).stdout.strip()))
    devices = [SimulatedDevice() for _ in range(2 * K)]
    enrol_file = tmp_path / "fleet.jsonl"
    enrol_file.write_text("".join(
        json.dumps({"device_id": d.device_id, "public_key": d.public_key_hex}) + "\n" for d in devices
    ))
    _cli("enroll", "--state", str(state), "--from", str(enrol_file))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(5)

    async def task_after(session: aiohttp.ClientSession, after: int) -> wire.Task:
        async with session.get(url + "/v1/task", params={"after": str(after), "wait": "30"}) as response:
            assert response.status == 200
            return wire.decode_task(await response.read(), aggregator_key)

    async def model(session: aiohttp.ClientSession, version: int) -> dict[str, np.ndarray]:
        async with session.get(url + f"/v1/models/{version}") as response:
            return wire.decode_model_release(await response.read(), aggregator_key).tensors

    def flat(tensors: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([tensors[k].ravel() for k in sorted(tensors)]).astype(np.float64)

    async def go() -> None:
        proc = _serve(state, port, log)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                await _wait_healthy(session, url, proc)
                task0 = await task_after(session, 0)
                base = await model(session, 0)
                shapes = {k: v.shape for k, v in base.items()}

                def delta() -> dict[str, np.ndarray]:
                    return {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}

                for device in devices[:K]:  # buffer 1: version 1
                    code, answer = await _post(session, url, device.update(task0, delta()))
                    assert code == 200, answer
                task1 = await task_after(session, task0.round_id)
                assert task1.model_version == 1
                v1 = flat(await model(session, 1))

                # Buffer 2: half trained on version 0 (staleness 1), half on version 1.
                second = devices[K:]
                tasks = [task0 if i % 2 == 0 else task1 for i in range(K)]
                samples = [int(n) for n in rng.integers(1, 200, K)]
                deltas = [delta() for _ in range(K)]
                bodies = [d.update(t, x, num_samples=n)
                          for d, t, x, n in zip(second, tasks, deltas, samples, strict=True)]
                receipts = await upload_until_killed(session, url, bodies, in_flight=6, kill_after=6,
                                                     kill=lambda: os.kill(proc.pid, signal.SIGKILL))
                proc.wait(timeout=30)
                assert proc.returncode == -signal.SIGKILL
                assert 6 <= len(receipts) < K

            restarted = _serve(state, port, log)
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                    await _wait_healthy(session, url, restarted)
                    async with session.get(url + "/v1/status") as response:
                        status = await response.json()
                    current = status["current_round"]
                    assert current["round"] == task1.round_id and current["model_version"] == 1
                    counted = next(r for r in status["rounds"] if r["round"] == task1.round_id)["devices"]
                    assert len(counted) == len(set(counted)) == current["accepted"]
                    assert {second[i].device_id for i in receipts} <= set(counted)

                    for i, body in enumerate(bodies):
                        code, answer = await _post(session, url, body)
                        assert code == 200, answer
                        if i in receipts:
                            assert answer == receipts[i]
                    task2 = await task_after(session, task1.round_id)
                    assert task2.model_version == 2
                    got = flat(await model(session, 2))
                    n = np.array(samples, dtype=np.float64)
                    w = np.array([(1.0 + 1 - t.model_version) ** -0.5 for t in tasks])
                    expected = v1 + (n[:, None] * w[:, None] * np.array([flat(x) for x in deltas])).sum(0) / n.sum()
                    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
                    async with session.get(url + "/v1/status") as response:
                        done = next(r for r in (await response.json())["rounds"] if r["round"] == task1.round_id)
                    assert done["status"] == "published" and done["participants"] == K
            finally:
                restarted.terminate()
                restarted.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    asyncio.run(go())
