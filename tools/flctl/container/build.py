"""``flctl container build``: the fl-aggregator and fl-agent images, per architecture, and a manifest list each.

For every architecture: the base image (base.py), then each service's dependency tree (cached) and its own
layer (payload.py) in a build context, and ``podman build`` of a Containerfile that only copies them and sets
the image's configuration. No instruction runs inside the image, so arm64 builds without emulation once its
base exists (only mmdebstrap runs arm64 maintainer scripts, through qemu-user-static).

The per-architecture images are ``localhost/fl-edge/<name>:<version>-<arch>``; the manifest list
``localhost/fl-edge/<name>:<version>`` names them all, and ``podman run --arch`` picks one of it. Images use
the Docker v2s2 format: the OCI image configuration has no HEALTHCHECK field and podman drops it there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from flctl.image.cache import ArtifactStore, cache_root, keep_bytes_from_env
from flctl.image.rootfs import build_project_wheel

from . import payload
from .base import base_image, base_tarball, remove_older_bases
from .payload import PROJECT_ROOT, SERVICES, Service
from .platforms import Platform, ensure_emulation
from .podman import ContainerError, image_exists, image_id, image_inspect, podman
from .prune import Removals, prune_dependency_trees, remove_image, remove_leftovers

REPOSITORY = "localhost/fl-edge"
HEALTHCHECK = "--interval=30s --timeout=5s --start-period=120s --retries=3"


@dataclass(frozen=True)
class BuiltImage:
    service: str
    platform: str
    ref: str
    size_bytes: int
    seconds: float


@dataclass(frozen=True)
class ProjectInfo:
    version: str
    licence: str
    source: str
    revision: str


def project_info(root: Path = PROJECT_ROOT) -> ProjectInfo:
    """The OCI labels' facts: version and licence from pyproject.toml, source and revision from git."""
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    licence = meta.get("license", {})
    licence = licence.get("text", "") if isinstance(licence, dict) else str(licence)

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    source = git("remote", "get-url", "origin") or meta.get("urls", {}).get("Source", "") or root.as_uri()
    return ProjectInfo(meta["version"], licence, source, git("rev-parse", "HEAD"))


def image_ref(service: Service | str, version: str, platform: Platform | None = None) -> str:
    name = service if isinstance(service, str) else service.name
    return f"{REPOSITORY}/{name}:{version}" + (f"-{platform.name}" if platform else "")


def containerfile(service: Service, base: str, info: ProjectInfo) -> str:
    labels = {
        "org.opencontainers.image.title": service.name,
        "org.opencontainers.image.description": service.description,
        "org.opencontainers.image.version": info.version,
        "org.opencontainers.image.licenses": info.licence,
        "org.opencontainers.image.source": info.source,
        "org.opencontainers.image.revision": info.revision,
    }
    uid = service.uid
    label_lines = " \\\n      ".join(f'{k}="{v}"' for k, v in labels.items())
    cmd = ", ".join(f'"{part}"' for part in service.command)
    return f"""FROM {base}
COPY deps/ /
COPY app/ /
COPY --chown={uid}:{uid} state/ {service.state_dir}/
ENV PATH={payload.VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 FL_HEALTH_URL={service.health_url}
USER {uid}:{uid}
WORKDIR {service.state_dir}
VOLUME {service.state_dir}
EXPOSE {service.port}
LABEL {label_lines}
HEALTHCHECK {HEALTHCHECK} CMD ["fl-healthcheck"]
CMD [{cmd}]
"""


