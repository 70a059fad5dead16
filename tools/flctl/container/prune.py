"""Removing the podman images a container build leaves behind, and counting what that frees.

Two kinds: the image a rebuilt name pointed to before (about 350 MB per service and architecture), and the
base images of older keys (about 140 MB each: a change to the base's Debian package set gives it a new key,
and so a new name). Left alone, both pile up in podman's storage until the disk fills. In the cache, the
dependency trees of older lock files go as the disk images do (ArtifactStore.prune: the newest few and a byte
budget; about 190 MB each).

Only an image flctl named and nothing else needs goes. One still tagged under another name stays (``podman rmi
ID`` deletes an image with one name left, that name with it), and so does one other images are built on (its
layers stay with them, so removing it would free nothing) and one a container uses (podman refuses). A podman
that fails to list or remove images costs the build nothing: what it could not look at stays.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from flctl.image.cache import ArtifactStore, Pruned, prune_summary

from .podman import ContainerError, podman

DEPENDENCIES = "container-deps"
TITLE_LABEL = "org.opencontainers.image.title"  # each service image's name (build.containerfile)
# Dependency trees kept whatever their size besides those the build used, as images/ keeps its newest images.
KEEP_DEPENDENCY_TREES = 3


@dataclass
class Removals:
    """What a build removed (from podman's storage and the cache), for its closing line."""

    images: list[str] = field(default_factory=list)
    trees: list[Path] = field(default_factory=list)  # base tarballs
    dependency_trees: list[Path] = field(default_factory=list)
    freed_bytes: int = 0

    def remove_tree(self, tree: Path, said: str, progress) -> None:
        """Remove a cache directory that belonged to a removed image (a base's tarball)."""
        size = sum(f.lstat().st_blocks * 512 for f in tree.rglob("*"))
        shutil.rmtree(tree)
        self.trees.append(tree)
        self.freed_bytes += size
        progress(f"{said} {tree} ({size / 1e6:.0f} MB)")

    def summary(self) -> str:
        """One line: how many images and cached trees went, and the bytes that freed."""
        counts = ((self.images, "image(s)"), (self.trees, "cached tarball(s)"),
                  (self.dependency_trees, "dependency tree(s)"))  # fmt: skip
        parts = [f"{len(items)} {noun}" for items, noun in counts if items]
        if not parts:
            return "removed nothing: no replaced image, older base or dependency tree"
        removed = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
        return f"removed {removed}: {self.freed_bytes / 1e6:.0f} MB freed"


def prune_dependency_trees(store: ArtifactStore, used: set[str], keep_bytes: int, removals: Removals,
                           progress) -> Pruned:
    """Remove the cached dependency trees (``<store>/container-deps/<key>``) the build did not use (``used``:
    their keys), beyond the newest few and ``keep_bytes``, as ``flctl image build`` prunes its images. A tree
    only a build reads (under the store's lock): the trees it used are kept, and none is in use otherwise."""
    pruned = store.prune(DEPENDENCIES, used, KEEP_DEPENDENCY_TREES, keep_bytes)
    removals.dependency_trees.extend(pruned.removed)
    removals.freed_bytes += pruned.freed_bytes
    progress(prune_summary(DEPENDENCIES, pruned))
    return pruned


def remove_image(image: str, name: str | None, subject: str, what: str, removals: Removals, cache: Path | None,
                 log: Path, progress) -> bool:
    """Remove ``image`` (an ID) unless something else needs it; ``name`` is the one tag flctl gave it that may
    go with it (None: it has none left). Says what happened as ``<subject>: removed|kept <what> (ID...)``;
    returns whether it went."""
    try:
        images = _all_images(cache)
    except ContainerError as exc:
        progress(f"{subject}: kept {what} ({image.removeprefix('sha256:')[:12]}): {failed(exc, log)}")
        return False
    found = images.get(image.removeprefix("sha256:"))
    if found is None:
        return False
    short = found["Id"][:12]
    others = [tag for tag in found.get("RepoTags") or [] if tag != name]
    if others:
        progress(f"{subject}: kept {what} ({short}): still tagged {', '.join(others)}")
        return False
    layers = _layers(found)
    rest = [i for i in images.values() if i["Id"] != found["Id"]]
    # By layers, not by podman's Parent: that is empty for an image built FROM an imported base (Docker format).
    children = [i for i in rest if len(_layers(i)) > len(layers) and _layers(i)[: len(layers)] == layers]
    if children:
        names = ", ".join((c.get("RepoTags") or [c["Id"][:12]])[0] for c in children)
        progress(f"{subject}: kept {what} ({short}): images are built on it ({names})")
        return False
    below = [int(i["Size"]) for i in rest if layers[: len(_layers(i))] == _layers(i)]
    freed = int(found["Size"]) - max(below, default=0)  # its own layers; those of the image below it stay
    done = podman("rmi", found["Id"], what=f"podman rmi {short}", cache=cache, log=log, check=False)
    if done.returncode != 0:
        progress(f"{subject}: kept {what} ({short}): podman refused (in use?), see {log}")
        return False
    removals.images.append(found["Id"])
    removals.freed_bytes += freed
    progress(f"{subject}: removed {what} ({short}, {freed / 1e6:.0f} MB)")
    return True


def remove_leftovers(services: list[str], removals: Removals, cache: Path | None, log: Path, progress) -> None:
    """Remove untagged images of ``services`` (by their ``org.opencontainers.image.title`` label) that earlier
    builds left: an image a rebuild replaced while a container still used it was kept then, and nothing names it
    any more. One still in use or built on stays (remove_image), and so do untagged images of anything else."""
    try:
        images = _all_images(cache)
    except ContainerError as exc:
        progress(f"kept earlier builds' leftover images: {failed(exc, log)}")
        return
    for image in images.values():
        title = (image.get("Labels") or {}).get(TITLE_LABEL)
        if not image.get("RepoTags") and title in services:
            remove_image(image["Id"], None, title, "an earlier build's leftover image", removals, cache, log,
                         progress)


def _all_images(cache: Path | None) -> dict[str, dict]:
    """Every image in podman's storage by ID, as ``podman image inspect`` describes it (tags, layers, size).

    One at a time: a manifest list whose instance for this machine is gone cannot be inspected (it is no image
    with layers of its own), and podman fails the whole call for it."""
    listed = podman("images", "--all", "--quiet", "--no-trunc", what="podman images", cache=cache).stdout.split()
    images = {}
    for image in dict.fromkeys(listed):  # an image with two names is listed twice
        done = podman("image", "inspect", image, what="podman image inspect", cache=cache, check=False)
        if done.returncode == 0:
            inspected = json.loads(done.stdout)[0]
            images[inspected["Id"]] = inspected
    return images


def failed(exc: ContainerError, log: Path) -> str:
    """Say that podman failed (in the progress line's words), its output going to ``log``."""
    with open(log, "a") as fh:
        fh.write(f"\n{exc}\n")
    return f"{str(exc).splitlines()[0].removesuffix(':')}, see {log}"


def _layers(image: dict) -> list[str]:
    return list((image.get("RootFS") or {}).get("Layers") or [])
