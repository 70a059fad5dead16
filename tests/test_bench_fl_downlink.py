"""bench/fl_quality.py --downlink: a tiny run end to end (the table, the figures, fewer bytes down per encoding)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "fl_quality.py"


@pytest.mark.slow
def test_tiny_downlink_run_counts_fewer_bytes_down_for_each_smaller_encoding(tmp_path: Path) -> None:
    # every client trains every round, so from round 2 on each device is one version behind
    cmd = [sys.executable, str(BENCH), "--downlink", "--clients", "3", "--per-round", "3", "--rounds", "3",
           "--seeds", "1", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "per device per round" in run.stdout and "target (>= 4x fewer bytes" in run.stdout
    summary = json.loads((tmp_path / "fl_downlink.json").read_text())["summary"]
    down = {m: s["down_bytes_per_device_round"] for m, s in summary.items()}
    up = {m: s["up_bytes_per_device_round"] for m, s in summary.items()}
    assert down["f32-up/full-down"] == down["int8-up/full-down"] > down["int8-up/f16-down"]
    assert down["int8-up/f16-down"] > down["int8-up/int8-down"] > down["int8-up/sparse-down"]
    assert up["int8-up/full-down"] < 0.3 * up["f32-up/full-down"]
    assert all(s["final_accuracy"] > 0.5 for s in summary.values())  # three rounds learn something (chance 0.1)
