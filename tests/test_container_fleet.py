"""`flctl container fleet`: the city and 3 agents from deploy/k8s's pod templates under `podman kube play`
complete 2 rounds with a held-out accuracy, `podman ps` shows them healthy, and after `down` and `up` the
same agents (same keys, nobody enrolled again) continue on the kept state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from container_harness import images  # noqa: F401 (fixture)

from flctl.container import fleet as fleet_module
from flctl.container.fleet import Fleet, FleetSettings, city_pod, down, podman_ps, status, up
from flctl.ports import free_port


def _wait_for_version(fleet: Fleet, version: int, timeout: float = 900) -> dict:
    """Poll the city until model ``version`` is published (the deadline only keeps a broken fleet from hanging)."""
    deadline = time.monotonic() + timeout
    while True:
        report = status(fleet, evaluate=False)
        city = report.get("city")
        if city is not None and city["model"]["version"] >= version:
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"model version {version} was not published: {report}")
        time.sleep(5)


@pytest.mark.slow
@pytest.mark.usefixtures("images")
def test_a_fleet_completes_two_rounds_and_resumes_after_down_and_up(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "fleet")
    settings = FleetSettings(devices=3, port=free_port(), round_timeout=240, samples_per_round=128)
    try:
        first = up(fleet, settings, progress=lambda line: None)
        assert first["enrolled"] == 3 and len(set(first["devices"].values())) == 3

        _wait_for_version(fleet, 2)
        report = status(fleet)
        assert all(c["state"] == "running" and c["health"] == "healthy" for c in report["containers"].values()), report
        assert len(report["containers"]) == 4
        published = [r for r in report["city"]["rounds"] if r["status"] == "published"]
        assert len(published) >= 2 and all(r["participants"] >= 2 for r in published)
        assert 0.0 < report["held_out_accuracy"] <= 1.0
        table = podman_ps(fleet)
        assert table.count("(healthy)") == 4, table

        down(fleet)
        assert "fl-city" not in podman_ps(fleet)
        second = up(fleet, progress=lambda line: None)
        assert second == {"devices": first["devices"], "enrolled": 0}  # same identities, no re-enrolment
        resumed = status(fleet, evaluate=False)["city"]
        assert resumed["model"]["version"] >= 2  # the city's state survived
        _wait_for_version(fleet, resumed["model"]["version"] + 1)
    finally:
        if fleet.settings_file.exists():
            down(fleet, purge=True)


def test_the_city_pod_is_the_statefulset_template_converted(tmp_path: Path) -> None:
    """The one documented conversion step: what podman cannot take is replaced, the rest is the template."""
    fleet = Fleet(tmp_path)
    pod = city_pod(fleet, FleetSettings(devices=3, port=18443))
    template = yaml.safe_load((fleet_module.K8S_BASE / "city" / "statefulset.yaml").read_text())["spec"]["template"]
    container = pod["spec"]["containers"][0]
    original = template["spec"]["containers"][0]
    assert container["image"] == original["image"] and container["command"] == original["command"]
    assert container["securityContext"] == original["securityContext"]
    assert "$(" not in " ".join(container["args"]) and "--min-clients" in container["args"]
    assert container["livenessProbe"]["exec"]["command"] == ["fl-healthcheck"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "fl-fleet-fl-city-state"
    assert volumes["key"]["hostPath"]["path"] == str(tmp_path / "secrets" / "fl-city-key")
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}
    assert container["ports"][0] == {"name": "https", "containerPort": 8443, "protocol": "TCP", "hostPort": 18443,
                                     "hostIP": "127.0.0.1"}
