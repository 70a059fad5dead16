"""The development image's root file system: Debian bookworm (mmdebstrap) + fl-agent + rootfs-overlay.

Steps, each cached by its inputs (see build.py):
- ``build_base``: mmdebstrap a minimal bookworm with systemd, udev, kmod and python3 into a tarball;
- ``download_dependency_wheels``: the wheels of the agent's dependencies, fetched on the host
  (``pip download --only-binary=:all:``) so the install into the image is offline and reproducible;
- ``build_sysroot``: base + a venv at /opt/fl-agent with those dependencies + the kernel modules (tarball);
- ``assemble_rootfs``: unpack the sysroot, install the project's wheel (``build_project_wheel``), copy the
  shared ``rootfs-overlay/`` and the development-only ``tools/image/dev-overlay/``, create the fl-agent user,
  enable the units, and make the tree ready for a read-only ext4 root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .arch import AMD64, GUEST_PYTHON, Architecture, check_can_emulate, is_foreign

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "dbus",
    "systemd-timesyncd",  # SNTP client: boards without a real-time clock boot with a stale clock
    "e2fsprogs",  # e2fsck for the data partition's check before every mount
    "iproute2",
    "procps",
    "python3",
    "python3-venv",
    "v4l-utils",  # v4l2-ctl: inspect cameras on the device
)
# Documentation, man pages and translations are dead weight on an appliance.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
)
VENV = "/opt/fl-agent"
# Units enabled in the development image on top of the overlay's presets.
DEV_UNITS_ENABLED = ("systemd-networkd.service",)
DEV_UNITS_MASKED = (
    "systemd-networkd-wait-online.service",
    "getty@tty1.service",  # no display: the console is the serial line
    # Maintenance that writes to the read-only root or needs what an appliance lacks (LVM, binfmt_misc).
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    # Modules this kernel does not ship (modules trimmed to what the appliance needs): each modprobe costs
    # seconds under emulation for nothing.
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "modprobe@dm_mod.service",
)


class RootfsError(RuntimeError):
    """A root file system step failed; the message names the step and the tail of its output."""


@dataclass(frozen=True)
class UserIds:
    uid: int
    gid: int
    video_gid: int


def agent_requirements(pyproject: Path) -> list[str]:
    """The agent's runtime requirements: core dependencies + the ``agent`` extra of pyproject.toml."""
    meta = tomllib.loads(pyproject.read_text())["project"]
    extra = meta.get("optional-dependencies", {}).get("agent")
    if extra is None:
        raise RootfsError(f"{pyproject} has no [project.optional-dependencies] agent extra")
    return sorted(set(meta.get("dependencies", [])) | set(extra))


def build_base(
    tarball: Path, log: Path, packages: tuple[str, ...] = BASE_PACKAGES, arch: Architecture = AMD64
) -> None:
    """mmdebstrap the base system of ``arch`` into ``tarball`` (root is needed: --mode=root). A foreign
    architecture's maintainer scripts run through qemu-user-static (binfmt_misc)."""
    check_can_emulate(arch)
    cmd = [
        "mmdebstrap",
        "--variant=apt",
        "--mode=root",
        "--format=tar",
        f"--architectures={arch.name}",
        # The mirror may serve a frozen snapshot whose Release file has expired.
        '--aptopt=Acquire::Check-Valid-Until "false"',
        f"--include={','.join(packages)}",
        *[f"--dpkgopt={o}" for o in DPKG_EXCLUDES],
        SUITE,
        str(tarball),
        MIRROR,
    ]
    run_logged(cmd, log, "mmdebstrap")


