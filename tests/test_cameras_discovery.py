"""Which udev devices are cameras, from recorded udev properties (tests/data/udev) and a fake node."""

from __future__ import annotations

from cameras_fakes import FakeCamera, FakeContext, FakeV4L2IO, recorded

from appliance import v4l2
from appliance.cameras import (
    CameraInfo,
    camera_from_udev,
    capture_decision,
    discover,
    format_camera_table,
    list_cameras,
)


def test_vivid_capture_node_is_a_camera() -> None:
    vivid = recorded("vivid-video0")
    assert capture_decision(vivid, FakeV4L2IO())
    info = camera_from_udev(vivid)
    assert (info.path, info.name) == ("/dev/video0", "vivid")


def test_uvc_capture_node_is_a_camera_and_its_metadata_node_is_not() -> None:
    io = FakeV4L2IO()  # no node to open: the decision must come from udev's properties alone
    assert capture_decision(recorded("uvc-video0"), io)
    assert not capture_decision(recorded("uvc-metadata-video1"), io)
    assert io.opens == 0
    assert camera_from_udev(recorded("uvc-video0")).driver == "uvcvideo"


def test_nodes_that_are_not_video_nodes_are_never_cameras() -> None:
    vbi = recorded("vivid-video0").with_node("/dev/vbi0")  # same properties, a VBI node
    assert not capture_decision(vbi, FakeV4L2IO())
    other = recorded("vivid-video0")
    other.properties["SUBSYSTEM"] = "sound"
    assert not capture_decision(other, FakeV4L2IO())


def test_udev_rule_override_can_exclude_a_camera() -> None:
    vivid = recorded("vivid-video0")
    vivid.properties["FL_AGENT_CAMERA"] = "0"
    assert not capture_decision(vivid, FakeV4L2IO())


def test_without_v4l_id_properties_the_driver_is_asked() -> None:
    bare = recorded("no-v4l-id-video2")
    capture = FakeV4L2IO(FakeCamera("/dev/video2"))
    assert capture_decision(bare, capture)
    metadata = FakeV4L2IO(FakeCamera("/dev/video2", device_caps=v4l2.V4L2_CAP_META_CAPTURE
                                     | v4l2.V4L2_CAP_STREAMING))
    assert not capture_decision(bare, metadata)
    assert not capture_decision(bare, FakeV4L2IO())  # the node cannot be opened: not a camera
    assert capture.open_count() == metadata.open_count() == 0  # probes close what they open


def test_discover_keeps_capture_nodes_in_node_order() -> None:
    context = FakeContext([
        recorded("uvc-metadata-video1"),
        recorded("vivid-video0").with_node("/dev/video10"),
        recorded("uvc-video0"),
    ])
    assert [c.path for c in discover(context, FakeV4L2IO())] == ["/dev/video0", "/dev/video10"]


def test_list_cameras_adds_driver_and_formats() -> None:
    io = FakeV4L2IO(
        FakeCamera("/dev/video0", card="UVC Camera (046d:0825)", driver="uvcvideo",
                   formats=[("YUYV", "YUYV 4:2:2", 0), ("MJPG", "Motion-JPEG", v4l2.V4L2_FMT_FLAG_COMPRESSED)]),
    )
    context = FakeContext([recorded("uvc-video0"), recorded("uvc-metadata-video1"),
                           recorded("vivid-video0").with_node("/dev/video4")])
    cams = list_cameras(context, io)
    assert cams[0] == CameraInfo("/dev/video0", "UVC Camera (046d:0825)", "uvcvideo", ("YUYV", "MJPG"))
    assert cams[1].path == "/dev/video4" and cams[1].error == "No such file or directory"
    table = format_camera_table(cams)
    lines = table.splitlines()
    assert lines[0].split() == ["PATH", "NAME", "DRIVER", "FORMATS"]
    assert lines[1].startswith("/dev/video0") and lines[1].endswith("YUYV MJPG")
    assert "uvcvideo" in lines[1]
    assert lines[2].startswith("/dev/video4") and lines[2].endswith("(No such file or directory)")


def test_empty_table_says_so() -> None:
    assert format_camera_table([]).startswith("no capture cameras found")
