"""The bounded frame buffer on the data partition: round trip, batched writes without fsync, retention,
crash leftovers, corruption, the upgrade from format 1, and the trainer's float32 view of the frames."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from appliance import framebuffer
from appliance.framebuffer import (
    BATCH_FRAMES,
    HEADER,
    FrameBuffer,
    FrameFileError,
    decode_frame,
    encode_frame,
    to_model_input,
)
from appliance.synthetic import SyntheticCamera
from appliance.training_job import TrainJob, training_data

RECORD = HEADER.size + 32 * 32  # uint8 pixels: 1,048 bytes a frame (format 1 took 4,120)


def _frame(value: int) -> np.ndarray:
    return np.full((1, 32, 32), value, np.uint8)


def _segments(root: Path) -> list[Path]:
    return sorted(root.glob("[0-9]*.fls"))


def test_frames_come_back_as_captured_and_as_model_input(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path / "frames")
    x_in, y_in = SyntheticCamera(0).capture(6)
    for i, (pixels, label) in enumerate(zip(x_in, y_in, strict=True)):
        buf.append(pixels, int(label), timestamp_ns=1_000 + i)
    buf.flush()
    x, y = buf.load()
    assert x.dtype == np.uint8 and np.array_equal(x, x_in)
    assert y.tolist() == y_in.tolist() and y.dtype == np.int64
    model_x = to_model_input(x)
    assert model_x.dtype == np.float32 and model_x.min() >= 0.0 and model_x.max() <= 1.0
    np.testing.assert_allclose(model_x, x_in / 255.0, atol=1e-7)
    assert to_model_input(_frame(255)).max() == 1.0
    assert buf.label_counts() == {int(k): int(v) for k, v in zip(*np.unique(y_in, return_counts=True), strict=True)}
    assert buf.stats().bytes == 6 * RECORD and len(_segments(tmp_path / "frames")) == 1


def test_frames_are_written_in_batches_and_never_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flash-wear fix: one file write per batch, no fsync of a file or the directory (a torn frame is
    caught by its CRC instead)."""
    synced: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append("fsync"))
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append("fdatasync"))
    buf = FrameBuffer(tmp_path)
    for i in range(BATCH_FRAMES - 1):
        buf.append(_frame(i), label=i % 4)
    assert _segments(tmp_path) == [] and len(buf) == 0  # waiting in memory
    buf.append(_frame(200), label=1)
    assert len(_segments(tmp_path)) == 1 and len(FrameBuffer(tmp_path)) == BATCH_FRAMES
    buf.append(_frame(201), label=2)
    assert buf.flush() is not None and buf.flush() is None
    assert len(_segments(tmp_path)) == 2 and len(FrameBuffer(tmp_path)) == BATCH_FRAMES + 1
    assert synced == []
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_batch_is_written_once_its_oldest_frame_has_waited_long_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow camera (one frame a minute) still reaches the trainer: batches are also closed by age."""
    now = [1000.0]
    monkeypatch.setattr(framebuffer.time, "monotonic", lambda: now[0])
    buf = FrameBuffer(tmp_path, batch_seconds=60.0)
    buf.append(_frame(1), label=1)
    now[0] += 59.0
    buf.append(_frame(2), label=2)
    assert len(FrameBuffer(tmp_path)) == 0
    now[0] += 1.0
    buf.append(_frame(3), label=3)
    assert FrameBuffer(tmp_path).load()[1].tolist() == [1, 2, 3]


def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path, max_frames=5)
    for i in range(8):
        buf.append(_frame(i), label=i % 4)
    buf.flush()
    assert len(buf) == 5
    _, y = FrameBuffer(tmp_path).load()
    assert y.tolist() == [3, 0, 1, 2, 3]


def test_retention_by_bytes(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path, max_frames=100, max_bytes=3 * RECORD + 10)
    for i in range(5):
        buf.append(_frame(128), label=i % 4)
    buf.flush()
    assert buf.stats().frames == 3
    assert sum(p.stat().st_size for p in _segments(tmp_path)) <= 3 * RECORD + 10


def test_retention_drops_whole_segments_of_at_most_an_eighth_of_the_limit(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path, max_frames=80)
    assert buf.batch_frames == 10 and FrameBuffer(tmp_path, max_frames=4096).batch_frames == BATCH_FRAMES
    for i in range(205):
        buf.append(_frame(i % 256), label=i % 4)
    buf.flush()
    x, _ = FrameBuffer(tmp_path).load()
    assert 70 <= len(x) <= 80
    assert x[-1, 0, 0, 0] == 204 and x[0, 0, 0, 0] == 205 - len(x)  # the newest, in order


def test_load_with_a_limit_returns_the_newest_frames(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path, batch_frames=4)
    for i in range(10):
        buf.append(_frame(i), label=i % 4)
    buf.flush()
    x, y = buf.load(limit=5)
    assert x[:, 0, 0, 0].tolist() == [5, 6, 7, 8, 9] and y.tolist() == [1, 2, 3, 0, 1]
    assert len(buf.load(limit=0)[1]) == 0 and len(buf.load(limit=50)[1]) == 10


def test_reopening_continues_the_sequence_and_clears_interrupted_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    buf = FrameBuffer(tmp_path, batch_frames=2)
    for i in range(4):
        buf.append(_frame(i), label=i % 4)
    first, second = _segments(tmp_path)
    (tmp_path / ".tmp-000000000099.fls").write_bytes(b"half a batch")  # power cut mid-write
    with open(second, "r+b") as fh:  # power cut before the kernel wrote the segment's end back
        fh.truncate(RECORD + 100)
    again = FrameBuffer(tmp_path, batch_frames=2)
    assert len(again) == 3
    again.append(_frame(9), label=1)
    third = again.flush()
    assert not list(tmp_path.glob(".tmp-*"))
    assert third is not None and third.name > second.name > first.name
    with caplog.at_level(logging.WARNING):
        assert again.load()[1].tolist() == [0, 1, 2, 1]
    assert "torn frame" in caplog.text and second.name in caplog.text


def test_a_reader_changes_nothing_and_the_writer_applies_new_limits(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path, max_frames=10)
    for i in range(6):
        buf.append(_frame(10), label=i % 4)
    (tmp_path / ".tmp-000000000006.fls").write_bytes(b"being written")  # the writer is mid-write
    reader = FrameBuffer(tmp_path, max_frames=2)  # e.g. the trainer with other limits
    assert len(reader) == 6 and reader.load()[1].tolist() == [0, 1, 2, 3, 0, 1]
    assert (tmp_path / ".tmp-000000000006.fls").exists() and len(_segments(tmp_path)) == 6
    writer = FrameBuffer(tmp_path, max_frames=2)
    writer.append(_frame(20), label=3)
    assert len(writer) == 2 and len(_segments(tmp_path)) == 2


@pytest.mark.parametrize("offset", [-1, 4], ids=["pixel", "label"])
def test_a_corrupted_frame_is_skipped_not_trained_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, offset: int
) -> None:
    """The CRC covers the pixels and the header's fields: a flipped label is not trained on either."""
    buf = FrameBuffer(tmp_path)
    for value, label in [(10, 1), (20, 2), (30, 3)]:
        buf.append(_frame(value), label=label)
    segment = buf.flush()
    assert segment is not None
    raw = bytearray(segment.read_bytes())
    raw[RECORD + offset if offset >= 0 else 2 * RECORD + offset] ^= 0x01
    segment.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        x, y = FrameBuffer(tmp_path).load()
    assert y.tolist() == [1, 3] and x[:, 0, 0, 0].tolist() == [10, 30]
    assert "checksum mismatch" in caplog.text and "frame 1" in caplog.text


