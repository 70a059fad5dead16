"""deploy/k8s/: every manifest validates offline and strictly against two Kubernetes versions K3s ships, the
two-zone overlay renders (kustomize, when kubectl is here) into manifests that validate too and keep zones
apart; the commands the pods run parse with the real CLIs and (slow) start an aggregator whose probe answers;
the init containers say in one line what is missing."""

from __future__ import annotations

import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from nacl.signing import SigningKey
from tls_certs import certificate

from aggregator.cli import build_parser
from appliance import modelpkg
from appliance.config import load_config
from flctl.ports import free_port
from tests.aggregator_harness import tiny_package

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# Complete resources, each valid on its own (kustomization files and the overlays' patches are not).
MANIFESTS = sorted(p for p in (K8S / "base").rglob("*.yaml") if p.name != "kustomization.yaml") + sorted(
    p for p in (K8S / "components").rglob("*.yaml") if p.name != "kustomization.yaml"
)
OVERLAY = K8S / "overlays" / "two-zones"
# Two release lines of K3s (v1.32.x+k3s1, v1.34.x+k3s1); kubernetes-validate bundles both schemas.
KUBERNETES_VERSIONS = ("1.32", "1.34")
AGENT_UNIT = ROOT / "rootfs-overlay" / "usr" / "lib" / "systemd" / "system" / "fl-agent.service"


def _validator() -> str | None:
    local = Path(sys.executable).parent / "kubernetes-validate"
    return str(local) if local.exists() else shutil.which("kubernetes-validate")


def _docs(paths: list[Path] = MANIFESTS) -> dict[str, dict[str, Any]]:
    """Every resource by ``kind/name``."""
    found = {}
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def _pod(workload: str) -> dict[str, Any]:
    return _docs()[workload]["spec"]["template"]["spec"]


def _container(workload: str, name: str) -> dict[str, Any]:
    return next(c for c in _pod(workload)["containers"] if c["name"] == name)


def _rendered_args(workload: str, configmap: str) -> list[str]:
    """The aggregator container's args with ``$(VAR)`` expanded from the ConfigMap, as the kubelet does."""
    config = _docs()[configmap]["data"]
    container = _container(workload, "aggregator")
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == configmap.split("/")[1]
            env[var["name"]] = config[ref["key"]]
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in container["args"]]


