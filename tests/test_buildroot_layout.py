"""buildroot-external/ read without Buildroot: the disk layout, the overlay and the packages agree with what
`flctl flash` expects and with the Yocto image (tests/test_buildroot_make.py runs Buildroot itself, when a
checkout is at hand; tests/test_buildroot_genimage.py runs genimage and `flctl flash` on the layout)."""

from __future__ import annotations

import hashlib
import re
import sys
import tomllib
from pathlib import Path

import pytest
from buildroot_tree import (
    BOARDS,
    BUILDROOT_PACKAGES,
    DEFCONFIGS,
    EXTERNAL,
    PACKAGES,
    PYTHON3_OPTIONS,
    REPO,
    config_selects,
    expand_external,
    kconfig_symbol,
    mk_value,
    read_defconfig,
    read_genimage,
)
from metafl_recipes import agent_imports

from flctl.flash.write import AGENT_USER, DATA_LABEL, ROOT_LABEL, STATE_DIR
from flctl.image.disk import TYPE_LINUX_DATA

OVERLAY = REPO / "rootfs-overlay"
UNITS = OVERLAY / "usr" / "lib" / "systemd" / "system"


def unit_values(path: Path, key: str) -> list[str]:
    return re.findall(rf"^{re.escape(key)}=(.*)$", path.read_text(), re.M)


def partitions(defconfig: str) -> list:
    disk = read_genimage(DEFCONFIGS[defconfig])
    image = next(c for c in disk.children if c.title == "fl-image.img")
    assert image.child("hdimage").options["partition-table-type"] == "gpt"
    return image.all("partition")


def test_external_tree_is_laid_out_as_buildroot_reads_it():
    assert re.search(r"^name: FL_EDGE$", (EXTERNAL / "external.desc").read_text(), re.M)
    assert "$(sort $(wildcard $(BR2_EXTERNAL_FL_EDGE_PATH)/package/*/*.mk))" in (EXTERNAL / "external.mk").read_text()
    sourced = re.findall(r'source "\$BR2_EXTERNAL_FL_EDGE_PATH/package/([^/]+)/Config.in"',
                         (EXTERNAL / "Config.in").read_text())
    assert sorted(sourced) == sorted(p.name for p in (EXTERNAL / "package").iterdir()) == sorted(PACKAGES)
    for package in PACKAGES:
        for name in ("Config.in", f"{package}.mk", f"{package}.hash"):
            assert (EXTERNAL / "package" / package / name).is_file(), f"package/{package}/{name} is missing"
    assert sorted(p.name for p in (EXTERNAL / "configs").iterdir()) == sorted(DEFCONFIGS)


@pytest.mark.parametrize("defconfig", sorted(DEFCONFIGS))
def test_disk_has_the_partitions_flctl_flash_finds(defconfig):
    """GPT; fl-root and fl-data once each, named as `flctl flash` looks them up, typed as in meta-fl's wic
    images (Linux filesystem data); fl-data last, so `flctl flash` can grow it to fill the card."""
    parts = partitions(defconfig)
    names = [p.title for p in parts]
    assert names.count(ROOT_LABEL) == 1 and names.count(DATA_LABEL) == 1, names
    assert names[-1] == DATA_LABEL
    for part in parts:
        if part.title in (ROOT_LABEL, DATA_LABEL):
            assert part.options["partition-type-uuid"].upper() == TYPE_LINUX_DATA


@pytest.mark.parametrize("defconfig", sorted(DEFCONFIGS))
def test_file_system_labels_match_partition_names(defconfig):
    """The device mounts /data by file-system label and the kernel finds the root by GPT name: the root
    image is Buildroot's rootfs.ext4 labelled fl-root, fl-data an empty ext4 labelled fl-data."""
    config = read_defconfig(defconfig)
    disk = read_genimage(DEFCONFIGS[defconfig])
    by_part = {p.title: p.options["image"] for p in partitions(defconfig)}
    assert config["BR2_TARGET_ROOTFS_EXT2"] == "y" and config["BR2_TARGET_ROOTFS_EXT2_4"] == "y"
    assert by_part[ROOT_LABEL] == "rootfs.ext4"
    assert config["BR2_TARGET_ROOTFS_EXT2_LABEL"] == ROOT_LABEL
    data = next(c for c in disk.children if c.title == by_part[DATA_LABEL])
    assert data.options.get("empty") == "true"
    assert data.child("ext4").options["label"] == DATA_LABEL


