"""What each image adds to the base: the fl-edge wheel and its dependencies as a venv at /opt/fl-edge, the
service's user, its entry script, the health check and (for the agent) the appliance's default config.

Nothing here runs inside the image, so a foreign architecture costs no emulation: pip installs on the host,
for the image's platform (``--target`` with bookworm's CPython and the architecture's manylinux tags), into
a directory laid out as a venv. The venv's ``bin/python3`` is a link to the image's /usr/bin/python3 and its
``pyvenv.cfg`` is what ``python3 -m venv`` writes; the entry scripts are the wheel's console scripts.
"""

from __future__ import annotations

import configparser
import os
import shutil
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from flctl.image.cache import ArtifactStore, InputHash

from .platforms import IMAGE_PYTHON, Platform
from .podman import ContainerError, run_tool

VENV = "/opt/fl-edge"
SITE_PACKAGES = f"{VENV}/lib/python{IMAGE_PYTHON}/site-packages"
PROJECT_ROOT = Path(__file__).resolve().parents[3]
LOCK_FILE = PROJECT_ROOT / "requirements" / "dev.lock"
# Test suites shipped inside wheels: megabytes nobody runs in a container.
_TEST_TREES = ("numpy", "scipy", "onnxruntime")


@dataclass(frozen=True)
class Service:
    """One image: which extra of the wheel it installs, its console script, user and state directory."""

    name: str  # the image's name and its console script
    extra: str
    module: str  # the console script's module (pyproject [project.scripts])
    uid: int
    state_dir: str
    port: int
    health_url: str
    command: tuple[str, ...]
    description: str
    groups: tuple[str, ...] = ()  # supplementary groups of the base system the user joins

    @property
    def user(self) -> str:
        return self.name


AGGREGATOR = Service(
    name="fl-aggregator",
    extra="aggregator",
    module="aggregator.cli",
    uid=10001,
    state_dir="/var/lib/fl-aggregator",
    port=8080,
    health_url="http://127.0.0.1:8080/healthz",
    command=("fl-aggregator", "serve", "--state", "/var/lib/fl-aggregator", "--listen", "0.0.0.0:8080",
             "--model", "/etc/fl-aggregator/model/model.flpkg"),
    description="fl-edge federated learning aggregator (city or site)",
)
AGENT = Service(
    name="fl-agent",
    extra="agent",
    module="appliance.cli",
    uid=10002,
    state_dir="/var/lib/fl-agent",
    port=9101,
    health_url="http://127.0.0.1:9101/metrics",
    command=("fl-agent", "run", "--config", "/etc/fl-agent/agent.toml"),
    description="fl-edge agent: trains on camera frames, sends signed updates",
    groups=("video",),  # /dev/video* mapped into the container belong to it
)
SERVICES = {s.name: s for s in (AGGREGATOR, AGENT)}


