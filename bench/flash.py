"""Flash time of a real-sized image: bmap copy against a plain full copy, in the same run.

    python bench/flash.py                       # the newest development image in the image cache, else synthetic
    python bench/flash.py --image fl-dev.img    # a given image (its .bmap beside it)
    python bench/flash.py --synthetic           # a 1.5 GiB sparse GPT image with ~200 MiB of data
    python bench/flash.py --loop                # targets are loop devices (block devices), not plain files

Both runs are the whole `flctl flash` path (copy, read-back verification, identity, table restore) onto a
target of the same kind; the source's and the targets' cached pages are dropped before each run so neither
run reads the other's cache. Prints both times and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from flctl.flash import blockdev  # noqa: E402
from flctl.flash import write as flash  # noqa: E402
from flctl.flash.imagesource import open_image  # noqa: E402
from flctl.provision import Fleet  # noqa: E402
from flctl.sealed import Sealer  # noqa: E402

MiB = 1 << 20


def newest_dev_image() -> Path | None:
    base = Path(os.environ.get("FL_EDGE_CACHE") or Path.home() / ".cache" / "fl-edge") / "images"
    found = [d / "fl-dev.img" for d in base.glob("*") if (d / ".complete").exists() and (d / "fl-dev.img").exists()
             and (d / "fl-dev.img.bmap").exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def synthetic_image(workdir: Path, size_mb: int = 1536, data_mb: int = 200) -> Path:
    """A sparse GPT disk: fl-root ext4 holding `data_mb` of incompressible files, an empty fl-data."""
    disk = workdir / "synthetic.img"
    with open(disk, "wb") as f:
        f.truncate(size_mb * MiB)
    root_mb = size_mb // 2
    table = (f"label: gpt\nstart=2048, size={root_mb * 2048}, name=\"fl-root\"\n"
             f"start={2048 + root_mb * 2048}, size={(size_mb - root_mb - 2) * 2048}, name=\"fl-data\"\n")
    subprocess.run(["sfdisk", "-q", str(disk)], input=table, text=True, check=True)
    tree = workdir / "rootfs"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nfl-agent:x:998:998::/:/usr/sbin/nologin\n")
    (tree / "usr").mkdir()
    for i in range(data_mb // 8):
        (tree / "usr" / f"blob{i:03d}").write_bytes(os.urandom(8 * MiB))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "fl-root", "-d", str(tree), "-E", f"offset={1 * MiB}",
                    str(disk), f"{root_mb * 1024}k"], check=True)
    shutil.rmtree(tree)
    subprocess.run(["bmaptool", "-q", "create", "-o", f"{disk}.bmap", str(disk)], check=True)
    return disk


def drop_cache(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextlib.contextmanager
def target(path: Path, size: int, loop: bool) -> Iterator[Path]:
    with open(path, "wb") as f:
        f.truncate(size)
    if not loop:
        yield path
        return
    dev = subprocess.run(["losetup", "-f", "--show", str(path)], capture_output=True, text=True, check=True)
    try:
        yield Path(dev.stdout.strip())
    finally:
        subprocess.run(["losetup", "-d", dev.stdout.strip()], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, help="image to flash (default: newest dev image in the cache)")
    ap.add_argument("--synthetic", action="store_true", help="use a synthetic 1.5 GiB image with ~200 MiB data")
    ap.add_argument("--loop", action="store_true", help="flash onto loop devices instead of plain files")
    ap.add_argument("--workdir", type=Path, help="where targets go (default: a temp dir under /var/tmp)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flash-bench-", dir=args.workdir or "/var/tmp"))
    try:
        image_path = args.image if args.image else (None if args.synthetic else newest_dev_image())
        kind = "given image" if args.image else "development image"
        if image_path is None:
            kind = "synthetic image"
            image_path = synthetic_image(work)
        os.environ.setdefault("FLCTL_KDF_LEVEL", "interactive")
        sealer = Sealer(b"bench")
        fleet = Fleet.create_or_open(work / "fleet", sealer, "http://10.0.2.100:8080", work / "agg")
        fleet.add_board("bench-1")
        board = flash.BoardIdentity("bench-1", fleet.device_key("bench-1"), fleet.aggregator_public_key,
                                    (fleet.board_agent_toml("bench-1")).read_text())
        with_bmap = open_image(image_path)
        without = open_image(image_path, use_bmap=False)
        if with_bmap.bmap is None:
            print(f"{image_path} has no .bmap beside it: nothing to compare", file=sys.stderr)
            return 2
        size = with_bmap.bmap.image_size
        print(f"{kind}: {image_path}")
        mapped = with_bmap.bmap.mapped_bytes
        where = "loop devices" if args.loop else "files"
        print(f"  size {size / MiB:.0f} MiB, mapped {mapped / MiB:.0f} MiB ({100 * mapped / size:.0f} %); "
              f"targets: {where} in {work}")
        times = {}
        for label, image in (("full copy", without), ("bmap", with_bmap)):
            drop_cache(image_path)
            tpath = work / f"target-{label.replace(' ', '-')}.img"
            with target(tpath, size, args.loop) as dev:
                t = blockdev.inspect(dev)
                started = time.monotonic()
                result = flash.flash_one(image, t, board, lambda *_: None)
                took = time.monotonic() - started
            if not result.ok:
                print(f"{label}: FAILED: {result.error}", file=sys.stderr)
                return 1
            times[label] = (took, result.copy_seconds)
            print(f"  {label:<9}: {took:6.1f} s total ({result.copy_seconds:6.1f} s copy, "
                  f"{took - result.copy_seconds:5.1f} s verify + identity)")
            tpath.unlink()
        full, bmap = times["full copy"][0], times["bmap"][0]
        print(f"  ratio full/bmap: {full / bmap:.1f}x total, "
              f"{times['full copy'][1] / times['bmap'][1]:.1f}x copy only")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