@pytest.mark.parametrize("defconfig", sorted(DEFCONFIGS))
def test_defconfig_builds_the_read_only_systemd_image(defconfig):
    config = read_defconfig(defconfig)
    assert config["BR2_INIT_SYSTEMD"] == "y"
    assert config["BR2_TARGET_GENERIC_REMOUNT_ROOTFS_RW"] == "n", "the root must stay read-only"
    assert config["BR2_PACKAGE_PYTHON_FL_AGENT"] == "y" and config["BR2_PACKAGE_PYTHON3"] == "y"
    assert expand_external(config["BR2_ROOTFS_OVERLAY"]) == OVERLAY
    for script in ("BR2_ROOTFS_POST_IMAGE_SCRIPT", "BR2_ROOTFS_POST_FAKEROOT_SCRIPT"):
        assert expand_external(config[script]).is_file()
    board = expand_external(config["BR2_ROOTFS_POST_SCRIPT_ARGS"])
    assert DEFCONFIGS[defconfig].parent == board
    for fragment in config["BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES"].split():
        assert expand_external(fragment).is_file()
    # post-image.sh writes its block map with bmaptool and compresses with zstd: both built for the host.
    assert config["BR2_PACKAGE_HOST_BMAP_TOOLS"] == "y" and config["BR2_PACKAGE_HOST_ZSTD"] == "y"
    assert config["BR2_PACKAGE_HOST_GENIMAGE"] == "y"


def test_raspberry_pi_boots_fl_root_read_only():
    config = read_defconfig("fl_raspberrypi4_64_defconfig")
    cmdline = expand_external(config["BR2_PACKAGE_RPI_FIRMWARE_CMDLINE_FILE"]).read_text().split()
    assert f"root=PARTLABEL={ROOT_LABEL}" in cmdline and "ro" in cmdline and "rw" not in cmdline


def test_docs_boot_qemu_from_fl_root_read_only():
    docs = (REPO / "docs" / "buildroot.md").read_text()
    assert re.search(rf"-append \"[^\"]*root=PARTLABEL={ROOT_LABEL} ro\b", docs)


def test_overlay_mounts_what_flctl_flash_provisions():
    """data.mount mounts the partition labelled fl-data on /data; the agent's state (where `flctl flash`
    writes the identity, STATE_DIR on fl-data) is bound onto /var/lib/fl-agent."""
    data = UNITS / "data.mount"
    assert unit_values(data, "What") == [f"/dev/disk/by-label/{DATA_LABEL}"]
    assert unit_values(data, "Where") == ["/data"]
    state = UNITS / "var-lib-fl\\x2dagent.mount"
    assert unit_values(state, "What") == [f"/data/{STATE_DIR}"]
    assert unit_values(state, "Where") == ["/var/lib/fl-agent"]
    assert not (OVERLAY / "etc" / "fstab").exists(), "mount units, not fstab, mount /data"


def test_agent_user_is_made_at_build_time_as_sysusers_describes_it():
    """The root is read-only, so Buildroot makes the user (package USERS) from the same fields as the
    overlay's sysusers.d; `flctl flash` reads its uid/gid from the image's /etc/passwd."""
    sysusers = (OVERLAY / "usr" / "lib" / "sysusers.d" / "fl-agent.conf").read_text()
    user = re.search(r'^u (\S+) - "([^"]+)" (\S+) (\S+)$', sysusers, re.M)
    assert user
    groups = re.findall(rf"^m {re.escape(user.group(1))} (\S+)$", sysusers, re.M)
    fields = mk_value("python-fl-agent", "PYTHON_FL_AGENT_USERS").split(maxsplit=8)
    name, uid, group, gid, password, home, shell, extra, comment = fields
    assert name == group == user.group(1) == AGENT_USER
    assert (uid, gid, password) == ("-1", "-1", "*"), "automatic system ids, no login"
    assert (comment, home, shell) == (user.group(2), user.group(3), user.group(4))
    assert extra.split(",") == groups


