"""``flctl container fleet up|down|status``: the city aggregator and N agents under ``podman kube play``, made
from the Kubernetes manifests in deploy/k8s/base (the pod templates of the city StatefulSet and the agent
DaemonSet), converted for one host by the step below and written to ``<fleet>/kube/*.yaml``:

- a StatefulSet's or DaemonSet's pod template becomes a Pod (one agent Pod per simulated camera node);
- the StatefulSet's volume claim and the agent's hostPath state become podman named volumes, which ``down``
  keeps (``down --purge`` removes them): the aggregator's state and every agent's identity survive a restart;
- Secrets and ConfigMaps become directories under ``<fleet>/secrets`` and ``<fleet>/configmaps`` holding the
  same keys (a ``subPath`` mount becomes a mount of that one file);
- the restart policy is OnFailure (under Always podman restarts finished init containers forever);
- ``$(VAR)`` in args is expanded from the ConfigMap, as the kubelet does; HTTP probes become the images'
  ``fl-healthcheck`` (podman runs an httpGet probe with curl, which the images do not have);
- what needs a cluster or a camera goes: node selectors and affinity, the camera resource, /run/udev; agents
  train on synthetic frames of camera i;
- agents talk to the city directly (no site in between) and pin its key; its port is published on 127.0.0.1,
  the agents' are not (podman 4.3 publishes every containerPort on the host, where the agents' would clash).

Keys and enrolment are the operator steps of docs/kubernetes.md, done by ``up``: the city's key, TLS
certificate and signed model package are made once on the host; each agent makes its own key on its volume
(``fl-agent keygen``) and ``up`` enrols the keys the city does not know yet, so a second ``up`` enrols nobody.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import ssl
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from nacl.signing import SigningKey

from appliance.durable import atomic_write, fsync_dir
from appliance.identity import read_key_file, write_key_file
from flctl.image.cache import fsync_file

from .build import image_ref, project_info
from .payload import AGENT, AGGREGATOR, PROJECT_ROOT
from .platforms import host_platform
from .podman import ContainerError, podman, run_tool

K8S_BASE = PROJECT_ROOT / "deploy" / "k8s" / "base"
NETWORK = "fl-fleet"
CITY = "fl-city"
CITY_PORT = 8443
MODEL = "cnn"
HELD_OUT_PER_CAMERA = 150


@dataclass(frozen=True)
class FleetSettings:
    """What ``up`` was first run with (``<fleet>/fleet.json``); a later ``up`` keeps it."""

    devices: int = 3
    port: int = 18443
    rounds: int = 0  # 0: no limit
    round_timeout: int = 300
    samples_per_round: int = 256
    epochs: int = 1

    def agent(self, index: int) -> str:
        return f"fl-agent-{index:02d}"


class Fleet:
    """The files of one fleet on this host, and the podman objects named after them."""

    def __init__(self, root: Path, cache: Path | None = None) -> None:
        self.root = root
        self.cache = cache

    @property
    def settings_file(self) -> Path:
        return self.root / "fleet.json"

    def settings(self) -> FleetSettings:
        if not self.settings_file.exists():
            raise ContainerError(f"{self.root} holds no fleet: run `flctl container fleet up` first")
        try:
            return FleetSettings(**json.loads(self.settings_file.read_bytes()))
        except (ValueError, TypeError) as exc:  # empty, cut short, not an object of FleetSettings' fields
            raise ContainerError(
                f"{self.settings_file} is damaged ({exc}): remove it and run `flctl container fleet up` again with "
                "the --devices and other options the fleet was made with (its key, certificate and volumes stay)"
            ) from None

    def save_settings(self, settings: FleetSettings) -> None:
        """Write ``fleet.json`` atomically (temp file, fsync, rename, directory fsync): it is written once and read by
        every later command, so a power cut must leave it whole or absent."""
        atomic_write(self.settings_file, (json.dumps(asdict(settings), indent=2) + "\n").encode())

    def volume(self, pod: str) -> str:
        return f"fl-fleet-{pod}-state"

    def secret(self, name: str) -> Path:
        return self.root / "secrets" / name

    def configmap(self, name: str) -> Path:
        return self.root / "configmaps" / name

    @property
    def ca_file(self) -> Path:
        return self.secret("fl-edge-ca") / "ca.crt"

    @property
    def kube(self) -> Path:
        return self.root / "kube"

    def pods(self, settings: FleetSettings) -> list[str]:
        return [CITY, *(settings.agent(i) for i in range(settings.devices))]

    def url(self, settings: FleetSettings) -> str:
        return f"https://127.0.0.1:{settings.port}"

    def tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = False  # the certificate names fl-city; the test reaches it as 127.0.0.1
        return context

    def get(self, settings: FleetSettings, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url(settings) + path, timeout=timeout, context=self.tls()) as response:
            return response.read()


# ------------------------------------------------------------------------------------------------ files


def prepare(fleet: Fleet, settings: FleetSettings) -> None:
    """The fleet's host files, made once: the city's key, certificate and model package, the pinned key, the
    agents' configs. A second call changes nothing (so the city keeps its identity)."""
    fleet.root.mkdir(parents=True, exist_ok=True)
    if not fleet.settings_file.exists():
        fleet.save_settings(settings)
    key_file = fleet.secret("fl-city-key") / "aggregator.key"
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        write_key_file(key_file, bytes(SigningKey.generate()), 0o440)
    _owned(key_file, AGGREGATOR.uid)
    key = SigningKey(read_key_file(key_file))
    _certificate(fleet)
    model = fleet.configmap("fl-city-model") / "model.flpkg"
    if not model.exists():
        from flctl.model.reference import export_reference_package

        model.parent.mkdir(parents=True, exist_ok=True)
        export_reference_package(MODEL, model, key)
    pinned = fleet.configmap("fl-site-pub") / "aggregator.pub"
    pinned.parent.mkdir(parents=True, exist_ok=True)
    pinned.write_text(bytes(key.verify_key).hex() + "\n")
    for i in range(settings.devices):
        config = fleet.configmap(f"fl-agent-config-{i:02d}") / "agent.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(_agent_toml(i, settings))
        os.chmod(config, 0o644)


