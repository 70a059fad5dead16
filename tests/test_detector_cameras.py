"""The detector on real cameras: a V4L2 camera (the fake kernel-side device of cameras_fakes) feeds frames, the
recorder stores each with the motion labeller's pseudo-boxes, the buffer gives them back as detector targets,
and an agent with [data] source = "cameras" trains the detector package on them and sends an update.

Bad input gets one line: a detector on a buffer of counts only (frames written before boxes were stored), and
a multi-class detector on class-less pseudo-boxes. The reverse, a counting classifier on a buffer of boxes,
is no error: every box record carries its count too.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path

import agent_harness
import numpy as np
import pytest
from agent_harness import FakeAggregator, run_agent_against, sample
from cameras_fakes import FakeCamera, FakeContext, FakeMonitor, FakeV4L2IO, recorded
from nacl.signing import SigningKey

from appliance import cameras, wire
from appliance.cameras import CameraManager, CaptureSettings, FrameRecorder
from appliance.config import AgentConfig, CamerasConfig, Config
from appliance.detection import DetectionSpec, encode_targets
from appliance.framebuffer import BOX_SLOTS, CountsOnlyBuffer, FrameBuffer, decode_frame, encode_frame
from appliance.synthetic import SyntheticCamera
from appliance.training_job import TrainJob, run_train_job

FAST = CaptureSettings(interval_s=0.01, frame_timeout_s=10.0, retry_min_s=0.05, retry_max_s=0.1)
WIDTH, HEIGHT, BLOCK = 128, 96, 16  # the fake camera's frame and its vehicles; stored at 32x32
KEY = SigningKey(bytes(range(32)))


def _traffic(seq: int) -> bytes:
    """Frame ``seq`` of a road with two 16x16 vehicles moving in separate lanes (top rows 4 and 50)."""
    rng = np.random.default_rng(seq)
    frame = 80 + 40 * np.linspace(0, 1, WIDTH)[None, :] + rng.normal(0, 1, (HEIGHT, WIDTH))
    for lane, top in enumerate((4, 50)):
        x = (10 + (5 + 2 * lane) * seq) % (WIDTH - BLOCK)
        frame[top:top + BLOCK, x:x + BLOCK] = 220
    return np.clip(frame, 0, 255).astype(np.uint8).tobytes()


def _camera(tmp_path: Path) -> tuple[FakeV4L2IO, Callable[..., CameraManager]]:
    dev = recorded("vivid-video0").with_node(str(tmp_path / "video0"))
    io = FakeV4L2IO(FakeCamera(dev.device_node, width=WIDTH, height=HEIGHT, luma=_traffic))

    def manager(settings: CaptureSettings, on_frame) -> CameraManager:
        return CameraManager(settings, on_frame, context=FakeContext([dev]), monitor=FakeMonitor(), io=io)

    return io, manager


async def _ticking(io: FakeV4L2IO) -> None:
    while True:
        io.tick()
        await asyncio.sleep(0.002)


def test_camera_frames_come_back_from_the_buffer_with_their_pseudo_boxes_as_detector_targets(tmp_path: Path) -> None:
    io, make_manager = _camera(tmp_path)
    buffer = FrameBuffer(tmp_path / "frames")
    recorder = FrameRecorder(buffer)
    manager = make_manager(FAST, recorder)

    async def body() -> None:
        ticker = asyncio.create_task(_ticking(io))
        await manager.start()
        while recorder.frames_labelled_total < 20:
            await asyncio.sleep(0.01)
        await manager.stop()
        await recorder.flush()
        ticker.cancel()

    asyncio.run(asyncio.wait_for(body(), 120))
    x, boxes = buffer.load_boxes()
    _, counts = buffer.load()
    assert len(x) == len(boxes) == len(counts) == recorder.frames_labelled_total == buffer.frames_with_boxes()
    two = [b for b in boxes if len(b) == 2]
    assert len(two) >= 0.9 * len(boxes) and (counts == 2).mean() >= 0.9  # the count is the number of boxes
    sizes = np.concatenate([b[:, 2:] - b[:, :2] for b in two])
    # a 16x16 vehicle of the 128x96 camera is 4 x 5.3 pixels of the stored 32x32 frame
    assert np.allclose(np.median(sizes, axis=0), [4.0, 16 / 3], atol=1.0), np.median(sizes, axis=0)
    tops = sorted(float(b[1]) for b in two[0])
    assert abs(tops[0] - 4 / 3) <= 1.0 and abs(tops[1] - 50 / 3) <= 1.0  # the two lanes
    spec = DetectionSpec(stride=2, classes=1, input_shape=(1, 32, 32))
    targets = encode_targets(spec, boxes)
    assert targets.shape == (len(x), 6, 16, 16)
    assert (targets[:, 5].sum(axis=(1, 2)) == [len(b) for b in boxes]).all()  # one centre cell per pseudo-box


def test_a_frame_with_more_blobs_than_slots_keeps_the_largest() -> None:
    view = np.array([[i * 6, 0, i * 6 + 2 + i % 3, 2 + i] for i in range(BOX_SLOTS + 3)], np.float32)
    kept = cameras.frame_boxes(view, (64, 64), (1, 32, 32))
    area = (view[:, 2] - view[:, 0]) * (view[:, 3] - view[:, 1])
    assert len(kept) == BOX_SLOTS
    assert np.allclose(np.sort((kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])) * 4,
                       np.sort(area)[-BOX_SLOTS:])


def test_box_records_round_trip_and_refuse_boxes_outside_the_frame() -> None:
    pixels = np.full((1, 32, 32), 7, np.uint8)
    boxes = np.array([[0.5, 1.0, 4.5, 6.25], [30, 28, 32, 32]], np.float32)
    record = decode_frame(encode_frame(pixels, 2, 9, boxes))
    assert record.label == 2 and np.array_equal(record.boxes, boxes) and (record.pixels == 7).all()
    assert decode_frame(encode_frame(pixels, 0, 9, np.zeros((0, 4)))).boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="must lie in the 32x32 frame"):
        encode_frame(pixels, 1, 9, np.array([[0, 0, 33, 4]]))
    with pytest.raises(ValueError, match=f"at most {BOX_SLOTS} are stored"):
        encode_frame(pixels, 1, 9, np.tile([[0, 0, 1, 1]], (BOX_SLOTS + 1, 1)))


def test_counts_and_boxes_share_a_buffer_and_a_detector_reads_only_the_boxes(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path, batch_frames=4)
    frame = np.zeros((1, 32, 32), np.uint8)
    for i in range(3):  # written by a version that stored counts only
        buf.append(frame, 1, i)
    for i in range(5):
        buf.append(frame, 1, 10 + i, boxes=np.array([[i, 0, i + 3, 3]], np.float32))
    buf.flush()
    reader = FrameBuffer(tmp_path)
    assert len(reader) == 8 and reader.frames_with_boxes() == 5
    assert reader.load()[1].tolist() == [1] * 8
    x, boxes = reader.load_boxes(limit=2)
    assert len(x) == 2 and [float(b[0, 0]) for b in boxes] == [3.0, 4.0]  # the newest


@pytest.fixture(scope="module")
def detector_package(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="torch (a tools/dev dependency) exports the detector")
    from appliance.modelpkg import write_package
    from flctl.model.build import PackageOptions, make_model, package_from_graphs
    from flctl.model.losses import resolve_loss
    from flctl.model.torch_export import export_graphs

    # The export without its check against torch autograd (tests/test_detector_model.py checks this network).
    model = make_model("flctl.model.detector:centre_net", seed=0)
    loss = resolve_loss("flctl.model.detector:centre_net_loss")
    options = PackageOptions(name="traffic-detector", class_names=["vehicle"], mean=0.4, std=0.25,
                             optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9}, detection=dict(model.detection))
    pkg = package_from_graphs(export_graphs(model, loss, (1, 32, 32)), loss, (1, 32, 32), options)
    path = tmp_path_factory.mktemp("detector") / "detector.flpkg"
    write_package(path, pkg, KEY)
    return path


class _TasksAtDetectorRate:
    """appliance.wire for the fake aggregator, whose tasks then ask for the detector's learning rate (0.01, as
    `flctl demo --model detector` does; the task default 0.05 is the classifier's)."""

    Task = staticmethod(functools.partial(wire.Task, learning_rate=0.01))

    def __getattr__(self, name: str) -> object:
        return getattr(wire, name)


