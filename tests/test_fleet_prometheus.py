"""Prometheus as users run it: a real Prometheus server scrapes a running loopback fleet through the
file_sd config `flctl demo` writes, and every endpoint passes `promtool check metrics`."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from flctl.demo import write_prometheus_config
from flctl.fleet import Fleet
from flctl.model import export_reference_package
from flctl.ports import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus package is not installed"),
]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def query(base: str, expr: str) -> list[dict]:
    answer = json.loads(fetch(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.fixture
def running_fleet(tmp_path):
    fleet = Fleet(root=tmp_path / "fleet", devices=2, rounds=2, samples_per_round=128, epochs=1, round_timeout=60)
    fleet.prepare(export_reference_package)
    fleet.start()
    yield fleet
    fleet.stop()


def wait_for_agent_metrics(fleet: Fleet, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for d in fleet.members:
                fetch(d.metrics_url)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"agent metrics endpoints did not come up; logs in {fleet.logs}")


def test_prometheus_scrapes_the_fleet_and_promtool_accepts_every_endpoint(running_fleet, tmp_path):
    fleet = running_fleet
    wait_for_agent_metrics(fleet)
    endpoints = [fleet.url + "/metrics"] + [d.metrics_url for d in fleet.members]
    for url in endpoints:
        check = subprocess.run(["promtool", "check", "metrics"], input=fetch(url), capture_output=True, text=True)
        assert check.returncode == 0, f"promtool check metrics {url}:\n{check.stdout}{check.stderr}"

    config = write_prometheus_config(fleet, tmp_path / "prom")
    port = free_port()
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        agents = aggregators = up = []
        while time.monotonic() < deadline:
            try:
                agents = query(base, "fl_agent_build_info")
                aggregators = query(base, '{__name__=~"fl_aggregator_.*", job="fl-aggregator"}')
                # a target is up once one scrape succeeded (one that overran its timeout while the agent was
                # busy training is retried at the next interval)
                up = query(base, "max_over_time(up[5m])")
            except OSError:
                pass
            if (len(agents) == len(fleet.members) and aggregators and len(up) == len(fleet.members) + 1
                    and all(s["value"][1] == "1" for s in up)):
                break
            time.sleep(1)
        assert len(agents) == len(fleet.members), f"agents seen by Prometheus: {agents}"
        assert {a["metric"]["job"] for a in agents} == {"fl-agent"}
        assert aggregators, "no fl_aggregator_* series in Prometheus"
        assert len(up) == len(fleet.members) + 1 and all(s["value"][1] == "1" for s in up), up
    finally:
        prom.terminate()
        prom.wait(timeout=10)