def build_project_wheel(project: Path, dest: Path, log: Path, python: str) -> Path:
    """Build the fl-edge wheel into ``dest`` from a copy of the project; returns the wheel.

    The copy keeps setuptools' build/ and *.egg-info out of the work tree others edit. ``python`` is the
    interpreter whose pip does the work (the project venv's).
    """
    dest.mkdir(parents=True, exist_ok=True)
    build_dir = dest.parent / "wheel-build"
    shutil.rmtree(build_dir, ignore_errors=True)
    shutil.copytree(
        project,
        build_dir,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".cache", ".*_cache", "demo-out"
        ),
    )
    try:
        run_logged(
            [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(build_dir)],
            log,
            "pip wheel (fl-edge)",
        )
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    wheels = sorted(dest.glob("fl_edge-*.whl"))
    if len(wheels) != 1:
        raise RootfsError(f"expected one fl_edge wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def download_dependency_wheels(
    requirements: list[str], constraints: Path, dest: Path, log: Path, python: str, arch: Architecture = AMD64
) -> None:
    """Download binary wheels of ``requirements`` and their dependencies into ``dest`` (on the host), at the
    versions pinned in ``constraints`` (the project's lock: the image runs what the tests ran).

    On its own architecture the guest runs the host's CPython minor version (Debian bookworm: 3.11), so no
    cross-platform flags are needed. For a foreign architecture pip is told the target: its manylinux
    platforms and bookworm's CPython, so the wheels are aarch64 ones. Binary-only keeps compilers out of the
    build. ``build_sysroot`` installs from these wheels alone, so the pins carry into the image.
    """
    dest.mkdir(parents=True, exist_ok=True)
    target: list[str] = []
    if is_foreign(arch):
        abi = f"cp{GUEST_PYTHON.replace('.', '')}"
        target = [*(f"--platform={p}" for p in arch.wheel_platforms), f"--python-version={GUEST_PYTHON}",
                  "--implementation=cp", f"--abi={abi}", "--abi=abi3", "--abi=none"]  # fmt: skip
    run_logged(
        [python, "-m", "pip", "download", "--only-binary=:all:", "-q", *target, "-c", str(constraints),
         "-d", str(dest), *requirements],
        log,
        "pip download (agent dependencies)",
    )


def build_sysroot(
    base_tar: Path, wheels: Path, requirements: list[str], modules_root: Path, out_tar: Path, work: Path, log: Path
) -> None:
    """Base system + a venv at /opt/fl-agent holding the agent's dependencies + the kernel modules, as a tar.

    This is the slow, rarely-changing part of the root file system; it is cached on its own so a change to
    the agent's code only reinstalls the project wheel (``assemble_rootfs``).
    """
    root = work / "sysroot"
    root.mkdir(parents=True)
    run_logged(["tar", "-xpf", str(base_tar), "-C", str(root), "--numeric-owner"], log, "unpack base")
    staged = root / "tmp" / "wheels"
    shutil.copytree(wheels, staged, ignore=shutil.ignore_patterns("build.log", ".complete"))
    with _chroot_mounts(root):
        _chroot_run(root, ["python3", "-m", "venv", VENV], log, "venv")
        _chroot_run(
            root,
            [f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links=/tmp/wheels", *requirements],
            log,
            "pip install the agent's dependencies into the image",
        )
    shutil.rmtree(staged)
    shutil.copytree(modules_root, root / "usr", dirs_exist_ok=True, symlinks=True)
    run_logged(["tar", "-cf", str(out_tar), "--numeric-owner", "--xattrs", "-C", str(root), "."], log, "pack sysroot")
    shutil.rmtree(root)


def assemble_rootfs(sysroot_tar: Path, project_wheel: Path, overlays: list[Path], root: Path, log: Path) -> UserIds:
    """Unpack the sysroot, add fl-agent and the overlays; returns the fl-agent ids."""
    root.mkdir(parents=True, exist_ok=True)
    run_logged(["tar", "-xpf", str(sysroot_tar), "-C", str(root), "--numeric-owner", "--xattrs"], log, "unpack")
    staged = root / "tmp" / project_wheel.name
    shutil.copy2(project_wheel, staged)
    with _chroot_mounts(root):
        _chroot_run(
            root,
            [f"{VENV}/bin/pip", "install", "-q", "--no-index", "--no-deps", f"/tmp/{project_wheel.name}"],
            log,
            "pip install fl-edge into the image",
        )
    staged.unlink()
    for script in ("fl-agent",):
        link = root / "usr" / "bin" / script
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(f"{VENV}/bin/{script}")
    for overlay in overlays:
        copy_overlay(overlay, root)
    run_logged(["systemd-sysusers", f"--root={root}"], log, "systemd-sysusers")
    ids = read_user_ids(root)
    _enable_units(root, log)
    prepare_read_only(root)
    return ids


# A clean pip in the chroot: no host config, index or find-links leaking into the image build.
_CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PIP_CONFIG_FILE": "/dev/null",
    "PIP_NO_INDEX": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def _chroot_run(root: Path, cmd: list[str], log: Path, what: str) -> None:
    run_logged(["chroot", str(root), *cmd], log, what, env=_CHROOT_ENV)


class _chroot_mounts:
    """/proc and /dev inside the chroot while pip runs (ensurepip and some wheels' metadata read them)."""

    def __init__(self, root: Path) -> None:
        self.points = [(root / "proc", ["-t", "proc", "proc"]), (root / "dev", ["--bind", "/dev"])]

    def __enter__(self) -> None:
        for point, args in self.points:
            subprocess.run(["mount", *args, str(point)], check=True)

    def __exit__(self, *exc: object) -> None:
        for point, _ in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], check=False)


