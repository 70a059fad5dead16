"""The agent keeps the model release it holds on flash (appliance/held_release.py): after a restart it names that
version in its heartbeat and fetches the next one as a delta from it (``serve --downlink int8``), rebuilt bit for
bit; a stored file that is cut short, corrupted, signed by another key or for a package the device does not hold
is ignored with one log line and removed, and the next model comes in full; the file is written once per version.

A relay between the agents and a real aggregator records every model answer (how many bytes, whether a delta).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from interrupted_writes import killed_write
from nacl.signing import SigningKey

from aggregator.app import SERVICES, AggregatorConfig, make_app
from aggregator.models import ServedPackage, load_package_file
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from appliance import wire
from appliance.agent import Agent
from appliance.client import AggregatorClient
from appliance.config import load_config
from appliance.held_release import RELEASE_FILE, load_release
from tests.agent_harness import ADVISORY, agent_config, enrolled_state, on_loopback, small_package
from tests.aggregator_harness import Harness, ServedAsInProduction, publish_rounds, run

PARAMETERS = 4000


def assert_published(h: Harness, release: wire.ModelRelease) -> None:
    """``release`` holds the very bits the aggregator signed for its version."""
    data = h.app[SERVICES].models.release_bytes(release.version)
    assert data is not None
    expected = wire.decode_model_release(data, h.key.verify_key, h.specs)
    assert release.digest == expected.digest
    for name in expected.tensors:
        assert release.tensors[name].tobytes() == expected.tensors[name].tobytes(), name


def signed_package(path: Path, key: SigningKey) -> ServedPackage:
    """A package the agent can load (graphs are never run here: no round is trained)."""
    specs = [wire.ParamSpec("layer0.weight", (200, 10)), wire.ParamSpec("layer1.bias", (PARAMETERS - 2000,))]
    return load_package_file(small_package(path, key, specs, seed=3, name="held-release-test"), key.verify_key)


@dataclass
class Answer:
    path: str
    size: int
    delta: bool


@dataclass
class Fleet:
    """A real aggregator (``--downlink int8``), the relay in front of it and one device's state directory."""

    h: Harness
    url: str
    state: Path
    config: Path
    answers: list[Answer] = field(default_factory=list)

    @property
    def stored(self) -> Path:
        return self.state / RELEASE_FILE

    def model_answers(self) -> list[Answer]:
        return [a for a in self.answers if a.path.startswith("/v1/models/")]

    @contextlib.asynccontextmanager
    async def agent(self) -> AsyncIterator[tuple[Agent, AggregatorClient]]:
        """An agent started on the device's state (as after a boot) and its client through the relay."""
        agent = Agent(load_config(self.config), budget=ADVISORY)
        try:
            async with AggregatorClient(self.url, self.h.key.verify_key) as client:
                yield agent, client
        finally:
            agent.sandbox.close()

    async def take(self, agent: Agent, client: AggregatorClient, task: wire.Task) -> wire.ModelRelease:
        """What the agent's round does first: the task's package, then its model release."""
        await agent._ensure_package(client, task.package_digest)
        return await agent._ensure_release(client, task)

    async def hold_first(self) -> wire.Task:
        """The aggregator's first task (version 0), taken by an agent that then stops: the device holds version 0."""
        first = await self.h.task()
        assert first is not None and first.model_version == 0
        async with self.agent() as (agent, client):
            await self.take(agent, client, first)
        return first

    async def publish_next(self, after: wire.Task) -> wire.Task:
        """One more round closed by the simulated devices; returns the task for the version it published."""
        await publish_rounds(self.h, 1)
        task = await self.h.task(after=after.round_id)
        assert task is not None and task.model_version == after.model_version + 1
        return task

    async def hold_first_then_next(self) -> tuple[wire.Task, wire.Task]:
        """:meth:`hold_first`, then :meth:`publish_next`: the device holds version 0 and the aggregator asks for 1."""
        first = await self.hold_first()
        return first, await self.publish_next(first)


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    key = SigningKey.generate()
    package = signed_package(tmp_path / "held.flpkg", key)
    app = make_app(AggregatorConfig(
        state_dir=tmp_path / "aggregator", package=package, key=key,
        policy=RoundPolicy(min_clients=2, goal_clients=2, round_timeout=60), downlink="int8",
    ))
    client = TestClient(ServedAsInProduction(app, host="127.0.0.1"))
    await client.start_server()
    devices = [SimulatedDevice() for _ in range(2)]
    app[SERVICES].registry.enroll(Enrolment(d.device_id, bytes(d.key.verify_key)) for d in devices)
    h = Harness(client=client, key=key, package=package, devices=devices, state_dir=tmp_path / "aggregator")
    answers: list[Answer] = []

    async def relay(request: web.Request) -> web.Response:
        upstream = await client.get(request.path, params=request.query)
        body = await upstream.read()
        answers.append(Answer(request.path, len(body), "X-Model-Base" in upstream.headers))
        return web.Response(status=upstream.status, body=body)

    relay_app = web.Application()
    relay_app.router.add_get("/v1/models/{version}", relay)
    relay_app.router.add_get("/v1/packages/{digest}", relay)
    state = tmp_path / "state"
    enrolled_state(state, key.verify_key)
    try:
        async with on_loopback(relay_app) as url:
            yield Fleet(h, url, state, agent_config(tmp_path / "agent.toml", url, state), answers)
    finally:
        await client.close()


