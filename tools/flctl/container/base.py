"""The base image both containers start from: a minimal Debian bookworm with python3, from mmdebstrap.

``--variant=essential`` (no apt: nothing installs packages at run time) plus CPython, libudev (pyudev finds
cameras through it) and libstdc++ (onnxruntime). No registry is involved: the root file system is built
from the Debian mirror and imported with ``podman import``. The tarball is cached by its inputs in the
fl-edge cache; the imported image is named after the same key, so a second build finds both, and a base of
another key for the same architecture is an older one (remove_older_bases).
"""

from __future__ import annotations

import re
from pathlib import Path

from flctl.image.cache import ArtifactStore, InputHash
from flctl.image.rootfs import DPKG_EXCLUDES, MIRROR, SUITE

from .platforms import Platform, ensure_emulation
from .podman import ContainerError, image_exists, image_id, podman, run_tool
from .prune import Removals, failed, remove_image

BASE_PACKAGES = ("python3-minimal", "libpython3.11-stdlib", "libudev1", "libstdc++6")
BASE_REPOSITORY = "localhost/fl-edge/base"
# What mmdebstrap leaves of the build: the host's resolv.conf and hostname, the build's apt options, apt's
# caches. A container gets its own resolv.conf and hostname from the runtime.
_CLEANUP = ('rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/cache/debconf/*-old '
            '"$1"/var/log/* "$1"/etc/apt/apt.conf.d/99mmdebstrap "$1"/etc/resolv.conf "$1"/etc/hostname')


def base_key(target: Platform) -> InputHash:
    return (
        InputHash("container-base")
        .text("suite", SUITE)
        .text("mirror", MIRROR)
        .text("arch", target.name)
        .text("packages", " ".join(BASE_PACKAGES))
        .text("dpkg", " ".join(DPKG_EXCLUDES))
        .text("cleanup", _CLEANUP)
    )


def base_image(store: ArtifactStore, target: Platform, log: Path, cache: Path | None = None) -> tuple[str, bool]:
    """The podman reference of ``target``'s base image, built and imported unless present; and whether it was.

    The tarball stays in the cache beside the image: the users of the images are added to its passwd and group."""
    key = base_key(target).key()
    ref = f"{BASE_REPOSITORY}:{key}-{target.name}"
    if image_exists(ref, cache) and store.has("container-base", key):
        return ref, True
    if not store.has("container-base", key):
        ensure_emulation(target)  # mmdebstrap runs the foreign packages' maintainer scripts
        with store.building("container-base", key) as out:
            run_tool(
                [
                    "mmdebstrap", "--variant=essential", "--mode=root", "--format=tar",
                    f"--architectures={target.name}",
                    '--aptopt=Acquire::Check-Valid-Until "false"',  # a frozen snapshot's Release may have expired
                    f"--include={','.join(BASE_PACKAGES)}",
                    *[f"--dpkgopt={o}" for o in DPKG_EXCLUDES],
                    f"--customize-hook={_CLEANUP}",
                    SUITE, str(out / "base.tar"), MIRROR,
                ],
                what=f"mmdebstrap the {target.name} base",
                log=log,
            )
    tarball = store.path("container-base", key) / "base.tar"
    podman("import", f"--arch={target.name}", "--os=linux", str(tarball), ref, what="podman import", cache=cache,
           log=log)
    return ref, False


def base_tarball(store: ArtifactStore, target: Platform) -> Path:
    """The cached root file system tarball of ``target``'s base (the passwd and group files come from it)."""
    return store.path("container-base", base_key(target).key()) / "base.tar"


def remove_older_bases(current: str, target: Platform, store: ArtifactStore, removals: Removals, log: Path,
                       progress, cache: Path | None = None) -> None:
    """Remove ``target``'s base images other than ``current`` (``localhost/fl-edge/base:<key>-<arch>``, the names
    base_image gives), each with its cached tarball, when nothing else needs the image (prune.remove_image).
    Run after the services are rebuilt on ``current``, so the images they replaced no longer hold the old base."""
    ours = re.compile(rf"{re.escape(BASE_REPOSITORY)}:([0-9a-f]{{20}})-{re.escape(target.name)}")
    try:
        listed = podman("images", f"--filter=reference={BASE_REPOSITORY}", "--format={{.Repository}}:{{.Tag}}",
                        what="podman images", cache=cache).stdout.split()
    except ContainerError as exc:
        progress(f"{current}: kept the older bases: {failed(exc, log)}")
        return
    for ref in listed:
        named = ours.fullmatch(ref)
        image = image_id(ref, cache) if named and ref != current else None
        if named and image and remove_image(image, ref, current, f"the older base {ref}", removals, cache, log,
                                            progress):
            tarball = store.path("container-base", named.group(1))
            if tarball.is_dir():
                removals.remove_tree(tarball, f"{current}: removed the older base's tarball", progress)
