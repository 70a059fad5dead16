"""requirements/dev.lock: the versions `make venv` (so `make test` and `make demo`) and the development image
install. A fresh machine once resolved newer releases than the suite had run with and failed it; these checks
keep the lock complete, exact, CPU-only and in use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from flctl.image import build, rootfs

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "dev.lock"
TORCH_PIN = ROOT / "requirements" / "torch-cpu.txt"


def locked() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def pyproject_requirements() -> list[Requirement]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        lines += extra
    return [r for r in map(Requirement, lines) if canonicalize_name(r.name) != "fl-edge"]


def test_every_requirement_of_pyproject_is_locked_at_a_version_it_accepts():
    """Adding or raising a requirement without `make lock` would install it unpinned: caught here."""
    pins = locked()
    for req in pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is in pyproject.toml but not in the lock: run `make lock LOCK_ARGS=`"
        assert req.specifier.contains(pins[name], prereleases=True), f"the lock has {name}=={pins[name]}, not {req}"


def test_the_lock_holds_the_cpu_torch_and_nothing_of_cuda():
    pins = locked()
    (wanted,) = (Requirement(line) for line in TORCH_PIN.read_text().splitlines() if line.startswith("torch"))
    torch = pins["torch"]
    assert wanted.specifier.contains(torch), f"lock has torch {torch}, requirements/torch-cpu.txt says {wanted}"
    assert torch.local == "cpu", f"torch {torch} is not the CPU build"
    cuda = sorted(n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton")
    assert not cuda, f"the lock pulls CUDA packages: {cuda}"


def test_the_venv_is_rebuilt_when_the_lock_changes(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(ROOT / "Makefile", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    stamp = tmp_path / ".venv" / ".installed"
    stamp.parent.mkdir()
    stamp.touch()
    old, new = 1_700_000_000, 1_700_000_100
    for path in (tmp_path / "pyproject.toml", tmp_path / "requirements" / "dev.lock"):
        os.utime(path, (old, old))
    os.utime(stamp, (new, new))

    def up_to_date() -> bool:
        return subprocess.run(["make", "-q", "venv"], cwd=tmp_path, capture_output=True).returncode == 0

    assert up_to_date()
    os.utime(tmp_path / "requirements" / "dev.lock", (new + 1, new + 1))
    assert not up_to_date(), "a new lock must reinstall the venv"


def test_the_image_downloads_the_agents_dependencies_at_the_locked_versions(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(rootfs, "run_logged", lambda cmd, *args, **kw: commands.append(cmd))
    requirements = rootfs.agent_requirements(ROOT / "pyproject.toml")
    rootfs.download_dependency_wheels(requirements, build.LOCK_FILE, tmp_path, tmp_path / "log", sys.executable)
    (cmd,) = commands
    assert build.LOCK_FILE == LOCK
    assert cmd[cmd.index("-c") + 1] == str(LOCK)
    pins = locked()
    assert all(canonicalize_name(Requirement(r).name) in pins for r in requirements)