def test_decode_names_the_problem() -> None:
    blob = encode_frame(_frame(128), 2, 7)
    record = decode_frame(blob)
    pixels, label, ts = record.pixels, record.label, record.timestamp_ns
    assert label == 2 and ts == 7 and pixels.shape == (1, 32, 32) and pixels.dtype == np.uint8
    assert record.boxes is None  # format 2: a count only
    with pytest.raises(FrameFileError, match="bad magic"):
        decode_frame(b"XXXX" + blob[4:], "f")
    with pytest.raises(FrameFileError, match="pixel bytes"):
        decode_frame(blob[:-4], "f")
    with pytest.raises(FrameFileError, match="shorter than"):
        decode_frame(blob[:10], "f")
    with pytest.raises(FrameFileError, match="format 1"):
        decode_frame(b"FLF1" + blob[4:], "f")


def test_wrong_shapes_types_and_labels_are_refused(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path)
    with pytest.raises(ValueError, match=r"shape \(1, 16, 16\) does not match"):
        buf.append(np.zeros((1, 16, 16), np.uint8), 0)
    with pytest.raises(ValueError, match="stored as captured, uint8"):
        buf.append(np.zeros((1, 32, 32), np.float32), 0)
    with pytest.raises(ValueError, match="class index"):
        buf.append(_frame(0), 300)
    with pytest.raises(ValueError, match="positive"):
        FrameBuffer(tmp_path, max_frames=0)
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(np.zeros((1, 1, 2, 2), np.float32))


