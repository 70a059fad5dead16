"""bench/fl_quality.py --stragglers (bench/fl_stragglers.py): the speed model, sync round times, and a tiny run end
to end (the async side runs as many local trainings as the sync side, the table and the figures come out)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "fl_quality.py"


@pytest.fixture(scope="module")
def stragglers():
    sys.path.append(str(ROOT / "bench"))  # after the project: bench/aggregator.py must not shadow the package
    try:
        import fl_stragglers

        yield fl_stragglers
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_speed_model_slows_the_stated_fraction_by_the_stated_factor_the_same_way_per_seed(stragglers) -> None:
    model = stragglers.SpeedModel(sigma=0.5, slow_fraction=0.3, slowdown=10.0, seconds_per_sample=0.01)
    speed, slow = model.draw(20, seed=4)
    again, slow_again = model.draw(20, seed=4)
    np.testing.assert_array_equal(speed, again)
    np.testing.assert_array_equal(slow, slow_again)
    assert len(slow) == 6 and len(set(slow.tolist())) == 6
    flat = stragglers.SpeedModel(sigma=0.5, slow_fraction=0.3, slowdown=1.0).draw(20, seed=4)[0]
    np.testing.assert_allclose(speed[slow], 10 * flat[slow])
    fast = np.setdiff1d(np.arange(20), slow)
    np.testing.assert_allclose(speed[fast], flat[fast])
    assert not np.array_equal(model.draw(20, seed=5)[1], slow) or not np.allclose(model.draw(20, seed=5)[0], speed)


def test_a_sync_round_lasts_as_long_as_its_slowest_sampled_client(stragglers) -> None:
    import fl_quality

    settings = fl_quality.Settings(clients=6, per_round=3, rounds=2, epochs=2, batch=16, lr=0.05, alpha=0.3,
                                   fedadam_eta=0.03, fedadam_tau=1e-3)
    fed = fl_quality.Federation(np.zeros((60, 2)), np.zeros(60), [np.arange(10 * c, 10 * c + 1 + c) for c in
                                                                   range(6)], np.zeros((1, 2)), np.zeros(1))
    speed = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 60.0])
    run = fl_quality.Run("ours-fedavg-f32", seed=0, accuracy=[0.5, 0.9])
    timed = stragglers.sync_timed(run, fed, settings, speed)
    lasts = [max(speed[c] * len(fed.clients[c]) * 2 for c in fl_quality.participants(settings, 0, r)) for r in (1, 2)]
    assert timed.times == pytest.approx([lasts[0], lasts[0] + lasts[1]])
    assert timed.time_to(0.9) == pytest.approx(lasts[0] + lasts[1]) and timed.trainings == 6


def test_time_held_is_when_the_curve_last_comes_up_to_the_target(stragglers) -> None:
    run = stragglers.TimedRun("ours-fedbuff", 0, times=[1.0, 2.0, 3.0, 4.0], accuracy=[0.95, 0.8, 0.91, 0.92])
    assert run.time_to(0.9) == 1.0 and run.time_held(0.9) == 3.0
    assert stragglers.TimedRun("x", 0, times=[1.0, 2.0], accuracy=[0.95, 0.8]).time_held(0.9) is None


@pytest.mark.slow
def test_tiny_straggler_run_prints_the_table_and_writes_the_figures(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH), "--stragglers", "--clients", "6", "--per-round", "3", "--rounds", "3",
           "--seeds", "1", "--buffer", "2", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "30% of clients 10x slower" in run.stdout and "time to 90%" in run.stdout
    figures = json.loads((tmp_path / "fl_stragglers.json").read_text())
    summary = figures["summary"]
    assert summary["ours-fedbuff"]["trainings"] == summary["ours-fedavg-f32"]["trainings"] == 9
    assert figures["buffer"] == {"buffer": 2, "max_staleness": 10, "weighting": "polynomial", "exponent": 0.5}
    sync, fedbuff = (next(r for r in figures["runs"] if r["method"] == m) for m in ("ours-fedavg-f32", "ours-fedbuff"))
    assert len(sync["accuracy"]) == 3 and len(fedbuff["accuracy"]) == 4  # 9 trainings, a version every 2
    assert fedbuff["times"] == sorted(fedbuff["times"]) and fedbuff["times"][-1] < sync["times"][-1]
    assert (tmp_path / "fl_stragglers.png").read_bytes().startswith(b"\x89PNG")