def requirements(extra: str, pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> list[str]:
    """The wheel's core dependencies plus one extra's: what the image's service imports."""
    meta = tomllib.loads(pyproject.read_text())["project"]
    wanted = meta.get("optional-dependencies", {}).get(extra)
    if wanted is None:
        raise ContainerError(f"{pyproject} has no [project.optional-dependencies] {extra} extra")
    return sorted(set(meta.get("dependencies", [])) | set(wanted))


def _pip(target: Path, platform: Platform, args: list[str], log: Path, what: str) -> None:
    run_tool([sys.executable, "-m", "pip", "install", "-q", "--no-warn-script-location", "--target", str(target),
              "--only-binary=:all:", *platform.wheel_tags, *args], what=what, log=log)  # fmt: skip


def dependencies(store: ArtifactStore, service: Service, platform: Platform, log: Path) -> Path:
    """A tree holding ``service``'s dependencies at SITE_PACKAGES, pinned by the lock; cached by its inputs."""
    reqs = requirements(service.extra)
    key = (
        InputHash("container-deps")
        .text("requirements", "\n".join(reqs))
        .file("lock", LOCK_FILE)
        .text("platform", platform.name)
        .text("tags", " ".join(platform.wheel_tags))
        .text("strip", " ".join(_TEST_TREES))
    ).key()
    if not store.has("container-deps", key):
        with store.building("container-deps", key) as out:
            site = out / "tree" / SITE_PACKAGES.lstrip("/")
            _pip(site, platform, ["-c", str(LOCK_FILE), *reqs], log, f"pip install {service.name}'s dependencies")
            shutil.rmtree(site / "bin", ignore_errors=True)  # scripts with the host's interpreter in them
            for package in _TEST_TREES:
                for tests in sorted((site / package).rglob("tests"), reverse=True):
                    if tests.is_dir():
                        shutil.rmtree(tests)
    return store.path("container-deps", key) / "tree"


def application(project_wheel: Path, service: Service, platform: Platform, base_tar: Path, out: Path,
                log: Path) -> None:
    """The image's own layer under ``out``: the wheel, the venv's frame, the entry and health scripts, the
    user, the state directory and the default config."""
    site = out / SITE_PACKAGES.lstrip("/")
    _pip(site, platform, ["--no-deps", str(project_wheel)], log, "pip install the fl-edge wheel")
    shutil.rmtree(site / "bin", ignore_errors=True)
    venv = out / VENV.lstrip("/")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python3").symlink_to("/usr/bin/python3")
    (venv / "bin" / "python").symlink_to("python3")
    (venv / "pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {IMAGE_PYTHON}\n"
    )
    script = _console_script(site, service)
    _write(venv / "bin" / service.name, script, 0o755)
    _write(out / "usr/local/bin/fl-healthcheck", (Path(__file__).parent / "healthcheck.py").read_text(), 0o755)
    passwd, group = _accounts(base_tar, service)
    _write(out / "etc/passwd", passwd, 0o644)
    _write(out / "etc/group", group, 0o644)
    if service is AGENT:
        overlay = PROJECT_ROOT / "rootfs-overlay/etc/fl-agent/agent.toml"
        _write(out / "etc/fl-agent/agent.toml", overlay.read_text(), 0o644)


def _console_script(site: Path, service: Service) -> str:
    """The wheel's console script for ``service``, with the venv's interpreter."""
    entry_points = next(site.glob("fl_edge-*.dist-info/entry_points.txt"), None)
    if entry_points is None:
        raise ContainerError(f"the fl-edge wheel installed into {site} has no entry_points.txt")
    parser = configparser.ConfigParser()
    parser.read(entry_points)
    target = parser.get("console_scripts", service.name, fallback=None)
    if target is None:
        raise ContainerError(f"the fl-edge wheel declares no console script {service.name!r}")
    module, _, function = target.partition(":")
    # The guard matters: the agent's trainer runs in a multiprocessing fork server, which imports the main
    # script again, and must not start a second agent.
    return (f"#!{VENV}/bin/python3\nimport sys\n\nfrom {module} import {function}\n\n"
            f"if __name__ == \"__main__\":\n    sys.exit({function}())\n")


def _accounts(base_tar: Path, service: Service) -> tuple[str, str]:
    """The base system's passwd and group with the service's user and group added (and its groups joined)."""
    with tarfile.open(base_tar) as tar:
        passwd = _member_text(tar, "etc/passwd")
        group = _member_text(tar, "etc/group")
    uid = service.uid
    passwd += f"{service.user}:x:{uid}:{uid}:{service.user}:{service.state_dir}:/usr/sbin/nologin\n"
    lines = []
    for line in group.splitlines():
        fields = line.split(":")
        if fields[0] in service.groups:
            members = [m for m in fields[3].split(",") if m]
            fields[3] = ",".join([*members, service.user])
        lines.append(":".join(fields))
    missing = set(service.groups) - {line.split(":")[0] for line in lines}
    if missing:
        raise ContainerError(f"the base system has no group {', '.join(sorted(missing))}")
    lines.append(f"{service.user}:x:{uid}:")
    return passwd, "\n".join(lines) + "\n"


def _member_text(tar: tarfile.TarFile, name: str) -> str:
    for candidate in (f"./{name}", name):
        try:
            member = tar.extractfile(candidate)
        except KeyError:
            continue
        if member is not None:
            return member.read().decode()
    raise ContainerError(f"{tar.name} holds no /{name}")


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def link_tree(source: Path, dest: Path) -> None:
    """Copy a cached tree into a build context by hard links (same file system: no 200 MB copy)."""
    try:
        shutil.copytree(source, dest, symlinks=True, copy_function=os.link)
    except OSError:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest, symlinks=True)
