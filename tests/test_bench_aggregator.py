"""bench/aggregator.py's Flower side runs in Flower's interpreter, where this project is not installed.

It once ran the benchmark module itself there, whose top-level `from flctl.ports import free_port` failed
with "No module named 'flctl'" before Flower was ever called.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.threadnames import name_this_thread  # before bench/ is on the path: its aggregator.py shadows ours

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FLOWER_SIDE = BENCH / "flower_fedavg.py"


def _aggregator_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # as when it runs as a script: its sibling proctree.py
    spec = importlib.util.spec_from_file_location("bench_aggregator", BENCH / "aggregator.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _python_without_this_project(tmp_path: Path) -> str:
    """A venv like a Flower one, less Flower: numpy and the standard library, nothing of fl-edge."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    numpy_only = tmp_path / "numpy-only"
    numpy_only.mkdir()
    site = Path(np.__file__).resolve().parents[1]
    for name in ("numpy", "numpy.libs"):
        if (site / name).exists():
            (numpy_only / name).symlink_to(site / name)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "numpy-only.pth").write_text(f"{numpy_only}\n")
    return python


def test_the_flower_side_imports_only_the_standard_library_numpy_and_flwr():
    allowed = set(sys.stdlib_module_names) | {"numpy", "flwr"}
    imported = set()
    for node in ast.walk(ast.parse(FLOWER_SIDE.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {FLOWER_SIDE.name}: line {node.lineno}"
            imported.add((node.module or "").split(".")[0])
    assert imported - allowed == set(), f"{FLOWER_SIDE.name} needs what Flower's interpreter lacks"


def test_flowers_server_side_run_gets_as_far_as_flower_in_an_interpreter_without_this_project(
    tmp_path, monkeypatch
):
    python = _python_without_this_project(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    probe = subprocess.run([python, "-c", "import numpy, importlib.util as u; print(u.find_spec('flctl'))"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "None", probe.stderr  # numpy yes, the project no
    outcome = _aggregator_bench(monkeypatch).run_flower_serverside(python, 1000, 3)
    assert outcome == "Flower run failed: ModuleNotFoundError: No module named 'flwr'"


@pytest.mark.skipif(not os.environ.get("FLWR_PYTHON"), reason="set FLWR_PYTHON to a venv's python with flwr")
def test_flowers_server_side_fedavg_runs_in_flowers_own_interpreter(monkeypatch):
    outcome = _aggregator_bench(monkeypatch).run_flower_serverside(os.environ["FLWR_PYTHON"], 1000, 3)
    assert isinstance(outcome, dict), outcome
    assert outcome["updates_per_s"] > 0 and outcome["version"]


def test_the_bound_is_measured_and_printed_next_to_the_servers_cpu(monkeypatch):
    bench = _aggregator_bench(monkeypatch)
    steps = bench.measure_bound(bytes(64 * 1024), 16 * 1024, repeats=3)
    assert set(steps) == {"sha256_ms", "add_ms", "copy_ms"} and all(v >= 0 for v in steps.values())
    stages = {"event_loop": 2.9, "workers": 4.1, "spool": 0.6, "accumulate": 0.8, "other": 0.1}
    ours = {"server_cpu_ms_per_update": 9.0, "ingest_cpu_ms_per_update": 8.5, "update_bytes": 4_000_300,
            "encoding": "float32", **{f"{k}_cpu_ms_per_update": v for k, v in stages.items()},
            **bench._bound_of([{"sha256_ms": 2.5, "add_ms": 0.2, "copy_ms": 0.3}])}
    line = bench.bound_line(ours)
    assert "bound 3.00 ms/upd" in line and line.endswith("= 3.00x the bound")
    assert ("8.50 receiving: 2.90 event loop, 4.10 hash+decode+norm, 0.60 spool write+fdatasync+commit, "
            "0.80 accumulate, 0.10 other;") in line


def test_the_servers_cpu_is_split_by_thread_stage(monkeypatch):
    bench = _aggregator_bench(monkeypatch)
    from proctree import cpu_seconds  # bench/, on the path once the benchmark is loaded

    def spin() -> None:  # a verify worker's CPU: counted for the process, under "workers", not the event loop
        name_this_thread()
        until = time.thread_time() + 0.3
        while time.thread_time() < until:
            pass
        time.sleep(0.5)  # alive while the stages are read

    worker = threading.Thread(target=spin, name="verify_7")
    worker.start()
    for _ in range(100):
        stages = bench._stage_cpu(os.getpid())
        if stages["workers"] >= 0.25:
            break
        time.sleep(0.01)
    whole = cpu_seconds(os.getpid())
    worker.join()
    assert stages["workers"] >= 0.25
    assert 0 <= stages["event_loop"] <= whole - 0.25
