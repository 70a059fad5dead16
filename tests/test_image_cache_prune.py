"""Pruning the image cache: the newest three and a byte budget, never an image a process holds (a QEMU run, a
test session), and one line saying what it freed. Before, every image of the last six hours stayed: up to about
8 GB on a machine that commits often."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flctl.image import cli
from flctl.image.build import ImageArtifacts, _prune, link_latest_image, prune_summary
from flctl.image.cache import COMPLETE, ENV_KEEP_BYTES, ArtifactStore, hold, keep_bytes_from_env

KIB = 1024
ENTRY_BYTES = 64 * KIB


def cached_images(root: Path, count: int, kernel: Path | None = None) -> list[Path]:
    """``count`` finished image entries of 64 KiB each (written, not sparse), k0 the oldest; each hard-links
    ``kernel`` as its vmlinux, as a real build links the kernel entry's."""
    entries = []
    for i in range(count):
        entry = root / "images" / f"k{i}"
        entry.mkdir(parents=True)
        (entry / "fl-dev.img").write_bytes(os.urandom(ENTRY_BYTES))
        (entry / "manifest.json").write_text(json.dumps({"key": f"k{i}", "partitions": []}))
        if kernel is not None:
            os.link(kernel, entry / "vmlinux")
        (entry / COMPLETE).write_text("")
        os.utime(entry, (1_000_000 + i, 1_000_000 + i))
        entries.append(entry)
    return entries


def left(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "images").iterdir())


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_old_images_go_beyond_the_newest_three_and_the_byte_budget(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel" / "vmlinux"
    kernel.parent.mkdir()
    kernel.write_bytes(os.urandom(4 * ENTRY_BYTES))
    entries = cached_images(tmp_path, 7, kernel)
    link_latest_image(tmp_path, entries[0])
    each = allocated(entries[0] / "fl-dev.img") + allocated(entries[0] / "manifest.json")

    # k6 is the current build, k5-k4 the newest after it, k0 the link: 4 entries; the budget has room for one more.
    pruned = _prune(ArtifactStore(tmp_path), "images", keep="k6", keep_bytes=5 * each)
    assert left(tmp_path) == ["k0", "k3", "k4", "k5", "k6"]
    assert [p.name for p in pruned.removed] == ["k2", "k1"]
    # the kernel hard-linked into every image stays with the kernel entry: removing an image does not free it
    assert pruned.freed_bytes == 2 * each and kernel.exists()
    assert (pruned.kept, pruned.kept_bytes, pruned.kept_in_use) == (5, 5 * each, [])
    assert prune_summary("images", pruned) == (f"cache images: removed 2, {2 * each / 1e6:.0f} MB freed; "
                                               f"kept 5, {5 * each / 1e6:.0f} MB")


def test_no_image_older_than_one_the_budget_removed_is_kept(tmp_path: Path) -> None:
    """The budget keeps the newest of the older images: a small old image does not outstay a bigger newer one."""
    entries = cached_images(tmp_path, 6)
    (entries[2] / "fl-dev.img").write_bytes(os.urandom(2 * ENTRY_BYTES))
    each = allocated(entries[0] / "fl-dev.img") + allocated(entries[0] / "manifest.json")
    pruned = _prune(ArtifactStore(tmp_path), "images", keep="k5", keep_bytes=4 * each)  # k5-k3, then room for 1
    assert left(tmp_path) == ["k3", "k4", "k5"]
    assert [p.name for p in pruned.removed] == ["k2", "k1", "k0"]


def test_an_image_a_running_process_holds_is_kept_over_the_budget(tmp_path: Path) -> None:
    """A QEMU run or a test session loads its image (ImageArtifacts.load holds it until the process exits), and
    keeps booting it; a build in another process pruned it from under them when it was over six hours old."""
    entries = cached_images(tmp_path, 6)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from flctl.image.build import ImageArtifacts; "
         f"ImageArtifacts.load(Path({str(entries[1])!r})); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        ImageArtifacts.load(entries[0])  # this process holds one too
        pruned = _prune(ArtifactStore(tmp_path), "images", keep="k5", keep_bytes=0)
    finally:
        holder.communicate("")
    assert left(tmp_path) == ["k0", "k1", "k3", "k4", "k5"]
    assert [p.name for p in pruned.removed] == ["k2"]
    assert [p.name for p in pruned.kept_in_use] == ["k1", "k0"]
    assert prune_summary("images", pruned).endswith("(2 over the budget: in use)")


def test_an_image_is_free_to_go_once_its_holder_has_exited(tmp_path: Path) -> None:
    entries = cached_images(tmp_path, 4)
    subprocess.run([sys.executable, "-c", f"from flctl.image.cache import hold; from pathlib import Path; "
                    f"hold(Path({str(entries[0])!r}))"], check=True)  # fmt: skip
    pruned = _prune(ArtifactStore(tmp_path), "images", keep="k3", keep_bytes=0)
    assert [p.name for p in pruned.removed] == ["k0"]


def test_holding_what_is_not_a_finished_cache_entry_does_nothing(tmp_path: Path) -> None:
    hold(tmp_path)  # an --out directory: no .complete marker, nothing to lock
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("text", "expected"), [("", 2 * 2**30), ("0", 0), ("1500000000", 1_500_000_000),
                                                ("500M", 500 * 2**20), ("3g", 3 * 2**30), (" 1T ", 2**40)])