def _owned(path: Path, uid: int) -> None:
    """Root owns the file, the service's group reads it: as a Secret with defaultMode 0440 and fsGroup."""
    os.chown(path, 0, uid)
    os.chmod(path, 0o440)


def _certificate(fleet: Fleet) -> None:
    """A self-signed certificate for the city (names fl-city, localhost, 127.0.0.1) that agents pin as CA.

    Made once, and a power cut must not leave half of it (the next ``up`` would keep it): openssl writes the key
    and the certificate under temp names, each is fsynced and renamed into place, the certificate last, since its
    name is what says the pair exists. The CA copy the agents pin is rewritten from it atomically on every call."""
    tls = fleet.secret("fl-city-tls")
    if not (tls / "tls.crt").exists():
        tls.mkdir(parents=True, exist_ok=True)
        partial = {name: tls / f".{name}.partial" for name in ("tls.key", "tls.crt")}
        run_tool(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-days", "3650", "-subj", f"/CN={CITY}", "-keyout", str(partial["tls.key"]),
                  "-out", str(partial["tls.crt"]),
                  "-addext", f"subjectAltName=DNS:{CITY},DNS:fl-aggregator,DNS:localhost,IP:127.0.0.1"],
                 what="openssl: the city's TLS certificate")  # fmt: skip
        for name in ("tls.key", "tls.crt"):
            _owned(partial[name], AGGREGATOR.uid)
            fsync_file(partial[name])
            os.replace(partial[name], tls / name)
        fsync_dir(tls)
    fleet.ca_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(fleet.ca_file, (tls / "tls.crt").read_bytes(), 0o644)


def _agent_toml(index: int, settings: FleetSettings) -> str:
    """The DaemonSet's agent.toml, pointed at the city, with synthetic frames of camera ``index``."""
    base = yaml.safe_load((K8S_BASE / "zone" / "agent-configmap.yaml").read_text())["data"]["agent.toml"]
    text = base.replace("https://fl-site:8443", f"https://{CITY}:{CITY_PORT}").replace('source = "cameras"', "")
    return (
        text.rstrip()
        + f'\nsource = "synthetic"\nsynthetic_camera = {index}\nsamples_per_round = {settings.samples_per_round}\n'
        + "\n[training]\nmax_threads = 1\n"
    )


