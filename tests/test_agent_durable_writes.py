"""The agent's durable writes: off its event loop, and whole after a power cut.

The round loop, delivery, the heartbeat and the systemd watchdog share one event loop; on an SD card one fsync can
take seconds, so the writes of a model's size (the package, the release held, an update into the outbox) and the
round's state must not run on it. Each write is replaced here by one that waits until a coroutine on the loop has
run while the write was under way (bounded, so a write back on the loop fails the test instead of hanging it).

A downloaded package is fsynced before the rename that gives it its final name (the calls are recorded, as in
tests/test_outbox_fsync.py), and a package file damaged on flash is removed and downloaded again at the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_harness import (
    ADVISORY,
    FakeAggregator,
    agent_config,
    enrolled_state,
    on_loopback,
    sample,
    small_package,
)
from interrupted_writes import killed_write
from nacl.signing import SigningKey

from appliance import held_release, modelpkg, wire
from appliance.agent import MODELS_DIR, Agent
from appliance.client import AggregatorClient
from appliance.config import load_config
from appliance.held_release import RELEASE_FILE

# How long a write waits for the loop. Only a write that blocks the loop waits this long (and then fails the test).
LOOP_WAIT_SECONDS = 30.0


class LoopWitness:
    """Wraps a blocking write: each call waits until :meth:`answer`, a coroutine on the event loop, has run while the
    write was under way, records whether it did, then writes."""

    def __init__(self, write: Callable[..., Any]):
        self.write = write
        self.started = threading.Event()
        self.loop_ran = threading.Event()
        self.seen: list[bool] = []  # one entry per call: did the loop run while it was under way?
        self.on_loop: Callable[[], None] = lambda: None  # what the loop does meanwhile (a test may check state)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        self.seen.append(self.loop_ran.wait(LOOP_WAIT_SECONDS))
        return self.write(*args, **kwargs)

    async def answer(self) -> None:
        while not self.started.is_set():
            await asyncio.sleep(0.01)
        self.on_loop()
        self.loop_ran.set()


@dataclass
class Device:
    """An agent started on its state directory, its client to a fake aggregator on loopback, and the task it serves."""

    agent: Agent
    client: AggregatorClient
    fake: FakeAggregator
    task: wire.Task
    config: Path
    downloads: list[bytes] = field(default_factory=list)  # package digests fetched

    @property
    def package_path(self) -> Path:
        return self.agent.state_dir / MODELS_DIR / f"{self.task.package_digest.hex()}.flpkg"

    async def take(self) -> wire.ModelRelease:
        """What a round does first: the task's package, then its model release."""
        await self.agent._ensure_package(self.client, self.task.package_digest)
        return await self.agent._ensure_release(self.client, self.task)

    def restart(self) -> None:
        """A new agent on the same state directory, as after a reboot."""
        self.agent.sandbox.close()
        self.agent = Agent(load_config(self.config), budget=ADVISORY)


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[Device]:
    key = SigningKey.generate()
    fake = FakeAggregator(key, small_package(tmp_path / "small.flpkg", key))
    state = tmp_path / "state"
    enrolled_state(state, key.verify_key)
    task = wire.Task(1, 0, fake.digest, fake.package.digest, deadline=int(time.time()) + 600)
    async with on_loopback(fake.app()) as url, AggregatorClient(url, key.verify_key) as client:
        config = agent_config(tmp_path / "agent.toml", url, state)
        d = Device(Agent(load_config(config), budget=ADVISORY), client, fake, task, config)
        package_bytes = client.package_bytes

        async def counted(digest: bytes) -> memoryview:
            d.downloads.append(digest)
            return await package_bytes(digest)

        client.package_bytes = counted  # type: ignore[method-assign]
        try:
            yield d
        finally:
            d.agent.sandbox.close()


async def witnessed(witness: LoopWitness, work: Any) -> Any:
    """Run ``work`` (a coroutine) with ``witness`` answering from the loop."""
    answer = asyncio.create_task(witness.answer())
    try:
        return await work
    finally:
        answer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answer


def trained_by(agent: Agent) -> Callable[..., Any]:
    """A stand-in for the agent's training: an update of the task's shapes at once, without a trainer process."""

    async def trained(task: wire.Task, package: modelpkg.ModelPackage, release: wire.ModelRelease) -> wire.Update:
        delta = {s.name: np.full(s.shape, 0.01, np.float32) for s in package.param_specs}
        return wire.Update(agent.identity.device_id, task.round_id, task.model_version, task.model_digest, 64, delta)

    return trained


# -- off the loop ---------------------------------------------------------------------------------------------------