def _job(package: Path, state: Path) -> TrainJob:
    from appliance.modelpkg import load_package

    params = dict(load_package(package, KEY.verify_key).initial_params)
    return TrainJob(package_path=str(package), aggregator_key=bytes(KEY.verify_key), params=params,
                    source="cameras", state_dir=str(state), samples=64, synthetic_camera=0, seed=1, epochs=1,
                    batch_size=16, learning_rate=0.01, prox_mu=0.0, threads=1)  # fmt: skip


@pytest.mark.slow
def test_a_detector_on_a_buffer_of_counts_only_is_refused_in_one_line(detector_package, tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path / "frames")
    x, y = SyntheticCamera(0).capture(32)
    for pixels, label in zip(x, y, strict=True):
        buf.append(pixels, int(label))
    buf.flush()
    with pytest.raises(CountsOnlyBuffer) as err:
        run_train_job(_job(detector_package, tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert "holds 32 frames with counts only and none with pseudo-boxes; a detector trains on boxes" in message


@pytest.mark.slow
def test_the_agent_trains_the_detector_on_a_cameras_pseudo_boxes_and_sends_an_update(
    detector_package, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fl-agent with [data] source = "cameras": camera_task (as `fl-agent run` starts it) captures from the fake
    V4L2 camera and records frames with pseudo-boxes; the round waits for a batch of them, trains the detector
    package in the trainer process and queues one signed update with the detection metrics."""
    monkeypatch.setattr("appliance.agent.FRAME_POLL_SECONDS", 0.2)
    monkeypatch.setattr(agent_harness, "wire", _TasksAtDetectorRate())
    io, make_manager = _camera(tmp_path)
    monkeypatch.setattr(cameras, "CameraManager", make_manager)
    fake = FakeAggregator(KEY, detector_package)

    async def cameras_record(state: Path) -> None:
        # buffer_max_frames 64: segments of 8 frames, so a batch of boxes reaches the flash quickly
        config = Config(agent=AgentConfig(state_dir=str(state)),
                        cameras=CamerasConfig(sample_interval_seconds=0.01, buffer_max_frames=64))
        await asyncio.gather(_ticking(io), cameras.camera_task(config))

    async def run() -> object:
        return await run_agent_against(fake, tmp_path, until=lambda _a: len(fake.updates) >= 1, source="cameras",
                                       during=cameras_record)

    agent = asyncio.run(run())
    assert len(fake.updates) == 1, "no update"
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) == 0
    update = wire.decode_update(fake.updates[0], lambda kid: agent.identity.verify_key, fake.package.param_specs)
    assert set(update.tensors) == set(fake.package.initial_params)
    assert update.num_samples >= 16 and np.isfinite(update.metrics["loss_after"])
    assert update.metrics["loss_after"] < update.metrics["loss_before"]
    assert {"centre_f1", "count_mae"} <= set(update.metrics)  # measured against the pseudo-boxes
    stored = FrameBuffer(tmp_path / "state" / "frames")
    assert stored.frames_with_boxes() == len(stored) > 0
