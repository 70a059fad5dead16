"""Buildroot itself on buildroot-external/: both defconfigs configure, `make show-info` lists the agent's
packages, the agent's dependency graph resolves without the network, utils/check-package is clean, and the
python-fl-agent package's own steps (Buildroot's rsync of the checkout, the PEP 517 wheel, Buildroot's
pyinstaller.py and the package's install hooks) run offline into a stand-in target directory.

Needs a Buildroot checkout, which CI's clean clone does not have (no network to fetch one): it runs only when
FL_BUILDROOT names one (Buildroot 2026.02.3), like FL_YOCTO_LAYERS for the bitbake test; else every test
here is skipped with that reason. Host tools: Buildroot's (which, bc, cpio, rsync, file, unzip, g++, perl,
wget), and for check-package and the install step, python3-magic, python3-flake8, shellcheck and
python3-installer (tools/host-packages.txt).

    git clone -b 2026.02.3 https://gitlab.com/buildroot.org/buildroot.git /work/buildroot
    FL_BUILDROOT=/work/buildroot python -m pytest tests/test_buildroot_make.py
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from buildroot_tree import BUILDROOT_PACKAGES, DEFCONFIGS, EXTERNAL, PACKAGES
from metafl_recipes import agent_imports

PINNED = "2026.02.3"
BUILDROOT = Path(os.environ.get("FL_BUILDROOT", "")).resolve()


def _missing_tree() -> str | None:
    if not os.environ.get("FL_BUILDROOT"):
        return (f"FL_BUILDROOT is not set: no Buildroot {PINNED} checkout to run make against (CI's clean clone "
                "has none and cannot fetch one, so these tests are skipped there)")
    if not (BUILDROOT / "Makefile").is_file() or not (BUILDROOT / "utils" / "check-package").is_file():
        return f"FL_BUILDROOT={BUILDROOT} is not a Buildroot checkout (no Makefile or utils/check-package)"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(_missing_tree() is not None, reason=_missing_tree() or ""),
]


def offline(argv: list[str]) -> list[str]:
    """argv in a network namespace of its own (no interface but lo), when this host lets us make one."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return [*prefix, *argv]
    return argv


def make(out: Path, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = offline(["make", "-s", f"BR2_EXTERNAL={EXTERNAL}", f"O={out}", *args])
    return subprocess.run(argv, cwd=BUILDROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, **(extra_env or {})})


def interpreter_with(*modules: str) -> str | None:
    """A Python that imports `modules`: this one, or Debian's (where the apt packages put them)."""
    code = "; ".join(f"import {m}" for m in modules)
    for python in (sys.executable, "/usr/bin/python3"):
        if Path(python).exists() and subprocess.run([python, "-c", code], capture_output=True).returncode == 0:
            return python
    return None


def test_buildroot_is_the_pinned_release():
    version = re.search(r"^export BR2_VERSION := (\S+)$", (BUILDROOT / "Makefile").read_text(), re.M)
    assert version and version.group(1) == PINNED, (
        f"{BUILDROOT} is Buildroot {version.group(1) if version else '?'}; the tests pin {PINNED}")


@pytest.fixture(scope="module", params=sorted(DEFCONFIGS))
def configured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An output directory configured with one of the tree's defconfigs."""
    out = tmp_path_factory.mktemp(request.param)
    result = make(out, request.param)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    yield out


def test_defconfig_keeps_the_choices(configured):
    config = (configured / ".config").read_text()
    for line in ("BR2_INIT_SYSTEMD=y", "# BR2_TARGET_GENERIC_REMOUNT_ROOTFS_RW is not set",
                 "BR2_PACKAGE_PYTHON_FL_AGENT=y", "BR2_PACKAGE_ONNXRUNTIME=y", "BR2_PACKAGE_PYTHON3_SSL=y",
                 'BR2_TARGET_ROOTFS_EXT2_LABEL="fl-root"',
                 'BR2_ROOTFS_OVERLAY="$(BR2_EXTERNAL_FL_EDGE_PATH)/../rootfs-overlay"'):
        assert line in config.splitlines(), f"{line!r} did not survive `make defconfig` (a dependency unmet?)"


def test_show_info_lists_the_agent_and_everything_it_imports(configured):
    result = make(configured, "show-info")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout)
    third_party = {i.module.split(".")[0] for i in agent_imports()} - set(sys.stdlib_module_names)
    wanted = set(PACKAGES) | {BUILDROOT_PACKAGES[m] for m in third_party}
    missing = sorted(wanted - set(info))
    assert not missing, f"make show-info does not list {missing}"
    assert info["python-fl-agent"]["version"] == "0.1.0"
    assert info["onnxruntime"]["licenses"] == "MIT"