async def test_the_model_release_is_stored_while_the_loop_runs_on(device: Device, monkeypatch) -> None:
    await device.agent._ensure_package(device.client, device.task.package_digest)
    witness = LoopWitness(held_release.atomic_write)
    monkeypatch.setattr(held_release, "atomic_write", witness)
    release = await witnessed(witness, device.agent._ensure_release(device.client, device.task))
    assert witness.seen == [True]
    assert release.digest == device.task.model_digest
    device.restart()  # and it was stored: the next start holds it
    assert device.agent._release is not None and device.agent._release.digest == device.task.model_digest


async def test_the_package_is_stored_while_the_loop_runs_on(device: Device, monkeypatch) -> None:
    from appliance import agent as agent_module

    witness = LoopWitness(agent_module.atomic_write)
    monkeypatch.setattr(agent_module, "atomic_write", witness)
    package = await witnessed(witness, device.agent._ensure_package(device.client, device.task.package_digest))
    assert witness.seen == [True]
    assert package.digest == device.task.package_digest
    assert modelpkg.load_package(device.package_path, device.fake.key.verify_key).digest == package.digest


async def test_an_update_is_queued_while_the_loop_runs_on_and_before_its_round_is_saved(
    device: Device, monkeypatch
) -> None:
    """The update goes into the outbox in a worker thread; a receipt saving the state meanwhile (on the loop) must not
    save the round as taken before its update is durable: a restart would then forget it."""
    agent = device.agent
    await device.take()
    monkeypatch.setattr(agent, "_train", trained_by(agent))
    witness = LoopWitness(agent.outbox.put)
    state_meanwhile: list[dict] = []

    def a_receipt_saves_the_state() -> None:
        agent._save_state()
        state_meanwhile.append(agent._load_state())

    witness.on_loop = a_receipt_saves_the_state
    monkeypatch.setattr(agent.outbox, "put", witness)
    await witnessed(witness, agent._round(device.client, device.task))
    assert witness.seen == [True]
    assert [s["last_round"] for s in state_meanwhile] == [0]
    assert agent.outbox.depth == 1 and agent._load_state()["last_round"] == 1 and agent.last_round == 1


async def test_a_round_stopped_while_its_update_is_written_ends_after_the_write(device: Device, monkeypatch) -> None:
    """The agent is stopped (its tasks cancelled) while a round's update goes into the outbox in a worker thread. A
    thread cannot be stopped, so the round must end only after the update is queued and the round saved: whoever
    stopped the agent (a test, the next agent on the same state) then finds the state final, and nothing is
    written after."""
    agent = device.agent
    await device.take()
    monkeypatch.setattr(agent, "_train", trained_by(agent))
    writing, stopping, saved = threading.Event(), threading.Event(), threading.Event()
    put, save = agent.outbox.put, agent._save_state
    round_ended_before_saved: list[bool] = []

    def put_when_stopping(body: bytes) -> str:
        writing.set()
        stopping.wait(LOOP_WAIT_SECONDS)
        return put(body)

    def saved_when(round_task: asyncio.Task) -> Callable[[], None]:
        def save_and_look() -> None:
            save()
            round_ended_before_saved.append(round_task.done())
            saved.set()

        return save_and_look

    monkeypatch.setattr(agent.outbox, "put", put_when_stopping)
    round_task = asyncio.create_task(agent._round(device.client, device.task))
    monkeypatch.setattr(agent, "_save_state", saved_when(round_task))
    assert await asyncio.to_thread(writing.wait, LOOP_WAIT_SECONDS)
    round_task.cancel()  # as Agent.run does when it is stopped
    asyncio.get_running_loop().call_soon(stopping.set)  # the write goes on once the cancellation has been delivered
    with pytest.raises(asyncio.CancelledError):
        await round_task
    assert saved.wait(LOOP_WAIT_SECONDS)
    assert round_ended_before_saved == [False], "the round ended while its thread was still writing"
    assert agent.outbox.depth == 1 and agent._load_state()["last_round"] == 1


class WatchedLock:
    """A lock that says (``contended``) when a thread had to wait for it."""

    def __init__(self, lock: threading.Lock, contended: threading.Event):
        self.lock, self.contended = lock, contended

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            self.contended.set()
            self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


