"""What a container build makes obsolete, on a scratch podman storage of tiny imported images (no real build):
the image a rebuild replaces, and the base images of older keys. Removed when nothing else needs them, kept when
the user tagged them under another name too, when images are built on them or a container uses them."""

from __future__ import annotations

import os
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
from container_harness import can_run_podman

from flctl import cli
from flctl.container import base, prune
from flctl.container.base import remove_older_bases
from flctl.container.platforms import platform_named
from flctl.container.podman import image_id, image_inspect, podman
from flctl.container.prune import Removals, prune_dependency_trees, remove_image, remove_leftovers
from flctl.image.cache import COMPLETE, ENV_KEEP_BYTES, ArtifactStore

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
    assert removals.summary() == "removed nothing: no replaced image, older base or dependency tree"


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


def service_image(cache: Path, ref: str, title: str, content: str) -> str:
    """Build ``ref`` on the new base, labelled as build.containerfile labels a service's image; returns its ID."""
    context = cache / f"context-{title}"
    context.mkdir(exist_ok=True)
    (context / "app").write_text(content)
    (context / "Containerfile").write_text(f"FROM {NEW_BASE}\nLABEL org.opencontainers.image.title={title}\n"
                                           "COPY app /app\n")
    podman("build", "--pull=never", "--layers=false", "-t", ref, str(context), what="podman build", cache=cache)
    found = image_id(ref, cache)
    assert found
    return found


def test_an_image_kept_while_a_container_used_it_goes_with_a_later_build(cache: Path) -> None:
    """A test session's container ran on the image a rebuild replaced: kept then, untagged, and before nothing
    ever looked at it again (350 MB per image, until the disk filled). A later build removes it once it is free;
    an untagged image that is no service's stays."""
    tiny_image(cache, NEW_BASE, b"new base")
    old = service_image(cache, REF, "fl-agent", "old")
    podman("create", "--network=none", "--name=uses-the-old-agent", REF, "/app", what="podman create", cache=cache)
    service_image(cache, REF, "fl-agent", "new build")
    theirs = service_image(cache, "localhost/theirs:1", "theirs", "a user's")
    podman("untag", theirs, what="podman untag", cache=cache)
    said: list[str] = []
    removals = Removals()
    remove_leftovers(["fl-agent", "fl-aggregator"], removals, cache, cache / "build.log", said.append)
    assert said == [f"fl-agent: kept an earlier build's leftover image ({old[:12]}): podman refused (in use?), "
                    f"see {cache / 'build.log'}"]
    podman("rm", "uses-the-old-agent", what="podman rm", cache=cache)
    said.clear()
    remove_leftovers(["fl-agent", "fl-aggregator"], removals, cache, cache / "build.log", said.append)
    assert image_id(old, cache) is None and image_id(theirs, cache) == theirs and image_id(REF, cache)
    assert said == [f"fl-agent: removed an earlier build's leftover image ({old[:12]}, 0 MB)"]
    assert removals.images == [old]


@pytest.fixture
def failing_image_list(monkeypatch: pytest.MonkeyPatch):
    """podman fails to list the images (its storage in trouble: an image removed while listed, a lock)."""

    def podman_with_a_failing_list(*args: str, **kwargs):
        if args[0] == "images":
            args = (*args, "--filter=nosuch=x")  # a real podman failure: exit 125, a reason on stderr
        return podman(*args, **kwargs)

    monkeypatch.setattr(base, "podman", podman_with_a_failing_list)
    monkeypatch.setattr(prune, "podman", podman_with_a_failing_list)


def test_a_podman_that_cannot_list_the_images_costs_the_build_nothing(cache: Path, failing_image_list) -> None:
    """The images are built by then: a failure to look for what they replaced is said, and the build goes on.
    Before, the ContainerError of `podman images` failed the whole build after it had built everything."""
    old = tiny_image(cache, OLD_BASE, b"old base")
    replaced = tiny_image(cache, REF, b"old")
    tiny_image(cache, REF, b"new build")
    said, removals = remove_older_amd64_bases(cache)
    assert not remove_image(replaced, None, REF, REPLACED, removals, cache, cache / "build.log", said.append)
    assert image_id(old, cache) == old and image_id(replaced, cache) == replaced
    failed = f"podman images failed (exit 125), see {cache / 'build.log'}"
    assert said == [f"{NEW_BASE}: kept the older bases: {failed}",
                    f"{REF}: kept the image it replaces ({replaced[:12]}): {failed}"]
    assert 'unsupported image filter "nosuch"' in (cache / "build.log").read_text()
    assert removals.summary() == "removed nothing: no replaced image, older base or dependency tree"


def dependency_trees(store: ArtifactStore, count: int) -> list[Path]:
    """``count`` cached dependency trees of 64 KiB each, d0 the oldest."""
    trees = []
    for i in range(count):
        tree = store.path("container-deps", f"d{i}")
        (tree / "tree").mkdir(parents=True)
        (tree / "tree" / "wheel.so").write_bytes(os.urandom(64 * 1024))
        (tree / COMPLETE).write_text("")
        os.utime(tree, (1_000_000 + i, 1_000_000 + i))
        trees.append(tree)
    return trees


def test_older_dependency_trees_go_beyond_those_the_build_used_the_newest_three_and_the_budget(tmp_path: Path):
    """<cache>/containers/container-deps grew by two trees (about 190 MB each) an architecture at every change
    of the lock file, and was never pruned (1.5 GB in 8 trees here)."""
    store = ArtifactStore(tmp_path / "containers")
    trees = dependency_trees(store, 8)
    each = sum(f.stat().st_blocks * 512 for f in trees[0].rglob("*") if f.is_file())
    said: list[str] = []
    removals = Removals()
    # d1 and d0: the trees this build used (cached long ago); d7-d5 the newest; the budget has room for one more.
    pruned = prune_dependency_trees(store, {"d0", "d1"}, 6 * each, removals, said.append)
    assert sorted(p.name for p in (tmp_path / "containers" / "container-deps").iterdir()) == [
        "d0", "d1", "d4", "d5", "d6", "d7"]
    assert [p.name for p in pruned.removed] == ["d3", "d2"] and pruned.freed_bytes == 2 * each
    assert said == [f"cache container-deps: removed 2, {2 * each / 1e6:.0f} MB freed; kept 6, {6 * each / 1e6:.0f} MB"]
    assert removals.summary() == f"removed 2 dependency tree(s): {2 * each / 1e6:.0f} MB freed"


def test_a_budget_that_is_not_a_size_stops_the_container_build_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                           capsys) -> None:
    monkeypatch.setenv(ENV_KEEP_BYTES, "lots")
    assert cli.main(["container", "build"]) == 1
    assert capsys.readouterr().err == (f"flctl container build: {ENV_KEEP_BYTES}='lots' is not a size: a number of "
                                       "bytes, e.g. 2000000000, 500M or 2G\n")
