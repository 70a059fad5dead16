"""Fixtures of the QEMU boot tests: the image (built on demand, cached), the host aggregator, booted appliances.

A plain ``pytest`` builds what it needs: the session-scoped ``dev_image`` fixture runs ``flctl image build``
(cached by the hash of its inputs in ``$FL_EDGE_CACHE`` or ``~/.cache/fl-edge``) for the host's architecture,
or for ``$FL_QEMU_ARCH`` (``flctl qemu test --arch arm64``); ``image_for("arm64")`` gives a named one. Boots
go through labgrid (QEMUDriver + ShellDriver) with an environment file written per appliance
(tools/flctl/qemu/rig.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 300  # a busy 2-core machine can double the 30-60 s a TCG boot takes


ENV_ARCH = "FL_QEMU_ARCH"  # flctl qemu test --arch


def _missing_prerequisite(arch_name: str) -> str | None:
    if sys.platform != "linux":
        return "the QEMU rig needs Linux"
    if os.geteuid() != 0:
        return "building the image needs root (mmdebstrap --mode=root, chroot, mount)"
    from flctl.image.arch import ArchitectureError, architecture, check_can_emulate
    from flctl.qemu.rig import QEMU_TARGETS

    arch = architecture(arch_name)
    qemu = QEMU_TARGETS[arch.name].binary
    for tool in (qemu, "mmdebstrap", "mkfs.ext4", "sgdisk", "bmaptool", "socat", "cpio"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (tools/host-packages.txt; `make test` installs it)"
    try:
        check_can_emulate(arch)
    except ArchitectureError as exc:
        return str(exc)
    try:
        import labgrid  # noqa: F401
    except ImportError:
        return "labgrid is not installed (pip install labgrid; it is in the dev extra)"
    return None


def build_test_image(arch_name: str):
    """The development image of ``arch_name``, built or taken from the cache; skips when the host lacks a tool."""
    reason = _missing_prerequisite(arch_name)
    if reason:
        pytest.skip(reason)
    from flctl.image.build import build_image

    started = time.monotonic()
    art = build_image(arch=arch_name)
    took = time.monotonic() - started
    print(
        f"\n[qemu] {art.arch.name} image {art.directory} ({art.manifest['disk_bytes'] / 2**20:.0f} MiB disk, "
        f"{art.manifest['disk_allocated_bytes'] / 2**20:.0f} MiB allocated); ready in {took:.1f} s "
        f"({'cached' if art.manifest.get('from_cache') else 'built'})"
    )
    return art


def machine_for(art):
    from flctl.qemu.rig import MachineConfig, accelerator_for

    accel = accelerator_for(art)
    print(f"\n[qemu] {art.arch.name} accelerator: {accel}")
    return MachineConfig(accel=accel)


@pytest.fixture(scope="session")
def dev_image():
    """The development image (the host's architecture, or $FL_QEMU_ARCH), built or cached, once per session."""
    from flctl.image.arch import host_architecture

    return build_test_image(os.environ.get(ENV_ARCH) or host_architecture().name)


@pytest.fixture(scope="session")
def machine(dev_image):
    return machine_for(dev_image)


@pytest.fixture(scope="session")
def image_for():
    """``image_for(arch) -> ImageArtifacts``: the development image of ``arch`` (amd64, arm64; a foreign one is
    built through qemu-user-static), built or cached once per session."""
    images = {}

    def _image(arch_name: str):
        if arch_name not in images:
            images[arch_name] = build_test_image(arch_name)
        return images[arch_name]

    return _image


@pytest.fixture(scope="session")
def boot_image():
    """``boot_image(art, appliance, workdir) -> BootedAppliance``: boot an appliance of ``art`` on the machine
    for its architecture (qemu-system-aarch64 for an arm64 image)."""
    machines = {}

    def _boot(art, appliance, workdir: Path) -> BootedAppliance:
        if art.arch.name not in machines:
            machines[art.arch.name] = machine_for(art)
        return boot(art, machines[art.arch.name], appliance, workdir)

    return _boot


@pytest.fixture(scope="module")
def start_aggregator(tmp_path_factory):
    """``start_aggregator() -> HostAggregator``: a running one-device-round aggregator of its own (as
    ``host_aggregator``), stopped with the module; for a module that needs one per parameter."""
    started = []

    def _start() -> HostAggregator:
        agg = _make_aggregator(tmp_path_factory)
        if agg.skip_reason is None:
            agg.start()
        started.append(agg)
        return agg

    yield _start
    for agg in started:
        agg.stop()


@dataclass
class HostAggregator:
    """`fl-aggregator serve` on host loopback, as the appliances' guestfwd reaches it."""

    state: Path
    port: int
    package: Path
    log: Path
    args: list[str]
    process: subprocess.Popen | None = None
    skip_reason: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def public_key_hex(self) -> str:
        return (self.state / "aggregator.pub").read_text().strip()

    def enroll(self, public_key_hex: str) -> None:
        """`fl-aggregator enroll`: the device may send updates (works whether or not the server runs)."""
        subprocess.run(
            [_script("fl-aggregator"), "enroll", "--state", str(self.state), public_key_hex],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [_script("fl-aggregator"), "serve", "--state", str(self.state), "--listen", f"127.0.0.1:{self.port}",
                 "--model", str(self.package), *self.args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fl-aggregator exited ({self.process.returncode}); log {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"fl-aggregator did not answer /healthz within 60 s; log {self.log}")

    def status(self, rounds: int = 20) -> dict:
        with urllib.request.urlopen(f"{self.url}/v1/status?rounds={rounds}", timeout=10) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _script(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise RuntimeError(f"{name} is not installed in {path.parent} (pip install -e .)")
    return str(path)


def export_test_package(out: Path, key) -> str | None:
    """The reference traffic-camera model (what the synthetic source feeds), signed with the aggregator key.

    Returns None, or why the package cannot be made."""
    try:
        from flctl.model import export_reference_package
    except ImportError as exc:
        return f"flctl.model (model packaging) is not available: {exc}"
    export_reference_package("cnn", out, key)
    return None


def _make_aggregator(tmp_path_factory, clients: int = 1) -> HostAggregator:
    from nacl.signing import SigningKey

    from appliance.identity import write_key_file
    from flctl.ports import free_port

    root = tmp_path_factory.mktemp("aggregator")
    state = root / "state"
    state.mkdir()
    key = SigningKey.generate()
    write_key_file(state / "aggregator.key", bytes(key), 0o600)
    write_key_file(state / "aggregator.pub", bytes(key.verify_key), 0o644)
    package = root / "model.flpkg"
    agg = HostAggregator(
        state=state,
        port=free_port(),
        package=package,
        log=root / "aggregator.log",
        args=["--min-clients", str(clients), "--goal-clients", str(clients), "--round-timeout", "1800",
              "--rounds", "3", "--epochs", "1", "--batch-size", "16"],
    )  # fmt: skip
    agg.skip_reason = export_test_package(package, key)
    return agg


@pytest.fixture(scope="module")
def host_aggregator(tmp_path_factory) -> Iterator[HostAggregator]:
    """A running aggregator with one-device rounds (quorum 1, goal 1): the appliance alone closes each round.

    Its key always exists (the agent pins it and will not start without it); without a model package the
    server does not run and ``skip_reason`` says why.
    """
    agg = _make_aggregator(tmp_path_factory)
    if agg.skip_reason is None:
        agg.start()
    yield agg
    agg.stop()


@pytest.fixture(scope="module")
def idle_aggregator(tmp_path_factory) -> Iterator[HostAggregator]:
    """Like ``host_aggregator`` but not started: the test calls ``start()`` when the appliance is set up to train.

    An agent that is offered round 1 while it has no camera frames skips that round for good, so a test that
    first checks the camera-configured agent must open round 1 only after switching it to its training data.
    """
    agg = _make_aggregator(tmp_path_factory)
    yield agg
    agg.stop()



def _quick_rounds_toml(camera: int = 0) -> str:
    """The agent.toml override the round tests put on a data partition, as provisioning would: synthetic
    camera ``camera``, small rounds for an emulated CPU, and the rig's plain-HTTP aggregator URL."""
    return f"""[data]
source = "synthetic"
synthetic_camera = {camera}
samples_per_round = 64
[training]
max_threads = 1
[aggregator]
url = "http://10.0.2.100:8080"
allow_plain_http = true
poll_wait_seconds = 5.0
"""


@pytest.fixture(scope="session")
def quick_rounds_toml():
    """``quick_rounds_toml(camera=0) -> str``: the round tests' agent.toml override."""
    return _quick_rounds_toml

@dataclass
class BootedAppliance:
    """A running guest under labgrid, with its shell and the host-side timings."""

    appliance: object
    target: object
    qemu: object
    shell: object
    boot_seconds: float
    notes: dict = field(default_factory=dict)

    def run(self, cmd: str, timeout: float = 60) -> tuple[int, str]:
        out, _, code = self.shell.run(cmd, timeout=timeout)
        return code, "\n".join(out)

    def check(self, cmd: str, timeout: float = 60) -> str:
        code, out = self.run(cmd, timeout)
        assert code == 0, f"`{cmd}` exited {code} in the guest:\n{out}"
        return out

    def wait_for(self, cmd: str, timeout: float, interval: float = 2.0) -> str:
        """Run ``cmd`` in the guest until it succeeds (the console is read all the while)."""
        deadline = time.monotonic() + timeout
        while True:
            code, out = self.run(cmd, timeout=max(30.0, interval * 2))
            if code == 0:
                return out
            if time.monotonic() > deadline:
                raise AssertionError(f"`{cmd}` still failing after {timeout:.0f} s:\n{out}")
            time.sleep(interval)

    def power_cut(self) -> None:
        """Stop the emulator at once (QMP quit): the guest gets no shutdown, its page cache is lost."""
        self.qemu.off()

    def poweroff(self, timeout: float = 300) -> None:
        """Clean shutdown; QEMU runs with -no-shutdown, so wait for status 'shutdown' and then quit it. A guest
        that never gets there fails here, not later as a puzzling unclean filesystem."""
        self.shell.console.sendline("systemctl poweroff")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.shell.console.expect("reboot: Power down", timeout=5)
                break
            except Exception:
                status = self.qemu.monitor_command("query-status")
                if status.get("status") == "shutdown":
                    break
                if time.monotonic() > deadline:
                    self.qemu.off()
                    raise AssertionError(f"the guest did not power off within {timeout:.0f} s") from None
        self.qemu.off()


def boot(dev_image, machine, appliance, workdir: Path) -> BootedAppliance:
    """Start one appliance through labgrid and log in on its serial console."""
    from labgrid import Environment

    from flctl.qemu.rig import labgrid_env

    env_file = labgrid_env(dev_image, [appliance], machine, workdir / f"{appliance.name}-env.yaml")
    env = Environment(str(env_file))
    target = env.get_target(appliance.name)
    qemu = target.get_driver("QEMUDriver")
    started = time.monotonic()
    qemu.on()
    shell = target.get_driver("ShellDriver")
    booted = BootedAppliance(appliance, target, qemu, shell, time.monotonic() - started)
    print(f"\n[qemu] {appliance.name}: shell after {booted.boot_seconds:.1f} s ({machine.accel})")
    return booted


@pytest.fixture(scope="session")
def boot_appliance(dev_image, machine):
    """``boot_appliance(appliance, workdir, variant=None) -> BootedAppliance``: power on and log in through
    labgrid, on the session's machine or a variant of it (e.g. ``dataclasses.replace(machine, rtc_base=...)``)."""

    def _boot(appliance, workdir: Path, variant=None) -> BootedAppliance:
        return boot(dev_image, variant or machine, appliance, workdir)

    return _boot


class UpdateGate:
    """A TCP proxy in front of the host aggregator that lets the first ``allow`` update uploads through and
    holds every later one: the request is read but never forwarded, the connection stays open, so the
    appliance's delivery hangs exactly as it would on a network that stalls mid-upload. ``held`` is set
    once an upload is being held. Everything else (task long-polls, models, packages) passes untouched.

    HTTP/1.1 keep-alive carries several requests per connection, so requests are framed by their head
    and Content-Length (the agent's client always sends one).
    """

    UPLOAD = b"POST /v1/updates"

    def __init__(self, upstream_port: int, allow: int = 1) -> None:
        self.upstream_port = upstream_port
        self.allow = allow
        self.uploads = 0
        self.held = threading.Event()
        self._lock = threading.Lock()
        self._held_sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError:
            client.close()  # aggregator not running: like a refused connection
            return
        upstream.settimeout(None)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(rest) < length:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    rest += chunk
                request, buf = head + b"\r\n\r\n" + rest[:length], rest[length:]
                if head.startswith(self.UPLOAD):
                    with self._lock:
                        self.uploads += 1
                        hold = self.uploads > self.allow
                    if hold:
                        self._held_sockets.append(client)
                        self.held.set()
                        return  # keep the client connection open, unanswered
                upstream.sendall(request)
        except OSError:
            return
        finally:
            if client not in self._held_sockets:
                client.close()
                upstream.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def open(self) -> None:
        """Let every upload through from now on and drop the held connections (their uploads are lost)."""
        with self._lock:
            self.allow = 10**9
        for s in self._held_sockets:
            s.close()
        self._held_sockets.clear()

    def close(self) -> None:
        self._server.close()
        self.open()


@pytest.fixture(scope="module")
def update_gate(idle_aggregator) -> Iterator[UpdateGate]:
    """Between an appliance's guestfwd and ``idle_aggregator``: the first upload passes, later ones hang."""
    gate = UpdateGate(idle_aggregator.port, allow=1)
    yield gate
    gate.close()


@pytest.fixture(scope="module")
def fleet_aggregator(tmp_path_factory) -> Iterator[HostAggregator]:
    """A running aggregator whose rounds wait for two appliances (quorum 2, goal 2)."""
    agg = _make_aggregator(tmp_path_factory, clients=2)
    if agg.skip_reason is None:
        agg.start()
    yield agg
    agg.stop()
