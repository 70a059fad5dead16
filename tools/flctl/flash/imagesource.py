"""A disk image to flash: its compression, its block map (`.bmap` from `bmaptool create`) and its GPT.

Decompression streams (gzip and xz from the standard library, zstd through the `zstd` program) so a
multi-gigabyte image is never unpacked to disk.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import gpt

COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}
IMAGE_SUFFIXES = (".img", ".wic", ".raw")
HEAD_BYTES = 1 << 20  # enough for a GPT with 128 entries on 512- or 4096-byte sectors


class ImageError(Exception):
    """The image cannot be flashed; the message names the problem."""


@dataclass(frozen=True)
class BmapRange:
    first: int  # block numbers, inclusive
    last: int
    sha256: str


@dataclass(frozen=True)
class Bmap:
    path: Path
    image_size: int
    block_size: int
    blocks: int
    mapped_blocks: int
    ranges: tuple[BmapRange, ...]

    @property
    def mapped_bytes(self) -> int:
        return sum((r.last - r.first + 1) * self.block_size for r in self.ranges)


def parse_bmap(path: Path) -> Bmap:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ImageError(f"cannot read the block map {path}: {exc}") from None
    if root.tag != "bmap" or not root.get("version", "").startswith("2."):
        raise ImageError(f"{path} is not a bmap version 2 file (made by `bmaptool create`)")

    def num(tag: str) -> int:
        el = root.find(tag)
        if el is None or not (el.text or "").strip().isdigit():
            raise ImageError(f"{path}: missing or bad <{tag}>")
        return int(el.text.strip())  # type: ignore[union-attr]

    ctype = (root.findtext("ChecksumType") or "").strip()
    if ctype != "sha256":
        raise ImageError(f"{path}: checksum type {ctype!r} not supported (bmaptool create makes sha256)")
    ranges = []
    for r in root.iter("Range"):
        text = (r.text or "").strip()
        first, _, last = text.partition("-")
        ranges.append(BmapRange(int(first), int(last or first), r.get("chksum", "")))
    return Bmap(path, num("ImageSize"), num("BlockSize"), num("BlocksCount"), num("MappedBlocksCount"), tuple(ranges))


@dataclass(frozen=True)
class Image:
    path: Path
    compression: str | None  # gzip, xz, zstd or None
    bmap: Bmap | None
    table: gpt.PartitionTable

    @property
    def plain_size(self) -> int | None:
        """Uncompressed size when known without reading the whole stream."""
        if self.bmap is not None:
            return self.bmap.image_size
        return self.path.stat().st_size if self.compression is None else None

    @property
    def disk_size(self) -> int:
        """Bytes the target must have."""
        return self.bmap.image_size if self.bmap is not None else self.table.min_disk_size


def _find_bmap(path: Path) -> Path | None:
    """IMAGE.bmap next to the image: for x.wic.zst try x.wic.zst.bmap, x.wic.bmap, x.bmap."""
    candidates = [path.with_name(path.name + ".bmap")]
    stem = path
    if stem.suffix in COMPRESSIONS:
        stem = stem.with_suffix("")
        candidates.append(stem.with_name(stem.name + ".bmap"))
    if stem.suffix in IMAGE_SUFFIXES:
        candidates.append(stem.with_suffix(".bmap"))
    return next((c for c in candidates if c.is_file()), None)


@contextlib.contextmanager
def open_stream(path: Path, compression: str | None) -> Iterator[BinaryIO]:
    """The decompressed bytes of the image as a binary stream."""
    if compression is None:
        with open(path, "rb") as f:
            yield f
    elif compression == "gzip":
        with gzip.open(path, "rb") as f:
            yield f  # type: ignore[misc]
    elif compression == "xz":
        with lzma.open(path, "rb") as f:
            yield f  # type: ignore[misc]
    else:
        proc = subprocess.Popen(["zstd", "-dcq", "--", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        complete = False
        try:
            yield proc.stdout  # type: ignore[misc]
            # Read to the end: the exit status then tells whether the stream was whole. A reader that
            # stopped early (the GPT check reads 1 MiB) does not want the rest decompressed.
            complete = proc.stdout.read(1) == b""
        finally:
            if not complete:
                proc.kill()
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            if proc.wait() != 0 and complete:
                detail = err.rsplit(":", 1)[-1].strip() or f"exit status {proc.returncode}"
                raise ImageError(f"{path.name} is truncated or damaged (zstd: {detail})")


def _read_head(path: Path, compression: str | None) -> bytes:
    try:
        with open_stream(path, compression) as f:
            return f.read(HEAD_BYTES)
    except (OSError, EOFError, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise ImageError(f"cannot read {path} as a {compression or 'raw'} image: {exc}") from None


def open_image(
    path: str | Path,
    bmap: str | Path | None = None,
    use_bmap: bool = True,
    root_label: str = "fl-root",
    data_label: str = "fl-data",
) -> Image:
    """Check that `path` is a flashable fl-edge image: GPT with both labelled partitions, not truncated."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"image {p} not found")
    compression = COMPRESSIONS.get(p.suffix)
    bmap_path = Path(bmap) if bmap else (_find_bmap(p) if use_bmap else None)
    if bmap and not bmap_path.is_file():  # type: ignore[union-attr]
        raise ImageError(f"block map {bmap} not found")
    head = _read_head(p, compression)
    plain_size = p.stat().st_size if compression is None else None
    try:
        table = gpt.read_table(gpt.bytes_reader(head))
    except gpt.GptError as exc:
        raise ImageError(f"{p} is not an fl-edge disk image: {exc}") from None
    try:
        root, data = table.by_name(root_label), table.by_name(data_label)
    except gpt.GptError as exc:
        raise ImageError(f"{p}: {exc}") from None
    names = ", ".join(repr(q.name) for q in table.partitions) or "none"
    if root is None:
        raise ImageError(
            f"{p} is not an fl-edge disk image: no partition labelled {root_label!r} (partitions: {names})"
        )
    if data is None:
        raise ImageError(
            f"{p} has no data partition labelled {data_label!r} (partitions: {names}); "
            f"the board's identity has nowhere to go"
        )
    parsed = parse_bmap(bmap_path) if bmap_path else None
    if parsed is not None and plain_size is not None and plain_size != parsed.image_size:
        raise ImageError(
            f"{p} is {plain_size} bytes but its bmap {bmap_path.name} says {parsed.image_size}: "  # type: ignore[union-attr]
            f"{'the image is truncated' if plain_size < parsed.image_size else 'wrong bmap'}"
        )
    need = table.min_disk_size
    if plain_size is not None and plain_size < need:
        raise ImageError(
            f"{p} is truncated: {plain_size} bytes, but its partition table needs {need} "
            f"(backup GPT header at byte {table.header.alternate_lba * table.sector_size})"
        )
    if parsed is not None and parsed.image_size < need:
        raise ImageError(
            f"{p}: the bmap says the image is {parsed.image_size} bytes, but its partition table "
            f"needs {need}; the image or its bmap is wrong"
        )
    return Image(p, compression, parsed, table)
