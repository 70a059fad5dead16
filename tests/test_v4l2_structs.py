"""The ctypes structs and ioctl numbers in appliance.v4l2 against the kernel's <linux/videodev2.h>.

EXPECTED holds what gcc printed for x86_64 from linux-libc-dev 6.1 (sizeof/offsetof and the VIDIOC_*
macros); `test_matches_kernel_headers_when_a_compiler_is_here` recomputes them from the headers
installed on the machine running the tests, so a layout mistake cannot hide behind a stale table.
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance import v4l2

X86_64 = platform.machine() == "x86_64"

EXPECTED_SIZES = {
    "v4l2_capability": 104, "v4l2_fmtdesc": 64, "v4l2_pix_format": 48, "v4l2_format": 208,
    "v4l2_requestbuffers": 20, "v4l2_buffer": 88, "v4l2_timecode": 16,
}
EXPECTED_OFFSETS = {
    ("v4l2_capability", "card"): 16, ("v4l2_capability", "bus_info"): 48,
    ("v4l2_capability", "version"): 80, ("v4l2_capability", "capabilities"): 84,
    ("v4l2_capability", "device_caps"): 88,
    ("v4l2_fmtdesc", "flags"): 8, ("v4l2_fmtdesc", "description"): 12,
    ("v4l2_fmtdesc", "pixelformat"): 44, ("v4l2_fmtdesc", "mbus_code"): 48,
    ("v4l2_pix_format", "pixelformat"): 8, ("v4l2_pix_format", "bytesperline"): 16,
    ("v4l2_pix_format", "sizeimage"): 20, ("v4l2_pix_format", "colorspace"): 24,
    ("v4l2_pix_format", "quantization"): 40, ("v4l2_pix_format", "xfer_func"): 44,
    ("v4l2_format", "fmt"): 8,
    ("v4l2_requestbuffers", "capabilities"): 12,
    ("v4l2_buffer", "timestamp"): 24, ("v4l2_buffer", "timecode"): 40, ("v4l2_buffer", "sequence"): 56,
    ("v4l2_buffer", "memory"): 60, ("v4l2_buffer", "m"): 64, ("v4l2_buffer", "length"): 72,
    ("v4l2_buffer", "request_fd"): 80,
}
EXPECTED_IOCTLS = {
    "VIDIOC_QUERYCAP": 0x80685600, "VIDIOC_ENUM_FMT": 0xC0405602, "VIDIOC_G_FMT": 0xC0D05604,
    "VIDIOC_S_FMT": 0xC0D05605, "VIDIOC_REQBUFS": 0xC0145608, "VIDIOC_QUERYBUF": 0xC0585609,
    "VIDIOC_QBUF": 0xC058560F, "VIDIOC_DQBUF": 0xC0585611, "VIDIOC_STREAMON": 0x40045612,
    "VIDIOC_STREAMOFF": 0x40045613,
}
EXPECTED_CONSTANTS = {
    "V4L2_CAP_VIDEO_CAPTURE": 0x1, "V4L2_CAP_VIDEO_CAPTURE_MPLANE": 0x1000, "V4L2_CAP_STREAMING": 0x04000000,
    "V4L2_CAP_DEVICE_CAPS": 0x80000000, "V4L2_CAP_META_CAPTURE": 0x00800000, "V4L2_BUF_FLAG_ERROR": 0x40,
}


def _offset(struct_name: str, field_name: str) -> int:
    return getattr(getattr(v4l2, struct_name), field_name).offset


@pytest.mark.skipif(not X86_64, reason="the recorded layout is x86_64's (long and pointers are 8 bytes)")
def test_struct_sizes_and_offsets_match_x86_64_kernel_layout() -> None:
    sizes = {name: ctypes.sizeof(getattr(v4l2, name)) for name in EXPECTED_SIZES}
    assert sizes == EXPECTED_SIZES
    offsets = {key: _offset(*key) for key in EXPECTED_OFFSETS}
    assert offsets == EXPECTED_OFFSETS


@pytest.mark.skipif(not X86_64, reason="ioctl numbers embed the x86_64 struct sizes")
def test_ioctl_numbers_match_the_kernel() -> None:
    assert {name: getattr(v4l2, name) for name in EXPECTED_IOCTLS} == EXPECTED_IOCTLS
    assert {name: getattr(v4l2, name) for name in EXPECTED_CONSTANTS} == EXPECTED_CONSTANTS


def test_fourcc_round_trip() -> None:
    assert v4l2.fourcc("YUYV") == 0x56595559
    assert v4l2.fourcc("GREY") == 0x59455247
    assert v4l2.fourcc_str(0x47504A4D) == "MJPG"
    assert v4l2.fourcc_str(v4l2.fourcc("Y16 ") | 1 << 31) == "Y16-BE"  # vivid offers both byte orders
    with pytest.raises(ValueError, match="4 ASCII"):
        v4l2.fourcc("YUV")


_C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/videodev2.h>
#define S(t) printf("size %s %zu\n", #t, sizeof(struct t))
#define O(t, f) printf("off %s %s %zu\n", #t, #f, offsetof(struct t, f))
#define I(x) printf("const %s %lu\n", #x, (unsigned long)(x))
int main(void) {
@BODY@
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None or not Path("/usr/include/linux/videodev2.h").exists(),
                    reason="needs gcc and the kernel headers (linux-libc-dev) to recompute the layout")
def test_matches_kernel_headers_when_a_compiler_is_here(tmp_path: Path) -> None:
    body = [f"  S({name});" for name in EXPECTED_SIZES]
    body += [f"  O({s}, {f});" for s, f in EXPECTED_OFFSETS]
    body += [f"  I({name});" for name in [*EXPECTED_IOCTLS, *EXPECTED_CONSTANTS]]
    src = tmp_path / "layout.c"
    src.write_text(_C_PROGRAM.replace("@BODY@", "\n".join(body)))
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout
    assert len(out.splitlines()) == len(body)
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            assert ctypes.sizeof(getattr(v4l2, rest[0])) == int(rest[1]), line
        elif kind == "off":
            assert _offset(rest[0], rest[1]) == int(rest[2]), line
        else:
            assert getattr(v4l2, rest[0]) == int(rest[1]), line