def test_the_budget_comes_from_the_environment(text: str, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_KEEP_BYTES, text)
    assert keep_bytes_from_env() == expected


def test_a_budget_that_is_not_a_size_stops_the_build_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(ENV_KEEP_BYTES, "2 GB")
    assert cli.main(["build"]) == 1
    err = capsys.readouterr().err
    assert err == (f"image build failed: {ENV_KEEP_BYTES}='2 GB' is not a size: a number of bytes, e.g. "
                   "2000000000, 500M or 2G\n")


def prune_elsewhere(root: Path, keep: str) -> list[str]:
    """Prune as a build in another process does (keep_bytes 0); the names it removed."""
    done = subprocess.run(
        [sys.executable, "-c", "from pathlib import Path; from flctl.image.build import _prune; "
         "from flctl.image.cache import ArtifactStore; "
         f"print(*[p.name for p in _prune(ArtifactStore(Path({str(root)!r})), 'images', {keep!r}, 0).removed])"],
        capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.split()


def test_an_image_loaded_through_the_latest_link_is_the_one_held_when_a_build_moves_the_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flctl qemu run --image <cache>/image` while a build elsewhere points the link at its new image: the run
    boots what it held. Before, load held the old target, then read the new one, which nothing held."""
    from flctl.image import build

    entries = cached_images(tmp_path, 6)
    link_latest_image(tmp_path, entries[0])
    real_hold = build.hold

    def hold_then_a_build_relinks(entry: Path) -> None:
        real_hold(entry)
        link_latest_image(tmp_path, entries[1])

    monkeypatch.setattr(build, "hold", hold_then_a_build_relinks)
    art = ImageArtifacts.load(tmp_path / "image")
    link_latest_image(tmp_path, entries[2])  # and a later build moves it on while the run goes on
    removed = prune_elsewhere(tmp_path, keep="k5")
    assert art.directory not in [tmp_path / "images" / name for name in removed]
    assert (art.directory / "manifest.json").exists()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_loading_an_image_again_and_again_holds_one_descriptor(tmp_path: Path) -> None:
    """A test session loads its image for every boot; a rebuild (--rebuild) replaces the entry's marker."""
    store = ArtifactStore(tmp_path)
    entry = cached_images(tmp_path, 5)[0]
    ImageArtifacts.load(entry)
    before = open_descriptors()
    for _ in range(20):
        ImageArtifacts.load(entry)
        with store.building("images", "k0") as out:  # the same key built again: a new marker
            (out / "manifest.json").write_text(json.dumps({"key": "k0", "partitions": []}))
        ImageArtifacts.load(entry)
    assert open_descriptors() == before
    os.utime(entry, (1, 1))  # the oldest again, beyond the newest three
    assert prune_elsewhere(tmp_path, keep="k4") == ["k1"]  # the rebuilt k0 is still held