# ------------------------------------------------------------------------------------------- conversion


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def city_pod(fleet: Fleet, settings: FleetSettings) -> dict[str, Any]:
    """The city StatefulSet's pod template as a Pod for podman (see the module docstring)."""
    sts = _load(K8S_BASE / "city" / "statefulset.yaml")
    args = dict(_load(K8S_BASE / "city" / "configmap.yaml")["data"])
    # Goal: every agent; quorum: all but one, so one slow camera does not abandon the round.
    args.update({"min-clients": str(max(1, settings.devices - 1)), "goal-clients": str(settings.devices),
                 "round-timeout": str(settings.round_timeout), "epochs": str(settings.epochs)})  # fmt: skip
    template = sts["spec"]["template"]
    spec = copy.deepcopy(template["spec"])
    for claim in sts["spec"]["volumeClaimTemplates"]:
        spec["volumes"].append({"name": claim["metadata"]["name"],
                                "persistentVolumeClaim": {"claimName": fleet.volume(CITY)}})  # fmt: skip
    _convert(spec, fleet, args, {})
    container = spec["containers"][0]
    if settings.rounds:
        container["args"] += ["--rounds", str(settings.rounds)]
    for port in container["ports"]:
        port.update(hostPort=settings.port, hostIP="127.0.0.1")
    return _pod(CITY, template["metadata"]["labels"], spec)


def agent_pod(fleet: Fleet, settings: FleetSettings, index: int) -> dict[str, Any]:
    """The agent DaemonSet's pod template as the Pod of one simulated camera node."""
    name = settings.agent(index)
    template = _load(K8S_BASE / "zone" / "agent-daemonset.yaml")["spec"]["template"]
    spec = copy.deepcopy(template["spec"])
    _convert(spec, fleet, {}, {"fl-agent-config": f"fl-agent-config-{index:02d}", "/var/lib/fl-agent": name})
    for container in spec["containers"]:
        container.pop("ports", None)  # podman publishes a containerPort on the host: every agent's would clash
    return _pod(name, template["metadata"]["labels"], spec)


def _pod(name: str, labels: dict[str, str], spec: dict[str, Any]) -> dict[str, Any]:
    # podman applies a pod's restart policy to its init containers too: under Always an init container that
    # has done its work is started again, forever. OnFailure restarts only what failed (a killed aggregator
    # included). Init containers of type "always" run at every pod start, as Kubernetes runs them.
    spec["restartPolicy"] = "OnFailure"
    annotations = {"io.podman.annotations.init.container.type": "always"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels,
                                                             "annotations": annotations}, "spec": spec}


def _convert(spec: dict[str, Any], fleet: Fleet, config: dict[str, str], renames: dict[str, str]) -> None:
    for key in ("nodeSelector", "affinity"):
        spec.pop(key, None)
    dropped: set[str] = set()
    volumes = []
    for volume in spec["volumes"]:
        if "secret" in volume:
            volume = {"name": volume["name"], "hostPath": {"path": str(fleet.secret(volume["secret"]["secretName"])),
                                                          "type": "Directory"}}  # fmt: skip
        elif "configMap" in volume:
            name = volume["configMap"]["name"]
            volume = {"name": volume["name"], "hostPath": {"path": str(fleet.configmap(renames.get(name, name))),
                                                          "type": "Directory"}}  # fmt: skip
        elif "hostPath" in volume and volume["hostPath"]["path"] in renames:
            pod = renames[volume["hostPath"]["path"]]
            volume = {"name": volume["name"], "persistentVolumeClaim": {"claimName": fleet.volume(pod)}}
        elif "hostPath" in volume:  # /run/udev: the fleet's agents train on synthetic frames
            dropped.add(volume["name"])
            continue
        volumes.append(volume)
    spec["volumes"] = volumes
    by_name = {v["name"]: v for v in volumes}
    for container in spec.get("initContainers", []) + spec["containers"]:
        mounts = []
        for mount in container.get("volumeMounts", []):
            if mount["name"] in dropped:
                continue
            if "subPath" in mount:  # one file of the directory: mount that file
                volume = by_name[mount["name"]]
                volume["hostPath"] = {"path": f"{volume['hostPath']['path']}/{mount.pop('subPath')}", "type": "File"}
            mounts.append(mount)
        container["volumeMounts"] = mounts
        env = {}
        kept = []
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
                kept.append(var)
            else:
                env[var["name"]] = config[var["valueFrom"]["configMapKeyRef"]["key"]]
        if "env" in container:
            container["env"] = kept
        for field in ("command", "args"):
            if field in container:
                container[field] = [_expand(a, env) for a in container[field]]
        for probe in ("startupProbe", "readinessProbe"):
            container.pop(probe, None)
        if "livenessProbe" in container:
            probe = container["livenessProbe"]
            container["livenessProbe"] = {"exec": {"command": ["fl-healthcheck"]},
                                          **{k: v for k, v in probe.items() if k.endswith(("Seconds", "Threshold"))}}
        for section in container.get("resources", {}).values():
            for resource in [r for r in section if "/" in r]:  # extended resources: the camera plugin's
                del section[resource]


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


