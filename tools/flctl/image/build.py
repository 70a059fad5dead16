"""``flctl image build``: the development image of the appliance, from Debian packages, without bitbake.

Output (in the cache, where ``<cache>/image`` links to the image of the host's architecture last built or
taken from it, ``<cache>/image-arm64`` to the arm64 one (``--arch arm64``); or in ``--out``):
  fl-dev.img        GPT disk: fl-root (ext4, mounted read-only) + fl-data (ext4, /data)
  fl-dev.img.bmap   block map for ``bmaptool copy`` (flctl flash)
  vmlinux | Image   uncompressed kernel for direct boot (QEMU -kernel: PVH on x86_64, the arm64 Image)
  initrd.img        busybox initramfs: loads virtio/ext4, mounts the root read-only, switches to systemd
  manifest.json     versions, cache key, partition offsets, kernel command line, the fl-agent uid/gid

Every step's inputs are hashed; a step whose inputs did not change is taken from the cache
(``--cache``, ``$FL_EDGE_CACHE``, default ``~/.cache/fl-edge``). See docs/image.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from appliance.durable import atomic_write, fsync_dir, sweep_interrupted_writes

from . import disk, kernel, rootfs
from .arch import Architecture, architecture, host_architecture, is_foreign
from .cache import (
    ArtifactStore,
    InputHash,
    Pruned,
    cache_root,
    fsync_file,
    hold,
    keep_bytes_from_env,
    prune_summary,
)

# Bump when a change to the build changes its output in a way the hashed inputs do not capture.
BUILD_FORMAT = "fl-dev-image/1"
PROJECT_ROOT = Path(__file__).resolve().parents[3]
IMAGE_TOOLS = PROJECT_ROOT / "tools" / "image"
# The versions `make venv` installs (made by `make lock`); the agent's dependency wheels are downloaded at them.
LOCK_FILE = PROJECT_ROOT / "requirements" / "dev.lock"
DISK_NAME = "fl-dev.img"
MANIFEST = "manifest.json"
# Sources that end up in the project wheel (and so in the image).
WHEEL_SOURCES = ("appliance", "aggregator", "tools/flctl")
# Old images and sysroots are pruned after a build to the newest KEEP_IMAGES, then as many older ones as fit in
# $FL_EDGE_CACHE_KEEP_BYTES (cache.DEFAULT_KEEP_BYTES, 2 GiB), then those a running process holds.
KEEP_IMAGES = 3
# <cache>/image: a link to the image the last build made or took from the cache (<cache>/image-<arch> for a
# foreign architecture); `flctl image build` prints it, `flctl qemu run --image` and `flctl flash` can be given it.
LATEST_LINK = "image"


class ImageBuildError(RuntimeError):
    """The image could not be built; the message says which step and why."""


@dataclass(frozen=True)
class ImageArtifacts:
    """A built image, as recorded in its manifest.json."""

    directory: Path
    manifest: dict

    @property
    def disk(self) -> Path:
        return self.directory / DISK_NAME

    @property
    def bmap(self) -> Path:
        return self.directory / (DISK_NAME + ".bmap")

    @property
    def arch(self) -> Architecture:
        """The image's architecture (images built before arm64 existed are amd64)."""
        return architecture(str(self.manifest.get("arch", "amd64")))

    @property
    def kernel(self) -> Path:
        """The kernel QEMU boots directly: ``vmlinux`` on x86_64, ``Image`` on arm64."""
        return self.directory / self.arch.kernel_file

    @property
    def vmlinux(self) -> Path:
        """The x86_64 name of ``kernel``, kept for callers written before arm64."""
        return self.kernel

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def cmdline(self) -> str:
        return str(self.manifest["cmdline"])

    def partition(self, name: str) -> disk.PartitionExtent:
        for p in self.manifest["partitions"]:
            if p["name"] == name:
                return disk.PartitionExtent(p["name"], int(p["offset"]), int(p["size"]))
        raise KeyError(f"no partition {name!r} in {self.directory / 'manifest.json'}")

    @classmethod
    def load(cls, directory: Path) -> ImageArtifacts:
        """The image in ``directory``; one in the cache is held (cache.hold) for as long as this process runs, so a
        build elsewhere does not prune it from under a QEMU run or a test session."""
        resolved = directory.resolve()  # once: a build elsewhere may point <cache>/image at another image meanwhile
        hold(resolved)
        path = resolved / MANIFEST
        if not path.exists():
            raise ImageBuildError(f"{directory} holds no built image (no {MANIFEST}); run `flctl image build`")
        try:
            manifest = json.loads(path.read_bytes())
        except ValueError as exc:  # empty, cut short, not UTF-8
            raise ImageBuildError(f"{path} is damaged ({exc}); build the image again (`flctl image build "
                                  "--rebuild`, with --out for an image outside the cache)") from None
        if not isinstance(manifest, dict):
            raise ImageBuildError(f"{path} is damaged (not a JSON object); build the image again "
                                  "(`flctl image build --rebuild`, with --out for an image outside the cache)")
        return cls(resolved, manifest)


