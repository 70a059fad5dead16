"""Secure rounds on a real aggregator on loopback, played by simulated devices with the agent's own client
(appliance/secagg_client.py), one phase at a time so a test can stop any device after any phase: in process
(:func:`secure_running`), or as a real ``fl-aggregator serve --secure-aggregation`` process that a test can kill -9
and start again on the same state between two phases (:class:`AggregatorProcess`). And real agents enrolled with a
secure aggregator serving a package (:func:`secure_aggregator`, :func:`make_agent`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from agent_harness import ADVISORY, agent_config
from aggregator_harness import Harness, ServedAsInProduction, running
from aiohttp.test_utils import TestClient
from nacl.signing import SigningKey, VerifyKey

from aggregator.app import SERVICES, AggregatorConfig, make_app
from aggregator.models import load_package_file
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.secagg_round import SecAggConfig
from aggregator.simulate import SimulatedDevice
from appliance import wire
from appliance.agent import Agent
from appliance.config import load_config
from appliance.identity import load_or_create_device_key, write_aggregator_key
from appliance.secagg_client import SecureRound, Transport
from flctl.ports import free_port

CLIP = 1.0


@contextlib.asynccontextmanager
async def secure_running(state_dir: Path, devices: int = 4, parameters: int = 50, round_timeout: float = 60,
                         phase_timeout: float = 10, **overrides: Any) -> AsyncIterator[Harness]:
    """An aggregator whose rounds are secure, with ``devices`` enrolled devices (all of them the goal)."""
    overrides.setdefault("policy", RoundPolicy(min_clients=2, goal_clients=devices, round_timeout=round_timeout))
    overrides.setdefault("secure_aggregation", SecAggConfig(phase_timeout=phase_timeout))
    async with running(state_dir, devices=devices, parameters=parameters, plan=TrainingPlan(clip_norm=CLIP),
                       **overrides) as h:
        yield h


def transport(h: Harness) -> Transport:
    return Transport(str(h.client.server.make_url("")).rstrip("/"), h.client.session, h.key.verify_key)


def secure_rounds(h: Harness, task: wire.Task) -> list[SecureRound]:
    return [SecureRound(transport(h), task, d.device_id, d.key) for d in h.devices]


def flat_delta(h: Harness, scale: float = 0.01) -> np.ndarray:
    return np.concatenate([v.ravel() for v in h.delta(scale).values()]).astype(np.float32)


PHASES = ("advertise", "join", "share", "receive")


async def until_masked(rounds: list[SecureRound], stop_after: str = "receive") -> None:
    """Every device through advertise, roster (join), share and the check of its routed shares (receive), one phase
    at a time; ``stop_after`` names the last phase to play, so a test can act on the aggregator between two."""
    for phase in PHASES[: PHASES.index(stop_after) + 1]:
        await asyncio.gather(*(getattr(r, phase)() for r in rounds))


def expected_mean(deltas: list[np.ndarray], samples: list[int]) -> np.ndarray:
    weights = np.array(samples, dtype=np.float64)
    return (sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True)) / weights.sum())


ROOT = Path(__file__).resolve().parent.parent
PROCESS_PARAMETERS = 100  # the synthetic model an AggregatorProcess serves
PROCESS_DEVICES = 3  # the devices enrolled in an AggregatorProcess, all of them its goal


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aggregator.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)


class AggregatorProcess:
    """A real aggregator process on loopback, and a way to SIGKILL and restart it on the same state."""

    def __init__(self, tmp_path: Path, round_timeout: float):
        self.state = tmp_path / "state"
        self.log = tmp_path / "aggregator.log"
        self.key = VerifyKey(bytes.fromhex(_cli("keygen", "--state", str(self.state)).stdout.strip()))
        self.devices = [SimulatedDevice() for _ in range(PROCESS_DEVICES)]
        _cli("enroll", "--state", str(self.state), *(d.public_key_hex for d in self.devices))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.round_timeout = round_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(self.state), "--listen",
             f"127.0.0.1:{self.port}", "--synthetic-parameters", str(PROCESS_PARAMETERS), "--min-clients", "2",
             "--goal-clients", str(PROCESS_DEVICES), "--round-timeout", str(self.round_timeout), "--clip-norm", "1",
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


def process_deltas(seed: int) -> list[np.ndarray]:
    """One flat float32 delta for each device of an :class:`AggregatorProcess`, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.01, PROCESS_PARAMETERS).astype(np.float32) for _ in range(PROCESS_DEVICES)]


@contextlib.asynccontextmanager
async def secure_aggregator(tmp_path: Path, key: SigningKey, package: Path, devices: int,
                            min_clients: int, max_rounds: int = 0) -> AsyncIterator[TestClient]:
    """A real aggregator on loopback whose rounds are secure, serving ``package`` (signed by ``key``), with
    ``devices`` as its goal and at most ``max_rounds`` published versions (0: no limit); yields its test client
    (enrol agents with :func:`make_agent`)."""
    config = AggregatorConfig(
        tmp_path / "aggregator", load_package_file(package, key.verify_key), key,
        policy=RoundPolicy(min_clients=min_clients, goal_clients=devices, round_timeout=240,
                           max_rounds=max_rounds),
        plan=TrainingPlan(batch_size=16, clip_norm=1.0), secure_aggregation=SecAggConfig(phase_timeout=20),
    )
    client = TestClient(ServedAsInProduction(make_app(config), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def make_agent(tmp_path: Path, name: str, url: str, key: SigningKey, client: TestClient) -> Agent:
    """An agent (state in ``tmp_path/name``) enrolled with the aggregator of ``client`` at ``url``."""
    state = tmp_path / name
    identity = load_or_create_device_key(state)
    write_aggregator_key(state, key.verify_key)
    client.server.app[SERVICES].registry.enroll([Enrolment(identity.device_id, bytes(identity.verify_key))])
    return Agent(load_config(agent_config(tmp_path / f"{name}.toml", url, state)), budget=ADVISORY)
