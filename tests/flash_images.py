"""Small GPT disk images shaped like the fl-edge images, for the flash and provision tests.

Built the way the real images are: sfdisk for the table, `mkfs.ext4 -d` (at an offset, no root needed) for
the root filesystem, `bmaptool create` for the block map.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from nacl.signing import SigningKey

from appliance import identity
from flctl import provision
from flctl.flash import write as flash

AGENT_UID, AGENT_GID = 998, 997
MiB = 1 << 20
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
PASSPHRASE = "correct horse battery staple"


def have_tools() -> str | None:
    """None when the image tools are installed, else the reason to skip."""
    missing = [t for t in ("sfdisk", "mkfs.ext4", "debugfs", "e2fsck", "bmaptool") if not shutil.which(t)]
    return f"missing host tools: {', '.join(missing)} (tools/host-packages.txt)" if missing else None


_BUILT: dict[tuple, Path] = {}


def make_image(path: Path, *, size_mb: int = 48, data: str = "empty", partitions: tuple[str, ...] = (
        "fl-root", "fl-data"), passwd: bool = True, bmap: bool = True, compress: str | None = None) -> Path:
    """Write a GPT image; `data` is "empty" (zeros, like a Yocto wic), "ext4" (formatted) or "junk".

    Returns the path of the (possibly compressed) image; the bmap, when made, is IMAGE.bmap of the raw image.
    Each distinct layout is built once per test session and copied (sparse) after that.
    """
    key = (size_mb, data, partitions, passwd, bmap)
    if key not in _BUILT:
        cache = Path(tempfile.mkdtemp(prefix="flash-images-")) / "disk.img"
        _build_image(cache, size_mb=size_mb, data=data, partitions=partitions, passwd=passwd, bmap=bmap)
        _BUILT[key] = cache
    path.parent.mkdir(parents=True, exist_ok=True)
    cached = _BUILT[key]
    subprocess.run(["cp", "--sparse=always", str(cached), str(path)], check=True)
    if bmap:
        shutil.copyfile(f"{cached}.bmap", f"{path}.bmap")
    if compress:
        tool = {"gz": ["gzip", "-1", "-f"], "xz": ["xz", "-0", "-f", "-T1"], "zst": ["zstd", "-q", "-f", "--rm"]}
        subprocess.run([*tool[compress], str(path)], check=True)
        return path.with_name(path.name + "." + compress)
    return path


def _build_image(path: Path, *, size_mb: int, data: str, partitions: tuple[str, ...], passwd: bool,
                 bmap: bool) -> None:
    with open(path, "wb") as f:
        f.truncate(size_mb * MiB)
    part_mb = (size_mb - 4) // 2
    lines = ["label: gpt", "unit: sectors"]
    start = 2048
    for name in partitions:
        lines.append(f'start={start}, size={part_mb * 2048}, type={LINUX}, name="{name}"')
        start += part_mb * 2048
    subprocess.run(["sfdisk", "-q", str(path)], input="\n".join(lines) + "\n", text=True, check=True)
    tree = path.parent / f"{path.name}.rootfs"
    (tree / "etc" / "fl-agent").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n" + (
        f"fl-agent:x:{AGENT_UID}:{AGENT_GID}::/var/lib/fl-agent:/usr/sbin/nologin\n" if passwd else ""))
    (tree / "etc" / "fl-agent" / "agent.toml").write_text('[aggregator]\nurl = "http://10.0.2.100:8080"\n')
    # some real content so the bmap has more than the tables in it
    (tree / "usr" / "lib").mkdir(parents=True, exist_ok=True)
    (tree / "usr" / "lib" / "blob").write_bytes(os.urandom(2 * MiB))
    for i, name in enumerate(partitions):
        offset = (2048 + i * part_mb * 2048) * 512
        if name == "fl-root":
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "fl-root", "-d", str(tree), "-E", f"offset={offset}",
                            str(path), f"{part_mb * 1024}k"], check=True)
        elif name == "fl-data" and data == "ext4":
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "fl-data", "-E", f"offset={offset}", str(path),
                            f"{part_mb * 1024}k"], check=True)
        elif name == "fl-data" and data == "junk":
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(b"\xa5" * 8192)
    shutil.rmtree(tree)
    if bmap:
        subprocess.run(["bmaptool", "-q", "create", "-o", f"{path}.bmap", str(path)], check=True)


def cli(argv: list[str]) -> int:
    """Run `flctl flash|provision ARGS` through the subcommands' own parsers, as the flctl CLI does."""
    parser = argparse.ArgumentParser(prog="flctl")
    sub = parser.add_subparsers(dest="command", required=True)
    flash.add_parser(sub)
    provision.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def make_fleet(tmp: Path, names: str = "cam-1,cam-2,cam-3", url: str = "http://10.0.2.100:8080") -> Path:
    fleet = tmp / "fleet"
    assert cli(["provision", "--fleet", str(fleet), "--names", names, "--aggregator-url", url]) == 0
    return fleet


def env_for_tests(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Passphrase from the environment and the quick argon2id level, as a CI job would set them."""
    monkeypatch.setenv("FLCTL_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("FLCTL_KDF_LEVEL", "interactive")


def data_volume(target: Path):  # type: ignore[no-untyped-def]
    """The fl-data filesystem of a flashed disk or image (raises GptError when the table is invalid)."""
    from flctl.flash import gpt
    from flctl.flash.ext4image import Ext4Volume

    size = target.stat().st_size if target.is_file() else None
    with open(target, "rb") as f:
        table = gpt.read_table(gpt.file_reader(f), size)
    part = table.by_name("fl-data")
    assert part is not None
    return Ext4Volume(target, part.offset, part.size)


def partition_bytes(disk: Path, label: str) -> bytes:
    from flctl.flash import gpt

    with open(disk, "rb") as f:
        table = gpt.read_table(gpt.file_reader(f))
        part = table.by_name(label)
        assert part is not None
        f.seek(part.offset)
        return f.read(part.size)


def board_record(fleet: Path, name: str) -> dict:
    return json.loads((fleet / "boards" / name / "board.json").read_text())


def assert_provisioned(target: Path, source: Path, fleet: Path, board: str) -> None:
    """What a booting board would see: a valid table, fl-root as built, its identity owned by fl-agent."""
    subprocess.run(["sfdisk", "--verify", str(target)], check=True, capture_output=True)
    assert partition_bytes(target, "fl-root") == partition_bytes(source, "fl-root")
    vol = data_volume(target)
    assert vol.label() == "fl-data"
    key = vol.read("fl-agent/identity/device.key")
    pub = vol.read("fl-agent/identity/aggregator.pub")
    assert key is not None and len(key) == 65 and key.endswith(b"\n")
    assert pub == (fleet / "aggregator.pub").read_bytes()
    assert vol.read("fl-agent/agent.toml") == (fleet / "boards" / board / "agent.toml").read_bytes()
    assert vol.stat("fl-agent/identity/device.key") == (0o100600, AGENT_UID, AGENT_GID)
    assert vol.stat("fl-agent/identity") == (0o040700, AGENT_UID, AGENT_GID)
    assert vol.stat("fl-agent") == (0o040700, AGENT_UID, AGENT_GID)
    sk = SigningKey(bytes.fromhex(key.decode().strip()))
    assert identity.device_id_for(sk.verify_key) == board_record(fleet, board)["device_id"]
    vol.fsck()