def test_build_time_tmpfiles_leave_the_data_mount_point_empty():
    """The overlay's tmpfiles.d create directories under /data, which Buildroot would also create in the
    root image at build time; post-fakeroot.sh removes them so that /data stays an empty mount point."""
    tmpfiles = "".join(p.read_text() for p in (OVERLAY / "usr" / "lib" / "tmpfiles.d").glob("*.conf"))
    assert re.search(r"^[dfz] /data/", tmpfiles, re.M)
    script = (BOARDS / "common" / "post-fakeroot.sh").read_text()
    assert 'find "${1}/data" -mindepth 1 -delete' in script


def test_agent_package_selects_every_dependency_the_agent_imports():
    imports = agent_imports()
    third_party = {i.module.split(".")[0] for i in imports} - set(sys.stdlib_module_names)
    unknown = third_party - set(BUILDROOT_PACKAGES)
    assert not unknown, f"imports with no Buildroot package in tests/buildroot_tree.py: {sorted(unknown)}"
    selects = config_selects("python-fl-agent")
    missing = {kconfig_symbol(BUILDROOT_PACKAGES[m]) for m in third_party} - selects
    stdlib = {i.module.split(".")[0] for i in imports} & set(PYTHON3_OPTIONS)
    missing |= {PYTHON3_OPTIONS[m] for m in stdlib} - selects
    assert not missing, f"python-fl-agent/Config.in does not select {sorted(missing)}"


def test_agent_package_is_the_project_version_and_builds_from_all_its_sources():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert mk_value("python-fl-agent", "PYTHON_FL_AGENT_VERSION") == project["project"]["version"]
    assert mk_value("python-fl-agent", "PYTHON_FL_AGENT_SITE") == "$(BR2_EXTERNAL_FL_EDGE_PATH)/.."
    # The rsync filter copies only what the build reads: every package directory pyproject.toml names.
    rules = mk_value("python-fl-agent", "PYTHON_FL_AGENT_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS")
    included = re.findall(r"--include='?/([^'\s]+?)/\*\*\*'?", rules)
    dirs = project["tool"]["setuptools"].get("package-dir", {})
    for package in project["tool"]["setuptools"]["packages"]:
        top, _, rest = package.partition(".")
        path = "/".join([dirs.get(top, top), *rest.split(".")]) if rest else dirs.get(top, top)
        assert any(path == inc or path.startswith(inc + "/") for inc in included), f"{package} ({path}) not copied"
        assert (REPO / path).is_dir()
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        assert f"--include=/{name}" in rules


def test_local_hashes_are_those_of_the_files():
    """The hash of a file in this checkout (python-fl-agent's LICENSE) is computed, not copied."""
    digest = hashlib.sha256((REPO / "LICENSE").read_bytes()).hexdigest()
    hashes = (EXTERNAL / "package" / "python-fl-agent" / "python-fl-agent.hash").read_text()
    assert f"sha256  {digest}  LICENSE" in hashes


def test_every_download_has_a_hash_or_says_why_not():
    """BR2_DOWNLOAD_FORCE_CHECK_HASHES is on in both defconfigs: each archive the tree's packages download
    has a sha256 line (onnxruntime's is a third party's, see the comment in its .hash)."""
    for package in ("python-prometheus-client", "onnxruntime"):
        version = mk_value(package, f"{package.upper().replace('-', '_')}_VERSION")
        hashes = (EXTERNAL / "package" / package / f"{package}.hash").read_text()
        source = {"python-prometheus-client": f"prometheus_client-{version}.tar.gz",
                  "onnxruntime": f"onnxruntime-{version}.tar.gz"}[package]
        assert re.search(rf"^sha256  [0-9a-f]{{64}}  {re.escape(source)}$", hashes, re.M), package
    for defconfig in DEFCONFIGS:
        assert read_defconfig(defconfig)["BR2_DOWNLOAD_FORCE_CHECK_HASHES"] == "y"
