"""Helpers for the aggregator tests: an app on a real loopback socket (aiohttp's TestServer), enrolled simulated
devices, and shortcuts for tasks, uploads and counters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from nacl.signing import SigningKey

from aggregator.app import METRICS, SERVER_OPTIONS, SERVICES, AggregatorConfig, make_app
from aggregator.buffered import BufferPolicy
from aggregator.models import ServedPackage
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.simulate import SimulatedDevice, synthetic_package
from aggregator.upstream import UpstreamConfig
from appliance import modelpkg, wire


def tiny_package() -> modelpkg.ModelPackage:
    """A real (signable) model package with a 3x4 layer and placeholder graphs: for the aggregator, which
    checks shapes and digests but never runs a graph."""
    rng = np.random.default_rng(0)
    return modelpkg.ModelPackage(
        name="tiny",
        param_specs=[wire.ParamSpec("fc.weight", (3, 4)), wire.ParamSpec("fc.bias", (3,))],
        initial_params={"fc.weight": rng.normal(size=(3, 4)).astype(np.float32), "fc.bias": np.zeros(3, np.float32)},
        training_graph=b"t",
        inference_graph=b"i",
        optimizer={"name": "sgd", "lr": 0.1},
        preprocessing={"input_shape": [4]},
        num_classes=3,
    )


T = TypeVar("T")


class ServedAsInProduction(TestServer):
    """aiohttp's TestServer, but with the server options of ``fl-aggregator serve`` (its TestServer cancels
    handlers when a client goes away, which production does not), so what a dropped client costs is tested as
    it happens."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, **{**kwargs, **SERVER_OPTIONS})


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def run_quietly(coro: Coroutine[Any, Any, T], caplog: pytest.LogCaptureFixture) -> T:
    """:func:`run`, then assert that nothing was logged at WARNING or above and no record carried a traceback
    (records are captured from INFO up, so an exception logged at INFO counts too)."""
    with caplog.at_level(logging.INFO):
        result = run(coro)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert noisy == [], [r.getMessage() for r in noisy]
    return result


