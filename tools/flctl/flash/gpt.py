"""GUID partition tables, read with `struct` so that images and disks are inspected without root or tools.

`flctl flash` uses this to check an image before writing it (it must be GPT with `fl-root` and `fl-data`), to
find the data partition on the target by its label, and to invalidate the partition table while a board's
identity is being written (see write.py: a board whose identity is incomplete must not look bootable).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

SIGNATURE = b"EFI PART"
# What the signature is replaced with while a target is being provisioned: no firmware, kernel or fdisk
# recognises it, and `flctl` can say "this target was left half-provisioned" instead of "no partition table".
PENDING_SIGNATURE = b"FLPROV.."
_HEADER = struct.Struct("<8s4sII4xQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")

ReadAt = Callable[[int, int], bytes]


class GptError(ValueError):
    """The bytes do not hold a usable GUID partition table; the message says what is wrong."""


@dataclass(frozen=True)
class Partition:
    index: int  # 1-based, as in /dev/sdX1
    name: str  # the GPT partition name (PARTLABEL)
    type_guid: str
    unique_guid: str
    first_lba: int
    last_lba: int
    sector_size: int

    @property
    def offset(self) -> int:
        return self.first_lba * self.sector_size

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * self.sector_size


@dataclass(frozen=True)
class GptHeader:
    lba: int  # where this header lives
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int


@dataclass(frozen=True)
class PartitionTable:
    sector_size: int
    header: GptHeader
    partitions: tuple[Partition, ...]

    @property
    def min_disk_size(self) -> int:
        """Bytes a disk needs to hold every partition and the backup header where this table puts it."""
        return (max(self.header.alternate_lba, self.header.lba) + 1) * self.sector_size

    def by_name(self, name: str) -> Partition | None:
        found = [p for p in self.partitions if p.name == name]
        if len(found) > 1:
            raise GptError(f"the partition table has {len(found)} partitions labelled {name!r}; expected one")
        return found[0] if found else None


def _parse_header(raw: bytes, lba: int) -> GptHeader | None:
    """The header at `lba`, or None when the signature or CRC is wrong."""
    if len(raw) < 92 or raw[:8] != SIGNATURE:
        return None
    (_sig, _rev, hsize, hcrc, my_lba, alt_lba, first, last, _guid, entries_lba, count, esize,
     ecrc) = _HEADER.unpack_from(raw)
    if not 92 <= hsize <= len(raw):
        return None
    check = bytearray(raw[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hcrc or my_lba != lba or esize < 128 or count > 16384:
        return None
    return GptHeader(my_lba, alt_lba, first, last, entries_lba, count, esize, ecrc)


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw)).upper()


def read_table(read_at: ReadAt, disk_size: int | None = None) -> PartitionTable:
    """Parse the primary GPT (512- or 4096-byte sectors); fall back to the backup header at the disk's end.

    `read_at(offset, length)` returns up to `length` bytes (fewer at the end of the medium).
    """
    for sector in (512, 4096):
        header = _parse_header(read_at(sector, sector), 1)
        if header is None and disk_size is not None and disk_size >= 2 * sector:
            last = disk_size // sector - 1
            header = _parse_header(read_at(last * sector, sector), last)
        if header is None:
            continue
        length = header.entry_count * header.entry_size
        entries = read_at(header.entries_lba * sector, length)
        if len(entries) != length or zlib.crc32(entries) != header.entries_crc:
            raise GptError("the GPT partition entries are damaged (CRC mismatch)")
        parts = []
        for i in range(header.entry_count):
            tguid, uguid, first, last, _attrs, rawname = _ENTRY.unpack_from(entries, i * header.entry_size)
            if tguid == b"\0" * 16:
                continue
            name = rawname.decode("utf-16-le", errors="replace").split("\0", 1)[0]
            parts.append(Partition(i + 1, name, _guid(tguid), _guid(uguid), first, last, sector))
        return PartitionTable(sector, header, tuple(parts))
    pending = read_at(512, 8) == PENDING_SIGNATURE or read_at(4096, 8) == PENDING_SIGNATURE
    if pending:
        raise GptError("the partition table was invalidated by an interrupted `flctl flash` "
                       "(the board was never completely provisioned)")
    raise GptError("no GPT partition table (not a partitioned disk image)")


def file_reader(f) -> ReadAt:  # type: ignore[no-untyped-def]
    """A `ReadAt` over a file object opened for binary reading."""

    def read_at(offset: int, length: int) -> bytes:
        f.seek(offset)
        return f.read(length)

    return read_at


def bytes_reader(data: bytes) -> ReadAt:
    """A `ReadAt` over the first bytes of an image (e.g. read from a decompressing stream)."""
    return lambda offset, length: data[offset:offset + length]


def header_offsets(table: PartitionTable) -> tuple[int, int]:
    """Byte offsets of the primary and the backup header."""
    return table.header.lba * table.sector_size, table.header.alternate_lba * table.sector_size