def ignored_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "stored model release" in r.getMessage()]


def test_a_restarted_agent_fetches_the_next_version_as_a_delta_and_rebuilds_it_bit_for_bit(tmp_path: Path) -> None:
    async def go() -> None:
        async with fleet(tmp_path) as f:
            _, task = await f.hold_first_then_next()
            full = f.model_answers()[-1]  # publishing does not go through the relay: still version 0's answer
            assert not full.delta

            async with f.agent() as (agent, client):  # a reboot
                assert agent.heartbeat().model_version == 0  # before any round: the version held on flash
                release = await f.take(agent, client, task)
            answer = f.model_answers()[-1]
            assert answer.path == "/v1/models/1" and answer.delta
            assert answer.size * 3 < full.size
            assert_published(f.h, release)

            # The rebuilt version is stored in a form that verifies by itself: the next boot holds it, bit for bit.
            async with f.agent() as (agent, client):
                assert agent.heartbeat().model_version == 1
                assert agent._release is not None and agent._release.version == 1
                assert_published(f.h, agent._release)
            print(f"model bytes after a restart: {full.size} in full, {answer.size} as an int8 delta")

    run(go())


def test_the_stored_release_is_written_once_per_version(tmp_path: Path) -> None:
    async def go() -> None:
        async with fleet(tmp_path) as f:
            first = await f.h.task()
            assert first is not None
            async with f.agent() as (agent, client):
                await f.take(agent, client, first)
                written = f.stored.stat()
                await f.take(agent, client, first)  # the same version again: nothing fetched, nothing written
            (interrupted,) = killed_write(f.stored)  # what a power cut during a write leaves
            async with f.agent() as (agent, client):  # a reboot on the same version
                assert not interrupted.exists()
                await f.take(agent, client, first)
            assert len(f.model_answers()) == 1
            again = f.stored.stat()
            assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)

            task = await f.publish_next(first)
            async with f.agent() as (agent, client):
                await f.take(agent, client, task)
            assert f.stored.stat().st_ino != written.st_ino  # a new version replaces the file
            assert [p.name for p in f.state.iterdir() if p.name.startswith(f".{RELEASE_FILE}")] == []

    run(go())


def flip_a_byte(f: Fleet) -> None:
    data = bytearray(f.stored.read_bytes())
    data[-3] ^= 0x01  # in the last tensor's values
    f.stored.write_bytes(bytes(data))


def cut_in_the_tensors(f: Fleet) -> None:
    data = f.stored.read_bytes()
    f.stored.write_bytes(data[: len(data) // 2])


def cut_in_the_signature(f: Fleet) -> None:
    f.stored.write_bytes(f.stored.read_bytes()[:100])


def another_package(f: Fleet) -> None:
    """A release genuinely signed by the pinned key, for a package this device does not hold."""
    release = wire.ModelRelease(0, bytes(range(32)), dict(f.h.package.info.initial_params))
    f.stored.write_bytes(wire.encode_model_release(release, f.h.key)[0])


def another_key(f: Fleet) -> None:
    release = wire.ModelRelease(0, f.h.package.info.digest, dict(f.h.package.info.initial_params))
    f.stored.write_bytes(wire.encode_model_release(release, SigningKey.generate())[0])


def another_signed_type(f: Fleet) -> None:
    """A message the pinned key signed with every field of a release and the tensors it pins, but of another type
    (how a receipt or a task would be replayed as a release): the signed type must say it is a model."""
    section = wire.encode_tensors(f.h.package.info.initial_params)
    payload = {"v": wire.PROTOCOL_VERSION, "type": "receipt", "version": 0, "package_digest": f.h.package.info.digest,
               "created_at": 0, "tensors_sha256": wire.tensors_digest(section)}
    f.stored.write_bytes(wire.sign(payload, f.h.key, wire.key_id(f.h.key.verify_key)) + section)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(flip_a_byte, "digest-mismatch"), (cut_in_the_tensors, "digest-mismatch"), (cut_in_the_signature, "truncated"),
     (another_package, "wrong-model"), (another_key, "unknown-key"), (another_signed_type, "wrong-type")],
)
def test_a_damaged_or_foreign_stored_release_is_ignored_and_the_model_comes_in_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, reason: str
) -> None:
    async def go() -> None:
        async with fleet(tmp_path) as f:
            _, task = await f.hold_first_then_next()
            damage(f)

            caplog.clear()
            with caplog.at_level(logging.INFO, logger="fl_agent"):
                async with f.agent() as (agent, client):
                    assert agent._release is None and agent.heartbeat().model_version is None
                    assert not f.stored.exists()  # removed
                    lines = ignored_lines(caplog)
                    release = await f.take(agent, client, task)
            assert len(lines) == 1 and f"({reason}:" in lines[0], lines
            answer = f.model_answers()[-1]
            assert answer.path == "/v1/models/1" and not answer.delta  # downloaded in full, as on a first boot
            assert_published(f.h, release)
            async with f.agent() as (agent, _):  # and stored again, whole
                assert agent._release is not None and agent._release.version == 1

    run(go())


