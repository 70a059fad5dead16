"""The frame buffer on a full, read-only or failing data partition, from the recorder to the trainer.

Writes the partition refuses drop their frames and leave the buffer sound (bounded memory, an index that matches
the card, the next write going through); segments a failing card cannot read are skipped by the readers, and a
frame buffer the agent cannot read skips the round with its reason instead of ending the agent. The last test runs
`fl-agent run` itself (its wiring of the camera task to the agent's metrics) and reads the count off /metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from agent_harness import FakeAggregator, enrolled_state, run_agent_against, sample, small_package
from cameras_fakes import FakeCamera, FakeV4L2IO, managers_over_fakes, recorded
from nacl.signing import SigningKey
from storage_faults import FullDirectoryWrites, error_lines

from appliance import cameras, cli
from appliance.cameras import FrameRecorder
from appliance.framebuffer import FrameBuffer
from appliance.training_job import NotEnoughData, TrainJob, training_data
from flctl.ports import free_port


def _frame(value: int) -> np.ndarray:
    return np.full((1, 32, 32), value, np.uint8)


def recorded_append(recorder: FrameRecorder, value: int) -> None:
    """One labelled frame through the recorder's write, as FrameRecorder.record hands it to the buffer."""
    buffer = recorder.buffer
    recorder.write(functools.partial(buffer.append, _frame(value), value % 4), frames=buffer.waiting + 1)


def refuse_unlink_in(monkeypatch: pytest.MonkeyPatch, directory: Path, error: int,
                     only: Callable[[str], bool] = lambda name: True) -> None:
    """Removing a file of ``directory`` (whose name passes ``only``) fails with ``error``."""
    unlink = os.unlink

    def refused(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
        name = os.fspath(path)
        if os.path.dirname(name) == str(directory) and only(os.path.basename(name)):
            raise OSError(error, os.strerror(error), name)
        unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", refused)


def test_writes_refused_before_the_buffer_could_take_its_directory_drop_their_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A card remounted read-only holding a write a power cut interrupted: the buffer cannot remove the leftover
    (its recover step) nor write. Each refused write drops its batch (memory stays bounded by one batch), counts
    once, and when the card takes writes again the recorder says how many frames were really dropped, and the
    buffer holds the frames written since, in batches of its size."""
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    (frames_dir / ".tmp-000000000000.fls").write_bytes(b"FLF3")
    monkeypatch.setattr(os, "write", FullDirectoryWrites(frames_dir, errno.EROFS))
    refuse_unlink_in(monkeypatch, frames_dir, errno.EROFS)
    buffer = FrameBuffer(frames_dir, max_frames=16)
    assert buffer.batch_frames == 2
    counted: list[str] = []
    recorder = FrameRecorder(buffer, on_storage_error=counted.append)
    with caplog.at_level(logging.INFO, logger="appliance.cameras"):
        asyncio.run(recorder.recover())
        for i in range(10):
            recorded_append(recorder, i)
            assert buffer.waiting < buffer.batch_frames, f"frame {i}: {buffer.waiting} frames held in memory"
        assert counted == ["read-only"] * (1 + 10 // 2)  # the recover step, then one a batch
        monkeypatch.undo()  # the card takes writes again
        for i in range(4):
            recorded_append(recorder, 100 + i)

    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"frame buffer {frames_dir}")]
    assert said[1:] == [f"frame buffer {frames_dir}: writing frames again; 10 frames were dropped meanwhile"]
    assert FrameBuffer(frames_dir).load()[0][:, 0, 0, 0].tolist() == [100, 101, 102, 103]
    assert not list(frames_dir.glob(".tmp-*"))


def test_an_old_segment_the_card_will_not_remove_neither_fails_the_write_nor_leaves_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention cannot remove the oldest segment (EIO on a failing card) just after a batch was written: the batch
    is stored (no refusal counted, no frames said dropped), the buffer's count stays what a reader of the directory
    sees, and retention goes on with the segments after it."""
    frames_dir = tmp_path / "frames"
    buffer = FrameBuffer(frames_dir, max_frames=8)  # one frame a segment
    for i in range(8):
        buffer.append(_frame(i), label=0)
    oldest = sorted(p.name for p in frames_dir.iterdir())[0]
    refuse_unlink_in(monkeypatch, frames_dir, errno.EIO, only=lambda name: name == oldest)
    counted: list[str] = []
    recorder = FrameRecorder(buffer, on_storage_error=counted.append)
    with caplog.at_level(logging.INFO):
        for i in range(8, 11):
            recorded_append(recorder, i)

    assert counted == []
    assert (frames_dir / oldest).exists()
    on_card = FrameBuffer(frames_dir)
    assert len(buffer) == 8 and len(on_card) == 9  # the undeletable one is beyond the limit, once
    assert sorted(on_card.load()[0][:, 0, 0, 0].tolist()) == [0, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"frame buffer {frames_dir}: cannot remove {oldest} ({os.strerror(errno.EIO)}); it stays until the next "
        "start tries again"
    ]


def unreadable_segment(monkeypatch: pytest.MonkeyPatch, segment: Path) -> None:
    """Every read of ``segment`` fails with EIO, as a bad block of a failing card does."""
    real_open = open

    def failing_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(segment):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(segment))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    monkeypatch.setattr("io.open", failing_open)


