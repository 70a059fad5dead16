"""Pixel formats -> grayscale, and the area downscale to the model's input, with known pixel values."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.v4l2 import PixFormat, area_resize, fourcc, to_gray


def _fmt(code: str, width: int, height: int, bytesperline: int) -> PixFormat:
    return PixFormat(width, height, fourcc(code), bytesperline, bytesperline * height)


def test_yuyv_takes_the_y_samples_and_skips_row_padding() -> None:
    # 4x2 image, Y = 10,20,30,40 / 50,60,70,80; chroma bytes 200/100 must not leak in; 4 padding bytes/row
    rows = [bytes([10, 200, 20, 100, 30, 200, 40, 100]) + b"\xee" * 4,
            bytes([50, 200, 60, 100, 70, 200, 80, 100]) + b"\xee" * 4]
    gray = to_gray(b"".join(rows), _fmt("YUYV", 4, 2, 12))
    assert gray.tolist() == [[10, 20, 30, 40], [50, 60, 70, 80]]


def test_uyvy_takes_the_odd_bytes() -> None:
    data = bytes([128, 11, 128, 22, 128, 33, 128, 44])
    assert to_gray(data, _fmt("UYVY", 4, 1, 8)).tolist() == [[11, 22, 33, 44]]


def test_grey_and_nv12_use_the_luma_plane() -> None:
    luma = bytes(range(12))
    assert to_gray(luma, _fmt("GREY", 4, 3, 4)).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    nv12 = luma + bytes([128]) * 6  # chroma plane after the luma plane
    assert to_gray(nv12, _fmt("NV12", 4, 3, 4)).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_rgb24_and_bgr24_use_bt601_luma() -> None:
    rgb = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])
    assert to_gray(rgb, _fmt("RGB3", 4, 1, 12)).tolist() == [[76, 150, 29, 255]]
    bgr = bytes([0, 0, 255, 0, 255, 0, 255, 0, 0, 255, 255, 255])
    assert to_gray(bgr, _fmt("BGR3", 4, 1, 12)).tolist() == [[76, 150, 29, 255]]


def test_short_frame_is_refused_with_sizes_named() -> None:
    with pytest.raises(ValueError, match=r"short YUYV frame: 10 bytes, 4x2"):
        to_gray(bytes(10), _fmt("YUYV", 4, 2, 8))


def test_last_row_without_padding_is_accepted() -> None:
    # some drivers report bytesused without the last row's padding
    data = bytes([1, 0, 2, 0]) + b"\x00" * 4 + bytes([3, 0, 4, 0])
    assert to_gray(data, _fmt("YUYV", 2, 2, 8)).tolist() == [[1, 2], [3, 4]]


def test_unknown_format_is_named() -> None:
    with pytest.raises(ValueError, match="MJPG"):
        to_gray(b"\xff\xd8", _fmt("MJPG", 2, 2, 0))


def test_area_resize_integer_ratio_is_the_block_mean() -> None:
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    out = area_resize(img, 2, 2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[2.5, 4.5], [10.5, 12.5]])


def test_area_resize_fractional_ratio_matches_exact_area_average() -> None:
    # 640x360 (vivid's default) -> 32x32: 11.25 rows per output row. Repeating each row 4 times makes
    # the ratio integral (45), so the plain block mean of the repeated image is the exact area average.
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(360, 640), dtype=np.uint8)
    reference = np.repeat(img.astype(np.float64), 4, axis=0).reshape(32, 45, 640).mean(1)
    reference = reference.reshape(32, 32, 20).mean(2)
    np.testing.assert_allclose(area_resize(img, 32, 32), reference, atol=1e-3)


def test_area_resize_keeps_a_bright_object_anywhere_in_view() -> None:
    img = np.zeros((360, 640), np.uint8)
    img[350:360, 630:640] = 255  # a 10x10 object in the bottom-right corner
    out = area_resize(img, 32, 32)
    assert out[-1, -1] > 0 and out[:-1, :-1].max() == 0
    assert out.sum() * (360 / 32) * (640 / 32) == pytest.approx(255 * 100, rel=1e-4)


def test_area_resize_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="2-D"):
        area_resize(np.zeros((2, 2, 3)), 1, 1)
    with pytest.raises(ValueError, match="positive"):
        area_resize(np.zeros((2, 2)), 0, 1)