def test_agent_dependencies_resolve_offline(configured):
    result = make(configured, "python-fl-agent-show-recursive-depends")
    assert result.returncode == 0, result.stderr[-3000:]
    depends = set(result.stdout.split())
    assert {"python3", "host-python-setuptools", "host-python-pypa-build", "skeleton-init-systemd"} <= depends


def test_check_package_is_clean_on_the_external_tree():
    python = interpreter_with("magic", "flake8")
    if python is None:
        pytest.skip("no Python with the magic and flake8 modules for utils/check-package "
                    "(apt-get install python3-magic python3-flake8)")
    files = sorted(str(p.relative_to(EXTERNAL)) for p in EXTERNAL.rglob("*") if p.is_file())
    result = subprocess.run([python, str(BUILDROOT / "utils" / "check-package"), "-b", *files], cwd=EXTERNAL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "\n0 warnings generated" in "\n" + result.stderr, result.stdout + result.stderr
    processed = re.search(r"(\d+) lines processed", result.stderr)
    assert processed and int(processed.group(1)) > 300


def test_agent_package_installs_only_the_agent(tmp_path_factory):
    """Buildroot rsyncs the checkout (the package's filter), the setuptools backend builds the wheel (the hook
    `python -m build -n -w` calls), Buildroot's pyinstaller.py installs it and the package's hooks (read
    from `make printvars`) keep the agent only and add the mount points: all without the network."""
    installer = interpreter_with("installer")
    if installer is None:
        pytest.skip("no Python with the installer module for Buildroot's pyinstaller.py "
                    "(apt-get install python3-installer)")
    out = tmp_path_factory.mktemp("install")
    target = out / "stand-in-target"
    assert make(out, "fl_qemu_x86_64_defconfig").returncode == 0
    rsync = make(out, "python-fl-agent-rsync")
    assert rsync.returncode == 0, rsync.stdout[-2000:] + rsync.stderr[-2000:]
    hooks = ("PYTHON_FL_AGENT_BUILDDIR PKG_PYTHON_SETUPTOOLS_INSTALL_TARGET_CMD PYTHON_FL_AGENT_KEEP_AGENT_ONLY "
             "PYTHON_FL_AGENT_INSTALL_MOUNT_POINTS PYTHON3_VERSION_MAJOR")
    printed = make(out, "printvars", f"VARS={hooks}", "QUOTED_VARS=YES", f"TARGET_DIR={target}")
    assert printed.returncode == 0, printed.stderr
    values = dict(re.findall(r"^(\w+)='((?:[^']|'\\'')*)'$", printed.stdout, re.M | re.S))
    values = {k: v.replace("'\\''", "'") for k, v in values.items()}
    build = Path(values["PYTHON_FL_AGENT_BUILDDIR"])
    copied = sorted(p.name for p in build.iterdir() if not p.name.startswith("."))  # Buildroot's stamps
    assert copied == ["LICENSE", "README.md", "aggregator", "appliance", "pyproject.toml", "tools"]
    subprocess.run([sys.executable, "-c", "import setuptools.build_meta as b; b.build_wheel('dist')"], cwd=build,
                   check=True, capture_output=True)
    subprocess.run([installer, *shlex.split(values["PKG_PYTHON_SETUPTOOLS_INSTALL_TARGET_CMD"])], cwd=build,
                   check=True)
    for hook in ("PYTHON_FL_AGENT_KEEP_AGENT_ONLY", "PYTHON_FL_AGENT_INSTALL_MOUNT_POINTS"):
        subprocess.run(["bash", "-ec", values[hook]], check=True)

    site = target / "usr" / "lib" / f"python{values['PYTHON3_VERSION_MAJOR']}" / "site-packages"
    assert sorted(p.name for p in site.iterdir()) == ["appliance", "fl_edge-0.1.0.dist-info"]
    assert sorted(p.name for p in (target / "usr" / "bin").iterdir()) == ["fl-agent"]
    dist = site / "fl_edge-0.1.0.dist-info"
    assert (dist / "entry_points.txt").read_text().split() == ["[console_scripts]", "fl-agent", "=",
                                                               "appliance.cli:main"]
    assert (dist / "top_level.txt").read_text().split() == ["appliance"]
    for mount_point in ("data", "var/lib/fl-agent", "var/lib/systemd/timesync"):
        assert (target / mount_point).is_dir()
    # The installed agent runs from the target tree (with this interpreter's third-party packages; cwd out of
    # the checkout, whose own appliance/ would come first on sys.path).
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, str(target / "usr" / "bin" / "fl-agent"), "--help"], cwd=out, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "run" in run.stdout, run.stderr
    where = subprocess.run([sys.executable, "-c", "import appliance.agent; print(appliance.agent.__file__)"],
                           cwd=out, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site)), where.stdout
