"""The image cache and an image's manifest.json survive a power cut whole, and a damaged manifest is named.

A build host loses power too, and a cache entry is trusted by its ``.complete`` marker from then on: an entry
whose marker and name survived a cut while its files came back empty (delayed allocation writes the data long
after the rename) would be taken as it is by every later build. So every file of an entry is fsynced before
the rename that makes it complete; manifest.json, rewritten with the build's timings, is replaced atomically;
``--out`` never leaves an old manifest beside a new disk; a downloaded kernel or busybox .deb (kept in
``<cache>/debs`` and taken as it is from then on) is fsynced; and a manifest that is empty or cut short is refused
in one line naming it, not with a JSON traceback. The calls are recorded on the host, as in
tests/test_outbox_fsync.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from interrupted_writes import killed_write
from rich.console import Console

from flctl.image import build, kernel
from flctl.image.build import DISK_NAME, MANIFEST, ImageArtifacts, ImageBuildError, write_manifest
from flctl.image.cache import COMPLETE, ArtifactStore


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(call, path) in the order they happen: fsync (of the file or directory it names) and rename/replace (of
    the name it makes)."""
    log: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd: int) -> None:
        log.append(("fsync", _path_of(fd)))
        real_fsync(fd)

    def rename(src, dst, *args, **kwargs) -> None:
        log.append(("rename", str(src)))
        real_rename(src, dst, *args, **kwargs)
        log.append(("renamed", str(dst)))

    def replace(src, dst, *args, **kwargs) -> None:
        log.append(("rename", str(src)))
        real_replace(src, dst, *args, **kwargs)
        log.append(("renamed", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)  # Path.rename calls os.rename
    monkeypatch.setattr(os, "replace", replace)
    return log


def _image(directory: Path, name: str) -> Path:
    """A small image directory whose every file says which image it belongs to."""
    directory.mkdir(parents=True)
    for file in (DISK_NAME, DISK_NAME + ".bmap", "vmlinux", "initrd.img"):
        (directory / file).write_text(f"{name} {file}")
    write_manifest(directory, {"key": name, "arch": "amd64", "cmdline": "root=LABEL=fl-root", "partitions": []})
    return directory


def test_a_cache_entry_is_on_disk_before_its_name_says_it_is_complete(tmp_path: Path, calls) -> None:
    store = ArtifactStore(tmp_path / "cache")
    with store.building("images", "k1") as out:
        (out / DISK_NAME).write_bytes(b"disk" * 1000)
        (out / "modules").mkdir()
        (out / "modules" / "virtio.ko").write_bytes(b"module")
        partial = out
    final = store.path("images", "k1")
    renamed = calls.index(("renamed", str(final)))
    synced_before = {path for call, path in calls[:renamed] if call == "fsync"}
    for name in (DISK_NAME, "modules/virtio.ko", COMPLETE, "modules", "."):
        assert os.path.normpath(partial / name) in synced_before, f"{name} was not fsynced before the rename"
    assert ("fsync", str(final.parent)) in calls[renamed:], "the new entry's name was not made durable"
    assert store.has("images", "k1") and (final / "modules" / "virtio.ko").read_bytes() == b"module"


def test_an_entry_a_power_cut_left_half_built_is_removed_by_the_next_build_of_it(tmp_path: Path) -> None:
    """A build killed or cut off leaves ``.<key>.partial-<pid>`` (half a disk image, 0.5 GB); pruning skips such
    names, and that key may never be built again (the agent's code changed): the next build of the kind removes
    it (builds sharing a cache hold its lock, so no other build is under way)."""
    store = ArtifactStore(tmp_path / "cache")
    stale = store.path("images", "k1").with_name(".k1.partial-4242")
    stale.mkdir(parents=True)
    (stale / DISK_NAME).write_bytes(b"half a disk")
    other = stale.with_name(".k2.partial-4242")
    other.mkdir()
    with store.building("images", "k1") as out:
        (out / DISK_NAME).write_bytes(b"disk")
    assert sorted(p.name for p in (tmp_path / "cache" / "images").iterdir()) == ["k1"]


def test_the_manifest_is_replaced_whole_fsynced_before_its_rename(tmp_path: Path, calls) -> None:
    """build_image rewrites manifest.json with the build's timings after the entry exists: a cut in the middle of
    an in-place write left an image directory no tool could read."""
    image = _image(tmp_path / "image", "old")
    calls.clear()
    write_manifest(image, {"key": "new", "arch": "amd64", "cmdline": "", "partitions": [], "build_seconds": 1.0})
    manifest = str(image / MANIFEST)
    renamed = calls.index(("renamed", manifest))
    temp = calls[renamed - 1][1]
    assert Path(temp).parent == image and temp != manifest, "manifest.json was written in place"
    assert ("fsync", temp) in calls[:renamed - 1], "the new manifest's bytes were not fsynced before the rename"
    assert calls[renamed + 1:] == [("fsync", str(image))]
    assert ImageArtifacts.load(image).manifest["key"] == "new"


@pytest.mark.parametrize("damage", ["", '{"key": "k1", "arch": "am', "[]"], ids=["empty", "cut-short", "not-object"])
def test_a_damaged_manifest_is_refused_in_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    image = _image(tmp_path / "image", "k1")
    (image / MANIFEST).write_text(damage)
    with pytest.raises(ImageBuildError) as refused:
        ImageArtifacts.load(image)
    message = str(refused.value)
    assert str(image.resolve() / MANIFEST) in message and "damaged" in message and "--rebuild" in message
    assert "\n" not in message


def test_an_interrupted_out_never_leaves_the_old_manifest_beside_a_new_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out DIR`` again, with another image, stopped half-way (here a copy that fails; a power cut alike): the
    directory says it holds no image, rather than the old image's partition offsets for the new disk."""
    out = tmp_path / "out"
    build._publish(ImageArtifacts.load(_image(tmp_path / "cache" / "a", "a")), out)
    new = ImageArtifacts.load(_image(tmp_path / "cache" / "b", "b"))
    real = build._link_or_copy

    def cut_before_initrd(src: Path, dst: Path) -> None:
        if dst.name == "initrd.img":
            raise OSError(errno.EIO, "the power went")
        real(src, dst)

    monkeypatch.setattr(build, "_link_or_copy", cut_before_initrd)
    with pytest.raises(ImageBuildError, match="the power went"):
        build._publish(new, out)
    assert (out / DISK_NAME).read_text() == f"b {DISK_NAME}"
    with pytest.raises(ImageBuildError, match="holds no built image"):
        ImageArtifacts.load(out)
    monkeypatch.setattr(build, "_link_or_copy", real)
    build._publish(new, out)
    assert json.loads((out / MANIFEST).read_text())["key"] == "b"
    assert ImageArtifacts.load(out).manifest["key"] == "b"


def test_a_copy_to_out_is_fsynced_before_it_takes_its_name(tmp_path: Path, calls, monkeypatch) -> None:
    """On another file system ``--out`` copies instead of linking; a copy is a new file's bytes like any other."""
    image = ImageArtifacts.load(_image(tmp_path / "cache" / "a", "a"))

    def cross_device(src, dst, *args, **kwargs) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", cross_device)
    out = tmp_path / "out"
    calls.clear()
    build._publish(image, out)
    for name in (DISK_NAME, "initrd.img", MANIFEST):
        renamed = calls.index(("renamed", str(out / name)))
        temp = calls[renamed - 1][1]
        assert temp != str(out / name) and ("fsync", temp) in calls[:renamed - 1], f"{name} was not fsynced"
    assert calls[-1] == ("fsync", str(out))
    assert (out / DISK_NAME).read_text() == f"a {DISK_NAME}"


def test_the_new_manifest_takes_its_name_only_once_the_disk_s_name_is_durable(tmp_path: Path, calls) -> None:
    """"The manifest last" holds after a power cut only if the names before it are on disk first: else the cut
    could keep the new manifest and lose the new disk's rename, the old disk left under the new manifest."""
    image = ImageArtifacts.load(_image(tmp_path / "cache" / "a", "a"))
    out = tmp_path / "out"
    calls.clear()
    build._publish(image, out)
    disk_renamed = calls.index(("renamed", str(out / DISK_NAME)))
    manifest_renamed = calls.index(("renamed", str(out / MANIFEST)))
    assert ("fsync", str(out)) in calls[disk_renamed:manifest_renamed], "the manifest's rename came first"


KILLED_PUBLISH = """
import errno, os, signal, sys
from pathlib import Path
from flctl.image import build
from flctl.image.build import DISK_NAME, ImageArtifacts

def cross_device(src, dst, *args, **kwargs):
    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

real_replace = os.replace

def killed_at_the_disk(src, dst, *args, **kwargs):
    if Path(dst).name == DISK_NAME:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kwargs)

os.link, os.replace = cross_device, killed_at_the_disk
build._publish(ImageArtifacts.load(Path(sys.argv[1])), Path(sys.argv[2]))
"""


def test_the_copy_a_killed_out_left_is_gone_after_the_next(tmp_path: Path) -> None:
    """``--out`` on another file system copies the disk image (GBs) under a temp name; a publish killed with -9
    before the rename cannot remove it, and the next publish must not leave it there for good."""
    image = _image(tmp_path / "cache" / "a", "a")
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_PUBLISH, str(image), str(out)], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [p for p in out.iterdir() if p.name.startswith(".")], "the killed publish left no copy to clean up"
    build._publish(ImageArtifacts.load(image), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in image.iterdir())


