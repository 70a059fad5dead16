"""The README's hint for a machine without the CPU torch on disk: `export PIP_EXTRA_INDEX_URL=<PyTorch's CPU index>`
before `make`. The lock pins torch 2.13.0+cpu, which PyPI cannot hold (it refuses local versions), so `make venv`
finds it only through an index the environment adds. These tests hold the two halves of that: the Makefile's
install leaves pip free to read the variable, and pip given the lock takes the +cpu build from the extra index,
never PyPI's 2.13.0 (the CUDA build). Both indexes are local directories standing in for the real ones."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "dev.lock"


def venv_install_commands(tmp_path: Path) -> list[list[str]]:
    """The pip commands `make venv` runs on a fresh clone, as make prints them (-n)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(ROOT / "Makefile", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    run = subprocess.run(["make", "-n", "venv"], cwd=tmp_path, capture_output=True, text=True, check=True)
    return [shlex.split(line) for line in run.stdout.splitlines() if " -m pip install " in line]


def locked_torch() -> str:
    (pin,) = [line.split("==", 1)[1].strip() for line in LOCK.read_text().splitlines() if line.startswith("torch==")]
    return pin


def simple_index(root: Path, version: str) -> Path:
    """A PEP 503 index holding one torch wheel of ``version`` (metadata only: pip never installs it here)."""
    wheel_name = f"torch-{version}-py3-none-any.whl"
    project = root / "torch"
    project.mkdir(parents=True)
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(project / wheel_name, "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    href = wheel_name.replace("+", "%2B")
    (project / "index.html").write_text(f'<!DOCTYPE html><html><body><a href="{href}">{wheel_name}</a></body></html>')
    (root / "index.html").write_text('<!DOCTYPE html><html><body><a href="torch/">torch</a></body></html>')
    return root


def download_locked_torch(tmp_path: Path, extra_index: Path | None) -> subprocess.CompletedProcess[str]:
    """pip, with no configuration but PIP_* variables, fetching torch under the lock as `make venv` would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip.conf and its wheel directory play no part
    env["PIP_INDEX_URL"] = simple_index(tmp_path / "pypi", locked_torch().split("+")[0]).as_uri()
    if extra_index is not None:
        env["PIP_EXTRA_INDEX_URL"] = extra_index.as_uri()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
           "-c", str(LOCK), "-d", str(out), "torch"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def downloaded(run_dir: Path) -> list[str]:
    out = run_dir / "out"
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def test_make_venv_installs_under_the_lock_and_lets_pip_read_its_index_from_the_environment(tmp_path: Path) -> None:
    *_, install = venv_install_commands(tmp_path)
    assert install[install.index("-c") + 1] == "requirements/dev.lock", install
    # --isolated ignores PIP_* variables, --no-index every index, and a command-line --extra-index-url replaces it
    blocking = {"--isolated", "--no-index", "--extra-index-url"} & {arg.split("=", 1)[0] for arg in install}
    assert not blocking, f"`make venv` runs pip with {sorted(blocking)}: the README's PIP_EXTRA_INDEX_URL is ignored"


def test_the_locked_cpu_torch_comes_from_the_extra_index_and_only_from_there(tmp_path: Path) -> None:
    pin = locked_torch()
    assert pin.endswith("+cpu"), pin
    without = download_locked_torch(tmp_path / "without", None)
    assert without.returncode != 0, "pip took PyPI's torch for the lock's " + pin  # its only torch is plain 2.13.0
    assert "torch" in without.stderr and downloaded(tmp_path / "without") == [], without.stderr
    cpu_index = simple_index(tmp_path / "pytorch-cpu", pin)
    with_extra = download_locked_torch(tmp_path / "with", cpu_index)
    assert with_extra.returncode == 0, with_extra.stdout + with_extra.stderr
    assert downloaded(tmp_path / "with") == [f"torch-{pin}-py3-none-any.whl"]
