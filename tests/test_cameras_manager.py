"""CameraManager in a real asyncio loop: udev events through a socket in the loop, capture tasks that
start and stop with the camera, counters, and frames reaching the labelled buffer."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cameras_fakes import (
    FakeCamera,
    FakeContext,
    FakeMonitor,
    FakeUdevDevice,
    FakeV4L2IO,
    managers_over_fakes,
    recorded,
)
from prometheus_client import CollectorRegistry, generate_latest
from storage_faults import FullDirectoryWrites

from appliance.cameras import CameraCollector, CameraManager, CapturedFrame, CaptureSettings, FrameRecorder
from appliance.framebuffer import FrameBuffer

FAST = CaptureSettings(interval_s=0.01, frame_timeout_s=10.0, retry_min_s=0.05, retry_max_s=0.1)


def vivid_at(tmp_path: Path) -> FakeUdevDevice:
    # a node path that does not exist on the host, so "gone" really means gone
    return recorded("vivid-video0").with_node(str(tmp_path / "video0"))


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def clock(io: FakeV4L2IO, period: float = 0.002) -> None:
    while True:
        io.tick()
        await asyncio.sleep(period)


def run(body, io: FakeV4L2IO, ticking: bool = True):
    async def main():
        ticker = asyncio.create_task(clock(io)) if ticking else None
        try:
            return await asyncio.wait_for(body(), 120)
        finally:
            if ticker:
                ticker.cancel()
    return asyncio.run(main())


def test_present_camera_is_captured_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node))
    frames: list[CapturedFrame] = []
    monitor = FakeMonitor()
    manager = CameraManager(FAST, frames.append, context=FakeContext([dev]), monitor=monitor, io=io)

    async def body() -> None:
        await manager.start()
        await until(lambda: len(frames) >= 3)
        await manager.stop()

    with caplog.at_level(logging.INFO, logger="appliance.cameras"):
        run(body, io)
    assert monitor.started and monitor.filters == ["video4linux"]
    assert f"camera added: {dev.device_node} (vivid)" in caplog.text
    assert frames[0].pixels.shape == (1, 32, 32) and frames[0].camera.name == "vivid"
    assert manager.stats.frames_captured_total >= 3
    assert io.opens >= 3  # one open per sample: the device is free between samples
    assert io.open_count() == 0


def test_hotplug_add_then_remove(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node))
    frames: list[CapturedFrame] = []
    monitor = FakeMonitor()
    manager = CameraManager(FAST, frames.append, context=FakeContext([]), monitor=monitor, io=io)

    async def body() -> None:
        await manager.start()
        await asyncio.sleep(0.05)
        assert manager.stats.cameras_present == 0
        monitor.emit(dev.with_action("add"))
        await until(lambda: len(frames) >= 2)
        assert manager.stats.cameras_present == 1
        monitor.emit(dev.with_action("remove"))
        await until(lambda: manager.stats.cameras_present == 0)
        await until(lambda: not manager._stopping)  # the capture task has finished
        captured = manager.stats.frames_captured_total
        await asyncio.sleep(0.1)
        assert manager.stats.frames_captured_total == captured  # nothing captured after removal
        await manager.stop()

    with caplog.at_level(logging.INFO, logger="appliance.cameras"):
        run(body, io)
    assert f"camera removed: {dev.device_node} (vivid): removed" in caplog.text
    assert manager.stats.cameras_added_total == 1 and manager.stats.cameras_removed_total == 1
    assert io.open_count() == 0 and sum(manager.stats.capture_errors_total.values()) == 0


def test_metadata_node_events_are_ignored() -> None:
    io = FakeV4L2IO()
    monitor = FakeMonitor()
    manager = CameraManager(FAST, lambda f: None, context=FakeContext([]), monitor=monitor, io=io)

    async def body() -> None:
        await manager.start()
        monitor.emit(recorded("uvc-metadata-video1").with_action("add"))
        await asyncio.sleep(0.1)
        await manager.stop()

    run(body, io)
    assert manager.stats.cameras_added_total == 0 and io.opens == 0


def test_camera_unplugged_mid_frame_is_not_a_crash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dev = vivid_at(tmp_path)
    cam = FakeCamera(dev.device_node)
    io = FakeV4L2IO(cam)
    monitor = FakeMonitor()
    settings = CaptureSettings(interval_s=0.01, frame_timeout_s=5.0, hold_open=True)
    manager = CameraManager(settings, lambda f: None, context=FakeContext([dev]), monitor=monitor, io=io)

    async def body() -> None:
        await manager.start()
        await until(lambda: cam.streamons == 1)  # streaming, waiting for a frame that never comes
        await asyncio.sleep(0.05)
        io.unplug(dev.device_node)
        await until(lambda: manager.stats.capture_errors_total["disconnected"] == 1)
        await until(lambda: io.open_count() == 0)  # the task closed the device itself
        monitor.emit(dev.with_action("remove"))
        await until(lambda: manager.stats.cameras_present == 0)
        await manager.stop()

    with caplog.at_level(logging.INFO, logger="appliance.cameras"):
        run(body, io, ticking=False)
    assert "went away during capture" in caplog.text
    assert "Traceback" not in caplog.text


def test_removal_while_streaming_cancels_cleanly(tmp_path: Path) -> None:
    dev = vivid_at(tmp_path)
    cam = FakeCamera(dev.device_node)
    io = FakeV4L2IO(cam)
    monitor = FakeMonitor()
    settings = CaptureSettings(interval_s=0.01, frame_timeout_s=5.0, hold_open=True)
    manager = CameraManager(settings, lambda f: None, context=FakeContext([dev]), monitor=monitor, io=io)

    async def body() -> None:
        await manager.start()
        await until(lambda: cam.streamons == 1)
        monitor.emit(dev.with_action("remove"))  # the remove event arrives before any I/O error
        await until(lambda: io.open_count() == 0)
        await manager.stop()

    run(body, io, ticking=False)
    assert not cam.streaming and all(m.closed for m in io.maps)
    assert sum(manager.stats.capture_errors_total.values()) == 0


def test_udev_overflow_resynchronises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node))
    context = FakeContext([])
    monitor = FakeMonitor()
    manager = CameraManager(FAST, lambda f: None, context=context, monitor=monitor, io=io)

    async def body() -> None:
        await manager.start()
        context.devices.append(dev)  # plugged in while its event was lost
        monitor.fail_next_poll = OSError(errno.ENOBUFS, "No buffer space available")
        monitor.emit(dev.with_action("add"))
        await until(lambda: manager.stats.cameras_present == 1)
        await manager.stop()

    run(body, io)
    assert manager.stats.capture_errors_total["udev"] == 1
    assert "re-enumerating" in caplog.text


def test_failing_frame_handler_is_counted_and_capture_goes_on(tmp_path: Path) -> None:
    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node))

    def broken(frame: CapturedFrame) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    manager = CameraManager(FAST, broken, context=FakeContext([dev]), monitor=FakeMonitor(), io=io)

    async def body() -> None:
        await manager.start()
        await until(lambda: manager.stats.capture_errors_total["handler"] >= 3)
        await manager.stop()

    run(body, io)
    assert manager.stats.frames_captured_total >= 3


def test_frames_queue_drops_the_oldest_when_nobody_reads(tmp_path: Path) -> None:
    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node))
    manager = CameraManager(FAST, context=FakeContext([dev]), monitor=FakeMonitor(), io=io, queue_size=2)

    async def body() -> None:
        await manager.start()
        await until(lambda: manager.stats.frames_captured_total >= 5)
        await manager.stop()

    run(body, io)
    assert manager.frames.qsize() == 2


def _traffic(width: int, height: int, vehicles: int) -> Callable[[int], bytes]:
    """Frame sequence -> luma of a road with `vehicles` 16x16 blocks moving in separate lanes."""
    rng = np.random.default_rng(0)
    road = (80 + 40 * np.linspace(0, 1, width)[None, :] + rng.normal(0, 2, (height, width))).astype(np.float32)

    def luma(seq: int) -> bytes:
        frame = road + np.random.default_rng(seq).normal(0, 1, road.shape)
        for lane in range(vehicles):
            x = (10 + (5 + 2 * lane) * seq) % (width - 16)
            top = 4 + lane * 30
            frame[top:top + 16, x:x + 16] = 220
        return np.clip(frame, 0, 255).astype(np.uint8).tobytes()

    return luma


def test_frames_are_labelled_and_kept_in_the_buffer(tmp_path: Path) -> None:
    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node, width=128, height=96, luma=_traffic(128, 96, 2)))
    buffer = FrameBuffer(tmp_path / "frames", max_frames=100)
    recorder = FrameRecorder(buffer)
    manager = CameraManager(FAST, recorder, context=FakeContext([dev]), monitor=FakeMonitor(), io=io)

    async def body() -> None:
        await manager.start()
        await until(lambda: recorder.frames_labelled_total >= 10)
        await manager.stop()
        await recorder.flush()  # frames wait in memory for a batch; camera_task flushes when it stops

    run(body, io)
    assert recorder.frames_unlabelled_total >= recorder.label_settings.warmup_frames
    x, y = buffer.load()
    assert x.shape[1:] == (1, 32, 32) and len(y) == recorder.frames_labelled_total
    assert (y == 2).mean() >= 0.9  # two vehicles in view
    assert x.dtype == np.uint8 and x.max() >= 200  # stored as captured: 8-bit luma, the vehicles at 220


def test_prometheus_collector_exposes_the_counters(tmp_path: Path) -> None:
    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node))
    recorder = FrameRecorder(FrameBuffer(tmp_path / "frames"))
    manager = CameraManager(FAST, recorder, context=FakeContext([dev]), monitor=FakeMonitor(), io=io)
    registry = CollectorRegistry()
    registry.register(CameraCollector(manager, recorder))

    async def body() -> bytes:
        await manager.start()
        await until(lambda: manager.stats.frames_captured_total >= 2)
        text = generate_latest(registry)
        await manager.stop()
        return text

    text = run(body, io).decode()
    assert "fl_agent_cameras_present 1.0" in text
    assert 'fl_agent_camera_capture_errors_total{reason="disconnected"} 0.0' in text
    captured = [line for line in text.splitlines() if line.startswith("fl_agent_camera_frames_captured_total ")]
    assert captured and float(captured[0].split()[1]) >= 2
    assert 'fl_agent_camera_frames_labelled_total{outcome="unlabelled"}' in text


def test_camera_task_runs_from_the_agent_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import cameras
    from appliance.config import AgentConfig, CamerasConfig, Config

    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node))
    made = managers_over_fakes(monkeypatch, dev, io)
    config = Config(agent=AgentConfig(state_dir=str(tmp_path)),
                    cameras=CamerasConfig(sample_interval_seconds=0.01, buffer_max_frames=7))
    registry = CollectorRegistry()

    async def body() -> None:
        task = asyncio.create_task(cameras.camera_task(config, registry))
        await until(lambda: bool(made) and made[0].stats.frames_captured_total >= 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(body, io)
    assert made[0].settings.interval_s == 0.01 and io.open_count() == 0
    assert b"fl_agent_cameras_present" in generate_latest(registry)
    assert 0 < len(FrameBuffer(tmp_path / "frames")) <= 7  # the last batch was written when the task stopped


def test_camera_task_drops_an_old_buffer_and_writes_its_last_batch_when_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After an upgrade the agent starts on a /data holding format-1 frames: they go, with a log line, before
    the first capture; frames waiting in memory for a batch are written when the task is stopped."""
    from appliance import cameras
    from appliance.config import AgentConfig, CamerasConfig, Config

    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    (frames_dir / "000000000000.flf").write_bytes(b"FLF1" + bytes(4116))  # a float32 frame of the old format
    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node))
    made = managers_over_fakes(monkeypatch, dev, io)
    config = Config(agent=AgentConfig(state_dir=str(tmp_path)), cameras=CamerasConfig(sample_interval_seconds=0.01))
    registry = CollectorRegistry()

    def labelled() -> float:
        text = generate_latest(registry).decode()
        line = next(x for x in text.splitlines() if x.startswith('fl_agent_camera_frames_labelled_total{outcome="lab'))
        return float(line.split()[-1])

    async def body() -> None:
        task = asyncio.create_task(cameras.camera_task(config, registry))
        await until(lambda: bool(made) and labelled() >= 3)
        assert not list(frames_dir.glob("[0-9]*.flf"))
        assert len(FrameBuffer(frames_dir)) == 0  # fewer than a batch: still in memory
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="appliance.framebuffer"):
        run(body, io)
    assert "dropped 1 frames of format 1" in caplog.text
    assert len(FrameBuffer(frames_dir)) == labelled() >= 3


