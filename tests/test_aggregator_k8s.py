"""deploy/k8s/: the manifests validate against the Kubernetes 1.31 schemas (offline, strict), and the commands
the StatefulSet runs (its init container, then `fl-aggregator serve` with the ConfigMap's settings) really start
an aggregator whose probe path answers."""

from __future__ import annotations

import os
import re
import shutil
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

from aggregator.cli import build_parser
from appliance import modelpkg
from flctl.ports import free_port
from tests.aggregator_harness import tiny_package

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def _validator() -> str | None:
    local = Path(sys.executable).parent / "kubernetes-validate"
    return str(local) if local.exists() else shutil.which("kubernetes-validate")


def _docs() -> dict[str, dict[str, Any]]:
    """Every resource in deploy/k8s by ``kind/name``."""
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def _pod() -> dict[str, Any]:
    return _docs()["StatefulSet/fl-aggregator"]["spec"]["template"]["spec"]


def _main_container() -> dict[str, Any]:
    return next(c for c in _pod()["containers"] if c["name"] == "aggregator")


def _rendered_args() -> list[str]:
    """The container's args with ``$(VAR)`` expanded from the ConfigMap, as the kubelet does."""
    config = _docs()["ConfigMap/fl-aggregator-args"]["data"]
    env = {}
    for var in _main_container()["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == "fl-aggregator-args"
            env[var["name"]] = config[ref["key"]]
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in _main_container()["args"]]


def test_manifests_exist() -> None:
    kinds = {key.split("/")[0] for key in _docs()}
    assert {"StatefulSet", "Service", "ConfigMap"} <= kinds


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly_against_kubernetes_1_31(manifest: Path) -> None:
    validator = _validator()
    if validator is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    done = subprocess.run([validator, "--strict", "-k", "1.31", str(manifest)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_args_parse_with_the_real_cli_and_match_the_volumes_and_ports() -> None:
    args = build_parser().parse_args(_rendered_args())
    container = _main_container()
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in _docs()["StatefulSet/fl-aggregator"]["spec"]["volumeClaimTemplates"]}
    assert str(args.state) == mounts["state"] and "state" in claims  # --state is on the PVC
    assert str(args.model.parent) == mounts["model"]
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert args.listen == ("0.0.0.0", port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    for name in ("Service/fl-aggregator", "Service/fl-aggregator-headless"):
        service = _docs()[name]["spec"]
        assert service["selector"] == _docs()["StatefulSet/fl-aggregator"]["spec"]["selector"]["matchLabels"]
        assert service["ports"][0]["targetPort"] == "http"


def test_every_container_is_non_root_read_only_and_bounded() -> None:
    pod = _pod()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for container in pod["initContainers"] + pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
    tmp = next(m for m in _main_container()["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


def _local(text: str, paths: dict[str, Path]) -> str:
    """``text`` with each mount path replaced by its local directory (in one pass: /tmp is a mount too)."""
    pattern = "|".join(re.escape(m) for m in sorted(paths, key=len, reverse=True))
    return re.sub(pattern, lambda m: str(paths[m.group(0)]), text)


@pytest.mark.slow
def test_the_pod_commands_start_an_aggregator_whose_probe_answers(tmp_path: Path) -> None:
    """The init container's command and the main container's args, with the mounts mapped to local paths."""
    pod = _pod()
    mounts = {m["mountPath"]: m["name"] for c in pod["initContainers"] + pod["containers"] for m in c["volumeMounts"]}
    paths = {mount: tmp_path / name for mount, name in mounts.items()}
    for local in paths.values():
        local.mkdir()
    key = SigningKey.generate()
    key_file = paths["/etc/fl-aggregator/key"] / "aggregator.key"
    key_file.write_text(bytes(key).hex() + "\n")
    os.chmod(key_file, 0o440)  # the Secret's defaultMode
    pkg = tiny_package()
    modelpkg.write_package(paths["/etc/fl-aggregator/model"] / "model.flpkg", pkg, key)

    init = pod["initContainers"][0]
    subprocess.run([_local(part, paths) for part in init["command"]], check=True, timeout=30)
    installed = paths["/var/lib/fl-aggregator"] / "aggregator.key"
    assert stat.S_IMODE(installed.stat().st_mode) == 0o600

    port = free_port()
    args = [_local(a, paths) for a in _rendered_args()]
    args[args.index("--listen") + 1] = f"127.0.0.1:{port}"  # loopback only in tests
    proc = subprocess.Popen([sys.executable, "-m", "aggregator.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        probe = _main_container()["livenessProbe"]["httpGet"]["path"]
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=2) as response:
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
