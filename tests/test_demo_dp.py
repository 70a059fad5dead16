"""`flctl demo --dp-noise-multiplier`: epsilon per round in the summary, from the signed releases, as dp-accounting
gives it for the same parameters; the budget ends the demo; bad settings are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import rdp

FLCTL = Path(sys.executable).parent / "flctl"


def rdp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Computed here, independently of aggregator.privacy: one Gaussian mechanism per round, no sampling."""
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.slow
def test_demo_with_dp_reports_epsilon_per_round_as_dp_accounting_and_stops_at_the_budget(tmp_path):
    z, delta = 0.005, 1e-5  # little noise, so two devices still learn; the accounting is what is checked
    budget = (rdp_epsilon(z, 2, delta) + rdp_epsilon(z, 3, delta)) / 2  # room for two rounds, not three
    out = tmp_path / "demo"
    run = subprocess.run(
        [str(FLCTL), "demo", "--devices", "2", "--rounds", "3", "--dp-noise-multiplier", str(z),
         "--dp-epsilon-budget", str(budget), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["model_version"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["epsilon"] == pytest.approx(rdp_epsilon(z, r["model_version"], delta), rel=1e-9)
    privacy = summary["privacy"]
    assert privacy["exhausted"] is True and privacy["rounds"] == 2 and privacy["delta"] == delta
    assert privacy["epsilon"] == pytest.approx(rdp_epsilon(z, 2, delta), rel=1e-9)
    said = run.stdout
    assert "epsilon" in said.split("Summary", 1)[1].splitlines()[2]  # a column of the summary table
    for r in rounds:
        assert f"{r['epsilon']:.3g}" in said
    assert f"privacy budget reached: epsilon {rdp_epsilon(z, 2, delta):.3g} of {budget:g} after v2" in said
    assert f"epsilon {rdp_epsilon(z, 2, delta):.3g} at delta 1e-05 after 2 noised round(s)" in said
    assert "noise std on the mean 0.01 per parameter with 2 devices" in said  # z * S / n, with the default S = 4
    png = (out / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--dp-epsilon-budget", "3"], "--dp-epsilon-budget goes with --dp-noise-multiplier"),
        (["--dp-noise-multiplier", "-1"], "--dp-noise-multiplier must be positive, got -1.0"),
        (["--dp-noise-multiplier", "inf"], "--dp-noise-multiplier must be a finite number, got inf"),  # inf is positive
        (["--dp-noise-multiplier", "1", "--dp-epsilon-budget", "0"], "--dp-epsilon-budget must be positive"),
        (["--dp-noise-multiplier", "1", "--strategy", "median"], "median selects or ranks individual updates"),
        (["--clip-norm", "-2"], "--clip-norm must be positive, got -2.0"),
    ],
)
def test_demo_refuses_bad_privacy_settings_in_one_line_before_creating_anything(tmp_path, options, reason):
    out = tmp_path / "demo"
    run = subprocess.run([str(FLCTL), "demo", *options, "--out", str(out)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode != 0
    assert reason in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not out.exists()


def test_rounds_abandoned_since_the_last_published_one_are_what_stops_the_demo():
    from flctl.demo import _abandoned_in_a_row

    def status(*states):
        return {"rounds": [{"round": i + 1, "status": s, "note": f"note {i + 1}"} for i, s in enumerate(states)]}

    # newest first; an open round in between does not reset the count, a published one does
    stalled = _abandoned_in_a_row(status("published", "abandoned", "abandoned", "collecting"))
    assert [r["round"] for r in stalled] == [3, 2]
    assert _abandoned_in_a_row(status("abandoned", "published", "collecting")) == []


def test_the_budget_ends_the_demo_only_once_no_round_is_open_and_every_version_was_seen():
    from flctl.demo import _budget_exhausted

    privacy = {"exhausted": True, "epsilon": 295.3, "epsilon_budget": 300.0}
    done = {"privacy": privacy, "current_round": None, "model": {"version": 4}}
    assert _budget_exhausted(done, 4) == (
        "privacy budget reached: epsilon 295 of 300 after v4; the aggregator opens no more rounds and v4 stays "
        "published"
    )
    assert _budget_exhausted(done, 3) is None  # v4 not evaluated yet
    assert _budget_exhausted({**done, "current_round": {"round": 5}}, 4) is None
    assert _budget_exhausted({**done, "privacy": {**privacy, "exhausted": False}}, 4) is None
    assert _budget_exhausted({**done, "privacy": None}, 4) is None
