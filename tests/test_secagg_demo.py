"""`flctl demo --secure-aggregation` as a user runs it: the aggregator sees only sums, and the model trains as well as
with plain FedAvg on the same seed.

"As well as" is held where it is a property of the protocol: the first round, trained from the same model on the
same frames, gives the same held-out accuracy (the sum is FedAvg's up to quantisation). From round 2 on, runs differ:
a perturbation below 10^-6 a parameter (secure aggregation's stochastic rounding, drawn from the devices' own
entropy, or just the order the aggregator sums updates in) changes later rounds. Before the reference CNN clipped its
gradients this was chaos (seed 0: plain 70.2 % in one run, 28.2 % after diverging at round 8 in another; secure runs
60.3-77.1 %); with clipping, plain ended at 74.4 % and 75.5 %, secure at 75.0 % and 77.1 % (docs/models.md,
"Gradient clipping"). The test still judges the mean of the last three rounds rather than the last: the secure run
is held to improving on round 1 by a wide margin and to ending no more than 10 points below plain (broken masks or
sums would leave it near the start). That the published model is FedAvg of the masked updates is asserted in
tests/test_secagg_aggregator.py; the comparison averaged over seeds and runs is bench/secagg_quality.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _demo(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[float]]:
    flctl = Path(sys.executable).parent / "flctl"
    run = subprocess.run(
        [str(flctl), "demo", "--devices", "8", "--rounds", "10", "--seed", "0", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["model_version"] for r in summary["rounds"]] == list(range(1, 11))
    return run, [r["accuracy"] for r in summary["rounds"]]


def test_the_secure_demo_trains_as_well_as_plain_fedavg_and_the_aggregator_saw_only_sums(tmp_path):
    _, plain = _demo(tmp_path / "plain")
    run, secure = _demo(tmp_path / "secure", "--secure-aggregation")
    text = " ".join(run.stdout.split())
    assert "the aggregator saw only masked inputs" in text
    assert "devices in each sum: round 1: 8," in text
    assert abs(secure[0] - plain[0]) <= 0.005
    last_three = sum(secure[-3:]) / 3
    assert last_three >= secure[0] + 0.15, secure
    assert last_three >= sum(plain[-3:]) / 3 - 0.10, (secure, plain)
