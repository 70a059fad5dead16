"""`flctl container build`: the fl-aggregator and fl-agent images run under podman as built, non-root, on a
read-only root, labelled, with a health check; the aggregator serves /healthz and an agent starts against it;
the arm64 images run under qemu-user-static from the same manifest lists."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from aggregator_harness import tiny_package
from container_harness import AGENT, AGGREGATOR, VERSION, build_all, images, podman, wait_http  # noqa: F401 (fixture)
from nacl.signing import SigningKey

from appliance import modelpkg
from appliance.identity import write_aggregator_key
from flctl.container.fleet import require_image
from flctl.container.payload import AGENT as AGENT_SERVICE
from flctl.container.payload import AGGREGATOR as AGGREGATOR_SERVICE
from flctl.container.platforms import PLATFORMS, host_platform
from flctl.container.podman import ContainerError
from flctl.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("images")]


@pytest.mark.parametrize("name", ["fl-aggregator", "fl-agent"])
def test_each_image_is_labelled_non_root_and_has_a_health_check(name: str) -> None:
    image = json.loads(podman("image", "inspect", f"{AGGREGATOR if name == 'fl-aggregator' else AGENT}-amd64")
                       .stdout)[0]
    config = image["Config"]
    uid = (AGGREGATOR_SERVICE if name == "fl-aggregator" else AGENT_SERVICE).uid
    assert config["User"] == f"{uid}:{uid}"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.source"]
    assert image["Healthcheck"]["Test"] == ["CMD", "fl-healthcheck"]


def test_the_help_of_both_commands_runs_on_a_read_only_root() -> None:
    out = podman("run", "--rm", "--read-only", AGGREGATOR, "fl-aggregator", "--help").stdout
    assert "serve" in out and "enroll" in out
    out = podman("run", "--rm", "--read-only", AGENT, "fl-agent", "--help").stdout
    assert "check-config" in out
    # Numeric USER (Kubernetes can check runAsNonRoot against it); cameras' group is added at run time.
    who = podman("run", "--rm", "--read-only", "--group-add", "video", AGENT, "id").stdout
    assert who.startswith("uid=10002(fl-agent) gid=10002(fl-agent)") and "44(video)" in who, who


def test_the_image_runs_the_wheel_the_dev_image_installs() -> None:
    """Same distribution, same version; the agent imports what training needs."""
    code = "import importlib.metadata as m, onnxruntime, numpy; print(m.version('fl-edge'))"
    assert podman("run", "--rm", "--read-only", AGENT, "python3", "-c", code).stdout.strip() == VERSION


def _chown(path: Path, uid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid)


def test_the_aggregator_serves_healthz_and_an_agent_starts_against_it(tmp_path: Path) -> None:
    key = SigningKey.generate()
    tag = uuid.uuid4().hex[:8]
    network, aggregator, agent = f"fl-test-{tag}", f"fl-agg-{tag}", f"fl-agent-{tag}"
    state, model = tmp_path / "aggregator", tmp_path / "model"
    state.mkdir()
    model.mkdir()
    (state / "aggregator.key").write_text(bytes(key).hex() + "\n")
    os.chmod(state / "aggregator.key", 0o600)
    modelpkg.write_package(model / "model.flpkg", tiny_package(), key)
    _chown(state, AGGREGATOR_SERVICE.uid)
    agent_state = tmp_path / "agent"
    write_aggregator_key(agent_state, key.verify_key)
    (tmp_path / "agent.toml").write_text(
        f'[aggregator]\nurl = "http://{aggregator}:8080"\nallow_plain_http = true\n'
        '[agent]\nstate_dir = "/var/lib/fl-agent"\n[data]\nsource = "synthetic"\n'
    )
    _chown(agent_state, AGENT_SERVICE.uid)
    port = free_port()
    podman("network", "create", network)
    try:
        podman("run", "-d", "--read-only", "--name", aggregator, "--network", network,
               "-p", f"127.0.0.1:{port}:8080", "-v", f"{state}:/var/lib/fl-aggregator",
               "-v", f"{model}:/etc/fl-aggregator/model:ro", AGGREGATOR)  # fmt: skip
        assert wait_http(f"http://127.0.0.1:{port}/healthz") == 200
        podman("run", "-d", "--read-only", "--name", agent, "--network", network,
               "-v", f"{agent_state}:/var/lib/fl-agent",
               "-v", f"{tmp_path / 'agent.toml'}:/etc/fl-agent/agent.toml:ro", AGENT)  # fmt: skip
        # The agent made its own identity on the mounted volume and answers its health check.
        for _ in range(120):
            if podman("healthcheck", "run", agent, check=False).returncode == 0:
                break
            assert podman("inspect", "--format", "{{.State.Running}}", agent).stdout.strip() == "true", \
                podman("logs", agent, check=False).stderr
            subprocess.run(["sleep", "1"], check=True)
        else:
            raise AssertionError("the agent never became healthy:\n" + podman("logs", agent, check=False).stderr)
        assert (agent_state / "identity" / "device.key").stat().st_uid == AGENT_SERVICE.uid
        assert podman("healthcheck", "run", aggregator).returncode == 0
        assert podman("inspect", "--format", "{{.State.Running}}", agent).stdout.strip() == "true"
    finally:
        podman("rm", "-f", "-v", "-t", "5", aggregator, agent, check=False)
        podman("network", "rm", "-f", network, check=False)


def test_the_arm64_agent_runs_under_emulation_from_the_manifest_list(tmp_path: Path) -> None:
    # numpy, not onnxruntime: onnxruntime's import blocks under qemu-user here (docs/containers.md)
    out = podman("run", "--rm", "--read-only", "--arch", "arm64", AGENT, "python3", "-c",
                 "import platform, numpy; print(platform.machine())").stdout
    assert out.strip() == "aarch64"
    assert "check-config" in podman("run", "--rm", "--arch", "arm64", AGENT, "fl-agent", "--help").stdout
    config = tmp_path / "agent.toml"
    config.write_text('[aggregator]\nurl = "http://fl-site:8080"\nallow_plain_http = true\n')
    os.chmod(config, 0o644)
    done = podman("run", "--rm", "--arch", "arm64", "-v", f"{config}:/etc/fl-agent/agent.toml:ro", AGENT,
                  "fl-agent", "check-config")
    assert "ok" in done.stdout
    assert "serve" in podman("run", "--rm", "--arch", "arm64", AGGREGATOR, "fl-aggregator", "--help").stdout


def test_a_damaged_state_is_refused_in_one_line(tmp_path: Path) -> None:
    """A corrupt state volume: the aggregator says what is wrong and exits 2, it does not crash in a loop."""
    key = SigningKey.generate()
    (tmp_path / "aggregator.key").write_text(bytes(key).hex() + "\n")
    os.chmod(tmp_path / "aggregator.key", 0o600)
    (tmp_path / "aggregator.db").write_bytes(b"this is not an SQLite database" * 100)
    _chown(tmp_path, AGGREGATOR_SERVICE.uid)
    done = podman("run", "--rm", "--read-only", "-v", f"{tmp_path}:/var/lib/fl-aggregator", AGGREGATOR,
                  "fl-aggregator", "serve", "--state", "/var/lib/fl-aggregator", "--synthetic-parameters", "10",
                  check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if "healthcheck" not in line]
    assert len(lines) == 1 and lines[0].startswith("fl-aggregator: ") and "aggregator.db" in lines[0], lines


def test_an_agent_without_cameras_says_so_once_and_stays_up(tmp_path: Path) -> None:
    """A DaemonSet pod on a node without cameras (no /dev/video* mapped, no /run/udev): the log says `0 present`
    in one line, the agent keeps running and answers its health check, `fl_agent_cameras_present` is 0."""
    name = f"fl-nocam-{uuid.uuid4().hex[:8]}"
    agent_state = tmp_path / "agent"
    write_aggregator_key(agent_state, SigningKey.generate().verify_key)
    _chown(agent_state, AGENT_SERVICE.uid)
    config = tmp_path / "agent.toml"
    config.write_text('[aggregator]\nurl = "http://127.0.0.1:9"\nallow_plain_http = true\n'
                      '[agent]\nstate_dir = "/var/lib/fl-agent"\n[data]\nsource = "cameras"\n')
    os.chmod(config, 0o644)
    try:
        podman("run", "-d", "--read-only", "--name", name, "-v", f"{agent_state}:/var/lib/fl-agent",
               "-v", f"{config}:/etc/fl-agent/agent.toml:ro", AGENT)  # fmt: skip
        for _ in range(120):
            log = podman("logs", name, check=False).stderr
            if "cameras: watching udev" in log and podman("healthcheck", "run", name, check=False).returncode == 0:
                break
            assert podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true", log
            subprocess.run(["sleep", "1"], check=True)
        else:
            raise AssertionError("the agent never reported its cameras or became healthy:\n" + log)
        camera_lines = [line for line in log.splitlines() if "cameras:" in line]
        assert len(camera_lines) == 1 and "cameras: watching udev; 0 present" in camera_lines[0], camera_lines
        assert "Traceback" not in log
        metrics = podman("exec", name, "python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                         "'http://127.0.0.1:9101/metrics').read().decode())").stdout
        assert "fl_agent_cameras_present 0.0" in metrics.splitlines()
        state = podman("inspect", "--format", "{{.State.Running}} {{.RestartCount}}", name).stdout.split()
        assert state == ["true", "0"], state
    finally:
        podman("rm", "-f", "-v", "-t", "5", name, check=False)


def test_fleet_up_refuses_images_built_only_for_another_architecture_in_one_line() -> None:
    """`flctl container build --arch arm64` alone on amd64 leaves a manifest list without this machine's image:
    `fleet up` names the architectures it holds and the build that fixes it (podman would try a registry)."""
    foreign = next(p for p in PLATFORMS.values() if p.foreign)
    ref = f"localhost/fl-edge/fl-test-{uuid.uuid4().hex[:8]}:{VERSION}"
    podman("manifest", "create", ref)
    try:
        podman("manifest", "add", f"--arch={foreign.name}", "--os=linux", ref,
               f"containers-storage:{AGENT}-{foreign.name}")
        with pytest.raises(ContainerError) as refused:
            require_image(ref)
        assert str(refused.value) == (f"image {ref} is built for {foreign.name}, not for this machine's "
                                      f"{host_platform().name}: run `flctl container build --arch "
                                      f"{host_platform().name},{foreign.name}`")
        require_image(AGENT)  # the session's manifest list holds both
    finally:
        podman("manifest", "rm", ref, check=False)


def test_a_rebuild_removes_the_images_it_replaces_and_keeps_both_manifest_lists() -> None:
    """Each `flctl container build` used to leave the previous per-architecture images untagged in podman's
    storage (1.4 GB a build); a CI runner that built once an hour filled its disk in a day."""
    def image_ids() -> set[str]:
        return set(podman("images", "-a", "--no-trunc", "--format", "{{.ID}}").stdout.split())

    platforms = [host_platform(), *(p for p in PLATFORMS.values() if p.foreign)]
    before = image_ids()
    per_arch = [f"{ref}-{p.name}" for ref in (AGGREGATOR, AGENT) for p in platforms]
    replaced = {ref: podman("image", "inspect", "--format={{.Id}}", ref).stdout.strip() for ref in per_arch}
    build_all.__wrapped__()
    now = image_ids()
    for ref, old in replaced.items():
        new = podman("image", "inspect", "--format={{.Id}}", ref).stdout.strip()
        assert new != old and old not in now, ref
    assert len(now) <= len(before), sorted(now - before)
    for ref in (AGGREGATOR, AGENT):
        listed = json.loads(podman("manifest", "inspect", ref).stdout)["manifests"]
        assert sorted(m["platform"]["architecture"] for m in listed) == sorted(p.name for p in platforms)
