"""STATE/privacy.json across versions and damage: a ledger written by an earlier fl-aggregator (before sums unmasked
but not published were counted, before the unmask was written ahead) loads and accounts exactly as it did, and a
central ledger keeps its old fields; a damaged or hand-edited ledger stops the start in one line, never with a
traceback, and never with a guess at the privacy spent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.privacy import (
    PENDING_FILE,
    DPConfig,
    PendingRelease,
    PrivacyError,
    PrivacyLedger,
    RoundNoise,
    epsilon,
    recorded_dp,
)
from flctl.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
DELTA = 1e-5


def _ledger(state: Path, saved: Any, mode: str = "distributed") -> PrivacyLedger:
    (state / "privacy.json").write_text(saved if isinstance(saved, str) else json.dumps(saved))
    return PrivacyLedger(state, DPConfig(1.0, DELTA, mode=mode))


def test_a_distributed_ledger_of_the_previous_version_loads_and_accounts_the_same(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, {"delta": DELTA, "noise_multipliers": [1.0, 0.87], "rdp_slack": 0.25})
    assert ledger.spent() == pytest.approx(epsilon([1.0, 0.87], DELTA, 0.25), rel=1e-12)


def test_a_ledger_with_unpublished_sums_loads_and_counts_them(tmp_path: Path) -> None:
    """As 963191e wrote it: a sum unmasked and abandoned, beside the published rounds."""
    ledger = _ledger(tmp_path, {"delta": DELTA, "noise_multipliers": [1.0], "unpublished_noise_multipliers": [0.5]})
    assert ledger.spent() == pytest.approx(epsilon([1.0, 0.5], DELTA), rel=1e-12)


def test_a_central_ledger_keeps_its_fields_when_a_round_is_counted(tmp_path: Path) -> None:
    """A central ledger never holds the distributed fields: the file reads as every version wrote it, with the mode
    a restart compares (tests/test_privacy_restart.py) beside them."""
    ledger = _ledger(tmp_path, {"delta": DELTA, "noise_multipliers": [1.0]}, mode="central")
    ledger.record_round()
    assert json.loads((tmp_path / "privacy.json").read_text()) == {
        "mode": "central", "delta": DELTA, "noise_multipliers": [1.0, 1.0]}
    assert ledger.spent() == pytest.approx(epsilon([1.0, 1.0], DELTA), rel=1e-12)


def test_the_unmask_written_ahead_counts_until_it_is_settled_once(tmp_path: Path) -> None:
    """Written before the unmask, the entry counts (and a restart reads it); an abandonment keeps it counted as a
    sum not published; a second round published settles its own entry into a published round, never twice."""
    ledger = _ledger(tmp_path, {"delta": DELTA, "noise_multipliers": []})
    noise = RoundNoise(1.0, 0.0)
    assert ledger.begin_unmask(1, noise) and not ledger.begin_unmask(1, noise)
    one = epsilon([1.0], DELTA)
    assert ledger.spent() == pytest.approx(one, rel=1e-12)
    again = PrivacyLedger(tmp_path, DPConfig(1.0, DELTA, mode="distributed"))
    assert again.unmasking is not None and again.unmasking.round_id == 1
    assert again.spent() == pytest.approx(one, rel=1e-12)
    assert again.unmask_abandoned() == pytest.approx(one, rel=1e-12)
    assert again.begin_unmask(2, noise)
    assert again.spent() == pytest.approx(epsilon([1.0, 1.0], DELTA), rel=1e-12)


@pytest.mark.parametrize(("saved", "named"), [
    ('{"delta": 1e-05, "noise_multipliers": [', "is not JSON"),
    ("[]", "is not a JSON object"),
    ({"delta": DELTA}, "noise_multipliers"),
    ({"delta": "x", "noise_multipliers": []}, "delta"),
    ({"delta": DELTA, "noise_multipliers": [1.0, None]}, "noise_multipliers"),
    ({"delta": DELTA, "noise_multipliers": [], "rdp_slack": -1}, "rdp_slack"),
    ({"delta": DELTA, "noise_multipliers": [], "unpublished_noise_multipliers": "x"}, "unpublished_noise_multipliers"),
    ({"delta": DELTA, "noise_multipliers": [], "unpublished_noise_multipliers": [-1]}, "unpublished_noise_multipliers"),
    ({"delta": DELTA, "noise_multipliers": [], "unpublished_noise_multipliers": [1e400]}, "unpublished"),
    ({"delta": DELTA, "noise_multipliers": [], "unpublished_noise_multipliers": [0]}, "unpublished"),
    ({"delta": DELTA, "noise_multipliers": [], "unmasking": {"round": 1}}, "unmasking"),
    ({"delta": DELTA, "noise_multipliers": [], "unmasking": 3}, "unmasking"),
    ({"mode": "local", "delta": DELTA, "noise_multipliers": []}, "mode"),
    ({"delta": DELTA, "noise_multipliers": [], "unmasking": {"round": 0, "noise_multiplier": 1.0, "rdp_slack": 0}},
     "unmasking"),
    ({"delta": DELTA, "noise_multipliers": [], "unmasking": {"round": True, "noise_multiplier": 1.0, "rdp_slack": 0}},
     "unmasking"),
    ('{"mode": "distributed", "delta": 1e-05, "noise_multipliers": [1.0], "clip_count_noise_multipliers": [10.0], '
     '"clip_norm": 1.0, "clip_history": [{"version": 1, "clip_norm": 1.0, "within": NaN}]}', "clip_history"),
    ({"delta": DELTA, "noise_multipliers": [1.0, True]}, "noise_multipliers true"),  # not read as 1.0
    ({"delta": DELTA, "noise_multipliers": 1.0}, "not a list of noise multipliers"),
    ('{"mode": "distributed", "delta": 1e-05, "noise_multipliers": [1.0], "clip_count_noise_multipliers": [10.0], '
     '"clip_norm": 1.0, "clip_history": [[1, 1.0, 0.5]]}', "clip_history"),
    ('{"mode": "distributed", "delta": 1e-05, "noise_multipliers": [1.0], "clip_count_noise_multipliers": [10.0], '
     '"clip_norm": 1.0, "clip_history": [{"version": "1", "clip_norm": 1.0, "within": 0.5}]}', "clip_history"),
])
def test_a_damaged_ledger_is_refused_in_one_line(tmp_path: Path, saved: Any, named: str) -> None:
    with pytest.raises(PrivacyError) as refused:
        _ledger(tmp_path, saved)
    message = str(refused.value)
    assert "privacy.json" in message and named in message and "\n" not in message, message


@pytest.mark.parametrize("saved", ['{"delta": 1e-05, "noise_multipliers": [',
                                   '{"delta": 1e-05, "noise_multipliers": [], "unpublished_noise_multipliers": "x"}'])
def test_serve_refuses_a_damaged_ledger_in_one_line(tmp_path: Path, saved: str) -> None:
    state = tmp_path / "state"
    subprocess.run([sys.executable, "-m", "aggregator.cli", "keygen", "--state", str(state)], cwd=ROOT, check=True,
                   capture_output=True, timeout=60)
    (state / "privacy.json").write_text(saved)
    done = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--synthetic-parameters", "10",
         "--listen", f"127.0.0.1:{free_port()}", "--clip-norm", "1", "--secure-aggregation", "--dp", "distributed",
         "--dp-noise-multiplier", "1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "privacy.json" in lines[0], done.stderr


@pytest.mark.parametrize(("config", "named"), [
    (DPConfig(1.0, 1e-6, mode="distributed"), "delta"),
    (DPConfig(1.0, DELTA, mode="central"), "--dp distributed"),
])
def test_a_ledger_is_not_taken_over_by_another_delta_or_mode(tmp_path: Path, config: DPConfig, named: str) -> None:
    """The ledger itself refuses to go on counting under a delta or a mode that is not the one its rounds were
    counted under, whoever opens it (serve compares the recorded settings first; the demo and tools do not)."""
    (tmp_path / "privacy.json").write_text(json.dumps({"mode": "distributed", "delta": DELTA,
                                                      "noise_multipliers": [1.0]}))
    with pytest.raises(PrivacyError) as refused:
        PrivacyLedger(tmp_path, config)
    assert named in str(refused.value) and "cannot change mid-way" in str(refused.value)


def test_the_recorded_settings_name_a_mode_no_version_wrote_in_one_line(tmp_path: Path) -> None:
    """What a restart compares its flags with (aggregator/privacy_restart.py) refuses a hand-edited mode, rather than
    reporting rounds counted under "--dp local"."""
    (tmp_path / "privacy.json").write_text(json.dumps({"mode": "local", "delta": DELTA, "noise_multipliers": [1.0]}))
    with pytest.raises(PrivacyError, match="mode") as refused:
        recorded_dp(tmp_path)
    assert "privacy.json" in str(refused.value) and "\n" not in str(refused.value)


def test_the_recorded_settings_count_the_pending_round_a_crash_left_before_the_ledger(tmp_path: Path) -> None:
    """A crash between the pending model's write and the ledger's: the pending file counts one round more, and it is
    what a restart holds its flags to."""
    (tmp_path / "privacy.json").write_text(json.dumps({"mode": "central", "delta": DELTA, "noise_multipliers": [1.0]}))
    newer = {"mode": "central", "delta": DELTA, "noise_multipliers": [1.0, 0.5]}
    release = PendingRelease(round_id=2, version=2, closed_at=1.0, participants=3, samples=30, note="",
                             params=np.zeros(4, dtype=np.float32), strategy_state={})
    (tmp_path / PENDING_FILE).write_bytes(release.encode(newer))
    recorded = recorded_dp(tmp_path)
    assert recorded is not None
    assert (recorded.source.name, recorded.rounds, recorded.last_noise_multiplier) == (PENDING_FILE, 2, 0.5)