@dataclass
class Harness:
    client: TestClient
    key: SigningKey
    package: ServedPackage
    devices: list[SimulatedDevice]
    state_dir: Path
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(7))

    @property
    def app(self):
        return self.client.server.app

    @property
    def engine(self):
        return self.app[SERVICES].engine

    @property
    def specs(self) -> list[wire.ParamSpec]:
        return self.package.info.param_specs

    async def task(self, after: int = 0, wait: float = 0) -> wire.Task | None:
        response = await self.client.get("/v1/task", params={"after": str(after), "wait": str(wait)})
        if response.status == 204:
            return None
        assert response.status == 200, await response.text()
        assert response.content_type == "application/cose"
        return wire.decode_task(await response.read(), self.key.verify_key)

    def flat(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """Named tensors (an update's or a release's) as one float64 vector in the package's layout order."""
        return np.concatenate([np.asarray(tensors[s.name], dtype=np.float64).reshape(-1) for s in self.specs])

    async def model(self, version: int) -> np.ndarray:
        """The published model ``version`` as :meth:`flat` lays it out, its release's signature checked."""
        response = await self.client.get(f"/v1/models/{version}")
        assert response.status == 200
        return self.flat(wire.decode_model_release(await response.read(), self.key.verify_key).tensors)

    def delta(self, scale: float = 0.01) -> dict[str, np.ndarray]:
        return {s.name: (self.rng.standard_normal(s.shape) * scale).astype(np.float32) for s in self.specs}

    async def upload(
        self, body: bytes, content_type: str = wire.CONTENT_TYPE, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """POST an update; returns (status, decoded receipt or the problem JSON)."""
        response = await self.client.post(
            "/v1/updates", data=body, headers={"Content-Type": content_type, **(headers or {})}
        )
        raw = await response.read()
        if response.status == 200:
            return 200, raw
        assert response.content_type == "application/problem+json", raw[:200]
        return response.status, json.loads(raw)

    def counter(self, name: str, **labels: str) -> float:
        value = self.app[METRICS].registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value

    def rejected(self, reason: str) -> float:
        return self.counter("fl_aggregator_updates_rejected_total", reason=reason)


async def publish_rounds(h: Harness, rounds: int) -> None:
    """``rounds`` rounds, each closed by every enrolled device's update: the next ``rounds`` model versions (the
    policy's goal must be all of ``h.devices``)."""
    for _ in range(rounds):
        task = await h.task(after=h.engine.store.last_round_id() - 1)
        assert task is not None
        for device in h.devices:
            assert (await h.upload(device.update(task, h.delta(0.05))))[0] == 200
        await h.task(after=task.round_id, wait=10)


@contextlib.asynccontextmanager
async def running(
    state_dir: Path,
    devices: int = 3,
    parameters: int = 50,
    key: SigningKey | None = None,
    enrolled: list[SimulatedDevice] | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """An aggregator on 127.0.0.1 with ``devices`` enrolled simulated devices."""
    key = key or SigningKey.generate()
    package = synthetic_package(parameters, tensors=2)
    policy = overrides.pop("policy", RoundPolicy(min_clients=2, goal_clients=devices or 1, round_timeout=60))
    config = AggregatorConfig(
        state_dir=state_dir, package=package, key=key, policy=policy, plan=overrides.pop("plan", TrainingPlan()),
        **overrides,
    )
    sims = enrolled if enrolled is not None else [SimulatedDevice() for _ in range(devices)]
    app = make_app(config)
    client = TestClient(ServedAsInProduction(app, host="127.0.0.1"))
    try:
        await client.start_server()  # inside: an aggregator that refuses to start must not leak the client's session
        registry = app[SERVICES].registry
        registry.enroll(Enrolment(d.device_id, bytes(d.key.verify_key)) for d in sims)
        yield Harness(client=client, key=key, package=package, devices=sims, state_dir=state_dir)
    finally:
        await client.close()


async def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def site_task(site: Harness, after: int) -> wire.Task:
    """What a device of the site gets: a task signed by the site key (the devices pin the site, not the city)."""
    task = await site.task(after=after, wait=30)
    assert task is not None, "the site opened no round"
    return task


@contextlib.asynccontextmanager
async def async_city_and_site(
    tmp_path: Path, city_buffer: int, devices: int = 2, retry_seconds: float = 2.0,
) -> AsyncIterator[tuple[Harness, Harness, wire.Task]]:
    """An async city (``city_buffer`` updates a version) and an async site of ``devices`` devices (one buffer for all
    of them) following it, enrolled there as a site; yields them and the site's first task, on which every device's
    update has been uploaded: the site forwards them as one update (with ``city_buffer=1`` the city publishes its
    version 1 from it). ``retry_seconds``: the site's first back-off toward the city."""
    city_key, site_key = SigningKey.generate(), SigningKey.generate()
    async with running(tmp_path / "city", key=city_key, enrolled=[],
                       policy=RoundPolicy(min_clients=1, round_timeout=600,
                                          buffer=BufferPolicy(size=city_buffer))) as city:
        city.app[SERVICES].registry.enroll([Enrolment(wire.key_id(site_key.verify_key), bytes(site_key.verify_key),
                                                      site=True)])
        upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2,
                                  retry_seconds=retry_seconds)
        async with running(tmp_path / "site", devices=devices, key=site_key, upstream=upstream,
                           policy=RoundPolicy(min_clients=1, round_timeout=600,
                                              buffer=BufferPolicy(size=devices))) as site:
            task = await site_task(site, 0)
            await wait_until(lambda: site.engine.reopen_after_forward, what="the site reading its parent's mode")
            for device in site.devices:
                status, answer = await site.upload(device.update(task, site.delta()))
                assert status == 200, answer
            yield city, site, task