def write_manifests(fleet: Fleet, settings: FleetSettings) -> list[Path]:
    fleet.kube.mkdir(parents=True, exist_ok=True)
    pods = [city_pod(fleet, settings), *(agent_pod(fleet, settings, i) for i in range(settings.devices))]
    paths = []
    for pod in pods:
        path = fleet.kube / f"{pod['metadata']['name']}.yaml"
        path.write_text(f"# Made by flctl container fleet from {K8S_BASE.relative_to(PROJECT_ROOT)}: do not edit.\n"
                        + yaml.safe_dump(pod, sort_keys=False))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------- podman


def up(fleet: Fleet, settings: FleetSettings | None = None, progress=print) -> dict[str, Any]:
    """Start the fleet (made on the first call); returns the device ids and how many were newly enrolled."""
    if fleet.settings_file.exists():
        settings = fleet.settings()
    settings = settings or FleetSettings()
    version = project_info().version
    for ref in (image_ref(AGGREGATOR, version), image_ref(AGENT, version)):
        require_image(ref, fleet.cache)
    prepare(fleet, settings)
    paths = write_manifests(fleet, settings)
    if podman("network", "exists", NETWORK, what="podman network exists", cache=fleet.cache, check=False).returncode:
        podman("network", "create", NETWORK, what="podman network create", cache=fleet.cache)
    for pod in fleet.pods(settings):
        volume = fleet.volume(pod)
        if podman("volume", "exists", volume, what="podman volume exists", cache=fleet.cache, check=False).returncode:
            podman("volume", "create", volume, what="podman volume create", cache=fleet.cache)
    _play(fleet, paths[0])
    _wait_healthy(fleet, settings)
    progress(f"{CITY}: {fleet.url(settings)} (CA {fleet.ca_file})")
    devices = {}
    for i in range(settings.devices):
        devices[settings.agent(i)] = _agent_identity(fleet, settings.agent(i), version)
    done = podman("exec", f"{CITY}-aggregator", "fl-aggregator", "enroll", "--state", AGGREGATOR.state_dir,
                  *(d["public_key"] for d in devices.values()), what="fl-aggregator enroll", cache=fleet.cache)
    enrolled = sum(1 for line in done.stdout.splitlines() if line.split()[1:2] == ["enrolled"])
    progress(f"enrolled {enrolled} new device(s) of {len(devices)}")
    for path in paths[1:]:
        _play(fleet, path)
    progress(f"started {len(paths) - 1} agent(s)")
    return {"devices": {name: d["device_id"] for name, d in devices.items()}, "enrolled": enrolled}


def require_image(ref: str, cache: Path | None = None) -> None:
    """Refuse, in one line, an image that is not built or whose manifest list lacks this machine's architecture
    (`flctl container build --arch arm64` alone on amd64): podman would otherwise look for it in a registry."""
    if not podman("image", "exists", ref, what="podman image exists", cache=cache, check=False).returncode:
        return
    if podman("manifest", "exists", ref, what="podman manifest exists", cache=cache, check=False).returncode:
        raise ContainerError(f"image {ref} is not built: run `flctl container build` first")
    listed = json.loads(podman("manifest", "inspect", ref, what=f"podman manifest inspect {ref}", cache=cache).stdout)
    built = sorted({entry["platform"]["architecture"] for entry in listed.get("manifests", [])})
    host = host_platform().name
    raise ContainerError(f"image {ref} is built for {', '.join(built) or 'no architecture'}, not for this machine's "
                         f"{host}: run `flctl container build --arch {','.join([host, *built])}`")


def _play(fleet: Fleet, path: Path) -> None:
    podman("kube", "play", "--replace", f"--network={NETWORK}", str(path), what=f"podman kube play {path.name}",
           cache=fleet.cache)