@pytest.mark.parametrize(("error", "reason"), [(errno.ENOSPC, "disk-full"), (errno.EIO, "io-error")])
def test_frame_writes_the_partition_refuses_are_dropped_counted_and_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: int, reason: str
) -> None:
    """The data partition refuses the frame buffer's writes for a while (one write per frame here): each refusal is
    counted (for fl_agent_storage_errors_total) and drops its frame, capture goes on, and the log says it once when
    the refusals start and once when frames are written again: no traceback, no handler error."""
    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node, width=128, height=96, luma=_traffic(128, 96, 2)))
    frames_dir = tmp_path / "frames"
    buffer = FrameBuffer(frames_dir, batch_frames=1)
    disk = FullDirectoryWrites(frames_dir, error)
    monkeypatch.setattr(os, "write", disk)
    counted: list[str] = []
    recorder = FrameRecorder(buffer, on_storage_error=counted.append)
    manager = CameraManager(FAST, recorder, context=FakeContext([dev]), monitor=FakeMonitor(), io=io)
    refused: list[int] = []

    async def body() -> None:
        await manager.start()
        await until(lambda: len(counted) >= 3)
        refused.append(len(counted))
        disk.full = False
        labelled = recorder.frames_labelled_total  # the buffer itself is the writer thread's while capture runs
        await until(lambda: recorder.frames_labelled_total >= labelled + 4)  # one may have been refused as it flipped
        await manager.stop()

    with caplog.at_level(logging.INFO, logger="appliance.cameras"):
        run(body, io)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"frame buffer {frames_dir}")]
    dropped = len(counted)  # one frame a write
    assert lines == [
        f"frame buffer {frames_dir}: cannot write frames ({reason}: {os.strerror(error)}); dropping them and "
        "capturing on until the data partition takes writes again",
        f"frame buffer {frames_dir}: writing frames again; {dropped} frames were dropped meanwhile",
    ]
    assert not [r for r in caplog.records if r.exc_info]
    assert manager.stats.capture_errors_total["handler"] == 0
    assert counted == [reason] * disk.refused and disk.refused >= refused[0]
    assert len(buffer) >= 3 and recorder.frames_labelled_total == dropped + len(buffer)  # dropped or stored
    assert not list(frames_dir.glob(".tmp-*"))


