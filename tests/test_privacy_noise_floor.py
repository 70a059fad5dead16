"""Numbers that broke the privacy accounting: a noise multiplier so small that dp-accounting's epsilon is infinite
(1e-300) or absurd (1e-6) started, counted a round in the ledger and then published an infinite epsilon in
/v1/status (``Infinity``, which is not JSON) or died signing the release; a budget of inf passed the library's
checks. Now such settings are refused at start-up in one line, and the ledger never counts a round it cannot give a
finite epsilon for (docs/privacy.md, "Choosing the noise", the floor)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.privacy import MIN_NOISE_MULTIPLIER, DPConfig, PrivacyError, PrivacyLedger, RoundNoise, epsilon
from flctl.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
DELTA = 1e-5


def _serve(state: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "serve", "--init", "--state", str(state), "--synthetic-parameters",
         "10", "--listen", f"127.0.0.1:{free_port()}", "--clip-norm", "1", *options],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )


@pytest.mark.parametrize("z", ["1e-300", "1e-6", "0.0009"])
@pytest.mark.parametrize("mode", [["--dp", "central"], ["--dp", "distributed", "--secure-aggregation"]])
def test_serve_refuses_a_noise_multiplier_below_the_floor_in_one_line(tmp_path: Path, z: str, mode: list[str]) -> None:
    state = tmp_path / "state"
    done = _serve(state, *mode, "--dp-noise-multiplier", z)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"--dp-noise-multiplier {float(z):g} is below {MIN_NOISE_MULTIPLIER:g}" in line, line
    assert "epsilon" in line and "--dp-delta 1e-05" in line, line
    assert not state.exists()


def test_the_refusal_says_the_epsilon_of_one_round_or_that_there_is_none() -> None:
    with pytest.raises(PrivacyError, match=r"one round alone would spend epsilon 5\.5e\+11 at --dp-delta 1e-05"):
        DPConfig(1e-6, DELTA)
    with pytest.raises(PrivacyError, match="dp-accounting gives no finite epsilon for one round"):
        DPConfig(1e-300, DELTA)


def test_the_floor_itself_and_the_demos_smallest_noise_are_accepted() -> None:
    """The floor is far below any noise a run has used (the demo's DP test uses 0.005, docs/privacy.md's tables
    0.03), and one round there still has a finite epsilon."""
    for z in (MIN_NOISE_MULTIPLIER, 0.005, 0.03):
        DPConfig(z, DELTA)
    assert epsilon([MIN_NOISE_MULTIPLIER] * 1000, 1e-300) < 1e12


@pytest.mark.parametrize("budget", [float("inf"), float("nan"), 0.0])
def test_a_budget_that_is_not_a_finite_positive_number_is_refused(budget: float) -> None:
    """inf passed ``not budget > 0`` and reached /v1/status as ``Infinity`` (flctl demo takes any float)."""
    with pytest.raises(PrivacyError, match="--dp-epsilon-budget must be positive and finite"):
        DPConfig(1.0, DELTA, epsilon_budget=budget)


def test_demo_refuses_a_budget_of_inf_in_one_line() -> None:
    import argparse

    from flctl.demo import add_parser, privacy_settings

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit, match="flctl demo: --dp-epsilon-budget must be positive and finite, got inf"):
        privacy_settings(parser.parse_args(["demo", "--dp-noise-multiplier", "1", "--dp-epsilon-budget", "inf"]))


def test_the_accountant_refuses_an_infinite_epsilon() -> None:
    with pytest.raises(PrivacyError, match="no finite epsilon"):
        epsilon([1.0, 1e-300], DELTA)


def test_a_round_without_a_finite_epsilon_is_never_counted(tmp_path: Path) -> None:
    """A distributed round whose sum held (through some path the start-up checks did not see) noise with no finite
    epsilon: the budget check says no round, and counting it is refused with nothing written."""
    ledger = PrivacyLedger(tmp_path, DPConfig(1.0, DELTA, mode="distributed"))
    ledger.record_round(RoundNoise(1.0, 0.0))
    before = (tmp_path / "privacy.json").read_bytes()
    tiny = RoundNoise(1e-300, 0.0)
    assert not ledger.budget_allows_next_round(tiny)
    assert "no finite epsilon" in (ledger.next_round_refusal(tiny) or "")
    with pytest.raises(PrivacyError, match="no finite epsilon"):
        ledger.record_round(tiny)
    with pytest.raises(PrivacyError, match="no finite epsilon"):
        ledger.begin_unmask(2, tiny)
    assert (tmp_path / "privacy.json").read_bytes() == before
    assert ledger.rounds == [1.0] and ledger.unmasking is None
    assert ledger.spent() == pytest.approx(epsilon([1.0], DELTA), rel=1e-12)


def test_a_ledger_that_counts_a_round_without_a_finite_epsilon_is_refused_in_one_line(tmp_path: Path) -> None:
    """The previous version counted a round at --dp-noise-multiplier 1e-300 before it failed to sign its release:
    the state's ledger then gave epsilon inf. Loading it is refused, naming the file, never an Infinity in
    /v1/status."""
    (tmp_path / "privacy.json").write_text(json.dumps({"mode": "central", "delta": DELTA,
                                                       "noise_multipliers": [1e-300]}))
    with pytest.raises(PrivacyError) as refused:
        PrivacyLedger(tmp_path, DPConfig(1.0, DELTA))
    message = str(refused.value)
    assert "privacy.json" in message and "no finite epsilon" in message and "\n" not in message, message


def test_a_ledger_whose_clip_history_holds_a_non_finite_number_is_refused(tmp_path: Path) -> None:
    """The clip history goes to /v1/status as it is: an Infinity in it (a hand-edited file: Python's json reads it)
    would have made the status unreadable."""
    (tmp_path / "privacy.json").write_text(
        '{"mode": "central", "delta": 1e-05, "noise_multipliers": [1.0], "clip_count_noise_multipliers": [10.0], '
        '"clip_norm": 1.0, "clip_history": [{"version": 1, "clip_norm": Infinity, "within": 0.5}]}')
    with pytest.raises(PrivacyError, match="clip_history") as refused:
        PrivacyLedger(tmp_path, DPConfig(1.0, DELTA))
    assert "\n" not in str(refused.value)


def test_the_accountant_composes_each_noise_multiplier_once_whatever_the_order(monkeypatch) -> None:
    """A distributed round's sum holds a noise multiplier that depends on its survivors, so a long run alternates
    between a few values. Each /v1/status and each round's end now computes epsilon even without a budget (the
    finite check), and composing one event per change of value cost about 0.3 s per call after 2000 rounds (in
    the event loop at a round's end); composition is order-free, so each value is composed once, with its count."""
    from dp_accounting import rdp

    composed: list[float] = []
    compose = rdp.RdpAccountant.compose

    def counting(self, event, count=1):
        composed.append(event.noise_multiplier)
        return compose(self, event, count)

    monkeypatch.setattr(rdp.RdpAccountant, "compose", counting)
    survivors = [2.0, 2.5, 3.0] * 400
    alternating = epsilon(survivors, DELTA)
    assert sorted(composed) == [2.0, 2.5, 3.0]
    assert alternating == pytest.approx(epsilon(sorted(survivors), DELTA), rel=1e-12)
