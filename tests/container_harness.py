"""Helpers for the container tests: podman with flctl's containers.conf, and the images built once per session
(``flctl container build --arch amd64,arm64``: a second build in the same cache only re-tags)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from flctl.container.build import BuiltImage, build_images, image_ref, project_info
from flctl.container.platforms import PLATFORMS, host_platform
from flctl.container.podman import podman_env

VERSION = project_info().version
AGGREGATOR = image_ref("fl-aggregator", VERSION)
AGENT = image_ref("fl-agent", VERSION)


def can_run_podman() -> str | None:
    """Why the container tests cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (tools/host-packages.txt)"
    if os.geteuid() != 0:
        return "the image build needs root (mmdebstrap --mode=root)"
    return None


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


@functools.cache
def build_all() -> list[BuiltImage]:
    """Both images for amd64 and arm64, and their manifest lists (the base systems and wheels are cached).
    Once per test session: each test module that imports the ``images`` fixture has its own copy of it."""
    platforms = [host_platform(), *(p for p in PLATFORMS.values() if p.foreign)]
    return build_images(platforms)


@pytest.fixture(scope="session")
def images() -> list[BuiltImage]:
    reason = can_run_podman()
    if reason:
        pytest.skip(reason)
    return build_all()


def wait_http(url: str, timeout: float = 120) -> int:
    """Poll ``url`` until it answers; returns the status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
