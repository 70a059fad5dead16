"""The Prometheus config `flctl qemu run|env` writes into its work dir: file_sd targets for every appliance's
forwarded metrics port (and the host aggregator when the rig knows its port), accepted by promtool.
No guest is booted: the appliances are the rig's own `Appliance` objects with fresh identities."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import time
import urllib.request

import pytest
from rich.console import Console

from flctl.prometheus import ScrapeConfigError
from flctl.qemu import cli as qemu
from flctl.qemu import rig as qemu_rig


def appliances(workdir, ports):
    return [
        qemu_rig.Appliance(f"fl{i}", workdir, qemu_rig.Identity.generate(), metrics_port=port, aggregator_port=8080)
        for i, port in enumerate(ports)
    ]


def targets_by_device(path):
    groups = json.loads(path.read_text())
    return {g["labels"]["device"]: (g["targets"], g["labels"]["role"]) for g in groups}


def promtool_check(config):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is missing: Debian's prometheus package is not installed")
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, f"promtool check config {config}:\n{check.stdout}{check.stderr}"


def test_rig_config_scrapes_every_appliance_and_the_aggregator(tmp_path):
    out = io.StringIO()
    rig = appliances(tmp_path, [40101, 40102])
    config = qemu.write_prometheus_config(tmp_path, rig, 8080, Console(file=out, width=80))

    assert config == tmp_path / "prometheus" / "prometheus.yml"
    targets = tmp_path / "prometheus" / "targets"
    assert targets_by_device(targets / "appliances.json") == {
        "fl0": (["127.0.0.1:40101"], "appliance"),
        "fl1": (["127.0.0.1:40102"], "appliance"),
    }
    assert json.loads((targets / "aggregator.json").read_text()) == [
        {"targets": ["127.0.0.1:8080"], "labels": {"role": "aggregator"}}
    ]
    text = config.read_text()
    assert "job_name: fl-aggregator" in text and "job_name: fl-agent" in text
    # The user is told where the config is and gets a command line to paste, unbroken by wrapping.
    run = re.search(r"^  run: (prometheus .*)$", out.getvalue(), re.MULTILINE)
    assert run and f"--config.file={config} " in run.group(1)
    promtool_check(config)


def test_without_an_aggregator_port_there_is_no_aggregator_job(tmp_path):
    stale = tmp_path / "prometheus" / "targets" / "aggregator.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('[{"targets": ["127.0.0.1:1"], "labels": {"role": "aggregator"}}]')

    config = qemu.write_prometheus_config(tmp_path, appliances(tmp_path, [40103]), None, Console(file=io.StringIO()))

    assert "fl-aggregator" not in config.read_text()
    assert not stale.exists(), "a target left from an earlier run would still be scraped"
    assert targets_by_device(config.parent / "targets" / "appliances.json") == {
        "fl0": (["127.0.0.1:40103"], "appliance")
    }
    promtool_check(config)


def test_relative_workdir_and_odd_characters_still_give_a_config_promtool_accepts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "rig 'one'"
    config = qemu.write_prometheus_config(
        workdir.relative_to(tmp_path), appliances(workdir, [40104]), 8080, Console(file=io.StringIO())
    )
    assert config.is_absolute(), "file_sd paths must not depend on the directory Prometheus starts in"
    promtool_check(config)


def test_an_impossible_port_is_refused_naming_the_target(tmp_path):
    with pytest.raises(
        ScrapeConfigError,
        match=re.escape("aggregator: expected host:port with a port in 1-65535, got '127.0.0.1:70000'"),
    ):
        qemu.write_prometheus_config(tmp_path, appliances(tmp_path, [40105]), 70000, Console(file=io.StringIO()))
    with pytest.raises(
        ScrapeConfigError,
        match=re.escape("appliance fl0: expected host:port with a port in 1-65535, got '127.0.0.1:0'"),
    ):
        qemu.write_prometheus_config(tmp_path, appliances(tmp_path, [0]), None, Console(file=io.StringIO()))


def test_qemu_run_refuses_an_aggregator_port_out_of_range(capsys):
    with pytest.raises(SystemExit) as exit_:
        qemu.main(["run", "--aggregator-port", "70000"])
    assert exit_.value.code == 2
    assert "expected a TCP port in 1-65535, got 70000" in capsys.readouterr().err


def test_the_printed_command_keeps_prometheus_data_beside_the_config_and_on_loopback(tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is missing: Debian's prometheus package is not installed")
    out = io.StringIO()
    config = qemu.write_prometheus_config(tmp_path / "rig", appliances(tmp_path, [40106]), 8080, Console(file=out))
    command = shlex.split(re.search(r"^  run: (prometheus .*)$", out.getvalue(), re.MULTILINE).group(1))
    listen = next(a.split("=", 1)[1] for a in command if a.startswith("--web.listen-address="))
    assert listen.startswith("127.0.0.1:"), "the UI and API (with its admin endpoints) stay on loopback"
    elsewhere = tmp_path / "started-here"
    elsewhere.mkdir()
    prom = subprocess.Popen(command, cwd=elsewhere, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready, give_up = False, time.monotonic() + 120
        while not ready:
            assert prom.poll() is None, f"prometheus exited ({prom.returncode}): {command}"
            assert time.monotonic() < give_up, f"prometheus never became ready on {listen}"
            try:
                with urllib.request.urlopen(f"http://{listen}/-/ready", timeout=2) as r:
                    ready = r.status == 200
            except OSError:
                time.sleep(0.2)
    finally:
        prom.terminate()
        prom.wait(timeout=30)
    assert (config.parent / "data").is_dir(), "the time series belong beside the config"
    assert not (elsewhere / "data").exists(), "Prometheus wrote ./data where it was started"
