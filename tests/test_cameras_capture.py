"""Capture against the fake V4L2 device: negotiation, fresh frames, conversion, clean teardown."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import pytest
from cameras_fakes import FakeCamera, FakeV4L2IO

from appliance import v4l2
from appliance.cameras import CaptureError, CaptureSession, CaptureSettings, error_reason, frame_views

T = TypeVar("T")


def run_with_clock(io: FakeV4L2IO, body: Callable[[], Awaitable[T]], period: float = 0.002) -> T:
    """Run `body` while a frame clock ticks the fake cameras (like a sensor at 1/period fps)."""

    async def main() -> T:
        async def clock() -> None:
            while True:
                io.tick()
                await asyncio.sleep(period)

        ticker = asyncio.create_task(clock())
        try:
            return await asyncio.wait_for(body(), 60)
        finally:
            ticker.cancel()

    return asyncio.run(main())


def _luma(seq: int) -> bytes:
    return bytes((seq * 7 + i) % 256 for i in range(64 * 48))


def test_grab_returns_a_fresh_settled_frame_in_luma() -> None:
    cam = FakeCamera("/dev/video0", luma=_luma)
    io = FakeV4L2IO(cam)
    session = CaptureSession("/dev/video0", CaptureSettings(settle_frames=2), io)

    async def body() -> np.ndarray:
        fmt = session.open()
        assert (fmt.fourcc, fmt.width, fmt.height) == ("YUYV", 64, 48)
        try:
            return await session.grab()
        finally:
            session.close()

    gray = run_with_clock(io, body)
    assert gray.shape == (48, 64)
    seq = (int(gray[0, 0]) * pow(7, -1, 256)) % 256  # which frame did we get?
    assert seq >= 2  # the first two frames after STREAMON were dropped
    assert gray.tobytes() == _luma(seq)
    assert io.open_count() == 0 and all(m.closed for m in io.maps)


def test_row_padding_from_the_driver_is_handled() -> None:
    cam = FakeCamera("/dev/video0", luma=lambda s: bytes([90]) * (64 * 48), stride_pad=16)
    io = FakeV4L2IO(cam)
    session = CaptureSession("/dev/video0", CaptureSettings(), io)

    async def body() -> np.ndarray:
        session.open()
        try:
            return await session.grab()
        finally:
            session.close()

    gray = run_with_clock(io, body)
    assert (gray == 90).all()


def test_frame_views_are_model_input_and_label_view() -> None:
    gray = np.full((48, 64), 51, np.uint8)
    gray[:24] = 255
    pixels, view = frame_views(gray, CaptureSettings())
    assert pixels.shape == (1, 32, 32) and pixels.dtype == np.uint8
    assert pixels.min() == 51 and pixels.max() == 255
    assert view.shape == (64, 64) and view.min() >= 0.0 and view.max() <= 1.0


def test_grey_is_preferred_and_compressed_only_devices_are_refused_by_name() -> None:
    both = FakeV4L2IO(FakeCamera("/dev/video0", formats=[("MJPG", "Motion-JPEG", 1), ("YUYV", "YUYV", 0),
                                                         ("GREY", "8-bit Greyscale", 0)]))
    session = CaptureSession("/dev/video0", CaptureSettings(), both)
    assert session.open().fourcc == "GREY"
    session.close()
    mjpeg = FakeV4L2IO(FakeCamera("/dev/video0", formats=[("MJPG", "Motion-JPEG", 1), ("H264", "H.264", 1)]))
    with pytest.raises(CaptureError, match="offers MJPG, H264") as info:
        CaptureSession("/dev/video0", CaptureSettings(), mjpeg).open()
    assert info.value.reason == "no_supported_format"
    assert mjpeg.open_count() == 0


def test_metadata_node_is_refused() -> None:
    io = FakeV4L2IO(FakeCamera("/dev/video1", device_caps=v4l2.V4L2_CAP_META_CAPTURE | v4l2.V4L2_CAP_STREAMING))
    with pytest.raises(CaptureError) as info:
        CaptureSession("/dev/video1", CaptureSettings(), io).open()
    assert info.value.reason == "not_capture" and io.open_count() == 0


def test_no_frame_times_out() -> None:
    io = FakeV4L2IO(FakeCamera("/dev/video0"))
    session = CaptureSession("/dev/video0", CaptureSettings(frame_timeout_s=0.1), io)

    async def body() -> None:
        session.open()
        try:
            await session.grab()
        finally:
            session.close()

    with pytest.raises(CaptureError, match="no frame from /dev/video0") as info:
        asyncio.run(body())  # no clock: the sensor never delivers
    assert info.value.reason == "timeout" and io.open_count() == 0


def test_unplug_while_waiting_for_a_frame_is_a_disconnect() -> None:
    io = FakeV4L2IO(FakeCamera("/dev/video0"))
    session = CaptureSession("/dev/video0", CaptureSettings(frame_timeout_s=5), io)

    async def body() -> BaseException:
        session.open()
        waiting = asyncio.create_task(session.grab())
        await asyncio.sleep(0.05)
        io.unplug("/dev/video0")  # wakes the reader like POLLERR; DQBUF answers ENODEV
        try:
            await waiting
        except OSError as exc:
            return exc
        finally:
            session.close()
        raise AssertionError("grab() returned a frame from an unplugged camera")

    exc = asyncio.run(body())
    assert exc.errno == errno.ENODEV and error_reason(exc) == "disconnected"
    assert io.open_count() == 0


@pytest.mark.parametrize(("exc", "reason"), [
    (OSError(errno.ENODEV, "x"), "disconnected"),
    (OSError(errno.EIO, "x"), "disconnected"),
    (OSError(errno.EBUSY, "x"), "busy"),
    (OSError(errno.EACCES, "x"), "permission"),
    (OSError(errno.EINVAL, "x"), "io_error"),
    (TimeoutError(), "timeout"),
    (ValueError("short YUYV frame"), "bad_frame"),
    (CaptureError("not_capture", "x"), "not_capture"),
])
def test_error_reasons(exc: BaseException, reason: str) -> None:
    assert error_reason(exc) == reason


def test_a_cancel_that_races_frame_readiness_still_cancels() -> None:
    # The camera is removed (task cancelled) in the same loop iteration as its fd turns readable. With
    # asyncio.wait_for on Python 3.11 the cancel was swallowed and the capture task went on forever.
    from appliance.cameras import wait_readable

    async def body() -> str:
        loop = asyncio.get_running_loop()
        callbacks = {}
        real_add = loop.add_reader

        def spy(fd, cb, *args):
            callbacks[fd] = (cb, args)
            return real_add(fd, cb, *args)

        loop.add_reader = spy  # type: ignore[method-assign]
        r, w = os.pipe()
        try:
            task = asyncio.create_task(wait_readable(r, 5))
            await asyncio.sleep(0.01)
            cb, args = callbacks[r]
            cb(*args)        # the fd became readable: the future is done...
            task.cancel()    # ...and the removal's cancel arrives before the task runs again
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"
            return "swallowed"
        finally:
            loop.add_reader = real_add  # type: ignore[method-assign]
            os.close(r)
            os.close(w)

    assert asyncio.run(body()) == "cancelled"