async def test_a_receipt_saved_while_a_round_is_saved_never_puts_the_older_round_back(
    device: Device, monkeypatch
) -> None:
    """A receipt saves the state on the loop while a round's save runs in a worker thread. The receipt's save took
    the state as it was before the round (last_round 0) and is writing it when the round's save comes: whatever
    the order, the file must end with the round saved, or a restart trains the round again."""
    from appliance import agent as agent_module

    agent = device.agent
    receipt_writing, round_came = threading.Event(), threading.Event()
    agent._state_lock = WatchedLock(agent._state_lock, round_came)  # the round's save waits for the receipt's
    writes = 0
    atomic_write = agent_module.atomic_write

    def write(path: Path, data: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal writes
        writes += 1
        if writes == 1:  # the receipt's: held until the round's save has come (and waited, or written)
            receipt_writing.set()
            round_came.wait(LOOP_WAIT_SECONDS)
        atomic_write(path, data, *args, **kwargs)
        if writes > 1:
            round_came.set()

    def receipt() -> None:
        agent.acknowledged_at = 1_700_000_000
        agent._save_state()

    monkeypatch.setattr(agent_module, "atomic_write", write)
    receipt_thread = threading.Thread(target=receipt)
    receipt_thread.start()
    assert await asyncio.to_thread(receipt_writing.wait, LOOP_WAIT_SECONDS)
    await asyncio.to_thread(agent._record_round, 1, None)
    receipt_thread.join()
    assert agent._load_state() == {"last_round": 1, "acknowledged_at": 1_700_000_000}


# -- the package on flash -------------------------------------------------------------------------------------------


async def test_a_downloaded_package_is_fsynced_before_its_rename_and_the_directory_after(
    device: Device, monkeypatch
) -> None:
    """Without the fsync before the rename, a power cut can leave a renamed but empty or short package file."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_replace(src, dst, *args, **kwargs)
        calls.append(("replace", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    await device.agent._ensure_package(device.client, device.task.package_digest)
    models = str(device.package_path.parent)
    on_package = [c for c in calls if c[1].startswith(models)]
    assert len(on_package) == 3, calls
    (first, temp_file), second, third = on_package
    assert first == "fsync" and Path(temp_file).parent == device.package_path.parent
    assert temp_file != str(device.package_path)
    assert second == ("replace", str(device.package_path)) and third == ("fsync", models)


def empty(path: Path) -> None:
    """What a power cut can leave after a rename whose data never reached the card."""
    path.write_bytes(b"")


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [empty, cut_short, flip_a_byte])
async def test_a_package_damaged_on_flash_is_removed_and_downloaded_again(
    device: Device, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None]
) -> None:
    await device.take()
    assert len(device.downloads) == 1
    damage(device.package_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fl_agent"):
        device.restart()  # starts: the release held names a package that no longer verifies, and is dropped
        assert device.agent._release is None
        release = await device.take()  # the round after: the package comes again, and the model with it
    assert len(device.downloads) == 2
    assert release.digest == device.task.model_digest
    lines = [r.getMessage() for r in caplog.records if "stored model package" in r.getMessage()]
    assert len(lines) == 1 and "downloading it again" in lines[0], lines
    assert modelpkg.load_package(device.package_path, device.fake.key.verify_key).digest == device.task.package_digest
    assert (device.agent.state_dir / RELEASE_FILE).exists()


async def test_a_package_damaged_while_the_agent_runs_fails_one_round_and_is_downloaded_again(
    device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    """The trainer reads the package from flash each round. Damaged after the agent loaded it, it failed every round
    until a restart; now the failed round checks the file, removes it, and the next round downloads it again."""
    agent = device.agent
    package, release = await agent._ensure_package(device.client, device.task.package_digest), await device.take()
    flip_a_byte(device.package_path)
    with caplog.at_level(logging.INFO, logger="fl_agent"):
        assert await agent._train(device.task, package, release) is None  # the trainer refuses the damaged file
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) == 1
    assert not device.package_path.exists()
    assert any("stored model package" in r.getMessage() for r in caplog.records)
    again = await agent._ensure_package(device.client, device.task.package_digest)
    assert len(device.downloads) == 2 and again.digest == package.digest
    assert modelpkg.load_package(device.package_path, device.fake.key.verify_key).digest == package.digest


async def test_what_a_package_write_killed_midway_left_is_removed_by_the_next_start(device: Device) -> None:
    """A package write cut short leaves its temp file (a model's size, on a small card); the next start removes it,
    and nothing else in models/."""
    models = device.package_path.parent
    models.mkdir(parents=True)
    assert len(killed_write(device.package_path)) == 1
    (models / ".kept-by-someone").write_bytes(b"not a temp file of the agent's")
    device.restart()
    assert sorted(p.name for p in models.iterdir()) == [".kept-by-someone"]
    await device.agent._ensure_package(device.client, device.task.package_digest)
    assert sorted(p.name for p in models.iterdir()) == [".kept-by-someone", device.package_path.name]