def test_sample_draws_distinct_frames(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path)
    for i in range(10):
        buf.append(_frame(i), label=i % 4)
    buf.flush()
    x, y = buf.sample(4, np.random.default_rng(0))
    assert x.shape == (4, 1, 32, 32) and len(set(x[:, 0, 0, 0].tolist())) == 4
    x, y = buf.sample(50)
    assert len(y) == 10
    empty = FrameBuffer(tmp_path / "empty")
    x, y = empty.sample(8)
    assert x.shape == (0, 1, 32, 32) and y.shape == (0,)


# --- the upgrade from format 1 -------------------------------------------------------------------------


def _format_1_frame(value: float, label: int) -> bytes:
    """A frame as the previous version wrote it: one file, float32 pixels, the CRC over the pixels only."""
    data = np.full((1, 32, 32), value, "<f4").tobytes()
    return struct.pack("<4sBB3HQI", b"FLF1", label, 0, 1, 32, 32, 1_000, zlib.crc32(data)) + data


def test_a_format_1_buffer_is_dropped_cleanly_after_an_upgrade(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device's /data holds float32 frames of the previous version: the new trainer reads none of them
    (and does not crash), the writer deletes them with one log line, and new frames follow them in order."""
    for seq in range(3):
        (tmp_path / f"{seq:012d}.flf").write_bytes(_format_1_frame(seq / 10, seq))
    (tmp_path / ".tmp-000000000003.flf").write_bytes(b"cut short")

    reader = FrameBuffer(tmp_path)
    assert len(reader) == 0 and reader.load()[0].shape == (0, 1, 32, 32) and reader.label_counts() == {}
    assert len(list(tmp_path.glob("[0-9]*.flf"))) == 3  # readers change nothing

    writer = FrameBuffer(tmp_path)
    with caplog.at_level(logging.INFO, logger="appliance.framebuffer"):
        writer.recover()
    assert "dropped 3 frames of format 1" in caplog.text
    assert not list(tmp_path.glob("*.flf")) and not list(tmp_path.glob(".tmp-*"))
    writer.append(_frame(7), label=2)
    segment = writer.flush()
    assert segment is not None and segment.name == "000000000003.fls"
    assert FrameBuffer(tmp_path).load()[1].tolist() == [2]


# --- the trainer's side ----------------------------------------------------------------------------------


def test_the_trainer_gets_the_newest_stored_frames_as_float32(tmp_path: Path) -> None:
    frames = FrameBuffer(tmp_path / "frames")
    x_in, y_in = SyntheticCamera(1).capture(100)
    for pixels, label in zip(x_in, y_in, strict=True):
        frames.append(pixels, int(label))
    frames.flush()
    job = TrainJob(package_path="", aggregator_key=b"", params={}, source="cameras", state_dir=str(tmp_path),
                   samples=40, synthetic_camera=0, seed=0, epochs=1, batch_size=16, learning_rate=0.1, prox_mu=0.0,
                   threads=1)  # fmt: skip
    x, y = training_data(job)
    assert x.dtype == np.float32 and x.shape == (40, 1, 32, 32) and x.flags.c_contiguous
    np.testing.assert_allclose(x, x_in[-40:] / 255.0, atol=1e-7)
    assert y.tolist() == y_in[-40:].tolist()