def test_readers_skip_a_segment_the_card_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing card returns EIO for one segment: the trainer's reads skip it with a warning naming it and train on
    the rest; too few readable frames left is the round's NotEnoughData, not an I/O error out of the trainer."""
    frames_dir = tmp_path / "frames"
    buffer = FrameBuffer(frames_dir, max_frames=16)  # two frames a segment
    for i in range(6):
        buffer.append(_frame(i), label=i % 4)
    middle = sorted(frames_dir.glob("*.fls"))[1]
    unreadable_segment(monkeypatch, middle)
    with caplog.at_level(logging.WARNING, logger="appliance.framebuffer"):
        reader = FrameBuffer(frames_dir)
        x, y = reader.load()
        counts = reader.label_counts()
    assert x[:, 0, 0, 0].tolist() == [0, 1, 4, 5] and y.tolist() == [0, 1, 0, 1]
    assert counts == {0: 2, 1: 2}
    assert f"skipping an unreadable segment: {middle.name}: {os.strerror(errno.EIO)}" in caplog.text

    job = TrainJob(package_path="", aggregator_key=b"", params={}, source="cameras", state_dir=str(tmp_path),
                   samples=64, synthetic_camera=0, seed=0, epochs=1, batch_size=4, learning_rate=0.1, prox_mu=0.0,
                   threads=1)
    assert len(training_data(job)[1]) == 4
    with pytest.raises(NotEnoughData, match="4 readable labelled frames in the buffer, need at least 5"):
        training_data(dataclasses.replace(job, batch_size=5))


async def test_a_frame_buffer_the_agent_cannot_read_skips_the_round_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The card fails reading the frame buffer's directory while the agent waits for frames: the round is skipped in
    one line and counted as an io-error; the agent goes on (its heartbeat, the next round) instead of ending."""
    key = SigningKey.generate()
    fake = FakeAggregator(key, small_package(tmp_path / "small.flpkg", key))
    frames_dir = tmp_path / "state" / "frames"
    scandir = os.scandir

    def failing_scandir(path: str | os.PathLike[str] = ".") -> Iterator[os.DirEntry[str]]:
        if os.fspath(path) == str(frames_dir):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    with caplog.at_level(logging.INFO, logger="fl_agent"):
        agent = await run_agent_against(
            fake, tmp_path, lambda a: sample(a, "fl_agent_rounds_skipped_total", {"reason": "io-error"}) >= 1,
            source="cameras", at_most=120,
        )
    assert error_lines(caplog) == [
        f"round 1: cannot read the frame buffer in {frames_dir}: {os.strerror(errno.EIO)}; skipping the round"
    ]
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "io-error"}) == 1
    assert sample(agent, "fl_agent_storage_errors_total", {"reason": "io-error"}) == 1
    assert agent.last_round == 1


def scraped(url: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels, as exposed) at the metrics endpoint ``url``; 0 when absent
    or when the endpoint does not answer yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_fl_agent_run_counts_refused_frame_writes_on_its_metrics_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`fl-agent run` with [data] source = "cameras" (only the camera and udev are fakes): the frame writes a full
    partition refuses reach fl_agent_storage_errors_total on the agent's own /metrics, through the camera task's
    wiring in cli.py. Stopped as an operator stops it in a terminal (SIGINT), which exits 0."""
    key = SigningKey.generate()
    state = tmp_path / "state"
    enrolled_state(state, key.verify_key)
    frames_dir = state / "frames"
    frames_dir.mkdir()
    disk = FullDirectoryWrites(frames_dir, errno.ENOSPC)
    monkeypatch.setattr(os, "write", disk)
    dev = recorded("vivid-video0").with_node(str(tmp_path / "video0"))
    io = FakeV4L2IO(FakeCamera(dev.device_node, width=128, height=96))
    clocks: list[asyncio.Task[None]] = []

    async def frame_clock() -> None:  # the fake camera's frame period, in the agent's own loop
        while True:
            io.tick()
            await asyncio.sleep(0.002)

    made = managers_over_fakes(monkeypatch, dev, io,
                               on_made=lambda: clocks.append(asyncio.get_running_loop().create_task(frame_clock())))
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        # an aggregator that is not there: the agent retries it, the cameras record meanwhile
        f'[aggregator]\nurl = "http://127.0.0.1:{free_port()}"\nallow_plain_http = true\npoll_wait_seconds = 1.0\n'
        f'[agent]\nstate_dir = "{state}"\nlog_level = "info"\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
        '[data]\nsource = "cameras"\n[cameras]\nsample_interval_seconds = 0.01\nbuffer_max_frames = 7\n'
    )
    metric = 'fl_agent_storage_errors_total{reason="disk-full"}'
    seen: list[float] = []
    running = threading.Event()
    running.set()
    stopping = threading.Lock()  # the interrupt is sent only while fl-agent run is running

    def stop_when_counted() -> None:
        deadline = time.monotonic() + 120  # only keeps a broken agent from hanging the run
        while running.is_set() and time.monotonic() < deadline:
            value = scraped(f"http://127.0.0.1:{port}/metrics", metric)
            if value >= 3:
                seen.append(value)
                break
            time.sleep(0.1)
        with stopping:
            if running.is_set():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    watcher = threading.Thread(target=stop_when_counted, daemon=True)
    watcher.start()
    try:
        with caplog.at_level(logging.INFO):
            status = cli.main(["run", "--config", str(config)])
        with stopping:
            running.clear()
        watcher.join()
    except KeyboardInterrupt:  # fl-agent run had already ended: not the test session's interrupt
        pytest.fail("fl-agent run ended before it was stopped")
    assert seen and seen[0] >= 3, f"{metric} never reached 3 on /metrics"
    assert status == 0
    assert disk.refused >= 3
    assert made[0].stats.capture_errors_total["handler"] == 0
    assert len(FrameBuffer(frames_dir)) == 0