def _agent_identity(fleet: Fleet, pod: str, version: str) -> dict[str, str]:
    """The agent's key on its volume, made on first use (`fl-agent keygen`, as the agent would itself)."""
    done = podman("run", "--rm", "--read-only", "-v", f"{fleet.volume(pod)}:{AGENT.state_dir}",
                  image_ref(AGENT, version), "fl-agent", "keygen", "--data", AGENT.state_dir,
                  what=f"fl-agent keygen ({pod})", cache=fleet.cache)  # fmt: skip
    fields = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    return {"device_id": fields["device_id"], "public_key": fields["public_key"]}


def _wait_healthy(fleet: Fleet, settings: FleetSettings, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fleet.get(settings, "/healthz", timeout=5)
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                logs = podman("logs", "--tail", "20", f"{CITY}-aggregator", what="podman logs", cache=fleet.cache,
                              check=False)
                raise ContainerError(f"{CITY} did not answer /healthz within {timeout:.0f} s ({exc}):\n"
                                     f"{logs.stdout}{logs.stderr}") from None
            time.sleep(1)


def down(fleet: Fleet, purge: bool = False) -> None:
    """Stop and remove the pods; the volumes (state, identities) stay unless ``purge``."""
    settings = fleet.settings()
    for path in sorted(fleet.kube.glob("*.yaml"), reverse=True):  # agents first, the city last
        podman("kube", "down", str(path), what=f"podman kube down {path.name}", cache=fleet.cache, check=False)
    if purge:
        for pod in fleet.pods(settings):
            podman("volume", "rm", "-f", fleet.volume(pod), what="podman volume rm", cache=fleet.cache, check=False)
        podman("network", "rm", "-f", NETWORK, what="podman network rm", cache=fleet.cache, check=False)
        shutil.rmtree(fleet.root)


def status(fleet: Fleet, evaluate: bool = True) -> dict[str, Any]:
    """Each container's state and health (health checks run now: without systemd podman does not schedule
    them), the city's round and model version, and the held-out accuracy of the newest model."""
    settings = fleet.settings()
    containers = {}
    for pod in fleet.pods(settings):
        name = f"{pod}-{'aggregator' if pod == CITY else 'agent'}"
        podman("healthcheck", "run", name, what="podman healthcheck run", cache=fleet.cache, check=False)
        done = podman("inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", name,
                      what="podman inspect", cache=fleet.cache, check=False)
        state, _, health = done.stdout.strip().partition(" ")
        containers[name] = {"state": state or "absent", "health": health or "none"}
    report: dict[str, Any] = {"containers": containers}
    try:
        report["city"] = json.loads(fleet.get(settings, "/v1/status"))
    except OSError as exc:
        report["city_error"] = str(exc)
        return report
    version = report["city"]["model"]["version"]
    if evaluate:
        report["held_out_accuracy"] = held_out_accuracy(fleet, settings, version)
    return report


def held_out_accuracy(fleet: Fleet, settings: FleetSettings, version: int) -> float:
    """Accuracy of model ``version`` (fetched from the city and verified) on held-out frames of every camera."""
    import numpy as np

    from appliance import wire
    from appliance.modelpkg import load_package
    from appliance.synthetic import evaluation_set
    from appliance.trainer import Trainer

    key = SigningKey(read_key_file(fleet.secret("fl-city-key") / "aggregator.key")).verify_key
    package = load_package(fleet.configmap("fl-city-model") / "model.flpkg", key)
    release = wire.decode_model_release(fleet.get(settings, f"/v1/models/{version}"), key, package.param_specs)
    sets = [evaluation_set(HELD_OUT_PER_CAMERA, [c], sample_seed=999) for c in range(settings.devices)]
    x = np.concatenate([s[0] for s in sets])
    y = np.concatenate([s[1] for s in sets])
    return float(Trainer(package, threads=1).evaluate(release.tensors, x, y)["accuracy"])


def podman_ps(fleet: Fleet) -> str:
    """``podman ps`` of the fleet's containers, as a user would type it."""
    return podman("ps", "--filter", "name=^fl-(city|agent)", "--format", "table {{.Names}}\t{{.Status}}\t{{.Ports}}",
                  what="podman ps", cache=fleet.cache).stdout