def test_out_inside_the_cache_is_refused_and_the_cached_image_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out <cache>/image`` (where the image is already): publishing into the image's own directory removed its
    manifest first, leaving a cached image every later build took and no tool could load; through the link to an
    older image it would have rewritten that entry's files in place."""
    cache = tmp_path / "cache"
    image = _image(cache / "images" / "k1", "k1")
    (image / COMPLETE).write_text("")
    (cache / "image").symlink_to("images/k1")

    def cached(store: ArtifactStore, *args, **kwargs) -> ImageArtifacts:
        art = ImageArtifacts.load(store.path("images", "k1"))
        art.manifest["from_cache"] = True
        return art

    monkeypatch.setattr(build, "_build_locked", cached)
    with pytest.raises(ImageBuildError) as refused:
        build.build_image(cache=cache, out=cache / "image", arch="amd64")
    assert f"--out {cache / 'image'}" in str(refused.value) and "inside the image cache" in str(refused.value)
    assert ImageArtifacts.load(cache / "image").manifest["key"] == "k1"


def test_a_manifest_rewrite_a_killed_build_left_is_removed_by_the_next_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_image rewrites a finished entry's manifest.json with its timings; a build killed there leaves the temp
    file in the entry, which pruning by age may not reach for long. The next build removes it, in one line."""
    cache = tmp_path / "cache"
    image = _image(cache / "images" / "k1", "k1")
    partitions = [{"name": name, "offset": 1 << 20, "size": 1 << 20} for name in ("fl-root", "fl-data")]
    write_manifest(image, {"key": "k1", "arch": "amd64", "cmdline": "", "partitions": partitions})
    (image / COMPLETE).write_text("")
    (left,) = killed_write(image / MANIFEST)

    def cached(store: ArtifactStore, *args, **kwargs) -> ImageArtifacts:
        art = ImageArtifacts.load(store.path("images", "k1"))
        art.manifest["from_cache"] = True
        return art

    monkeypatch.setattr(build, "_build_locked", cached)
    said = io.StringIO()
    build.build_image(cache=cache, out=tmp_path / "out", arch="amd64", console=Console(file=said, width=200))
    assert not left.exists()
    assert "cache images: removed 1 temp file" in said.getvalue()
    assert ImageArtifacts.load(image).manifest["key"] == "k1"


DEB = kernel.DebPackage("linux-image-6.1.0-28-amd64", "6.1.119-1", "amd64")
WHOLE_DEB = b"!<arch>\n" + b"deb" * 1000


def apt_get_download(cmd: list[str], cwd: Path | None = None, **kwargs) -> str:
    """``apt-get download`` as apt does it: the .deb written straight to its name in the current directory."""
    (Path(cwd) / DEB.filename).write_bytes(WHOLE_DEB)
    return ""


def test_a_downloaded_deb_is_on_disk_before_it_takes_its_name(
    tmp_path: Path, calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``<cache>/debs`` keeps each .deb once downloaded; apt-get download does not fsync, and an empty .deb after a
    cut would be taken by every later build."""
    monkeypatch.setattr(kernel, "_run", apt_get_download)
    debs = tmp_path / "debs"
    deb = kernel.download_deb(DEB, debs, kernel.Apt())
    renamed = calls.index(("renamed", str(deb)))
    temp = calls[renamed - 1][1]
    assert temp != str(deb) and ("fsync", temp) in calls[:renamed - 1], "the .deb was not fsynced before its name"
    assert ("fsync", str(debs)) in calls[renamed:], "the .deb's name was not made durable"
    assert deb.read_bytes() == WHOLE_DEB and debs_in(debs) == [DEB.filename]