def copy_overlay(overlay: Path, root: Path) -> None:
    """Copy an overlay tree onto the root, keeping symlinks; files are owned by root.

    Modes are Debian's, whatever the checkout's umask made them: files 0644 (0755 if executable), new
    directories 0755. Directories the root already has keep theirs.
    """
    if not overlay.is_dir():
        raise RootfsError(f"overlay {overlay} does not exist")
    for src in sorted(overlay.rglob("*")):
        rel = src.relative_to(overlay)
        if "__pycache__" in rel.parts or src.name.endswith((".md", ".pyc")):
            continue
        dst = root / rel
        if src.is_symlink():
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            dst.symlink_to(os.readlink(src))
        elif src.is_dir():
            if not dst.is_dir():
                dst.mkdir()
                os.chmod(dst, 0o755)
        else:
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o755 if src.stat().st_mode & 0o111 else 0o644)
            os.chown(dst, 0, 0)


def read_user_ids(root: Path) -> UserIds:
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    if "fl-agent" not in users:
        raise RootfsError("systemd-sysusers did not create the fl-agent user (rootfs-overlay sysusers.d)")
    video = groups.get("video")
    if video is None or "fl-agent" not in video[3].split(","):
        raise RootfsError("fl-agent is not a member of the video group")
    return UserIds(uid=int(users["fl-agent"][2]), gid=int(users["fl-agent"][3]), video_gid=int(video[2]))


def _enable_units(root: Path, log: Path) -> None:
    presets = sorted((root / "usr/lib/systemd/system-preset").glob("*fl-agent*.preset"))
    units = []
    for preset in presets:
        for line in preset.read_text().splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "enable":
                units.append(words[1])
    run_logged(["systemctl", f"--root={root}", "enable", *units, *DEV_UNITS_ENABLED], log, "systemctl enable")
    run_logged(["systemctl", f"--root={root}", "mask", *DEV_UNITS_MASKED], log, "systemctl mask")


def prepare_read_only(root: Path) -> None:
    """What a read-only root needs: mount points, an empty machine-id, no caches, and nothing of the build host."""
    for d in ("data", "var/lib/fl-agent"):
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, 0o755)
    # Empty: systemd generates a transient machine id at boot and does not try to write one.
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() and not dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    for junk in ("var/lib/apt/lists", "var/cache/apt", "var/cache/debconf", "var/log"):
        path = root / junk
        if path.is_dir():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name != "lock":
                    child.unlink()
    remove_build_only_files(root)
    write_file(root / "etc/hostname", "fl-dev\n", 0o644)


# What mmdebstrap leaves of the machine and the options that built the tree. It copies the build host's
# resolv.conf and hostname, with that host's modes, for network access inside the chroot (mmdebstrap(1),
# SOURCE_DATE_EPOCH): a nameserver of the build machine means nothing on a board. 99mmdebstrap holds the
# build's --aptopt (Check-Valid-Until off, for a frozen mirror), which has no business on a device.
BUILD_ONLY_FILES = ("etc/resolv.conf", "etc/hostname", "etc/apt/apt.conf.d/99mmdebstrap")


def remove_build_only_files(root: Path) -> None:
    """Drop what the build host and the build's options left in the tree (the image writes its own hostname)."""
    for rel in BUILD_ONLY_FILES:
        path = root / rel
        if path.exists() or path.is_symlink():
            path.unlink()


def write_file(path: Path, text: str, mode: int) -> None:
    """Write a root-owned file with exactly ``mode`` (a rewrite would keep the mode of what was there)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, 0, 0)


def run_logged(cmd: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` appending its output to ``log``; on failure raise with the output's tail."""
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
        except FileNotFoundError as exc:
            raise RootfsError(f"{what}: {cmd[0]} is not installed (see tools/host-packages.txt)") from exc
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RootfsError(f"{what} failed (exit {proc.returncode}); log {log}:\n{tail}")
