"""`flctl flash`: write an fl-edge disk image to a card, eMMC, USB stick or image file and give it its identity.

The order is chosen so that no board ever looks provisioned when it is not:
  1. check the image (GPT with fl-root and fl-data, not truncated, bmap consistent) and the target (not the
     system disk, not mounted, removable unless --force), then ask for confirmation;
  2. copy: `bmaptool copy` with the image's block map (sparse, checksummed), else a streamed full copy;
  3. read back and verify (the bmap's per-range SHA-256, or the hash of the whole stream);
  4. on a block device larger than the image (a 32 GB card, a 1 GB image), move the backup GPT header to the
     device's end and grow fl-data, the last partition, to fill it (`sfdisk`; its filesystem with
     `resize2fs`; `--no-grow` keeps the image's layout);
  5. invalidate both GPT headers (signature -> "FLPROV.."): from here on the disk has no partition table;
  6. create the data filesystem if the image left it empty, write the identity into it with debugfs, read it
     back, load it with appliance.identity and check the device id, fsck;
  7. restore both GPT headers and re-read the table.
Any failure leaves the headers invalidated (or invalidates them), so a half-provisioned board does not boot
and `flctl flash` reports it as such. Identity files land on the data partition as
fl-agent/identity/device.key (0600), fl-agent/identity/aggregator.pub and fl-agent/agent.toml, owned by the
image's fl-agent user (uid/gid read from /etc/passwd on fl-root), and, when the fleet gives the board NTP
servers, timesyncd.conf (owned by root: systemd-timesyncd reads it, the agent has no business writing it).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from appliance import identity
from appliance.config import ConfigError, load_config

from ..provision import Fleet, ProvisionError, agent_toml, open_fleet
from ..sealed import SealError
from . import blockdev, gpt
from .ext4image import Ext4Error, Ext4Volume, passwd_entry
from .imagesource import Image, ImageError, open_image, open_stream

ROOT_LABEL = "fl-root"
DATA_LABEL = "fl-data"
AGENT_USER = "fl-agent"
STATE_DIR = "fl-agent"  # on the data partition; /var/lib/fl-agent is bound to /data/fl-agent
TIMESYNCD_CONF = "timesyncd.conf"  # /data/timesyncd.conf: linked into /run/systemd/timesyncd.conf.d at boot
CHUNK = 4 << 20
GROW_MIN = 16 << 20  # less room than this beyond the image's layout is not worth a partition edit
BLKRRPART = 0x125F

Report = Callable[[str, int, int | None], None]  # (phase, bytes done so far in phase, phase total)


class FlashError(Exception):
    """Flashing failed or was refused; the message is what the user sees."""


@dataclass(frozen=True)
class BoardIdentity:
    name: str
    signing_key: SigningKey
    aggregator_key: VerifyKey
    agent_toml: str
    timesyncd_conf: str | None = None

    @property
    def device_id(self) -> str:
        return identity.device_id_for(self.signing_key.verify_key)


@dataclass
class FlashResult:
    target: str
    board: str
    device_id: str
    method: str = ""
    data_size: int = 0  # bytes of the fl-data partition as flashed (grown or as in the image)
    grown: bool = False
    copy_seconds: float = 0.0
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


# -- low-level I/O --------------------------------------------------------------------------------------
def _drop_cache(fd: int) -> None:
    """Flush and forget cached pages so the read-back reads the medium, not memory."""
    os.fsync(fd)
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _reread_partitions(target: blockdev.Target) -> None:
    if not target.is_block:
        return
    with contextlib.suppress(OSError), open(target.path, "rb") as f:
        fcntl.ioctl(f.fileno(), BLKRRPART)


def _sha256_ranges(path: Path, ranges: Iterator[tuple[int, int]], report: Report, total: int) -> Iterator[str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        _drop_cache(fd)
        done = 0
        for start, length in ranges:
            h = hashlib.sha256()
            pos, end = start, start + length
            while pos < end:
                block = os.pread(fd, min(CHUNK, end - pos), pos)
                if not block:
                    raise FlashError(f"{path} ends at byte {pos}, before the end of the image ({end})")
                h.update(block)
                pos += len(block)
                done += len(block)
                report("verify", done, total)
            yield h.hexdigest()
    finally:
        os.close(fd)


# -- copy -----------------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _bmaptool_error(stderr: str, image: Image) -> str:
    text = _ANSI.sub("", stderr)
    # the last "ERROR:" paragraph (the first ones carry the traceback)
    detail = " ".join(text.rsplit("ERROR:", 1)[-1].split()) if "ERROR:" in text else text.strip()[-300:]
    bmap = image.bmap.path.name if image.bmap else "?"
    if "checksum mismatch" in detail:
        return (f"{image.path.name} does not match its block map {bmap} ({detail}): the image is corrupt or "
                f"the bmap belongs to another image")
    if any(m in detail for m in ("image size", "truncated", "unexpected EOF", "but should have")):
        return f"{image.path.name} is truncated or does not match its block map {bmap}: {detail}"
    return f"bmaptool copy failed: {detail}"


def copy_bmap(image: Image, target: blockdev.Target, report: Report) -> None:
    """bmaptool copy, with progress read from the child's write counter."""
    assert image.bmap is not None
    total = image.bmap.mapped_bytes
    proc = subprocess.Popen(["bmaptool", "-q", "copy", "--bmap", str(image.bmap.path), str(image.path),
                             str(target.path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    io_path = Path(f"/proc/{proc.pid}/io")
    while proc.poll() is None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            wchar = int(io_path.read_text().split("wchar:")[1].split()[0])
            report("copy", min(wchar, total), total)
        time.sleep(0.2)
    reader.join()
    if proc.returncode != 0:
        raise FlashError(_bmaptool_error("".join(stderr), image))
    report("copy", total, total)


def copy_full(image: Image, target: blockdev.Target, report: Report) -> tuple[int, str]:
    """Stream the decompressed image onto the target; return (bytes written, sha256 of them)."""
    total = image.plain_size
    h = hashlib.sha256()
    written = 0
    flags = os.O_WRONLY | (0 if target.is_block else os.O_CREAT | os.O_TRUNC)
    fd = os.open(target.path, flags, 0o644)
    try:
        with open_stream(image.path, image.compression) as src:
            while True:
                try:
                    block = src.read(CHUNK)
                except (EOFError, OSError) as exc:
                    raise FlashError(f"{image.path.name} is truncated or damaged: {exc}") from None
                if not block:
                    break
                if target.is_block and written + len(block) > target.size:
                    raise FlashError(f"{image.path.name} is larger than {target.path} "
                                     f"({blockdev.human_size(target.size)})")
                os.pwrite(fd, block, written) if target.is_block else os.write(fd, block)
                h.update(block)
                written += len(block)
                report("copy", written, total)
        os.fsync(fd)
    except ImageError as exc:
        raise FlashError(str(exc)) from None
    finally:
        os.close(fd)
    if written < image.table.min_disk_size:
        raise FlashError(f"{image.path.name} is truncated: {written} bytes, but its partition table needs "
                         f"{image.table.min_disk_size}")
    return written, h.hexdigest()


def verify_bmap(image: Image, target: blockdev.Target, report: Report) -> None:
    bmap = image.bmap
    assert bmap is not None
    ranges = ((r.first * bmap.block_size,
               min((r.last + 1) * bmap.block_size, bmap.image_size) - r.first * bmap.block_size)
              for r in bmap.ranges)
    digests = _sha256_ranges(target.path, ranges, report, bmap.mapped_bytes)
    for r, digest in zip(bmap.ranges, digests, strict=True):
        if digest != r.sha256:
            raise FlashError(f"read-back verification failed: blocks {r.first}-{r.last} on {target.path} "
                             f"differ from the image (bad medium or a failing reader?)")


def verify_full(target: blockdev.Target, length: int, digest: str, report: Report) -> None:
    (got,) = _sha256_ranges(target.path, iter([(0, length)]), report, length)
    if got != digest:
        raise FlashError(f"read-back verification failed: {target.path} does not hold what was written "
                         f"(bad medium or a failing reader?)")


# -- identity -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _ram_dir() -> Iterator[Path]:
    """A private directory in RAM (/dev/shm when present): plaintext keys never touch the host's disks."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix="flctl-", dir=base))
    try:
        os.chmod(d, 0o700)
        yield d
    finally:
        for f in d.rglob("*"):
            if f.is_file():
                with contextlib.suppress(OSError), open(f, "r+b") as fh:
                    fh.write(b"\0" * f.stat().st_size)
        shutil.rmtree(d, ignore_errors=True)


def agent_owner(volume: Ext4Volume, override: tuple[int, int] | None) -> tuple[int, int]:
    if override is not None:
        return override
    if not volume.has_filesystem():
        raise FlashError(f"the {ROOT_LABEL} partition is not ext4, so the {AGENT_USER} user cannot be looked "
                         f"up in its /etc/passwd; pass --owner UID:GID")
    passwd = volume.read("/etc/passwd")
    if passwd is None:
        raise FlashError(f"the image's {ROOT_LABEL} has no /etc/passwd; pass --owner UID:GID")
    owner = passwd_entry(passwd.decode(errors="replace"), AGENT_USER)
    if owner is None:
        raise FlashError(f"the image's /etc/passwd has no {AGENT_USER} user, so the agent could not read its "
                         f"key; rebuild the image with the fl-agent user or pass --owner UID:GID")
    return owner


def write_identity(data: Ext4Volume, board: BoardIdentity, uid: int, gid: int) -> None:
    """Put the board's identity into the data filesystem, then read it back and load it as the agent will."""
    with _ram_dir() as stage:
        identity.write_device_key(stage, board.signing_key)
        identity.write_aggregator_key(stage, board.aggregator_key)
        (stage / "agent.toml").write_text(board.agent_toml)
        files = [
            (identity.device_key_path(stage), f"{STATE_DIR}/identity/{identity.DEVICE_KEY_FILE}", 0o600),
            (identity.aggregator_key_path(stage), f"{STATE_DIR}/identity/{identity.AGGREGATOR_KEY_FILE}", 0o644),
            (stage / "agent.toml", f"{STATE_DIR}/agent.toml", 0o644),
        ]
        data.install(files, [(STATE_DIR, 0o700), (f"{STATE_DIR}/identity", 0o700)], uid, gid)
        back = stage / "readback"
        (back / identity.IDENTITY_DIR).mkdir(parents=True, mode=0o700)
        for host, dest, mode in files:
            content = data.read(dest)
            if content != host.read_bytes():
                raise FlashError(f"read-back verification failed: {dest} on the data partition differs")
            meta = data.stat(dest)
            if meta is None or (meta[0] & 0o7777, meta[1], meta[2]) != (mode, uid, gid):
                raise FlashError(f"{dest} on the data partition has mode/owner {meta}, expected "
                                 f"{mode:o} {uid}:{gid}")
            out = back / host.relative_to(stage)
            out.write_bytes(content)
            os.chmod(out, mode)
        loaded = identity.load_device_key(back)
        if loaded.device_id != board.device_id:
            raise FlashError("the device key read back from the data partition gives device id "
                             f"{loaded.device_id}, expected {board.device_id}")
        if bytes(identity.load_aggregator_key(back)) != bytes(board.aggregator_key):
            raise FlashError("the aggregator key read back from the data partition is not the fleet's")
        if board.timesyncd_conf is not None:
            (stage / TIMESYNCD_CONF).write_text(board.timesyncd_conf)
            data.install([(stage / TIMESYNCD_CONF, TIMESYNCD_CONF, 0o644)], [], 0, 0)
            if data.read(TIMESYNCD_CONF) != (stage / TIMESYNCD_CONF).read_bytes():
                raise FlashError(f"read-back verification failed: {TIMESYNCD_CONF} on the data partition differs")
    data.fsck()


# -- one target -----------------------------------------------------------------------------------------
def _invalidate(target: blockdev.Target, table: gpt.PartitionTable) -> int:
    """Overwrite the GPT header signatures; return how many headers the target is large enough to hold."""
    size = target.path.stat().st_size if not target.is_block else target.size
    offsets = set(gpt.header_offsets(table))
    if target.is_block:
        # A card's previous content may have a backup header at the card's end, which firmware and
        # partitioning tools would use to "repair" the table: it goes too (and is not restored).
        end = size - table.sector_size
        with open(target.path, "rb") as f:
            f.seek(end)
            if f.read(8) == gpt.SIGNATURE:
                offsets.add(end)
    marked = 0
    for offset in sorted(offsets):
        if offset + 8 <= size:
            _write_at(target.path, offset, gpt.PENDING_SIGNATURE)
            marked += 1
    return marked


def _restore(target: blockdev.Target, table: gpt.PartitionTable) -> None:
    for offset in gpt.header_offsets(table):
        _write_at(target.path, offset, gpt.SIGNATURE)


def _sfdisk(target: blockdev.Target, args: list[str], script: str | None = None) -> None:
    # the kernel is told once, at the end (_reread_partitions), when the table is final
    proc = subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", *args, str(target.path)],
                          input=script, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FlashError(f"sfdisk {' '.join(args)} on {target.path} failed: "
                         f"{(proc.stderr or proc.stdout).strip()[-300:]}")


def grow_data_partition(target: blockdev.Target, table: gpt.PartitionTable) -> gpt.PartitionTable | None:
    """Fill a device larger than the image: backup GPT header to the device's end, fl-data (which must be the
    last partition) extended to the last usable sector, its filesystem (if any) grown to match. Returns the
    new table, or None when there is nothing to grow (an image file, no room, fl-data not last)."""
    data = table.by_name(DATA_LABEL)
    if not target.is_block or data is None or target.size - table.min_disk_size < GROW_MIN:
        return None
    if max(table.partitions, key=lambda p: p.last_lba) != data:
        return None
    _sfdisk(target, ["--relocate", "gpt-bak-std"])
    _sfdisk(target, ["-N", str(data.index)], ", +\n")
    with open(target.path, "rb") as f:
        _drop_cache(f.fileno())
        grown = gpt.read_table(gpt.file_reader(f), target.size)
    new_data = grown.by_name(DATA_LABEL)
    if new_data is None or new_data.first_lba != data.first_lba or new_data.size <= data.size:
        raise FlashError(f"growing {DATA_LABEL} on {target.path} did not give the expected partition: {new_data}")
    volume = Ext4Volume(target.path, new_data.offset, new_data.size)
    if volume.has_filesystem():
        volume.grow()
    return grown


def flash_one(image: Image, target: blockdev.Target, board: BoardIdentity, report: Report,
              owner: tuple[int, int] | None = None, grow: bool = True) -> FlashResult:
    """Flash and provision one target; never raises: failures are in the result's `error`."""
    result = FlashResult(str(target.path), board.name, board.device_id)
    started = time.monotonic()
    touched = False
    try:
        if target.is_block and target.size < image.disk_size:
            raise FlashError(f"{target.path} ({blockdev.human_size(target.size)}) is smaller than the image "
                             f"({blockdev.human_size(image.disk_size)})")
        touched = True
        if image.bmap is not None:
            result.method = "bmap"
            copy_bmap(image, target, report)
            result.copy_seconds = time.monotonic() - started
            verify_bmap(image, target, report)
        else:
            result.method = "full copy"
            length, digest = copy_full(image, target, report)
            result.copy_seconds = time.monotonic() - started
            verify_full(target, length, digest, report)
        size = target.size if target.is_block else target.path.stat().st_size
        with open(target.path, "rb") as f:
            table = gpt.read_table(gpt.file_reader(f), size)
        root, data = table.by_name(ROOT_LABEL), table.by_name(DATA_LABEL)
        if root is None or data is None:
            raise FlashError(f"after copying, {target.path} has no {ROOT_LABEL}/{DATA_LABEL} partition")
        if grow:
            report("grow", 0, None)
            grown = grow_data_partition(target, table)
            if grown is not None:
                table, data, result.grown = grown, grown.by_name(DATA_LABEL), True
        result.data_size = data.size
        report("identity", 0, None)
        _invalidate(target, table)
        uid, gid = agent_owner(Ext4Volume(target.path, root.offset, root.size), owner)
        volume = Ext4Volume(target.path, data.offset, data.size)
        if not volume.has_filesystem():
            volume.mkfs(DATA_LABEL)
        elif volume.label() != DATA_LABEL:
            volume.set_label(DATA_LABEL)
        write_identity(volume, board, uid, gid)
        _restore(target, table)
        with open(target.path, "rb") as f:
            _drop_cache(f.fileno())
            again = gpt.read_table(gpt.file_reader(f), size)
        if again.by_name(DATA_LABEL) != data:
            raise FlashError("the partition table read back after provisioning differs from the one written")
        _reread_partitions(target)
        report("done", 0, None)
    except (FlashError, ImageError, Ext4Error, gpt.GptError, identity.IdentityError, OSError) as exc:
        result.error = str(exc) if not isinstance(exc, OSError) else f"{target.path}: {exc.strerror or exc}"
        if touched and (target.is_block or target.path.exists()):
            try:
                if _invalidate(target, image.table):
                    result.error += "; the target was marked unbootable (partition table invalidated): flash it again"
                else:
                    result.error += "; nothing usable was written: flash it again"
            except OSError as exc2:
                result.error += f"; could not mark the target unbootable either ({exc2.strerror})"
        report("failed", 0, None)
    result.seconds = time.monotonic() - started
    return result


# -- command --------------------------------------------------------------------------------------------
def _parse_owner(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m:
        raise FlashError(f"--owner {text!r}: expected UID:GID (numbers)")
    return int(m.group(1)), int(m.group(2))


def _board_list(args: argparse.Namespace) -> list[str]:
    if args.many:
        if not args.boards:
            raise FlashError("--many needs --boards A,B,... (one board per target, in order)")
        names = [n.strip() for n in args.boards.split(",") if n.strip()]
        if len(names) != len(args.targets):
            raise FlashError(f"--boards names {len(names)} board(s) for {len(args.targets)} target(s)")
        if len(set(names)) != len(names):
            raise FlashError("--boards lists a board twice: every board needs its own target")
        return names
    if len(args.targets) != 1:
        raise FlashError(f"{len(args.targets)} targets given: use --many to flash several at once")
    if not args.board:
        raise FlashError("--board NAME is required (the fleet board whose identity goes on the target)")
    return [args.board]


def _board_config(fleet: Fleet, name: str) -> str:
    """The board's agent.toml from the fleet, checked with the agent's own strict loader (each key; the
    transport is checked by the agent at start, against the image's config and CA file merged with this)."""
    path = fleet.board_agent_toml(name)
    if not path.exists():
        return agent_toml(fleet.url)
    try:
        load_config(path, override=False, transport=False)
    except ConfigError as exc:
        raise FlashError(f"board {name}'s agent.toml would stop the agent: {exc}") from None
    return path.read_text()


def _identities(fleet: Fleet, names: list[str]) -> list[BoardIdentity]:
    agg = fleet.aggregator_public_key
    return [BoardIdentity(n, fleet.device_key(n), agg, _board_config(fleet, n), _board_timesync(fleet, n))
            for n in names]


def _board_timesync(fleet: Fleet, name: str) -> str | None:
    """The board's timesyncd.conf from the fleet (its NTP servers), if provisioning gave it one."""
    path = fleet.board_timesyncd_conf(name)
    return path.read_text() if path.exists() else None


def _confirm(targets: list[blockdev.Target], image: Image, console: Console) -> bool:
    console.print(f"Image {image.path} ({'bmap' if image.bmap else 'no bmap: full copy'}) will be written to:")
    for t in targets:
        console.print(f"  {t.describe()}")
    console.print("[bold red]Everything on these targets will be lost.[/]")
    if not sys.stdin.isatty():
        return False
    return input("Type 'yes' to continue: ").strip().lower() == "yes"


def run(args: argparse.Namespace) -> int:
    # Logs and CI output are not terminals: give the summary table room rather than eliding device ids.
    console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)
    try:
        names = _board_list(args)
        owner = _parse_owner(args.owner)
        image = open_image(args.image, bmap=args.bmap, use_bmap=not args.no_bmap, root_label=ROOT_LABEL,
                           data_label=DATA_LABEL)
        targets = [blockdev.inspect(t) for t in args.targets]
        if len({str(t.path.resolve()) for t in targets}) != len(targets):
            raise FlashError("the same target is given twice")
        for t in targets:
            if t.path.exists() and t.path.resolve() == image.path.resolve():
                raise FlashError(f"{t.path} is the image itself")
            blockdev.check_safe(t, force=args.force)
            if t.is_block and t.size < image.disk_size:
                raise FlashError(f"{t.path} ({blockdev.human_size(t.size)}) is smaller than the image "
                                 f"({blockdev.human_size(image.disk_size)})")
        fleet = open_fleet(args.fleet, args.passphrase_file)
        boards = _identities(fleet, names)
        if not args.yes and not _confirm(targets, image, console):
            raise FlashError("not confirmed (not a terminal, or the answer was not 'yes'); pass --yes to flash "
                             "without asking")
    except (FlashError, ImageError, blockdev.UnsafeTarget, ProvisionError, SealError) as exc:
        console.print(f"flctl flash: [bold red]refused[/]: {exc}", highlight=False, markup=True)
        return 2
    results = _flash_all(image, targets, boards, owner, console, grow=not args.no_grow)
    _summary(results, console)
    return 0 if all(r.ok for r in results) else 1


def _flash_all(image: Image, targets: list[blockdev.Target], boards: list[BoardIdentity],
               owner: tuple[int, int] | None, console: Console, grow: bool = True) -> list[FlashResult]:
    columns = (TextColumn("{task.fields[board]:<12}"), TextColumn("{task.description:<9}"), BarColumn(),
               DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        def job(t: blockdev.Target, b: BoardIdentity) -> FlashResult:
            task = progress.add_task("copy", board=b.name, total=None)

            def report(phase: str, done: int, total: int | None) -> None:
                if total is None:  # a phase without a byte count: keep the bar where it is
                    progress.update(task, description=phase)
                else:
                    progress.update(task, description=phase, completed=done, total=total)

            return flash_one(image, t, b, report, owner, grow)

        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            return list(pool.map(job, targets, boards))


def _summary(results: list[FlashResult], console: Console) -> None:
    if len(results) == 1:
        r = results[0]
        if r.ok:
            data = f"{blockdev.human_size(r.data_size)}{' (grown to fill the device)' if r.grown else ''}"
            console.print(f"flctl flash: {r.target} provisioned as board {r.board} (device {r.device_id}) "
                          f"by {r.method} in {r.seconds:.1f} s; {DATA_LABEL} {data}", highlight=False)
        else:
            console.print(f"flctl flash: [bold red]FAILED[/] {r.target}: {r.error}", highlight=False)
        return
    table = Table(title="flctl flash --many")
    for col in ("target", "board", "device id", "method", DATA_LABEL, "seconds", "result"):
        table.add_column(col, overflow="fold")
    for r in results:
        data = (blockdev.human_size(r.data_size) + (" (grown)" if r.grown else "")) if r.data_size else ""
        table.add_row(r.target, r.board, r.device_id, r.method, data, f"{r.seconds:.1f}",
                      "ok" if r.ok else f"[red]FAILED[/]: {r.error}")
    console.print(table)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser("flash", help="write an image to a card/disk/file and give it a board's identity",
                       description="Write an fl-edge disk image (.img/.wic, optionally .gz/.xz/.zst; with its "
                                   ".bmap when present) to a block device or image file, verify it, and write "
                                   "the board's identity from the fleet onto its data partition.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("targets", metavar="TARGET", nargs="+", help="block device (/dev/sdX) or image file")
    p.add_argument("--fleet", required=True, metavar="DIR", help="fleet directory made by `flctl provision`")
    p.add_argument("--board", metavar="NAME", help="board whose identity goes on TARGET")
    p.add_argument("--many", action="store_true", help="flash several TARGETs in parallel")
    p.add_argument("--boards", metavar="A,B,...", help="with --many: one board per TARGET, in order")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true", help="allow a target that is not removable "
                   "(never the system disk or a mounted one)")
    p.add_argument("--bmap", metavar="FILE", help="block map (default: IMAGE.bmap next to the image)")
    p.add_argument("--no-bmap", action="store_true", help="ignore any bmap: verified full copy")
    p.add_argument("--no-grow", action="store_true", help="keep the image's partition layout on a larger "
                   "device (default: fl-data grows to fill it)")
    p.add_argument("--owner", metavar="UID:GID", help="owner of the identity files (default: the image's "
                   "fl-agent user from /etc/passwd on fl-root)")
    p.add_argument("--passphrase-file", metavar="FILE", help="fleet passphrase file (default: "
                   "$FLCTL_PASSPHRASE, else asked)")
    p.set_defaults(func=run)
    return p