def test_camera_task_waits_for_a_frame_buffer_the_card_fails_to_list_and_then_captures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing card returns EIO listing the frame buffer's directory when the agent starts: the camera task (and
    with it the agent, which systemd would restart into the same error) does not end; each try is counted, the
    first is logged, and once the directory can be read capture starts."""
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    scandir = os.scandir
    tries: list[int] = []

    def failing_twice(path: str | os.PathLike[str] = ".") -> Iterator[os.DirEntry[str]]:
        if os.fspath(path) == str(frames_dir) and len(tries) < 2:
            tries.append(1)
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", failing_twice)
    monkeypatch.setattr(cameras, "BUFFER_RETRY_SECONDS", 0.01)
    dev = recorded("vivid-video0").with_node(str(tmp_path / "video0"))
    io = FakeV4L2IO(FakeCamera(dev.device_node))
    made = managers_over_fakes(monkeypatch, dev, io)
    from appliance.config import AgentConfig, CamerasConfig, Config

    config = Config(agent=AgentConfig(state_dir=str(tmp_path)), cameras=CamerasConfig(sample_interval_seconds=0.01))
    counted: list[str] = []

    async def body() -> None:
        task = asyncio.create_task(cameras.camera_task(config, on_storage_error=counted.append))
        deadline = asyncio.get_running_loop().time() + 60  # only keeps a broken task from hanging the run
        while not (made and made[0].stats.frames_captured_total >= 3) and not task.done():
            assert asyncio.get_running_loop().time() < deadline, "capture never started"
            io.tick()
            await asyncio.sleep(0.002)
        assert not task.done(), task.exception()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="appliance.cameras"):
        asyncio.run(body())
    assert counted == ["io-error", "io-error"]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"frame buffer {frames_dir}")]
    assert said == [
        f"frame buffer {frames_dir}: cannot read it (io-error: {os.strerror(errno.EIO)}); no frames are kept until "
        "it can, tried again every 0 s",
        f"frame buffer {frames_dir}: readable again; keeping frames",
    ]


def test_a_frame_write_cancelled_by_stop_keeps_the_buffer_until_it_ends(tmp_path: Path) -> None:
    """The agent stopping (or a camera unplugged) cancels a capture while its frame is being written on a slow card;
    the write goes on in its thread, which cannot be stopped. The flush at stop must wait for it, or the two threads
    share the buffer: here the frame would stay in memory, unwritten (on a card, two segments could also get one
    name). Slowness is a gate the test opens, not a sleep."""
    buffer = FrameBuffer(tmp_path / "frames")
    recorder = FrameRecorder(buffer)
    entered, gate = threading.Event(), threading.Event()

    def slow_card_record(frame: object) -> None:  # FrameRecorder.record, the card slow to take the frame
        entered.set()
        gate.wait()
        buffer.append(_frame(7), 1)

    recorder.record = slow_card_record  # type: ignore[method-assign]

    async def body() -> None:
        capture = asyncio.create_task(recorder(None))  # type: ignore[arg-type]
        await asyncio.to_thread(entered.wait)
        capture.cancel()
        flushing = asyncio.create_task(recorder.flush())
        # Until the flush is done, or waits for the recorder's lock (held, as it must be, by the write in flight).
        while not flushing.done() and not getattr(recorder._lock, "_waiters", None):
            await asyncio.sleep(0)
        gate.set()
        await flushing
        with pytest.raises(asyncio.CancelledError):
            await capture

    asyncio.run(body())
    assert FrameBuffer(tmp_path / "frames").load()[0][:, 0, 0, 0].tolist() == [7]
