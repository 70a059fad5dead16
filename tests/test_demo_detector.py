"""`flctl demo --model detector`: its tables show detection quality; end to end (slow) it trains the detector on
a small fleet and writes the picture of held-out frames with predicted and true boxes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from flctl import demo_detector
from flctl.demo import RoundRow, _summary


def test_the_summary_shows_map_centre_f1_and_count_error_per_round():
    scores = {"map50": 0.412, "centre_f1": 0.5, "count_mae": 1.25}
    row = RoundRow(round_id=1, model_version=1, participants=8, samples=2048, seconds=30.0, received_bytes=8e5,
                   train_loss=0.4, accuracy=0.412, loss=3.0, scores=scores)  # fmt: skip
    baseline = {"map50": 0.013, "centre_f1": 0.0, "count_mae": 1.68, "loss": 2.8}
    console = Console(width=200, record=True)
    console.print(_summary([row], baseline, columns=demo_detector.COLUMNS))
    text = console.export_text()
    assert "mAP@0.5" in text and "centre F1" in text and "count err" in text and "held-out acc" not in text
    assert "0.013" in text and "0.412" in text and "1.25" in text


@pytest.mark.slow
def test_detector_demo_trains_and_draws_held_out_boxes(tmp_path):
    out = tmp_path / "demo"
    flctl = Path(sys.executable).parent / "flctl"
    run = subprocess.run(
        [str(flctl), "demo", "--model", "detector", "--devices", "3", "--rounds", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "mAP@0.5" in run.stdout and "improved" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][-1]["scores"]["map50"] > summary["baseline"]["map50"]
    assert (out / "detections.png").read_bytes().startswith(b"\x89PNG")
