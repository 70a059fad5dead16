"""Restarting a state served with --dp: `serve` refuses, in one line naming the recorded and the given settings, to
go on without DP or under another mode or delta (the published models promise one guarantee from the initial
model); the same settings, or a new noise multiplier or budget, go on counting in the same ledger; `--dp-reset`
without --dp stops DP on purpose, retiring the ledger and saying in the log what is lost (docs/privacy.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from aggregator_harness import publish_rounds, run, running

from aggregator.privacy import DPConfig
from aggregator.rounds import RoundPolicy, TrainingPlan
from appliance.identity import write_key_file
from flctl.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PARAMETERS = 50  # the harness's synthetic model, served again by `serve --synthetic-parameters`


@pytest.fixture
def dp_state(tmp_path: Path) -> Path:
    """A state that published one version under --dp central (delta 1e-5), with its key on disk for `serve`."""
    state = tmp_path / "state"

    async def go() -> None:
        policy = RoundPolicy(min_clients=2, goal_clients=2, round_timeout=60)
        async with running(state, devices=2, parameters=PARAMETERS, policy=policy,
                           plan=TrainingPlan(clip_norm=1.0), privacy=DPConfig(noise_multiplier=1.0)) as h:
            await publish_rounds(h, 1)
            write_key_file(state / "aggregator.key", bytes(h.key), 0o600)

    run(go())
    assert json.loads((state / "privacy.json").read_text())["mode"] == "central"
    return state


def _serve(state: Path, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
            "--synthetic-parameters", str(PARAMETERS), "--clip-norm", "1", *flags]


def _refused(state: Path, *flags: str) -> str:
    done = subprocess.run(_serve(state, free_port(), *flags), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def _status_of_running(state: Path, *flags: str) -> tuple[dict, str]:
    """Start `serve`, read /v1/status once it answers, stop it; returns the status and what it logged."""
    port = free_port()
    proc = subprocess.Popen(_serve(state, port, *flags), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=2) as response:
                    status = json.load(response)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        else:
            pytest.fail("serve never answered /v1/status")
    finally:
        proc.terminate()
        _, logged = proc.communicate(timeout=30)
    return status, logged


def test_a_restart_without_dp_is_refused_in_one_line(dp_state: Path) -> None:
    line = _refused(dp_state)
    assert "records --dp central --dp-delta 1e-05 (1 noised rounds counted" in line, line
    assert "given no --dp" in line and "--dp-reset" in line, line
    assert (dp_state / "privacy.json").exists()


@pytest.mark.parametrize(("flags", "given", "problem"), [
    (["--dp", "distributed", "--secure-aggregation"], "given --dp distributed --dp-delta 1e-05", "mode would change"),
    (["--dp", "central", "--dp-delta", "1e-6"], "given --dp central --dp-delta 1e-06", "delta would change"),
])
def test_a_restart_under_another_mode_or_delta_is_refused(dp_state: Path, flags: list[str], given: str,
                                                          problem: str) -> None:
    line = _refused(dp_state, *flags, "--dp-noise-multiplier", "1")
    assert "records --dp central --dp-delta 1e-05" in line and given in line and problem in line, line


def test_the_same_settings_or_a_new_noise_multiplier_go_on_counting_in_the_ledger(dp_state: Path) -> None:
    status, _ = _status_of_running(dp_state, "--dp", "central", "--dp-noise-multiplier", "2",
                                   "--dp-epsilon-budget", "50")
    assert (status["model"]["version"], status["privacy"]["rounds"]) == (1, 1)
    assert status["privacy"]["epsilon"] > 0


def test_dp_reset_stops_dp_retiring_the_ledger_and_logs_what_is_lost(dp_state: Path) -> None:
    line = _refused(dp_state, "--dp", "central", "--dp-noise-multiplier", "1", "--dp-reset")
    assert "--dp-reset goes without --dp" in line and (dp_state / "privacy.json").exists(), line

    status, logged = _status_of_running(dp_state, "--dp-reset")
    assert status["privacy"] is None and status["model"]["version"] == 1
    assert not (dp_state / "privacy.json").exists()
    retired = list(dp_state.glob("privacy-retired-*.json"))
    assert len(retired) == 1 and json.loads(retired[0].read_text())["noise_multipliers"] == [1.0]
    warning = next(entry for entry in logged.splitlines() if "--dp-reset" in entry)
    assert "WARNING" in warning and retired[0].name in warning and "no differential privacy guarantee" in warning

    line = _refused(dp_state, "--dp", "central", "--dp-noise-multiplier", "1")  # DP cannot resume on this state
    assert "published 1 versions but 0 were trained with DP noise" in line, line


def test_a_ledger_written_before_it_recorded_its_mode_is_held_to_the_mode_its_releases_state(dp_state: Path) -> None:
    """A ledger of the previous version has no mode: it was not compared, so --dp distributed served on a central
    state (and its next write recorded "distributed"). The newest signed release states the mode instead."""
    ledger = dp_state / "privacy.json"
    saved = json.loads(ledger.read_text())
    del saved["mode"]
    ledger.write_text(json.dumps(saved))
    line = _refused(dp_state, "--dp", "distributed", "--secure-aggregation", "--dp-noise-multiplier", "1")
    assert "records --dp central --dp-delta 1e-05" in line and "mode would change" in line, line
    assert "mode" not in json.loads(ledger.read_text())


def test_a_ledger_that_counts_no_round_does_not_hold_a_restart_without_dp(tmp_path: Path) -> None:
    """A distributed state whose first unmask failed (too few shares) keeps a ledger counting nothing: no release
    promises a guarantee, yet a restart without --dp was refused, pointing to --dp-reset and its 'DP can never
    resume', which is not so for a state that published nothing."""
    state = tmp_path / "state"
    subprocess.run([sys.executable, "-m", "aggregator.cli", "keygen", "--state", str(state)], cwd=ROOT, check=True,
                   capture_output=True)
    (state / "privacy.json").write_text(json.dumps({"mode": "distributed", "delta": 1e-5, "noise_multipliers": []}))
    status, _ = _status_of_running(state)
    assert status["privacy"] is None and status["model"]["version"] == 0
    assert (state / "privacy.json").exists()


def test_dp_reset_retires_nothing_when_the_start_is_refused_for_something_else(dp_state: Path) -> None:
    """The ledger was retired first, then the start refused (here --tls-cert without --tls-key): the state had lost
    its ledger for a server that never served, and --dp could no longer restart it."""
    line = _refused(dp_state, "--dp-reset", "--tls-cert", str(dp_state / "cert.pem"))
    assert "--tls-cert and --tls-key go together" in line, line
    assert (dp_state / "privacy.json").exists() and not list(dp_state.glob("privacy-retired-*.json"))