def test_a_download_cut_short_is_never_taken_by_a_later_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """apt-get download writes the .deb under the name it keeps: a download that dies half-way (a network error, a
    kill) left half a kernel package that every later build took as downloaded, and dpkg-deb refused."""
    debs = tmp_path / "debs"

    def dies_half_way(cmd: list[str], cwd: Path | None = None, **kwargs) -> str:
        (Path(cwd) / DEB.filename).write_bytes(WHOLE_DEB[: len(WHOLE_DEB) // 2])
        raise kernel.KernelError("apt-get download failed (100): Connection reset by peer")

    monkeypatch.setattr(kernel, "_run", dies_half_way)
    with pytest.raises(kernel.KernelError):
        kernel.download_deb(DEB, debs, kernel.Apt())
    killed = debs / f"{kernel.DOWNLOAD_PREFIX}4242"  # what a build killed with -9 mid-download leaves
    killed.mkdir()
    (killed / DEB.filename).write_bytes(WHOLE_DEB[:100])
    monkeypatch.setattr(kernel, "_run", apt_get_download)
    assert kernel.download_deb(DEB, debs, kernel.Apt()).read_bytes() == WHOLE_DEB
    assert debs_in(debs) == [DEB.filename]


def test_a_download_under_way_is_left_alone_by_another_process_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/qemu_guest.py downloads the kernel into ``<cache>/qemu-guest`` without the image cache's lock (two
    test sessions at once, say): the second download waits for the first and takes its .deb, rather than removing
    the first one's download directory as one a killed build left."""
    debs = tmp_path / "debs"
    second: dict[str, object] = {}

    def download_in_another_thread() -> None:
        try:
            second["deb"] = kernel.download_deb(DEB, debs, kernel.Apt())
        except Exception as exc:  # reported below
            second["error"] = exc

    other = threading.Thread(target=download_in_another_thread)

    def first_download(cmd: list[str], cwd: Path | None = None, **kwargs) -> str:
        monkeypatch.setattr(kernel, "_run", apt_get_download)  # what the other one would run, if it ran
        other.start()
        other.join(0.5)  # without the turns, it has removed this download's directory by now
        return apt_get_download(cmd, cwd)

    monkeypatch.setattr(kernel, "_run", first_download)
    assert kernel.download_deb(DEB, debs, kernel.Apt()).read_bytes() == WHOLE_DEB
    other.join()
    assert "error" not in second and second["deb"] == debs / DEB.filename


def debs_in(debs: Path) -> list[str]:
    """The .debs and download directories in ``debs`` (not the lock file downloads take turns with)."""
    return sorted(p.name for p in debs.iterdir() if p.name != ".download.lock")