def test_camera_task_captures_on_a_read_only_partition_and_counts_its_refused_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A card remounted read-only after errors, holding a write a power cut interrupted: the buffer can neither
    remove it nor write a frame. The camera task starts and captures all the same; its refused writes reach the
    agent's counter (``on_storage_error``) and the log says so once."""
    from appliance import cameras
    from appliance.config import AgentConfig, CamerasConfig, Config

    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    (frames_dir / ".tmp-000000000000.fls").write_bytes(b"FLF3")  # cut short by a power cut
    monkeypatch.setattr(os, "write", FullDirectoryWrites(frames_dir, errno.EROFS))
    unlink = os.unlink

    def read_only_unlink(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
        if os.path.dirname(os.fspath(path)) == str(frames_dir):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", read_only_unlink)
    dev = vivid_at(tmp_path)
    io = FakeV4L2IO(FakeCamera(dev.device_node))
    made = managers_over_fakes(monkeypatch, dev, io)
    config = Config(agent=AgentConfig(state_dir=str(tmp_path)),
                    cameras=CamerasConfig(sample_interval_seconds=0.01, buffer_max_frames=7))
    counted: list[str] = []

    async def body() -> None:
        task = asyncio.create_task(cameras.camera_task(config, CollectorRegistry(), on_storage_error=counted.append))
        await until(lambda: len(counted) >= 3 or task.done())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="appliance.cameras"):
        run(body, io)
    assert len(counted) >= 3 and set(counted) == {"read-only"}
    assert made[0].stats.capture_errors_total["handler"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"frame buffer {frames_dir}: cannot write frames (read-only: {os.strerror(errno.EROFS)}); "
                      "dropping them and capturing on until the data partition takes writes again"]
    assert len(FrameBuffer(frames_dir)) == 0
