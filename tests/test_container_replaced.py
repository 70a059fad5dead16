"""What a container build makes obsolete, on a scratch podman storage of tiny imported images (no real build):
the image a rebuild replaces, and the base images of older keys. Removed when nothing else needs them, kept when
the user tagged them under another name too, when images are built on them or a container uses them."""

from __future__ import annotations

import tarfile
from io import BytesIO
from pathlib import Path

import pytest
from container_harness import can_run_podman

from flctl.container.base import remove_older_bases
from flctl.container.platforms import platform_named
from flctl.container.podman import image_id, image_inspect, podman
from flctl.container.prune import Removals, remove_image
from flctl.image.cache import ArtifactStore

pytestmark = pytest.mark.skipif(can_run_podman() is not None, reason=str(can_run_podman()))

REF = "localhost/fl-edge/fl-agent:0.0.1-amd64"
REPLACED = "the image it replaces"
OLD_KEY, NEW_KEY = "0" * 20, "1" * 20
OLD_BASE, NEW_BASE = f"localhost/fl-edge/base:{OLD_KEY}-amd64", f"localhost/fl-edge/base:{NEW_KEY}-amd64"


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
    size = int(image_inspect(old, cache)["Size"])
    tiny_image(cache, REF, b"new build")
    said: list[str] = []
    removals = Removals()
    assert remove_image(old, None, REF, REPLACED, removals, cache, cache / "build.log", said.append)
    assert image_id(old, cache) is None
    assert said == [f"{REF}: removed the image it replaces ({old[:12]}, {size / 1e6:.0f} MB)"]
    assert removals.freed_bytes == size
    assert removals.summary() == "removed 1 image(s): 0 MB freed"


def test_a_rebuild_keeps_the_image_it_replaces_when_the_user_tagged_it_too(cache: Path) -> None:
    """`podman rmi ID` deletes an image that has one name left, and that name with it."""
    old = tiny_image(cache, REF, b"old")
    podman("tag", REF, "localhost/mine:stable", what="podman tag", cache=cache)
    tiny_image(cache, REF, b"new build")
    said: list[str] = []
    removals = Removals()
    assert not remove_image(old, None, REF, REPLACED, removals, cache, cache / "build.log", said.append)
    assert image_id("localhost/mine:stable", cache) == old
    assert said == [f"{REF}: kept the image it replaces ({old[:12]}): still tagged localhost/mine:stable"]
    assert removals.summary() == "removed nothing: no replaced image and no older base"


def remove_older_amd64_bases(cache: Path) -> tuple[list[str], Removals]:
    said: list[str] = []
    removals = Removals()
    remove_older_bases(NEW_BASE, platform_named("amd64"), ArtifactStore(cache / "containers"), removals,
                       cache / "build.log", said.append, cache)
    return said, removals


def test_a_new_base_removes_the_older_base_of_its_architecture_and_its_tarball(cache: Path) -> None:
    old = tiny_image(cache, OLD_BASE, b"old base" * 1000)
    size = int(image_inspect(old, cache)["Size"])
    tiny_image(cache, NEW_BASE, b"new base")
    arm64 = tiny_image(cache, f"localhost/fl-edge/base:{OLD_KEY}-arm64", b"the arm64 base")
    mine = tiny_image(cache, "localhost/fl-edge/base:mine", b"a base of the user's")
    tarball = cache / "containers" / "container-base" / OLD_KEY
    tarball.mkdir(parents=True)
    (tarball / "base.tar").write_bytes(b"x" * 8192)
    said, removals = remove_older_amd64_bases(cache)
    assert image_id(old, cache) is None and not tarball.exists()
    assert image_id(NEW_BASE, cache) and image_id(arm64, cache) == arm64 and image_id(mine, cache) == mine
    assert said == [
        f"{NEW_BASE}: removed the older base {OLD_BASE} ({old[:12]}, {size / 1e6:.0f} MB)",
        f"{NEW_BASE}: removed the older base's tarball {tarball} (0 MB)",
    ]
    assert removals.freed_bytes >= size + 8192
    freed = f"{removals.freed_bytes / 1e6:.0f} MB freed"
    assert removals.summary() == f"removed 1 image(s) and 1 cached tarball(s): {freed}"


def test_an_older_base_the_user_tagged_too_is_kept(cache: Path) -> None:
    old = tiny_image(cache, OLD_BASE, b"old base")
    podman("tag", OLD_BASE, "localhost/mine:base", what="podman tag", cache=cache)
    tiny_image(cache, NEW_BASE, b"new base")
    said, removals = remove_older_amd64_bases(cache)
    assert image_id(OLD_BASE, cache) == old
    assert said == [f"{NEW_BASE}: kept the older base {OLD_BASE} ({old[:12]}): still tagged localhost/mine:base"]
    assert removals.freed_bytes == 0


def test_an_older_base_a_container_uses_is_kept(cache: Path) -> None:
    old = tiny_image(cache, OLD_BASE, b"old base")
    tiny_image(cache, NEW_BASE, b"new base")
    podman("create", "--network=none", "--name=uses-the-old-base", OLD_BASE, "/content", what="podman create",
           cache=cache)
    said, _ = remove_older_amd64_bases(cache)
    assert image_id(OLD_BASE, cache) == old
    assert said == [f"{NEW_BASE}: kept the older base {OLD_BASE} ({old[:12]}): podman refused (in use?), see "
                    f"{cache / 'build.log'}"]


def test_an_older_base_an_image_is_built_on_is_kept_as_removing_it_frees_nothing(cache: Path) -> None:
    """An image of an earlier version, or one service rebuilt alone (--image): the other still uses the old base."""
    old = tiny_image(cache, OLD_BASE, b"old base")
    tiny_image(cache, NEW_BASE, b"new base")
    context = cache / "context"
    context.mkdir()
    (context / "app").write_text("app")
    (context / "Containerfile").write_text(f"FROM {OLD_BASE}\nCOPY app /app\n")
    podman("build", "--pull=never", "--layers=false", "-t", REF, str(context), what="podman build", cache=cache)
    said, _ = remove_older_amd64_bases(cache)
    assert image_id(OLD_BASE, cache) == old
    assert said == [f"{NEW_BASE}: kept the older base {OLD_BASE} ({old[:12]}): images are built on it ({REF})"]
