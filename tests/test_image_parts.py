"""Host-side checks of the image build's parts (fast; the QEMU boot tests check the assembled image).

- the hardened unit's exposure as systemd itself scores it;
- the cache key follows every input (content, mode, new files) and nothing else;
- vmlinux extraction from a bzImage-like blob;
- the GPT disk: partitions named, placed and filled as the manifest says; a bmap that `bmaptool` accepts;
- a provisioned data partition: identity files with the contract's modes, owned by the agent's uid;
- the finished root tree: nothing of the build host (mmdebstrap's copies of its resolv.conf and hostname),
  modes as Debian ships them whatever the checkout's umask.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flctl.image import disk as image_disk
from flctl.image.build import ImageArtifacts
from flctl.image.cache import InputHash
from flctl.image.kernel import KernelError, extract_vmlinux
from flctl.image.rootfs import copy_overlay, prepare_read_only

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "rootfs-overlay"
MIB = image_disk.MIB


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (tools/host-packages.txt)")


def test_agent_unit_exposure_is_at_most_2_5():
    need("systemd-analyze")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--root={OVERLAY}", "--no-pager", "fl-agent.service"],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"Overall exposure level for fl-agent\.service: ([0-9.]+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    assert float(m.group(1)) <= 2.5


def test_units_reference_each_other_consistently():
    units = OVERLAY / "usr/lib/systemd/system"
    service = (units / "fl-agent.service").read_text()
    bind = units / "var-lib-fl\\x2dagent.mount"
    assert bind.exists(), "the bind mount unit's name must be the escaped path of /var/lib/fl-agent"
    assert "Where=/var/lib/fl-agent" in bind.read_text()
    assert "What=/data/fl-agent" in bind.read_text()
    data = (units / "data.mount").read_text()
    assert "Where=/data" in data and "What=/dev/disk/by-label/fl-data" in data
    assert "Requires=var-lib-fl\\x2dagent.mount" in service
    assert "ReadWritePaths=/var/lib/fl-agent" in service
    preset = (OVERLAY / "usr/lib/systemd/system-preset/80-fl-agent.preset").read_text().split()
    assert {"data.mount", "var-lib-fl\\x2dagent.mount", "fl-agent.service"} <= set(preset)


def test_cache_key_follows_content_mode_and_new_files(tmp_path):
    tree = tmp_path / "overlay"
    (tree / "etc").mkdir(parents=True)
    unit = tree / "etc" / "a.conf"
    unit.write_text("x=1\n")

    def key() -> str:
        return InputHash("t").tree("overlay", tree).key()

    first = key()
    assert key() == first
    unit.write_text("x=2\n")
    second = key()
    assert second != first
    os.chmod(unit, 0o600)
    third = key()
    assert third != second
    (tree / "etc" / "b.conf").write_text("")
    assert key() != third
    (tree / "etc" / "__pycache__").mkdir()
    (tree / "etc" / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    assert InputHash("t").tree("overlay", tree).key() == key()


def test_names_frame_inputs():
    assert InputHash("t").text("a", "bc").key() != InputHash("t").text("ab", "c").key()


def test_vmlinux_is_found_behind_junk_and_false_magics():
    elf = b"\x7fELF" + os.urandom(5000)
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ)
    blob = b"MZ" + os.urandom(300) + b"\xfd7zXZ\x00garbage" + os.urandom(100) + payload + os.urandom(64)
    assert extract_vmlinux(blob) == elf


def test_vmlinux_extraction_refuses_a_blob_without_kernel():
    with pytest.raises(KernelError, match="no xz- or gzip-compressed ELF kernel"):
        extract_vmlinux(b"MZ" + lzma.compress(b"not an elf", format=lzma.FORMAT_XZ))


def test_gpt_disk_has_named_partitions_with_their_file_systems(tmp_path):
    need("mkfs.ext4", "sgdisk", "bmaptool", "dumpe2fs")
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "marker").write_text("root partition\n")
    image_disk.make_ext4(tmp_path / "root.ext4", 8 * MIB, "fl-root", source=src, journal=False)
    image_disk.make_data_fs(tmp_path / "data.ext4", 8 * MIB)
    disk = tmp_path / "fl-dev.img"
    extents = image_disk.assemble_gpt(
        disk,
        [
            ("fl-root", tmp_path / "root.ext4", image_disk.TYPE_ROOT_X86_64),
            ("fl-data", tmp_path / "data.ext4", image_disk.TYPE_LINUX_DATA),
        ],
    )
    assert [(e.name, e.offset, e.size) for e in extents] == [("fl-root", MIB, 8 * MIB), ("fl-data", 9 * MIB, 8 * MIB)]
    table = subprocess.run(["sgdisk", "-p", str(disk)], capture_output=True, text=True, check=True).stdout
    # 8304: Linux x86-64 root (Discoverable Partitions Spec); 8300: Linux filesystem data (a wrong type GUID
    # once made sgdisk, and partitioning tools on the flashing host, show the data partition as unknown)
    assert re.search(r"^\s+1\s+2048\s+18431\s.*\s8304\s+fl-root$", table, re.MULTILINE), table
    assert re.search(r"^\s+2\s+18432\s+34815\s.*\s8300\s+fl-data$", table, re.MULTILINE), table
    for ext in extents:
        part = tmp_path / f"{ext.name}.part"
        image_disk.extract_partition(disk, ext, part)
        head = subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True, check=True).stdout
        assert re.search(rf"^Filesystem volume name:\s+{ext.name}$", head, re.MULTILINE)
    root_features = subprocess.run(
        ["dumpe2fs", "-h", str(tmp_path / "fl-root.part")], capture_output=True, text=True, check=True
    ).stdout
    assert "has_journal" not in root_features, "the read-only root needs no journal"
    bmap = image_disk.make_bmap(disk)
    assert "<BlockMap>" in bmap.read_text()
    assert disk.stat().st_blocks * 512 < disk.stat().st_size, "the disk image should stay sparse"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown of the identity files to the agent's uid needs root")
def test_provisioned_data_partition_holds_identity_with_contract_modes(tmp_path):
    need("mkfs.ext4", "debugfs")
    from flctl.qemu.rig import Identity, provision_data_partition

    manifest = {"partitions": [{"name": "fl-data", "offset": MIB, "size": 16 * MIB}], "fl_agent_uid": 990,
                "fl_agent_gid": 990}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    art = ImageArtifacts.load(tmp_path)
    identity = Identity.generate()
    data = tmp_path / "data.ext4"
    provision_data_partition(art, data, identity, "ab" * 32, agent_toml='[agent]\nlog_level = "debug"\n')

    def stat(path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"stat {path}", str(data)], capture_output=True, text=True).stdout

    def cat(path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"cat {path}", str(data)], capture_output=True, text=True).stdout

    key = stat("/fl-agent/identity/device.key")
    assert re.search(r"Mode:\s+0600", key) and re.search(r"User:\s+990\s+Group:\s+990", key), key
    assert cat("/fl-agent/identity/device.key") == bytes(identity.signing_key).hex() + "\n"
    assert cat("/fl-agent/identity/aggregator.pub") == "ab" * 32 + "\n"
    assert re.search(r"Mode:\s+0700", stat("/fl-agent/identity"))
    assert "log_level" in cat("/fl-agent/agent.toml")
    label = subprocess.run(["dumpe2fs", "-h", str(data)], capture_output=True, text=True).stdout
    assert re.search(r"^Filesystem volume name:\s+fl-data$", label, re.MULTILINE)


def test_provisioning_refuses_a_malformed_aggregator_key(tmp_path):
    from flctl.qemu.rig import Identity, RigError, provision_data_partition

    manifest = {"partitions": [{"name": "fl-data", "offset": MIB, "size": 16 * MIB}], "fl_agent_uid": 0,
                "fl_agent_gid": 0}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RigError, match="64 lowercase hex"):
        provision_data_partition(ImageArtifacts.load(tmp_path), tmp_path / "d.ext4", Identity.generate(), "XYZ")


def mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o7777)


@pytest.mark.skipif(os.geteuid() != 0, reason="the image's files are chowned to root")
def test_root_tree_keeps_nothing_of_the_build_host_and_debian_modes(tmp_path):
    root = tmp_path / "root"
    (root / "etc/apt/apt.conf.d").mkdir(parents=True)
    # As mmdebstrap leaves a tree: the build host's files, with the build host's modes (0755 on the machine
    # that reported it), and the build's apt options.
    (root / "etc/resolv.conf").write_text("nameserver 10.255.255.53\n")
    (root / "etc/hostname").write_text("buildhost\n")
    (root / "etc/apt/apt.conf.d/99mmdebstrap").write_text('Acquire::Check-Valid-Until "false";\n')
    for name in ("resolv.conf", "hostname"):
        os.chmod(root / "etc" / name, 0o755)
    old_umask = os.umask(0o077)
    try:
        prepare_read_only(root)
    finally:
        os.umask(old_umask)

    assert not (root / "etc/resolv.conf").exists() and not (root / "etc/resolv.conf").is_symlink()
    assert not (root / "etc/apt/apt.conf.d/99mmdebstrap").exists()
    assert (root / "etc/hostname").read_text() == "fl-dev\n"
    assert mode(root / "etc/hostname") == "0o644"
    assert mode(root / "data") == mode(root / "var/lib/fl-agent") == "0o755"


@pytest.mark.skipif(os.geteuid() != 0, reason="the image's files are chowned to root")
def test_overlay_files_get_debian_modes_whatever_the_checkout_umask(tmp_path):
    overlay = tmp_path / "overlay"
    (overlay / "etc/fl-agent").mkdir(parents=True)
    (overlay / "usr/bin").mkdir(parents=True)
    (overlay / "etc/fl-agent/agent.toml").write_text("[agent]\n")
    (overlay / "usr/bin/helper").write_text("#!/bin/sh\n")
    # A checkout made under umask 077: owner-only files and directories.
    os.chmod(overlay / "etc/fl-agent/agent.toml", 0o600)
    os.chmod(overlay / "usr/bin/helper", 0o700)
    for d in (overlay / "etc/fl-agent", overlay / "usr/bin"):
        os.chmod(d, 0o700)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    os.chmod(root / "usr/bin", 0o755)

    copy_overlay(overlay, root)

    assert mode(root / "etc/fl-agent") == "0o755"
    assert mode(root / "etc/fl-agent/agent.toml") == "0o644"
    assert mode(root / "usr/bin/helper") == "0o755"
    assert mode(root / "usr/bin") == "0o755", "a directory the base system ships keeps its mode"


def fake_image(directory: Path, key: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"key": key, "partitions": []}))
    return directory


def test_image_build_leaves_the_image_at_one_place_under_the_cache_that_qemu_run_takes(tmp_path, monkeypatch):
    from flctl.image.build import default_image_dir, link_latest_image
    from flctl.image.cli import add_parser

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FL_EDGE_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["image", "build"]).out is None, "no default relative to the current directory"
    assert default_image_dir() == tmp_path / "cache" / "image"

    cache = tmp_path / "cache"
    old = fake_image(cache / "images" / "aaaa", "aaaa")
    new = fake_image(cache / "images" / "bbbb", "bbbb")
    link_latest_image(cache, old)
    link_latest_image(cache, new)
    art = ImageArtifacts.load(default_image_dir())
    assert art.directory == new and art.manifest["key"] == "bbbb"
    assert os.readlink(cache / "image") == "images/bbbb", "relative: the cache directory may move"


def test_pruning_keeps_the_image_the_cache_link_points_at(tmp_path):
    from flctl.image.build import _prune, link_latest_image
    from flctl.image.cache import ArtifactStore

    store = ArtifactStore(tmp_path)
    entries = [fake_image(tmp_path / "images" / f"k{i}", f"k{i}") for i in range(6)]
    for i, entry in enumerate(entries):
        os.utime(entry, (1_000_000 + i, 1_000_000 + i))  # old, k5 the newest
    link_latest_image(tmp_path, entries[0])
    _prune(store, "images", keep="k5", keep_bytes=0)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["k0", "k3", "k4", "k5"]


def test_cache_root_follows_fl_edge_cache_then_xdg_cache_home(tmp_path, monkeypatch):
    from flctl.image.cache import cache_root

    monkeypatch.delenv("FL_EDGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "fl-edge"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid by the spec: ignored
    assert cache_root() == Path.home() / ".cache" / "fl-edge"
    monkeypatch.setenv("FL_EDGE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_qemu_run_refuses_an_image_dir_without_an_image_in_one_line(tmp_path, capsys):
    from flctl.qemu import cli

    assert cli.main(["run", "--image", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qemu run: ") and err.count("\n") == 1, err
    assert f"{tmp_path} holds no built image" in err


def test_the_unit_delegates_exactly_the_controllers_the_agent_passes_to_the_trainer(tmp_path):
    # Delegate= once listed io, which the agent never enabled for its children: the guest showed
    # `cpu memory pids` in the unit's cgroup.subtree_control, and the unit claimed an I/O split it did not make.
    from appliance import budget as b

    unit = (OVERLAY / "usr/lib/systemd/system/fl-agent.service").read_text()
    delegated = set(re.search(r"^Delegate=(.*)$", unit, re.MULTILINE).group(1).split())
    base = tmp_path / "fl-agent.service"
    (base / "trainer").mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpu io memory pids\n")  # what systemd makes available (guest)
    (base / "cgroup.subtree_control").write_text("\n")
    (base / "cgroup.procs").write_text("")
    sandbox = b.TrainerSandbox(
        b.Budget(cpu_quota=1.0, threads=1, memory_max=None, memory_high=None, delegated=True, advisory=False,
                 reason="test", base=base),
        memory_max=None,
    )  # fmt: skip
    sandbox._prepare()
    enabled = {c.lstrip("+") for c in (base / "cgroup.subtree_control").read_text().split()}
    assert delegated == enabled


# The kernel module that creates each device class a unit may allow by name (DeviceAllow=char-CLASS).
DEVICE_CLASS_MODULES = {"video4linux": "videodev"}


def test_every_device_class_the_agent_may_open_exists_when_it_starts() -> None:
    """systemd resolves DeviceAllow=char-CLASS against /proc/devices when the unit starts; a class whose driver is
    not loaded yet allows nothing, so a camera plugged in later could not be opened (EPERM) until a restart. Each
    such class's module is loaded at boot (modules-load.d), before fl-agent starts."""
    overlay = Path(__file__).resolve().parent.parent / "rootfs-overlay"
    unit = (overlay / "usr/lib/systemd/system/fl-agent.service").read_text()
    classes = re.findall(r"^DeviceAllow=char-([\w-]+)", unit, flags=re.M)
    assert classes, "fl-agent.service allows no device class by name"
    loaded = {
        line.strip()
        for conf in (overlay / "usr/lib/modules-load.d").glob("*.conf")
        for line in conf.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    for device_class in classes:
        assert DEVICE_CLASS_MODULES[device_class] in loaded, f"char-{device_class}'s module is not loaded at boot"
