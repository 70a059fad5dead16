"""`flctl demo --secure-aggregation --dp-noise-multiplier Z --dp-mode distributed`: the devices add the noise
inside secure aggregation, and the summary reports the epsilon dp-accounting gives for the noise each round's
sum held; --dp-mode distributed without --secure-aggregation is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting import rdp

FLCTL = sys.executable.rsplit("/", 1)[0] + "/flctl"


def rdp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.slow
def test_demo_with_distributed_dp_reports_the_epsilon_of_the_noise_the_devices_added(tmp_path):
    z, delta = 0.005, 1e-5  # little noise, so two devices still learn; the accounting is what is checked
    out = tmp_path / "demo"
    run = subprocess.run(
        [FLCTL, "demo", "--devices", "2", "--rounds", "2", "--secure-aggregation", "--dp-noise-multiplier", str(z),
         "--dp-mode", "distributed", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["model_version"] for r in summary["rounds"]] == [1, 2]
    for r in summary["rounds"]:  # both devices in every sum: the noise multiplier is z, up to the levels' rounding
        assert r["epsilon"] == pytest.approx(rdp_epsilon(z, r["model_version"], delta), rel=1e-6)
    assert summary["privacy"]["mode"] == "distributed"
    assert "differential privacy (distributed, per device): epsilon" in run.stdout
    assert "the sum of the devices' updates" in run.stdout


def test_demo_refuses_distributed_dp_without_secure_aggregation_in_one_line(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([FLCTL, "demo", "--dp-noise-multiplier", "1", "--dp-mode", "distributed", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode != 0
    assert "--dp distributed needs --secure-aggregation" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not out.exists()