class Steps:
    """Progress display: a spinner while a step runs, then one line with its outcome and duration."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, title: str, cached: bool = False) -> Iterator[None]:
        if cached:
            self.console.print(f"[green]✓[/] {title} [dim](cached)[/]")
            self.timings[title] = 0.0
            yield
            return
        start = time.monotonic()
        with self.console.status(f"{title}…"):
            try:
                yield
            except BaseException:
                self.console.print(f"[red]✗[/] {title} [dim]({time.monotonic() - start:.1f} s)[/]")
                raise
        took = time.monotonic() - start
        self.timings[title] = took
        self.console.print(f"[green]✓[/] {title} [dim]({took:.1f} s)[/]")


def build_image(
    cache: Path | None = None,
    out: Path | None = None,
    data_size: int = disk.DEFAULT_DATA_SIZE,
    rebuild: bool = False,
    console: Console | None = None,
    arch: str | None = None,
) -> ImageArtifacts:
    """Build (or take from the cache) the development image for ``arch`` (Debian's name: amd64, arm64; default
    the host's); returns where it is."""
    console = console or Console(stderr=True)
    target = architecture(arch) if arch else host_architecture()
    try:
        keep_bytes = keep_bytes_from_env()
    except ValueError as exc:
        raise ImageBuildError(str(exc)) from None
    store = ArtifactStore(cache or cache_root())
    if out is not None and out.resolve().is_relative_to(store.root.resolve()):
        # Publishing there would replace a cache entry's files in place: through <cache>/image, the previous
        # image's (its key then naming another image); into the image's own directory, its manifest removed first.
        raise ImageBuildError(f"--out {out} is inside the image cache {store.root}: give a directory outside it, or "
                              f"leave --out out to find the image at {default_image_dir(store.root, target.name)}")
    if os.geteuid() != 0:
        raise ImageBuildError("flctl image build needs root (mmdebstrap --mode=root, chroot, mount); run it with sudo")
    steps = Steps(console)
    started = time.monotonic()
    with store.lock():
        _sweep_manifest_writes(store, console)
        art = _build_locked(store, steps, data_size, rebuild, target, keep_bytes)
        from_cache = bool(art.manifest.get("from_cache"))
        if not from_cache:
            manifest = dict(art.manifest)
            manifest["build_seconds"] = round(time.monotonic() - started, 1)
            manifest["step_seconds"] = {k: round(v, 1) for k, v in steps.timings.items()}
            write_manifest(art.directory, manifest)
        art = ImageArtifacts.load(art.directory)
        if out is None:
            link_latest_image(store.root, art.directory, latest_link_name(target))
    if out is not None:
        art = _publish(art, out, console)
    art.manifest["from_cache"] = from_cache  # in memory only: callers report whether this call built it
    took = time.monotonic() - started
    disk_mib = art.disk.stat().st_size / disk.MIB
    console.print(
        f"[bold]image[/] {target.name} {art.directory}  disk {disk_mib:.0f} MiB "
        f"(root {art.partition('fl-root').size // disk.MIB} MiB, "
        f"data {art.partition('fl-data').size // disk.MIB} MiB), key {art.manifest['key']}, {took:.1f} s"
    )
    return art


def _build_locked(
    store: ArtifactStore, steps: Steps, data_size: int, rebuild: bool, arch: Architecture, keep_bytes: int
) -> ImageArtifacts:
    apt = kernel.apt_for(arch, store.root)
    with steps.step(f"resolve Debian {arch.name} kernel and busybox packages"):
        kernel_pkg = kernel.resolve_kernel_package(arch, apt)
        busybox_pkg = kernel.resolve_package(kernel.BUSYBOX_PACKAGE, apt)

    base_key = (
        InputHash("base")
        .text("format", BUILD_FORMAT)
        .text("arch", arch.name)
        .text("suite", rootfs.SUITE)
        .text("mirror", rootfs.MIRROR)
        .text("packages", " ".join(rootfs.BASE_PACKAGES))
        .text("dpkg", " ".join(rootfs.DPKG_EXCLUDES))
    )
    reqs = rootfs.agent_requirements(PROJECT_ROOT / "pyproject.toml")
    wheels_key = (
        InputHash("wheels").text("format", BUILD_FORMAT).text("requirements", "\n".join(reqs)).file("lock", LOCK_FILE)
    )
    wheels_key.text("python", f"{sys.version_info.major}.{sys.version_info.minor}").text("arch", arch.name)
    if is_foreign(arch):
        wheels_key.text("platforms", " ".join(arch.wheel_platforms))
    kernel_key = (
        InputHash("kernel")
        .text("format", BUILD_FORMAT)
        .text("arch", arch.name)
        .text("kernel", f"{kernel_pkg.name}={kernel_pkg.version}")
        .text("busybox", f"{busybox_pkg.name}={busybox_pkg.version}")
        .text("modules", " ".join(arch.rootfs_modules) + "|" + " ".join(arch.initramfs_modules))
        .file("init", IMAGE_TOOLS / "initramfs-init")
        .file("code", Path(kernel.__file__))
    )
    image_key = (
        InputHash("image")
        .text("format", BUILD_FORMAT)
        .child("base", base_key)
        .child("wheels", wheels_key)
        .child("kernel", kernel_key)
        .file("pyproject", PROJECT_ROOT / "pyproject.toml")
        .tree("overlay", PROJECT_ROOT / "rootfs-overlay")
        .tree("dev-overlay", IMAGE_TOOLS / "dev-overlay")
        .text("cmdline", arch.kernel_cmdline)
        .text("data-size", str(data_size))
    )
    for src in WHEEL_SOURCES:
        image_key.tree(f"src:{src}", PROJECT_ROOT / src)
    for module in (rootfs, disk, sys.modules[__name__], sys.modules[Architecture.__module__]):
        image_key.file(f"code:{module.__name__}", Path(module.__file__ or ""))

    key = image_key.key()
    if store.has("images", key) and not rebuild:
        with steps.step(f"image {key}", cached=True):
            pass
        art = ImageArtifacts.load(store.path("images", key))
        art.manifest["from_cache"] = True
        return art

    debs = store.root / "debs"
    with steps.step(f"download {kernel_pkg.name} {kernel_pkg.version}", cached=(debs / kernel_pkg.filename).exists()):
        kernel_deb = kernel.download_deb(kernel_pkg, debs, apt)
    with steps.step(f"download {busybox_pkg.name}", cached=(debs / busybox_pkg.filename).exists()):
        busybox_deb = kernel.download_deb(busybox_pkg, debs, apt)

    kernel_cached = store.has("kernel", kernel_key.key())
    with steps.step(f"kernel: {arch.kernel_file}, modules, initramfs", cached=kernel_cached):
        if not kernel_cached:
            with store.building("kernel", kernel_key.key()) as out, store.scratch() as work:
                kernel.build_kernel(kernel_deb, busybox_deb, IMAGE_TOOLS / "initramfs-init", out, work, arch)
    built_kernel = kernel.load_kernel_build(store.path("kernel", kernel_key.key()), arch)

    base_cached = store.has("base", base_key.key()) and not rebuild
    emulated = " (emulated: qemu-user-static)" if is_foreign(arch) else ""
    with steps.step(f"mmdebstrap {rootfs.SUITE} {arch.name} base system{emulated}", cached=base_cached):
        if not base_cached:
            with store.building("base", base_key.key()) as out:
                rootfs.build_base(out / "base.tar", out / "build.log", arch=arch)
    base_tar = store.path("base", base_key.key()) / "base.tar"

    wheels_cached = store.has("wheels", wheels_key.key())
    with steps.step(f"download agent dependency wheels ({arch.machine})", cached=wheels_cached):
        if not wheels_cached:
            with store.building("wheels", wheels_key.key()) as out:
                rootfs.download_dependency_wheels(reqs, LOCK_FILE, out, out / "build.log", sys.executable, arch)
    dep_wheels = store.path("wheels", wheels_key.key())

    sysroot_key = (
        InputHash("sysroot")
        .text("format", BUILD_FORMAT)
        .text("arch", arch.name)
        .child("base", base_key)
        .child("wheels", wheels_key)
        .child("kernel", kernel_key)
        .file("code", Path(rootfs.__file__))
    )
    sysroot_cached = store.has("sysroot", sysroot_key.key())
    with steps.step("sysroot: base + dependency venv + kernel modules", cached=sysroot_cached):
        if not sysroot_cached:
            with store.building("sysroot", sysroot_key.key()) as out, store.scratch() as work:
                rootfs.build_sysroot(
                    base_tar, dep_wheels, reqs, built_kernel.modules_root, out / "sysroot.tar", work, out / "build.log"
                )
    sysroot_tar = store.path("sysroot", sysroot_key.key()) / "sysroot.tar"

    with store.building("images", key) as out, store.scratch() as work:
        log = out / "build.log"
        with steps.step("build the fl-edge wheel"):
            project_wheel = rootfs.build_project_wheel(PROJECT_ROOT, work / "wheel", log, sys.executable)
        root = work / "rootfs"
        with steps.step("root file system: sysroot + fl-agent + overlays"):
            ids = rootfs.assemble_rootfs(
                sysroot_tar,
                project_wheel,
                [PROJECT_ROOT / "rootfs-overlay", IMAGE_TOOLS / "dev-overlay"],
                root,
                log,
            )
        with steps.step("file systems: fl-root (ext4, read-only) and fl-data"):
            root_size = disk.root_fs_size(root)
            disk.make_ext4(work / "root.ext4", root_size, disk.ROOT_LABEL, source=root, journal=False)
            disk.make_data_fs(work / "data.ext4", data_size)
            shutil.rmtree(root)
        with steps.step("GPT disk image + bmap"):
            extents = disk.assemble_gpt(
                out / DISK_NAME,
                [
                    (disk.ROOT_LABEL, work / "root.ext4", arch.gpt_root_type),
                    (disk.DATA_LABEL, work / "data.ext4", disk.TYPE_LINUX_DATA),
                ],
            )
            disk.make_bmap(out / DISK_NAME)
            for name in (arch.kernel_file, "initrd.img"):
                _link_or_copy(built_kernel.kernel.parent / name, out / name)
        manifest = {
            "key": key,
            "format": BUILD_FORMAT,
            "arch": arch.name,
            "machine": arch.machine,
            "suite": rootfs.SUITE,
            "kernel_package": f"{kernel_pkg.name}={kernel_pkg.version}",
            "kernel_version": built_kernel.kver,
            "busybox_package": f"{busybox_pkg.name}={busybox_pkg.version}",
            "fl_edge_wheel": project_wheel.name,
            "cmdline": arch.kernel_cmdline,
            "partitions": [e.as_dict() for e in extents],
            "fl_agent_uid": ids.uid,
            "fl_agent_gid": ids.gid,
            "video_gid": ids.video_gid,
            "disk_bytes": (out / DISK_NAME).stat().st_size,
            "disk_allocated_bytes": (out / DISK_NAME).stat().st_blocks * 512,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_manifest(out, manifest)
    for kind, current in (("images", key), ("sysroot", sysroot_key.key())):
        steps.console.print(f"[dim]{prune_summary(kind, _prune(store, kind, current, keep_bytes))}[/]")
    return ImageArtifacts.load(store.path("images", key))


def _sweep_manifest_writes(store: ArtifactStore, console: Console) -> None:
    """Remove the temp files of manifest rewrites (write_manifest, into finished entries) that a killed build left;
    a build under way elsewhere waits for the cache's lock, held here, so none is live (and durable's sweep would
    keep one that was)."""
    images = store.root / "images"
    entries = [entry for entry in images.iterdir() if entry.is_dir()] if images.is_dir() else []
    swept = sweep_interrupted_writes(*entries)
    if swept:
        console.print(f"[dim]cache images: {swept.describe()}[/]")


def latest_link_name(arch: Architecture) -> str:
    """``image`` for the host's architecture, ``image-<arch>`` for a foreign one."""
    return f"{LATEST_LINK}-{arch.name}" if is_foreign(arch) else LATEST_LINK


def default_image_dir(cache: Path | None = None, arch: str | None = None) -> Path:
    """``<cache>/image`` (``<cache>/image-arm64`` for ``arch`` arm64 on an x86_64 host): where ``flctl image
    build`` leaves the image unless given ``--out``."""
    target = architecture(arch) if arch else host_architecture()
    return (cache or cache_root()) / latest_link_name(target)


def link_latest_image(root: Path, directory: Path, name: str = LATEST_LINK) -> None:
    """Point ``<root>/<name>`` at the image ``directory`` in the cache, atomically (a reader sees the old image
    or the new one, never a mix); the link is relative, so a cache directory that moves keeps it."""
    link = root / name
    tmp = root / f".{name}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(directory.relative_to(root))
    os.replace(tmp, link)


def _prune(store: ArtifactStore, kind: str, keep: str, keep_bytes: int) -> Pruned:
    """Drop old entries of ``kind`` (ArtifactStore.prune: the newest few, a byte budget, those in use), keeping
    ``keep`` and the images ``<cache>/image`` and ``<cache>/image-<arch>`` link to (each architecture's latest)."""
    keep_names = {keep}
    for latest in store.root.glob(f"{LATEST_LINK}*"):
        if latest.is_symlink():
            keep_names.add(Path(os.readlink(latest)).name)
    return store.prune(kind, keep_names, KEEP_IMAGES, keep_bytes)


def write_manifest(directory: Path, manifest: dict) -> None:
    """Replace ``directory``'s manifest.json atomically (durable.atomic_write): a power cut leaves the old one or
    the new one, never an empty or half-written file that no tool can read."""
    atomic_write(directory / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` whole: a hard link, else a copy fsynced, made as ``.<name>.partial`` and renamed over
    ``dst`` (the directory is fsynced by the caller). The temp name is the same in every process, so one that a
    killed publish left (a whole disk image, when copied) is replaced by the next, never kept for good."""
    tmp = dst.with_name(f".{dst.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
            fsync_file(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(art: ImageArtifacts, out: Path, console: Console | None = None) -> ImageArtifacts:
    """Put the image's files in ``out``, manifest.json last. The old manifest goes first (and that is made
    durable), so an interrupted publish leaves a directory that says it holds no image, never an old manifest
    beside a new disk whose partitions it no longer describes; and the other files' names are made durable before
    the new manifest takes its name. ``out`` is outside the cache (build_image). Publishes into one ``out`` take
    turns (:func:`_publishing_alone`); returns the image published, read before another publish may replace it.
    A directory that refuses the files (read-only, full) is an ImageBuildError naming it, not a traceback."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _publishing_alone(out, console or Console(stderr=True)):
            _publish_files(art, out)
            return ImageArtifacts.load(out)
    except OSError as exc:
        raise ImageBuildError(
            f"--out {out}: {exc.strerror} ({exc.filename or out}); {out} holds no image now (the build is in the "
            f"cache, {art.directory}: run the build again once {out} can take it)") from None


@contextlib.contextmanager
def _publishing_alone(out: Path, console: Console) -> Iterator[None]:
    """Hold an flock on the directory ``out`` (no lock file in it: it holds the image's files only). Two builds
    publishing into one ``--out`` at once interleaved their files, the first one's manifest landing last over the
    second one's disk; and builds with different caches do not share the cache's lock. A second one waits, saying
    why, then publishes its image whole over the first one's. The lock goes with the process however it ends."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"[yellow]another flctl image build is publishing into {out}: waiting for it to finish, "
                          "then this image replaces it there[/]")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _publish_files(art: ImageArtifacts, out: Path) -> None:
    (out / MANIFEST).unlink(missing_ok=True)
    fsync_dir(out)
    for name in (DISK_NAME, DISK_NAME + ".bmap", art.arch.kernel_file, "initrd.img"):
        _link_or_copy(art.directory / name, out / name)
    fsync_dir(out)
    _link_or_copy(art.directory / MANIFEST, out / MANIFEST)
    fsync_dir(out)
