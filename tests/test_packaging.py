"""The wheel users and images install carries every module of the three packages (a subpackage missing
from pyproject's package list once shipped an aggregator without its strategies)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"appliance": ROOT / "appliance", "aggregator": ROOT / "aggregator", "flctl": ROOT / "tools" / "flctl"}


def test_wheel_contains_every_module(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("fl_edge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{package}/{path.relative_to(source).as_posix()}"
        for package, source in SOURCES.items()
        for path in source.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("fl-agent = appliance.cli:main", "fl-aggregator = aggregator.cli:main", "flctl = flctl.cli:main"):
        assert script in scripts
