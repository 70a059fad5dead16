"""Two ``flctl image build --out DIR`` into one directory take turns: the second waits, saying so, until the first
has published, and DIR then holds one image whole. Without that, the second published its image while the first
was half-way, and the first then put its remaining files and its manifest over the second's disk: a manifest
describing the partitions of another image's disk, which `flctl flash` and `flctl qemu run` would trust."""

from __future__ import annotations

import errno
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from test_image_durability import _image

from flctl.image import build
from flctl.image.build import DISK_NAME, MANIFEST, ImageArtifacts, ImageBuildError

ROOT = Path(__file__).resolve().parents[1]

# Publishes argv[1] into argv[2], and stops after the disk image until a line comes on stdin.
PAUSED_PUBLISH = """
import sys
from pathlib import Path
from flctl.image import build
from flctl.image.build import DISK_NAME, ImageArtifacts

real = build._link_or_copy

def paused_after_the_disk(src, dst):
    real(src, dst)
    if dst.name == DISK_NAME:
        print("disk published", flush=True)
        sys.stdin.readline()

build._link_or_copy = paused_after_the_disk
build._publish(ImageArtifacts.load(Path(sys.argv[1])), Path(sys.argv[2]))
"""


def test_a_second_publish_into_the_same_out_waits_and_leaves_one_image_whole(tmp_path: Path) -> None:
    first, second = _image(tmp_path / "cache" / "a", "a"), _image(tmp_path / "cache" / "b", "b")
    out = tmp_path / "out"
    writer = subprocess.Popen([sys.executable, "-c", PAUSED_PUBLISH, str(first), str(out)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "disk published\n"
        said = io.StringIO()
        other = threading.Thread(target=build._publish,
                                 args=(ImageArtifacts.load(second), out, Console(file=said, width=200)))
        other.start()
        deadline = time.monotonic() + 30
        while other.is_alive() and "waiting" not in said.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert writer.stdin is not None
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(timeout=60) == 0
        other.join(timeout=60)
        assert not other.is_alive()
    finally:
        if writer.poll() is None:
            writer.kill()
    image = ImageArtifacts.load(out)
    assert (out / DISK_NAME).read_text() == f"{image.manifest['key']} {DISK_NAME}", (
        f"{MANIFEST} describes image {image.manifest['key']} beside {(out / DISK_NAME).read_text()!r}")
    assert image.manifest["key"] == "b"
    assert f"another flctl image build is publishing into {out}" in " ".join(said.getvalue().split())


def test_an_out_that_refuses_the_files_says_so_and_the_next_publish_goes_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full (or read-only) --out fails the publish in one line naming it, not a traceback, and lets go of the
    directory's lock: the next publish into it does not wait."""
    image = _image(tmp_path / "cache" / "a", "a")
    out = tmp_path / "out"
    real = build._link_or_copy

    def full(src: Path, dst: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(build, "_link_or_copy", full)
    with pytest.raises(ImageBuildError) as refused:
        build._publish(ImageArtifacts.load(image), out)
    assert str(refused.value).startswith(f"--out {out}: No space left on device ({out / DISK_NAME})")
    assert not (out / MANIFEST).exists()

    monkeypatch.setattr(build, "_link_or_copy", real)
    said = io.StringIO()
    assert build._publish(ImageArtifacts.load(image), out, Console(file=said, width=200)).manifest["key"] == "a"
    assert "waiting" not in said.getvalue()
