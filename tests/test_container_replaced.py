"""The image a container rebuild replaces, on a scratch podman storage of tiny imported images (no build):
removed when nothing else names it, kept when the user tagged it under another name too."""

from __future__ import annotations

import tarfile
from io import BytesIO
from pathlib import Path

import pytest
from container_harness import can_run_podman

from flctl.container.build import remove_replaced
from flctl.container.podman import image_id, podman

pytestmark = pytest.mark.skipif(can_run_podman() is not None, reason=str(can_run_podman()))

REF = "localhost/fl-edge/fl-agent:0.0.1-amd64"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache (for flctl's containers.conf) and a podman storage of the test's own, so no real image is touched."""
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{tmp_path / "graph"}"\nrunroot = "{tmp_path / "run"}"\n')
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(conf))
    return tmp_path


def tiny_image(cache: Path, ref: str, content: bytes) -> str:
    """Import a one-file image as ``ref``; returns its ID."""
    buffer = BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("content")
        info.size = len(content)
        tar.addfile(info, BytesIO(content))
    archive = cache / f"{len(content)}.tar"
    archive.write_bytes(buffer.getvalue())
    podman("import", "-q", str(archive), ref, what="podman import", cache=cache)
    found = image_id(ref, cache)
    assert found
    return found


def test_a_rebuild_removes_the_untagged_image_it_replaces(cache: Path) -> None:
    old = tiny_image(cache, REF, b"old")
    tiny_image(cache, REF, b"new build")
    said: list[str] = []
    remove_replaced(old, REF, cache, cache / "build.log", said.append)
    assert image_id(old, cache) is None
    assert said == [f"{REF}: removed the image it replaces ({old[:12]})"]


def test_a_rebuild_keeps_the_image_it_replaces_when_the_user_tagged_it_too(cache: Path) -> None:
    """`podman rmi ID` deletes an image that has one name left, and that name with it."""
    old = tiny_image(cache, REF, b"old")
    podman("tag", REF, "localhost/mine:stable", what="podman tag", cache=cache)
    tiny_image(cache, REF, b"new build")
    said: list[str] = []
    remove_replaced(old, REF, cache, cache / "build.log", said.append)
    assert image_id("localhost/mine:stable", cache) == old
    assert said == [f"{REF}: kept the image it replaces ({old[:12]}): still tagged localhost/mine:stable"]