def _validate(path: Path, version: str) -> None:
    validator = _validator()
    if validator is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    done = subprocess.run([validator, "--strict", "-k", version, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_tree_and_the_agents_are_all_there() -> None:
    kinds = {key.split("/")[0] for key in _docs()}
    assert {"StatefulSet", "DaemonSet", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy",
            "ServiceMonitor", "PodMonitor"} <= kinds  # fmt: skip
    assert {"StatefulSet/fl-city", "StatefulSet/fl-site", "DaemonSet/fl-agent"} <= set(_docs())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_strictly(manifest: Path, version: str) -> None:
    _validate(manifest, version)


def _render(tmp_path: Path, overlay: Path = OVERLAY) -> Path:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed: the overlay is not rendered")
    done = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(done.stdout)
    return out


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_two_zone_overlay_renders_to_valid_manifests(tmp_path: Path, version: str) -> None:
    _validate(_render(tmp_path), version)


def test_the_hostpath_camera_fallback_renders_to_valid_manifests(tmp_path: Path) -> None:
    """components/cameras-hostpath on top of the overlay: the camera as a device file, no plugin resource."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(OVERLAY, overlay)],
        "components": [os.path.relpath(K8S / "components" / "cameras-hostpath", overlay)],
    }))
    rendered = _render(tmp_path, overlay)
    _validate(rendered, KUBERNETES_VERSIONS[-1])
    agent = _docs([rendered])["DaemonSet/fl-agent-zone-a"]["spec"]["template"]["spec"]
    assert "squat.ai/video" not in agent["containers"][0]["resources"]["limits"]
    device = next(v for v in agent["volumes"] if v["name"] == "video0")
    assert device["hostPath"] == {"path": "/dev/video0", "type": "CharDevice"}


def test_the_overlay_keeps_each_zone_to_its_own_site(tmp_path: Path) -> None:
    docs = _docs([_render(tmp_path)])
    for zone, other in (("zone-a", "zone-b"), ("zone-b", "zone-a")):
        site = docs[f"StatefulSet/fl-site-{zone}"]
        agents = docs[f"DaemonSet/fl-agent-{zone}"]
        site_labels = site["spec"]["template"]["metadata"]["labels"]
        agent_labels = agents["spec"]["template"]["metadata"]["labels"]
        assert site_labels["fl-edge.io/zone"] == agent_labels["fl-edge.io/zone"] == zone
        assert agents["spec"]["template"]["spec"]["nodeSelector"]["topology.kubernetes.io/zone"] == zone
        # The agents' only egress (besides DNS) selects their own zone's site, not the other's.
        egress = docs[f"NetworkPolicy/fl-agent-{zone}"]["spec"]["egress"]
        selected = egress[0]["to"][0]["podSelector"]["matchLabels"]
        assert selected.items() <= site_labels.items()
        other_site = docs[f"StatefulSet/fl-site-{other}"]["spec"]["template"]["metadata"]["labels"]
        assert not selected.items() <= other_site.items()
        # The agents' config names their site's Service, and the zone's Secrets are the site's.
        config = docs[f"ConfigMap/fl-agent-config-{zone}"]["data"]["agent.toml"]
        assert f'url = "https://fl-site-{zone}:8443"' in config and f"Service/fl-site-{zone}" in docs
        secrets = {v["secret"]["secretName"] for v in site["spec"]["template"]["spec"]["volumes"] if "secret" in v}
        assert secrets == {f"fl-site-{zone}-key", f"fl-site-{zone}-tls", "fl-edge-ca"}
    # Sites reach the city (whose pods carry no zone label), and the city answers sites of every zone.
    city = docs["StatefulSet/fl-city"]["spec"]["template"]["metadata"]["labels"]
    to_city = docs["NetworkPolicy/fl-sites-to-city"]["spec"]
    assert to_city["egress"][0]["to"][0]["podSelector"]["matchLabels"].items() <= city.items()
    assert "fl-edge.io/zone" not in to_city["podSelector"]["matchLabels"]


@pytest.mark.parametrize(("workload", "configmap"), [("StatefulSet/fl-city", "ConfigMap/fl-city-args"),
                                                     ("StatefulSet/fl-site", "ConfigMap/fl-site-args")])
def test_args_parse_with_the_real_cli_and_match_the_volumes_and_ports(workload: str, configmap: str) -> None:
    args = build_parser().parse_args(_rendered_args(workload, configmap))
    container = _container(workload, "aggregator")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in _docs()[workload]["spec"]["volumeClaimTemplates"]}
    assert str(args.state) == mounts["state"] and "state" in claims  # --state is on the PVC
    assert str(args.model.parent) == mounts["model"]
    assert str(args.tls_cert.parent) == str(args.tls_key.parent) == mounts["tls"]
    port = next(p for p in container["ports"] if p["name"] == "https")["containerPort"]
    assert args.listen == ("0.0.0.0", port)
    # Ready only while the disk answers (/readyz, 503 while it is stalled); live while the process answers (/healthz)
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    name = workload.split("/")[1]
    for service in (f"Service/{name}", f"Service/{name}-headless"):
        spec = _docs()[service]["spec"]
        assert spec["selector"] == _docs()[workload]["spec"]["selector"]["matchLabels"]
        assert spec["ports"][0]["targetPort"] == "https"
    if name == "fl-site":  # a site follows the city through its Service, pinning its key and the CA
        assert args.upstream == f"https://fl-city:{port}"
        assert str(Path(args.upstream_key).parent) == mounts["upstream"]
        assert str(Path(args.upstream_ca).parent) == mounts["ca"]


def test_the_agent_config_is_valid_and_names_the_site(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(_docs()["ConfigMap/fl-agent-config"]["data"]["agent.toml"])
    config = load_config(config_file, override=False, transport=False)
    assert config.aggregator.url == "https://fl-site:8443" and config.data.source == "cameras"
    container = _container("DaemonSet/fl-agent", "agent")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/fl-agent/agent.toml" and config.state_path == Path(mounts["state"])
    assert str(Path(config.aggregator.ca_file).parent) == mounts["ca"]


def _unit_value(key: str) -> str:
    return next(line.split("=", 1)[1] for line in AGENT_UNIT.read_text().splitlines() if line.startswith(f"{key}="))


def test_the_agent_gets_the_appliance_budget_and_a_camera() -> None:
    limits = _container("DaemonSet/fl-agent", "agent")["resources"]["limits"]
    assert _unit_value("CPUQuota") == "100%" and limits["cpu"] == "1"
    assert _unit_value("MemoryMax") == "512M" and limits["memory"] == "512Mi"
    assert limits["squat.ai/video"] == "1"
    assert _pod("DaemonSet/fl-agent")["securityContext"]["supplementalGroups"] == [44]  # video


def test_every_container_is_non_root_read_only_and_bounded() -> None:
    """Everything runs as its service's user with no capability, except the agent's init container, which
    owns the node's state directory for the agent and may only change owners."""
    for workload in ("StatefulSet/fl-city", "StatefulSet/fl-site", "DaemonSet/fl-agent"):
        pod = _pod(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for container in pod.get("initContainers", []) + pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            if (workload, container["name"]) == ("DaemonSet/fl-agent", "prepare-state"):
                assert security["runAsUser"] == 0
                assert set(security["capabilities"]["add"]) == {"CHOWN", "FOWNER", "DAC_OVERRIDE"}
            else:
                assert "add" not in security["capabilities"] and security.get("runAsUser", 1) != 0
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(
                container["resources"]["limits"])
        tmp = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


def _local(text: str, paths: dict[str, Path]) -> str:
    """``text`` with each mount path replaced by its local directory (in one pass: /tmp is a mount too)."""
    pattern = "|".join(re.escape(m) for m in sorted(paths, key=len, reverse=True))
    return re.sub(pattern, lambda m: str(paths[m.group(0)]), text)


def _mount_dirs(workload: str, tmp_path: Path) -> dict[str, Path]:
    pod = _pod(workload)
    mounts = {m["mountPath"]: m["name"] for c in pod["initContainers"] + pod["containers"] for m in c["volumeMounts"]}
    paths = {mount: tmp_path / name for mount, name in mounts.items()}
    for local in paths.values():
        local.mkdir(exist_ok=True)
    return paths


@pytest.mark.parametrize(("workload", "who"), [("StatefulSet/fl-city", "fl-city"), ("StatefulSet/fl-site", "fl-site"),
                                               ("DaemonSet/fl-agent", "fl-agent")])
def test_an_init_container_says_which_secret_is_missing(tmp_path: Path, workload: str, who: str) -> None:
    """A missing key Secret (or pinned key) stops the pod in its init container with one line naming it."""
    paths = _mount_dirs(workload, tmp_path)
    init = _pod(workload)["initContainers"][0]
    done = subprocess.run([_local(part, paths) for part in init["command"]], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1
    assert done.stderr.startswith(f"{who}: no ") and "docs/kubernetes.md" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_city_pod_commands_start_an_aggregator_whose_probe_answers(tmp_path: Path) -> None:
    """The init container's command and the main container's args, with the mounts mapped to local paths."""
    workload = "StatefulSet/fl-city"
    paths = _mount_dirs(workload, tmp_path)
    key = SigningKey.generate()
    key_file = paths["/etc/fl-aggregator/key"] / "aggregator.key"
    key_file.write_text(bytes(key).hex() + "\n")
    os.chmod(key_file, 0o440)  # the Secret's defaultMode
    leaf = certificate(tmp_path, "tls")
    shutil.copyfile(leaf.cert, paths["/etc/fl-aggregator/tls"] / "tls.crt")
    shutil.copyfile(leaf.key_file, paths["/etc/fl-aggregator/tls"] / "tls.key")
    modelpkg.write_package(paths["/etc/fl-aggregator/model"] / "model.flpkg", tiny_package(), key)

    init = _pod(workload)["initContainers"][0]
    subprocess.run([_local(part, paths) for part in init["command"]], check=True, timeout=30)
    installed = paths["/var/lib/fl-aggregator"] / "aggregator.key"
    assert stat.S_IMODE(installed.stat().st_mode) == 0o600

    port = free_port()
    args = [_local(a, paths) for a in _rendered_args(workload, "ConfigMap/fl-city-args")]
    args[args.index("--listen") + 1] = f"127.0.0.1:{port}"  # loopback only in tests
    proc = subprocess.Popen([sys.executable, "-m", "aggregator.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(leaf.cert))
    try:
        probe = _container(workload, "aggregator")["livenessProbe"]["httpGet"]["path"]
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}{probe}", timeout=2,
                                            context=context) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.1)
        else:
            raise AssertionError("the aggregator never answered its probe")
        assert (paths["/var/lib/fl-aggregator"] / "aggregator.db").exists()  # state went to the PVC
    finally:
        proc.terminate()
        proc.wait(timeout=30)