def build_images(platforms: list[Platform], services: list[Service] | None = None, cache: Path | None = None,
                 progress=print) -> list[BuiltImage]:
    """Build every service for every platform, then the manifest lists; returns each image with its size.

    What the build makes obsolete goes (prune.py): the image each rebuilt name pointed to before (and those earlier
    builds had to keep while a container used them), the base images of other keys for each platform, and the
    cached dependency trees of older lock files beyond the newest few and $FL_EDGE_CACHE_KEEP_BYTES; the last
    progress line says how many bytes that freed."""
    try:
        keep_bytes = keep_bytes_from_env()
    except ValueError as exc:
        raise ContainerError(str(exc)) from None
    if os.geteuid() != 0:
        raise ContainerError("flctl container build needs root (mmdebstrap --mode=root, podman's storage)")
    services = services or list(SERVICES.values())
    # A store of its own: its lock does not wait for a disk image build sharing the cache.
    store = ArtifactStore((cache or cache_root()) / "containers")
    info = project_info()
    built: list[BuiltImage] = []
    removals = Removals()
    used_dependencies: set[str] = set()
    with store.lock(), store.scratch("container-") as work:
        log = store.root / "build.log"  # kept after the build: errors point into it
        log.write_text("")
        started = time.monotonic()
        wheel = build_project_wheel(PROJECT_ROOT, work / "wheel", log, sys.executable)
        progress(f"fl-edge wheel {wheel.name} ({time.monotonic() - started:.1f} s)")
        # First, so an older base such a leftover was built on can go below once the services are rebuilt.
        remove_leftovers(list(SERVICES), removals, cache, log, progress)
        for platform in platforms:
            ensure_emulation(platform)
            started = time.monotonic()
            base, cached = base_image(store, platform, log, cache)
            took = " (cached)" if cached else f" ({time.monotonic() - started:.1f} s)"
            progress(f"{platform.name} base {base}{took}")
            for service in services:
                started = time.monotonic()
                ref = image_ref(service, info.version, platform)
                context = work / f"{service.name}-{platform.name}"
                context.mkdir()
                dependencies = payload.dependencies(store, service, platform, log)
                used_dependencies.add(dependencies.parent.name)
                payload.link_tree(dependencies, context / "deps")
                payload.application(wheel, service, platform, base_tarball(store, platform), context / "app", log)
                (context / "state").mkdir(mode=0o700)
                (context / "Containerfile").write_text(containerfile(service, base, info))
                replaced = image_id(ref, cache)
                # No layer cache: buildah 1.28 reused a cached COPY layer whose source files had changed (an
                # entry script fixed in the build context stayed old in the image). The copies take seconds.
                podman("build", "--format=docker", "--pull=never", "--layers=false",
                       f"--platform=linux/{platform.name}", "-t", ref, "-f", str(context / "Containerfile"),
                       str(context), what=f"podman build {ref}", cache=cache, log=log)  # fmt: skip
                inspected = image_inspect(ref, cache)
                size = int(inspected["Size"])
                if replaced and replaced != inspected["Id"]:
                    # Left alone, every rebuild would leave its predecessor untagged in podman's storage.
                    remove_image(replaced, None, ref, "the image it replaces", removals, cache, log, progress)
                image = BuiltImage(service.name, platform.name, ref, size, round(time.monotonic() - started, 1))
                built.append(image)
                progress(f"{ref}: {size / 1e6:.0f} MB ({image.seconds} s)")
                shutil.rmtree(context)
            remove_older_bases(base, platform, store, removals, log, progress, cache)
        prune_dependency_trees(store, used_dependencies, keep_bytes, removals, progress)
        for service in services:
            manifest_list(service, info.version, platforms, cache, log)
            progress(f"{image_ref(service, info.version)}: manifest list of {', '.join(p.name for p in platforms)}")
    progress(removals.summary())
    return built


def manifest_list(service: Service, version: str, platforms: list[Platform], cache: Path | None, log: Path) -> str:
    """``localhost/fl-edge/<name>:<version>`` as a manifest list of the per-architecture images (made anew)."""
    ref = image_ref(service, version)
    # Unconditionally: ``image exists`` resolves a list to its instance for this machine, and says no once the
    # rebuild removed that instance (prune.remove_image), while the list still holds the name.
    podman("manifest", "rm", ref, what=f"podman manifest rm {ref}", cache=cache, log=log, check=False)
    if image_exists(ref, cache):
        podman("rmi", ref, what=f"podman rmi {ref}", cache=cache, log=log)
    podman("manifest", "create", ref, what=f"podman manifest create {ref}", cache=cache, log=log)
    for platform in platforms:
        podman("manifest", "add", f"--arch={platform.name}", "--os=linux", ref,
               f"containers-storage:{image_ref(service, version, platform)}",
               what=f"podman manifest add {platform.name}", cache=cache, log=log)  # fmt: skip
    return ref
