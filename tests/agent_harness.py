"""Helpers for the agent tests: a fake aggregator that can lie, and a real agent loop run against an aggregator
on loopback until a condition holds.

The fake serves one task, the package, a model release and receipts; a test makes it forge or tamper with the
release, serve a release that does not match the task, or answer uploads with receipts that prove nothing
(unsigned, signed by another key, a broken signature, naming another update).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
from aiohttp import web
from nacl.signing import SigningKey, VerifyKey

from aggregator.app import SERVICES
from aggregator.registry import Enrolment
from appliance import modelpkg, wire
from appliance.agent import Agent
from appliance.budget import Budget
from appliance.config import load_config
from appliance.framebuffer import CAMERA_FRAME_SHAPE
from appliance.identity import DeviceIdentity, load_or_create_device_key, write_aggregator_key
from appliance.modelpkg import load_package
from appliance.synthetic import NUM_CLASSES

ADVISORY = Budget(None, 1, None, None, False, True, "test: no cgroup")
TASK_BATCH_SIZE = 16
SAMPLES_PER_ROUND = 64
#: How the fake answers an upload it stored (``FakeAggregator.receipts``; a test may change it mid-run).
RECEIPTS = ("genuine", "unsigned", "wrong-key", "bad-signature", "wrong-update", "whole-body")


class FakeAggregator:
    """Serves the task of round ``round_id`` (1 unless a test changes it; on model version 0), the package, a model
    release and receipts.

    ``release_key`` signs the release with another key; ``tamper`` flips a byte of its tensors; ``release_params``
    serves a genuinely signed release of other parameters than the task names; ``release_package_digest`` one
    that names another package. ``receipts`` is one of :data:`RECEIPTS`. ``cut_release`` (a test may change it
    mid-run) ends each release download half-way: the connection closed after half the announced body.
    """

    def __init__(
        self, key: SigningKey, package_path: Path, release_key: SigningKey | None = None, tamper: bool = False,
        release_params: dict[str, np.ndarray] | None = None, release_package_digest: bytes | None = None,
        receipts: str = "genuine",
    ):
        self.key = key
        self.package_bytes = package_path.read_bytes()
        self.package = load_package(package_path, key.verify_key)
        _, self.digest = wire.encode_model_release(  # what the task names
            wire.ModelRelease(0, self.package.digest, self.package.initial_params), key
        )
        release, _ = wire.encode_model_release(
            wire.ModelRelease(
                0, release_package_digest or self.package.digest, release_params or self.package.initial_params
            ),
            release_key or key,
        )
        if tamper:
            release = bytearray(release)
            release[-5] ^= 0x01
        self.release = bytes(release)
        self.receipts = receipts
        self.updates: list[bytes] = []
        self.device_keys: dict[str, VerifyKey] = {}
        self.unavailable_posts = 0  # answer this many uploads with 503 first (aggregator down)
        self.round_seconds = 300  # how far ahead of its issue the task's deadline lies
        self.batch_size = TASK_BATCH_SIZE  # the task's batch size
        self.poll_seconds = 0.2  # how long a poll for a round after round_id waits before its 204
        self.ignores_after = False  # serve round 1's task to every poll, whatever its after= says
        self.polls: list[float] = []  # when each poll for a task arrived (time.monotonic)
        self.package_downloads = 0
        self.release_downloads = 0
        self.cut_release = False
        self.round_id = 1  # the round whose task is served (a test may open another mid-run)
        self.first_served: dict[int, int] = {}  # round -> the number of polls when its task was first served

    def receipt(self, body: bytes, update: wire.Update) -> bytes:
        genuine = wire.Receipt(update.device_id, update.round_id, wire.update_digest(body))
        if self.receipts == "genuine":
            return wire.encode_receipt(genuine, self.key)
        if self.receipts == "unsigned":  # the receipt's payload, without the COSE_Sign1 around it
            return cbor2.dumps({"v": wire.PROTOCOL_VERSION, "type": "receipt", "device": genuine.device_id,
                                "round": genuine.round_id, "update_digest": genuine.update_digest,
                                "accepted_at": genuine.accepted_at}, canonical=True)
        if self.receipts == "wrong-key":
            return wire.encode_receipt(genuine, SigningKey.generate())
        if self.receipts == "bad-signature":
            signed = bytearray(wire.encode_receipt(genuine, self.key))
            signed[-1] ^= 0x01  # the last byte of the signature
            return bytes(signed)
        if self.receipts == "wrong-update":
            other = wire.Receipt(update.device_id, update.round_id, hashlib.sha256(b"another update").digest())
            return wire.encode_receipt(other, self.key)
        if self.receipts == "whole-body":  # the SHA-256 of the whole body: not the update's name, its envelope's
            other = wire.Receipt(update.device_id, update.round_id, hashlib.sha256(body).digest())
            return wire.encode_receipt(other, self.key)
        raise ValueError(f"unknown receipt mode {self.receipts!r}; expected one of {RECEIPTS}")

    def app(self) -> web.Application:
        async def task(request: web.Request) -> web.Response:
            self.polls.append(time.monotonic())
            if int(request.query.get("after", "0")) >= self.round_id and not self.ignores_after:
                await asyncio.sleep(self.poll_seconds)
                return web.Response(status=204)
            t = wire.Task(
                self.round_id, 0, self.digest, self.package.digest, deadline=int(time.time()) + self.round_seconds,
                epochs=1, batch_size=self.batch_size,
            )
            self.first_served.setdefault(self.round_id, len(self.polls))
            return web.Response(body=wire.encode_task(t, self.key), content_type="application/cose")

        async def package(request: web.Request) -> web.Response:
            self.package_downloads += 1
            return web.Response(body=self.package_bytes)

        async def model(request: web.Request) -> web.Response:
            self.release_downloads += 1
            if not self.cut_release:
                return web.Response(body=self.release)
            cut = web.StreamResponse(headers={"Content-Length": str(len(self.release))})
            await cut.prepare(request)
            await cut.write(self.release[: len(self.release) // 2])
            assert request.transport is not None
            request.transport.close()  # a network fault: the link drops with half the body sent
            return cut

        async def updates(request: web.Request) -> web.Response:
            body = await request.read()
            if self.unavailable_posts > 0:
                self.unavailable_posts -= 1
                return web.Response(status=503)
            self.updates.append(body)
            update = wire.decode_update(body, self.device_keys.get)
            return web.Response(body=self.receipt(body, update), content_type="application/cose")

        app = web.Application()
        app.router.add_get("/v1/task", task)
        app.router.add_get("/v1/packages/{digest}", package)
        app.router.add_get("/v1/models/{version}", model)
        app.router.add_post("/v1/updates", updates)
        return app


SMALL_SPECS = (wire.ParamSpec("layer0.weight", (20, 10)), wire.ParamSpec("layer0.bias", (10,)))


def small_package(path: Path, key: SigningKey, specs: Sequence[wire.ParamSpec] = SMALL_SPECS, seed: int = 7,
                  name: str = "small-test-package", input_shape: Sequence[int] = CAMERA_FRAME_SHAPE,
                  num_classes: int = NUM_CLASSES) -> Path:
    """A signed model package of the tensors ``specs`` (drawn from ``seed``) at ``path``, for tests whose training
    is stubbed out (its graphs are placeholders, never run), taking samples of ``input_shape`` (by default what the
    device's sources deliver: a package that does not fit them is refused before training, appliance/package_fit.py)."""
    specs = list(specs)
    rng = np.random.default_rng(seed)
    package = modelpkg.ModelPackage(
        name=name, param_specs=specs,
        initial_params={s.name: rng.normal(0, 0.05, s.shape).astype(np.float32) for s in specs},
        training_graph=b"not run", inference_graph=b"not run", optimizer={"name": "sgd"},
        preprocessing={"input_shape": list(input_shape)}, num_classes=num_classes,
    )
    modelpkg.write_package(path, package, key)
    return path


def agent_config(path: Path, url: str, state: Path, source: str = "synthetic", ca_file: Path | None = None) -> Path:
    """An agent.toml for a loopback aggregator at ``url`` (short long-polls, no metrics listener)."""
    transport = f'url = "{url}"\nca_file = "{ca_file}"\n' if ca_file else f'url = "{url}"\nallow_plain_http = true\n'
    path.write_text(
        f"[aggregator]\n{transport}poll_wait_seconds = 1.0\n"
        f'[agent]\nstate_dir = "{state}"\n[metrics]\nlisten = ""\n'
        f'[data]\nsource = "{source}"\nsamples_per_round = {SAMPLES_PER_ROUND}\n'
    )
    return path


async def run_agent(
    agent: Agent, until: Callable[[Agent], bool], during: Coroutine[Any, Any, None] | None = None,
    at_most: float = 300,
) -> Agent:
    """Run ``agent`` until ``until(agent)`` holds (polled), then stop it. ``at_most`` only keeps a broken agent
    from hanging the run: a loaded CI machine must not turn slowness into a failure."""
    running = asyncio.create_task(agent.run([during] if during else None))
    deadline = time.monotonic() + at_most
    try:
        while not until(agent) and not running.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    return agent


async def run_agent_against(
    fake: FakeAggregator, tmp_path: Path, until: Callable[[Agent], bool], source: str = "synthetic",
    during: Callable[[Path], Coroutine[Any, Any, None]] | None = None, at_most: float = 300,
    tls: tuple[ssl.SSLContext, Path] | None = None, extra_toml: str = "",
) -> Agent:
    """Serve ``fake`` on loopback and run an agent (state in ``tmp_path/state``, ``extra_toml`` appended to its
    agent.toml) against it; ``during(state)`` runs beside the agent's loops."""
    async with on_loopback(fake.app(), tls[0] if tls else None) as url:
        state = tmp_path / "state"
        identity = enrolled_state(state, fake.key.verify_key)
        fake.device_keys = {identity.device_id: identity.verify_key}
        config = agent_config(tmp_path / "agent.toml", url, state, source, tls[1] if tls else None)
        config.write_text(config.read_text() + extra_toml)
        agent = Agent(load_config(config), budget=ADVISORY)
        return await run_agent(agent, until, during(state) if during else None, at_most)


@contextlib.asynccontextmanager
async def on_loopback(app: web.Application, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """``app`` served on 127.0.0.1 at a free port until the block ends; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


def enrolled_state(state: Path, aggregator_key: VerifyKey) -> DeviceIdentity:
    """An agent's state directory holding its device key and the aggregator's key it pins."""
    identity = load_or_create_device_key(state)
    write_aggregator_key(state, aggregator_key)
    return identity


@contextlib.asynccontextmanager
async def beside_real_aggregator(
    app: web.Application, key: SigningKey, tmp_path: Path
) -> AsyncIterator[tuple[str, Path, DeviceIdentity]]:
    """``app`` (a real aggregator, ``make_app``, signing with ``key``) served on loopback until the block ends,
    and an agent enrolled with it (state in ``tmp_path/agent``): yields the aggregator's URL, the agent.toml and
    the agent's identity."""
    async with on_loopback(app) as url:
        state = tmp_path / "agent"
        identity = enrolled_state(state, key.verify_key)
        app[SERVICES].registry.enroll([Enrolment(identity.device_id, bytes(identity.verify_key))])
        yield url, agent_config(tmp_path / "agent.toml", url, state), identity


def sample(agent: Agent, name: str, labels: dict[str, str] | None = None) -> float:
    value = agent.metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0
