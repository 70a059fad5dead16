"""kill -9 of a real `fl-aggregator serve --secure-aggregation` between the phases of a secure round: on restart
the round goes on with the very same roster and unmask request and publishes FedAvg of the updates exactly, or,
when it can no longer finish, is abandoned with the reason. It never publishes a wrong sum."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from nacl.signing import VerifyKey
from secagg_harness import until_masked

from aggregator.simulate import SimulatedDevice, synthetic_package
from appliance import wire
from appliance.secagg_client import SecureRound, Transport
from flctl.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PARAMETERS = 100
DEVICES = 3
SPECS = synthetic_package(PARAMETERS).info.param_specs


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aggregator.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)


class Aggregator:
    """A real aggregator process on loopback, and a way to SIGKILL and restart it on the same state."""

    def __init__(self, tmp_path: Path, round_timeout: float):
        self.state = tmp_path / "state"
        self.log = tmp_path / "aggregator.log"
        self.key = VerifyKey(bytes.fromhex(_cli("keygen", "--state", str(self.state)).stdout.strip()))
        self.devices = [SimulatedDevice() for _ in range(DEVICES)]
        _cli("enroll", "--state", str(self.state), *(d.public_key_hex for d in self.devices))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.round_timeout = round_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(self.state), "--listen",
             f"127.0.0.1:{self.port}", "--synthetic-parameters", str(PARAMETERS), "--min-clients", "2",
             "--goal-clients", str(DEVICES), "--round-timeout", str(self.round_timeout), "--clip-norm", "1",
             "--secure-aggregation", "--secagg-phase-timeout", "20"],
            cwd=ROOT, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def healthy(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                async with session.get(self.url + "/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("the aggregator did not come up")

    async def get(self, session: aiohttp.ClientSession, path: str, **params: str) -> tuple[int, bytes]:
        async with session.get(self.url + path, params=params) as response:
            return response.status, await response.read()

    async def status(self, session: aiohttp.ClientSession) -> dict:
        return json.loads((await self.get(session, "/v1/status"))[1])

    async def first_round(self, session: aiohttp.ClientSession) -> tuple[wire.Task, list[SecureRound]]:
        """Starts the aggregator and returns its first (secure) task with each enrolled device's client for it."""
        self.start()
        await self.healthy(session)
        task = wire.decode_task((await self.get(session, "/v1/task"))[1], self.key)
        link = Transport(self.url, session, self.key)
        return task, [SecureRound(link, task, d.device_id, d.key) for d in self.devices]


def _deltas(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.01, PARAMETERS).astype(np.float32) for _ in range(DEVICES)]


async def _published(agg: Aggregator, session: aiohttp.ClientSession, task: wire.Task) -> np.ndarray:
    code, body = await agg.get(session, "/v1/task", after=str(task.round_id), wait="60")
    assert code == 200, "no round opened after the secure round"
    assert wire.decode_task(body, agg.key).model_version == 1, (await agg.status(session))["rounds"]
    releases = []
    for version in (0, 1):
        release = wire.decode_model_release((await agg.get(session, f"/v1/models/{version}"))[1], agg.key, SPECS)
        releases.append(np.concatenate([release.tensors[s.name].ravel() for s in SPECS]).astype(np.float64))
    return releases[1] - releases[0]


@pytest.mark.parametrize("killed_in", ["share", "masked", "unmask"])
def test_a_round_killed_between_phases_resumes_and_publishes_the_exact_mean(tmp_path: Path, killed_in: str) -> None:
    agg = Aggregator(tmp_path, round_timeout=120)
    deltas, samples = _deltas(1), [20, 40, 60]

    async def go() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
            task, rounds = await agg.first_round(session)
            await until_masked(rounds, stop_after="join")
            roster = (await agg.get(session, f"/v1/secagg/{task.round_id}/roster"))[1]
            if killed_in == "share":
                agg.kill()
                agg.start()
                await agg.healthy(session)
                assert (await agg.get(session, f"/v1/secagg/{task.round_id}/roster"))[1] == roster
            await asyncio.gather(*(r.share() for r in rounds))
            await asyncio.gather(*(r.receive() for r in rounds))
            bodies = [r.masked_input(d, n) for r, d, n in zip(rounds, deltas, samples, strict=True)]
            receipts = []
            for i, body in enumerate(bodies):
                if killed_in == "masked" and i == 2:
                    agg.kill()
                    agg.start()
                    await agg.healthy(session)
                async with session.post(agg.url + "/v1/updates", data=body,
                                        headers={"Content-Type": wire.CONTENT_TYPE}) as response:
                    assert response.status == 200, await response.text()
                    receipts.append(await response.read())
            if killed_in == "masked":  # the outbox resends what it holds: acknowledged inputs get their receipt
                async with session.post(agg.url + "/v1/updates", data=bodies[0],
                                        headers={"Content-Type": wire.CONTENT_TYPE}) as response:
                    assert await response.read() == receipts[0]
            await rounds[0].unmask()
            if killed_in == "unmask":
                request = (await agg.get(session, f"/v1/secagg/{task.round_id}/unmask"))[1]
                agg.kill()
                agg.start()
                await agg.healthy(session)
                assert (await agg.get(session, f"/v1/secagg/{task.round_id}/unmask"))[1] == request
                await rounds[0].unmask()  # answering the same request again changes nothing
            await asyncio.gather(*(r.unmask() for r in rounds[1:]))
            published = await _published(agg, session, task)
            weights = np.array(samples, dtype=np.float64)
            expected = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True)) / weights.sum()
            np.testing.assert_allclose(published, expected, atol=1e-5)
            record = next(r for r in (await agg.status(session))["rounds"] if r["round"] == task.round_id)
            assert record["status"] == "published" and record["secure"]["sum_devices"] == DEVICES

    try:
        asyncio.run(go())
    finally:
        agg.stop()


def test_a_round_whose_deadline_passed_while_the_aggregator_was_down_is_abandoned_with_the_reason(
    tmp_path: Path,
) -> None:
    agg = Aggregator(tmp_path, round_timeout=6)

    async def go() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
            task, rounds = await agg.first_round(session)
            await until_masked(rounds, stop_after="join")
            await rounds[0].share()
            agg.kill()
            while time.time() <= task.deadline:  # down past the round's deadline
                await asyncio.sleep(0.5)
            agg.start()
            await agg.healthy(session)
            code, body = await agg.get(session, "/v1/task", after=str(task.round_id), wait="60")
            assert code == 200 and wire.decode_task(body, agg.key).model_version == 0
            record = next(r for r in (await agg.status(session))["rounds"] if r["round"] == task.round_id)
            assert record["status"] == "abandoned"
            assert record["note"].startswith("secure aggregation: ")
            assert (await agg.get(session, "/v1/models/1"))[0] == 404

    try:
        asyncio.run(go())
    finally:
        agg.stop()
