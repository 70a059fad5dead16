"""The arm64 image and rig, host side (fast; tests/qemu/test_arm64_boot.py builds and boots the real one).

- ``--arch`` names an architecture the build knows, or the command says in one line that it does not;
- a foreign architecture's packages come from a private apt state in the cache, never the host's dpkg;
- the arm64 kernel is Debian's Image as shipped, recognised by its magic, and an x86 kernel is refused;
- each architecture keeps its own latest-image link, and pruning keeps what either link points at;
- the rig boots an arm64 image with qemu-system-aarch64 (machine virt, TCG) on the PL011 console;
- `flctl flash` and `flctl provision` take a disk whose root partition has the arm64 type, as the x86 one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flctl.image import arch as image_arch
from flctl.image import disk as image_disk
from flctl.image import kernel as image_kernel
from flctl.image.build import ImageArtifacts, _prune, default_image_dir, latest_link_name, link_latest_image
from flctl.image.cache import ArtifactStore
from flctl.image.cli import main as image_main
from flctl.qemu import cli as qemu_cli
from flctl.qemu import rig

MIB = image_disk.MIB
# The first 64 bytes of an arm64 Image header (Documentation/arch/arm64/booting.rst): magic "ARM\x64" at 56.
ARM64_HEADER = bytes(56) + b"ARM\x64" + bytes(4)


def manifest_dir(directory: Path, arch: str, key: str = "k") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "key": key,
        "arch": arch,
        "cmdline": image_arch.architecture(arch).kernel_cmdline,
        "partitions": [{"name": "fl-root", "offset": MIB, "size": 64 * MIB},
                       {"name": "fl-data", "offset": 65 * MIB, "size": 16 * MIB}],
        "fl_agent_uid": 990,
        "fl_agent_gid": 990,
    }  # fmt: skip
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_architectures_by_debian_or_uname_name_and_a_clear_refusal():
    assert image_arch.architecture("arm64") is image_arch.ARM64
    assert image_arch.architecture("aarch64") is image_arch.ARM64
    assert image_arch.architecture("x86_64") is image_arch.AMD64
    with pytest.raises(image_arch.ArchitectureError, match=r"unknown architecture 'riscv64'.*amd64, arm64"):
        image_arch.architecture("riscv64")


def test_image_build_refuses_an_unknown_arch_before_building(capsys):
    with pytest.raises(SystemExit) as exc:
        image_main(["build", "--arch", "sparc"])
    assert exc.value.code == 2
    assert "unknown architecture 'sparc'" in capsys.readouterr().err


def test_arm64_kernel_command_line_uses_the_virt_machines_uart():
    assert image_arch.ARM64.kernel_cmdline.startswith("console=ttyAMA0,115200 root=LABEL=fl-root ")
    assert image_arch.AMD64.kernel_cmdline.startswith("console=ttyS0,115200 root=LABEL=fl-root ")
    assert "gpio_keys" in image_arch.ARM64.rootfs_modules, "QMP system_powerdown presses a gpio-keys key on virt"
    assert "vivid" in image_arch.ARM64.rootfs_modules


def test_foreign_packages_come_from_a_private_apt_state_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(image_arch.platform, "machine", lambda: "x86_64")
    host = image_kernel.apt_for(image_arch.AMD64, tmp_path)
    assert host.options() == [], "the host's architecture uses the host's apt as before"
    foreign = image_kernel.apt_for(image_arch.ARM64, tmp_path)
    foreign.prepare()
    opts = dict(o.split("=", 1) for o in foreign.options() if o != "-o")
    assert opts["APT::Architecture"] == opts["APT::Architectures"] == "arm64"
    for key in ("Dir::Etc::SourceList", "Dir::State", "Dir::Cache", "Dir::State::status"):
        assert Path(opts[key]).is_relative_to(tmp_path / "apt" / "arm64"), key
    sources = (tmp_path / "apt" / "arm64" / "sources.list").read_text()
    assert "bookworm-security" in sources and "signed-by=" in sources
    assert image_kernel.DebPackage("linux-image-6.1.0-1-arm64", "6.1.1-1", "arm64").filename.endswith("_arm64.deb")


def test_a_private_apt_state_refreshes_lists_a_day_old(tmp_path):
    apt = image_kernel.Apt("arm64", tmp_path / "apt")
    apt.prepare()
    assert apt.stale(), "no package lists yet"
    lists = tmp_path / "apt" / "lists" / "deb.debian.org_debian_dists_bookworm_main_binary-arm64_Packages.lz4"
    lists.write_bytes(b"")
    assert not apt.stale()
    day_ago = lists.stat().st_mtime - image_kernel.APT_LISTS_MAX_AGE - 60
    os.utime(lists, (day_ago, day_ago))
    assert apt.stale()
    assert not image_kernel.HOST_APT.stale(), "the host's own lists are the host's business"


def test_arm64_kernel_is_the_packaged_image_and_an_x86_kernel_is_refused():
    image = ARM64_HEADER + b"kernel text"
    assert image_kernel.bootable_kernel(image, image_arch.ARM64) == image
    assert image_kernel.bootable_kernel(gzip.compress(image), image_arch.ARM64) == image
    with pytest.raises(image_kernel.KernelError, match="not an arm64 Image"):
        image_kernel.bootable_kernel(b"MZ" + bytes(600) + b"HdrS", image_arch.ARM64)


def test_each_architecture_keeps_its_latest_image_link_and_pruning_keeps_both(tmp_path, monkeypatch):
    monkeypatch.setattr(image_arch.platform, "machine", lambda: "x86_64")
    assert latest_link_name(image_arch.AMD64) == "image"
    assert latest_link_name(image_arch.ARM64) == "image-arm64"
    assert default_image_dir(tmp_path, "arm64") == tmp_path / "image-arm64"
    assert default_image_dir(tmp_path) == tmp_path / "image"

    entries = [manifest_dir(tmp_path / "images" / f"k{i}", "arm64" if i == 1 else "amd64", f"k{i}") for i in range(6)]
    for i, entry in enumerate(entries):
        os.utime(entry, (1_000_000 + i, 1_000_000 + i))
    link_latest_image(tmp_path, entries[0], "image")
    link_latest_image(tmp_path, entries[1], "image-arm64")
    _prune(ArtifactStore(tmp_path), "images", keep="k5", keep_bytes=0)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["k0", "k1", "k3", "k4", "k5"]
    art = ImageArtifacts.load(default_image_dir(tmp_path, "arm64"))
    assert art.arch is image_arch.ARM64 and art.kernel.name == "Image"


def test_an_image_without_an_arch_in_its_manifest_is_amd64(tmp_path):
    directory = manifest_dir(tmp_path / "old", "amd64")
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["arch"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    art = ImageArtifacts.load(directory)
    assert art.arch is image_arch.AMD64 and art.kernel == art.vmlinux == art.directory / "vmlinux"


@pytest.fixture
def arm64_art(tmp_path, monkeypatch):
    monkeypatch.setattr(image_arch.platform, "machine", lambda: "x86_64")
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 is not installed (qemu-system-arm; tools/host-packages.txt)")
    return ImageArtifacts.load(manifest_dir(tmp_path / "arm64", "arm64"))


def appliance(tmp_path):
    return rig.Appliance("fl0", tmp_path, rig.Identity.generate(), metrics_port=40111, aggregator_port=40112)


def test_rig_boots_arm64_with_qemu_system_aarch64_on_virt(arm64_art, tmp_path, monkeypatch):
    monkeypatch.delenv(rig.ENV_ACCEL, raising=False)
    assert rig.accelerator_for(arm64_art) == "tcg", "an arm64 guest on an x86_64 host runs under TCG"
    machine = rig.MachineConfig(accel="tcg")
    cmd = rig.qemu_command(arm64_art, appliance(tmp_path), machine)
    assert Path(cmd[0]).name == "qemu-system-aarch64"
    assert cmd[cmd.index("-M") + 1] == "virt" and cmd[cmd.index("-cpu") + 1] == "cortex-a72"
    assert cmd[cmd.index("-kernel") + 1] == str(arm64_art.directory / "Image")
    assert cmd[cmd.index("-append") + 1].startswith("console=ttyAMA0,115200")
    netdev = cmd[cmd.index("-netdev") + 1]
    assert "guestfwd=tcp:10.0.2.100:8080-cmd:socat - TCP:127.0.0.1:40112" in netdev
    assert "hostfwd=tcp:127.0.0.1:40111-:9101" in netdev

    env = rig.labgrid_env(arm64_art, [appliance(tmp_path)], machine, tmp_path / "env.yaml")
    loaded = yaml.safe_load(env.read_text())
    driver = loaded["targets"]["fl0"]["drivers"]["QEMUDriver"]
    assert driver["machine"] == "virt" and driver["cpu"] == "cortex-a72"
    assert Path(loaded["tools"]["qemu"]).name == "qemu-system-aarch64"
    assert loaded["images"]["kernel"].endswith("/Image")
    assert "-no-shutdown" in shlex.split(driver["extra_args"])


def test_rig_refuses_kvm_for_a_foreign_image_in_one_line(arm64_art, monkeypatch):
    monkeypatch.setenv(rig.ENV_ACCEL, "kvm")
    with pytest.raises(rig.RigError, match="cannot run under KVM"):
        rig.accelerator_for(arm64_art)


def test_qemu_run_refuses_an_image_of_another_arch_than_asked_in_one_line(arm64_art, capsys):
    assert qemu_cli.main(["run", "--arch", "amd64", "--image", str(arm64_art.directory)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qemu run: ") and err.count("\n") == 1, err
    assert "--arch amd64, but the image in" in err and "is an arm64 image" in err


def test_qemu_test_passes_the_arch_to_the_boot_tests(monkeypatch):
    seen = {}
    monkeypatch.setattr(qemu_cli.subprocess, "call", lambda cmd, cwd, env: seen.update(env=env) or 0)
    parser = argparse.ArgumentParser(prog="flctl")
    qemu_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["qemu", "test", "--arch", "aarch64"])
    assert args.func(args) == 0
    assert seen["env"][qemu_cli.ENV_TEST_ARCH] == "arm64"


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (tools/host-packages.txt)")


def test_flash_and_provision_take_an_arm64_disk_like_an_x86_one(tmp_path, monkeypatch):
    """A disk built as the arm64 image is (its root partition typed for AArch64) is flashed with a board's
    identity exactly as the x86 one: the flash never looks at the root partition's type."""
    need("sgdisk", "mkfs.ext4", "debugfs", "bmaptool", "e2fsck")
    from flash_images import PASSPHRASE, cli, data_volume

    monkeypatch.setenv("FLCTL_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("FLCTL_KDF_LEVEL", "interactive")
    root_tree = tmp_path / "root"
    (root_tree / "etc").mkdir(parents=True)
    (root_tree / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nfl-agent:x:990:990::/:/usr/sbin/nologin\n")
    image_disk.make_ext4(tmp_path / "root.ext4", 16 * MIB, image_disk.ROOT_LABEL, source=root_tree, journal=False)
    image_disk.make_data_fs(tmp_path / "data.ext4", 16 * MIB)
    disk_image = tmp_path / "fl-dev.img"
    image_disk.assemble_gpt(
        disk_image,
        [(image_disk.ROOT_LABEL, tmp_path / "root.ext4", image_arch.ARM64.gpt_root_type),
         (image_disk.DATA_LABEL, tmp_path / "data.ext4", image_disk.TYPE_LINUX_DATA)],
    )  # fmt: skip
    image_disk.make_bmap(disk_image)
    table = subprocess.run(["sgdisk", "-i", "1", str(disk_image)], capture_output=True, text=True).stdout
    assert image_arch.ARM64.gpt_root_type in table

    fleet = tmp_path / "fleet"
    assert cli(["provision", "--fleet", str(fleet), "--names", "arm-1", "--aggregator-url",
                "https://agg.example:8443"]) == 0  # fmt: skip
    card = tmp_path / "card.img"
    assert cli(["flash", str(disk_image), str(card), "--board", "arm-1", "--fleet", str(fleet), "--yes"]) == 0
    volume = data_volume(card)
    pinned = volume.read("fl-agent/identity/aggregator.pub")
    assert pinned is not None and pinned.decode().strip() == (fleet / "aggregator.pub").read_text().strip()
    key = volume.stat("fl-agent/identity/device.key")
    assert key is not None and key[1:] == (990, 990), "the key belongs to the fl-agent user of the arm64 root"
