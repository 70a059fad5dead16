"""The bounded frame buffer on the data partition: round trip, retention, crash leftovers, corruption."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from appliance.framebuffer import HEADER, FrameBuffer, FrameFileError, decode_frame, encode_frame

FRAME_BYTES = HEADER.size + 4 * 32 * 32


def _frame(value: float) -> np.ndarray:
    return np.full((1, 32, 32), value, np.float32)


def test_frames_come_back_as_training_batches(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path / "frames")
    for i in range(6):
        buf.append(_frame(i / 10), label=i % 4, timestamp_ns=1_000 + i)
    x, y = buf.load()
    assert x.shape == (6, 1, 32, 32) and x.dtype == np.float32
    assert y.tolist() == [0, 1, 2, 3, 0, 1] and y.dtype == np.int64
    np.testing.assert_allclose(x[:, 0, 0, 0], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-6)
    assert buf.label_counts() == {0: 2, 1: 2, 2: 1, 3: 1}
    assert buf.stats().bytes == 6 * FRAME_BYTES


def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path, max_frames=5)
    for i in range(8):
        buf.append(_frame(i / 10), label=i % 4)
    assert len(buf) == 5 and len(list(tmp_path.glob("*.flf"))) == 5
    _, y = buf.load()
    assert y.tolist() == [3, 0, 1, 2, 3]


def test_retention_by_bytes(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path, max_frames=100, max_bytes=3 * FRAME_BYTES + 10)
    for i in range(5):
        buf.append(_frame(0.5), label=i % 4)
    assert buf.stats().frames == 3
    assert sum(p.stat().st_size for p in tmp_path.glob("*.flf")) <= 3 * FRAME_BYTES + 10


def test_reopening_continues_the_sequence_and_clears_interrupted_writes(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path, max_frames=10)
    first = buf.append(_frame(0.1), label=1)
    (tmp_path / ".tmp-000000000099.flf").write_bytes(b"half a frame")  # power cut mid-write
    again = FrameBuffer(tmp_path, max_frames=10)
    assert len(again) == 1
    second = again.append(_frame(0.2), label=2)
    assert not list(tmp_path.glob(".tmp-*"))
    assert second.name > first.name
    assert again.load()[1].tolist() == [1, 2]


def test_a_reader_changes_nothing_and_the_writer_applies_new_limits(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path, max_frames=10)
    for i in range(6):
        buf.append(_frame(0.1), label=i % 4)
    (tmp_path / ".tmp-000000000006.flf").write_bytes(b"being written")  # the writer is mid-write
    reader = FrameBuffer(tmp_path, max_frames=2)  # e.g. the trainer with other limits
    assert len(reader) == 6 and reader.load()[1].tolist() == [0, 1, 2, 3, 0, 1]
    assert (tmp_path / ".tmp-000000000006.flf").exists() and len(list(tmp_path.glob("[0-9]*.flf"))) == 6
    writer = FrameBuffer(tmp_path, max_frames=2)
    writer.append(_frame(0.2), label=3)
    assert len(writer) == 2 and len(list(tmp_path.glob("[0-9]*.flf"))) == 2


def test_corrupted_frame_is_dropped_not_trained_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    buf = FrameBuffer(tmp_path)
    buf.append(_frame(0.1), label=1)
    bad = buf.append(_frame(0.2), label=2)
    buf.append(_frame(0.3), label=3)
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        _, y = buf.load()
    assert y.tolist() == [1, 3]
    assert "checksum mismatch" in caplog.text
    assert not bad.exists() and len(buf) == 2


def test_decode_names_the_problem() -> None:
    blob = encode_frame(_frame(0.5), 2, 7)
    pixels, label, ts = decode_frame(blob)
    assert label == 2 and ts == 7 and pixels.shape == (1, 32, 32)
    with pytest.raises(FrameFileError, match="bad magic"):
        decode_frame(b"XXXX" + blob[4:], "f")
    with pytest.raises(FrameFileError, match="pixel bytes"):
        decode_frame(blob[:-4], "f")
    with pytest.raises(FrameFileError, match="shorter than"):
        decode_frame(blob[:10], "f")


def test_wrong_shapes_and_labels_are_refused(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path)
    with pytest.raises(ValueError, match=r"shape \(1, 16, 16\) does not match"):
        buf.append(np.zeros((1, 16, 16), np.float32), 0)
    with pytest.raises(ValueError, match="class index"):
        buf.append(_frame(0.0), 300)
    with pytest.raises(ValueError, match="positive"):
        FrameBuffer(tmp_path, max_frames=0)


def test_sample_draws_distinct_frames(tmp_path: Path) -> None:
    buf = FrameBuffer(tmp_path)
    for i in range(10):
        buf.append(_frame(i / 10), label=i % 4)
    x, y = buf.sample(4, np.random.default_rng(0))
    assert x.shape == (4, 1, 32, 32) and len(set(x[:, 0, 0, 0].tolist())) == 4
    x, y = buf.sample(50)
    assert len(y) == 10
    empty = FrameBuffer(tmp_path / "empty")
    x, y = empty.sample(8)
    assert x.shape == (0, 1, 32, 32) and y.shape == (0,)
