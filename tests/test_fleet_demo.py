"""End to end on loopback: the demo as a user runs it, shortened, and a fleet of real agent processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_shortened_demo_prints_the_table_writes_the_plot_and_exits_0(tmp_path):
    out = tmp_path / "demo"
    flctl = Path(sys.executable).parent / "flctl"
    run = subprocess.run(
        [str(flctl), "demo", "--devices", "2", "--rounds", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Summary" in run.stdout and "improved" in run.stdout
    png = (out / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert [r["model_version"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][-1]["accuracy"] > summary["baseline"]["accuracy"]
    assert all(r["participants"] == 2 for r in summary["rounds"])
    assert (out / "prometheus" / "prometheus.yml").exists()


def test_demo_refuses_to_overwrite_a_directory_that_is_not_its_own(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    flctl = Path(sys.executable).parent / "flctl"
    run = subprocess.run([str(flctl), "demo", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "is not a demo directory" in run.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def fleet_processes(pid: int) -> dict[int, str]:
    """The demo's children that are fleet members (pid -> cmdline), read from /proc."""
    found = {}
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in (children.read_text().split() if children.exists() else []):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        if "fl-agent" in cmdline or "fl-aggregator" in cmdline:
            found[int(child)] = cmdline
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_demo_stopped_by_sigterm_stops_its_aggregator_and_agents(tmp_path):
    flctl = Path(sys.executable).parent / "flctl"
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen(
            [str(flctl), "demo", "--devices", "2", "--rounds", "1000", "--epochs", "1", "--samples", "64",
             "--out", str(tmp_path / "demo")],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        fleet: dict[int, str] = {}
        deadline = time.monotonic() + 300
        while len(fleet) < 3:  # the aggregator and two agents
            assert demo.poll() is None, f"the demo exited ({demo.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"fleet not started: {fleet}\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
            fleet = fleet_processes(demo.pid)
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    said = log.read_text()
    assert code == 128 + signal.SIGTERM, said[-3000:]
    assert "stopped by SIGTERM; the fleet is stopped" in said
    left = {pid: cmd for pid, cmd in fleet.items() if running(pid)}
    assert not left, f"left running after the demo: {left}"


def test_three_agent_processes_complete_three_rounds_and_the_model_improves(tmp_path):
    from flctl.demo import Evaluator
    from flctl.fleet import Fleet
    from flctl.model import export_reference_package

    fleet = Fleet(root=tmp_path / "fleet", devices=3, rounds=3, round_timeout=300)
    fleet.prepare(export_reference_package)
    fleet.start()
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = fleet.status()
            if status["model"]["version"] >= 3:
                break
            assert all(d.process.poll() is None for d in fleet.members), f"an agent died; logs in {fleet.logs}"
            time.sleep(1)
        assert status["model"]["version"] == 3, f"model stuck at v{status['model']['version']}; logs {fleet.logs}"
        published = [r for r in status["rounds"] if r["status"] == "published"]
        assert len(published) == 3 and all(r["participants"] == 3 for r in published)
        evaluator = Evaluator(fleet)
        before, _ = evaluator.evaluate(0)
        after, _ = evaluator.evaluate(3)
        assert after["accuracy"] > before["accuracy"] + 0.05
    finally:
        fleet.stop()
