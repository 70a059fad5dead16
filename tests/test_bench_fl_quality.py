"""bench/fl_quality.py: the Dirichlet split it measures on, and a tiny run end to end (table, plot, figures)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "fl_quality.py"


def _bench():
    spec = importlib.util.spec_from_file_location("fl_quality", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fl_quality"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_dirichlet_split_partitions_every_sample_once_and_skews_labels_as_alpha_says():
    q = _bench()
    y = np.repeat(np.arange(10), 100)
    skewed = q.dirichlet_split(y, 20, 0.3, np.random.default_rng(0))
    mixed = q.dirichlet_split(y, 20, 100.0, np.random.default_rng(0))
    for parts in (skewed, mixed):
        joined = np.concatenate(parts)
        assert len(joined) == len(y) and len(np.unique(joined)) == len(y)
        assert min(len(p) for p in parts) >= 8

    def classes_held(parts):  # classes making up at least 10 % of a client's samples
        return np.median([np.sum(np.bincount(y[p], minlength=10) >= 0.1 * len(p)) for p in parts])

    assert classes_held(skewed) <= 4 < classes_held(mixed)


def test_dirichlet_split_refuses_impossible_requests():
    q = _bench()
    y = np.repeat(np.arange(10), 5)
    with pytest.raises(ValueError, match="cannot give 20 clients 8 samples"):
        q.dirichlet_split(y, 20, 0.3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="alpha > 0"):
        q.dirichlet_split(y, 2, 0.0, np.random.default_rng(0))


@pytest.mark.slow
def test_tiny_run_prints_the_table_writes_the_plot_and_counts_bytes_per_encoding(tmp_path):
    cmd = [sys.executable, str(BENCH), "--clients", "4", "--per-round", "4", "--rounds", "2", "--seeds", "1",
           "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "accuracy on the held-out set per round" in out and "rounds to 90%" in out
    for method in ("ours-fedavg-f32", "ours-fedavg-f16", "ours-fedavg-int8", "ours-fedadam-f32"):
        assert any(line.startswith(method) for line in out.splitlines()), method
    png = (tmp_path / "fl_quality.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    figures = json.loads((tmp_path / "fl_quality.json").read_text())
    summary = figures["summary"]
    assert all(len(r["accuracy"]) == 2 for r in figures["runs"])
    # two rounds of FedAvg on digits already learn something (chance is 0.1)
    assert summary["ours-fedavg-f32"]["final_accuracy"] > 0.5
    up = {m: summary[m]["up_bytes_per_round"] for m in ("ours-fedavg-f32", "ours-fedavg-f16", "ours-fedavg-int8")}
    assert up["ours-fedavg-int8"] < 0.3 * up["ours-fedavg-f32"] and up["ours-fedavg-f16"] < 0.55 * up["ours-fedavg-f32"]
    if "flower-fedavg" in summary:  # flwr found ($FLWR_PYTHON or this interpreter): same curve as ours
        assert figures["comparison"]["max_gap"] == 0.0
        assert figures["comparison"]["max_weight_gap"] < 1e-4
    else:
        assert "flwr not found" in out


def test_client_mix_split_gives_hundreds_of_clients_equal_shares_with_the_label_skew_alpha_says():
    q = _bench()
    y = np.repeat(np.arange(10), 144)[:1437]  # the size of digits' training set
    skewed = q.client_mix_split(y, 300, 0.3, np.random.default_rng(0))
    mixed = q.client_mix_split(y, 300, 100.0, np.random.default_rng(0))
    for parts in (skewed, mixed):
        joined = np.concatenate(parts)
        assert len(joined) == len(y) and len(np.unique(joined)) == len(y)
        assert {len(p) for p in parts} == {4, 5}

    def classes_held(parts):
        return np.median([len(np.unique(y[p])) for p in parts])

    assert classes_held(skewed) <= 3 < classes_held(mixed)
    with pytest.raises(ValueError, match="cannot give 300 clients one sample"):
        q.client_mix_split(y[:200], 300, 0.3, np.random.default_rng(0))


def test_noise_multiplier_for_a_target_epsilon_is_the_smallest_that_stays_within_it():
    q = _bench()
    from aggregator.privacy import epsilon

    for target, rounds in ((1.0, 20), (8.0, 20), (3.0, 2)):
        z = q.noise_multiplier_for(target, rounds, 1e-5)
        assert epsilon([z] * rounds, 1e-5) <= target < epsilon([z - 0.02] * rounds, 1e-5)


def test_the_epsilon_given_for_information_with_sampling_is_ours_at_rate_1_and_smaller_below():
    q = _bench()
    from aggregator.privacy import epsilon

    ours = epsilon([5.0] * 20, 1e-5)
    assert q.poisson_epsilon(5.0, 20, 1.0, 1e-5) == pytest.approx(ours, rel=1e-6)
    assert q.poisson_epsilon(5.0, 20, 0.5, 1e-5) < ours


@pytest.mark.slow
def test_tiny_dp_run_reports_accuracy_and_the_epsilon_dp_accounting_gives_beside_flower(tmp_path):
    import dp_accounting
    from dp_accounting import rdp

    cmd = [sys.executable, str(BENCH), "--dp", "--clients", "20", "--per-round", "10", "--rounds", "2", "--seeds",
           "1", "--dp-epsilons", "3,8", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "NO sampling amplification" in out and "for information only, NOT claimed" in out
    png = (tmp_path / "fl_quality_dp.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    figures = json.loads((tmp_path / "fl_quality_dp.json").read_text())
    assert all(len(r["accuracy"]) == 2 for r in figures["runs"])
    assert figures["reference_final_accuracy"] > 0.5  # without DP two rounds already learn (chance is 0.1)
    rows = figures["dp"]
    assert [r["target_epsilon"] for r in rows] == [3.0, 8.0]
    for row in rows:
        accountant = rdp.RdpAccountant()  # independently of the bench and of aggregator.privacy
        accountant.compose(dp_accounting.GaussianDpEvent(row["noise_multiplier"]), 2)
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert row["epsilon"] <= row["target_epsilon"]
        assert row["epsilon_if_poisson"] < row["epsilon"]  # half the clients per round
        assert row["noise_std_on_mean"] == pytest.approx(row["noise_multiplier"] * 0.5 / 10)
    methods = {r["method"] for r in figures["runs"]}
    assert {"ours-fedavg-f32", *(f"ours z={r['noise_multiplier']:g}" for r in rows)} <= methods
    if figures["flower_version"]:  # flwr found ($FLWR_PYTHON or this interpreter): its DP wrapper, same noise
        assert {f"flower z={r['noise_multiplier']:g}" for r in rows} <= methods
        assert all("gap" in r for r in rows)
    else:
        assert "flwr not found" in out