def test_a_damaged_rebuilt_release_is_ignored_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A release rebuilt from a delta is stored as the delta's signed envelope and the rebuilt tensors, checked
    against the signed ``model_digest`` at start: one changed bit, and the next model comes in full."""

    async def go() -> None:
        async with fleet(tmp_path) as f:
            _, second = await f.hold_first_then_next()
            async with f.agent() as (agent, client):
                await f.take(agent, client, second)
            assert f.model_answers()[-1].delta
            flip_a_byte(f)
            third = await f.publish_next(second)

            caplog.clear()
            with caplog.at_level(logging.INFO, logger="fl_agent"):
                async with f.agent() as (agent, client):
                    assert agent._release is None
                    release = await f.take(agent, client, third)
            lines = ignored_lines(caplog)
            assert len(lines) == 1 and "(digest-mismatch:" in lines[0], lines
            assert not f.model_answers()[-1].delta
            assert_published(f.h, release)

    run(go())


def test_a_held_release_of_the_tasks_version_number_but_another_model_is_not_trained_on(tmp_path: Path) -> None:
    """The stored release is a genuinely signed version 1, but not the version 1 the aggregator publishes now
    (its store was reset and it trained on): the task's digest decides, not the version number, so the agent
    fetches the version the task names instead of training on the one it holds."""

    async def go() -> None:
        async with fleet(tmp_path) as f:
            first = await f.hold_first()
            earlier_life = {name: value + np.float32(0.5) for name, value in f.h.package.info.initial_params.items()}
            f.stored.write_bytes(wire.encode_model_release(
                wire.ModelRelease(1, f.h.package.info.digest, earlier_life), f.h.key)[0])
            task = await f.publish_next(first)

            async with f.agent() as (agent, client):
                assert agent._release is not None and agent._release.version == 1  # it verifies: signed, held
                release = await f.take(agent, client, task)
            assert release.digest == task.model_digest
            assert_published(f.h, release)
            assert f.model_answers()[-1].path == "/v1/models/1"

    run(go())


def test_a_stored_file_larger_than_any_model_answer_is_ignored_without_being_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file grown past what the client accepts for a model answer (a corrupted file system) is refused from its
    size: read whole, it could take the agent's memory at every start, and systemd would restart it into the same."""
    key = SigningKey.generate()
    state = tmp_path / "state"
    state.mkdir()
    with (state / RELEASE_FILE).open("wb") as fh:
        fh.truncate(wire.DEFAULT_LIMITS.max_bytes + 1)  # sparse: takes no room
    reads: list[Path] = []
    read_bytes = Path.read_bytes

    def recording_read_bytes(path: Path) -> bytes:
        reads.append(path)
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", recording_read_bytes)
    with caplog.at_level(logging.INFO, logger="fl_agent"):
        assert load_release(state, key.verify_key, state / "models") is None
    lines = ignored_lines(caplog)
    assert len(lines) == 1 and "(too-large:" in lines[0], lines
    assert reads == [] and not (state / RELEASE_FILE).exists()


def test_a_leftover_temp_entry_that_cannot_be_removed_does_not_stop_the_agent(tmp_path: Path) -> None:
    """What a power cut left beside the stored release is removed at start; one that cannot be (here a directory
    of that name) is left, and the agent still starts holding its version."""

    async def go() -> None:
        async with fleet(tmp_path) as f:
            await f.hold_first()
            (f.state / f".{RELEASE_FILE}.stuck").mkdir()
            async with f.agent() as (agent, _):
                assert agent._release is not None and agent._release.version == 0

    run(go())
