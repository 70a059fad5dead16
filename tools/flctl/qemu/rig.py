"""The QEMU rig: how one appliance of the development image is started.

Each appliance gets
- the shared root partition of ``fl-dev.img``, attached read-only straight from the disk image (QEMU's raw
  driver exposes the partition by ``offset``/``size``), so any number of guests share one root;
- its own data partition image (``LABEL=fl-data``), made fresh with its identity on it (device key, pinned
  aggregator key, optional agent.toml override): the "provisioned appliance";
- user-mode networking with ``restrict=on``: the guest reaches nothing but ``10.0.2.100:8080``, which a
  ``guestfwd`` (the ``cmd:socat`` form: one host connection per guest connection) sends to the aggregator on
  the host's loopback, and a ``hostfwd`` from host loopback to the guest's metrics port 9101. The netdev is
  named ``net0`` so that added QEMU options can refer to it (``-object filter-dump,netdev=net0,...``);
- any QEMU options the user adds (``MachineConfig.qemu_args``), last on the command line.

The image's architecture picks the emulator (``QEMU_TARGETS``): qemu-system-x86_64 with machine q35, or
qemu-system-aarch64 with machine virt; the rest (drives, network, labgrid drivers) is the same.

The same pieces feed labgrid's QEMUDriver (``labgrid_env``) for the boot tests and a plain ``qemu`` command
line (``qemu_command``) for ``flctl qemu run``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing

from appliance.identity import read_key_file, write_key_file

from ..image import disk
from ..image.arch import host_architecture, is_foreign
from ..image.build import ImageArtifacts
from ..image.cache import cache_root

GUEST_AGGREGATOR = ("10.0.2.100", 8080)
GUEST_METRICS_PORT = 9101
NETDEV_ID = "net0"
KVM_PROBE_SECONDS = 15
KVM_PROBE_MEMO_SECONDS = 24 * 3600
ENV_ACCEL = "FL_QEMU_ACCEL"  # force "kvm" or "tcg"
PROMPT = r"root@fl-dev:[^\s]*# "
# The autologin line ("fl-dev login: root (automatic login)") must not count as a login prompt.
LOGIN_PROMPT = r"fl-dev login: (?!root \(automatic)"


class RigError(RuntimeError):
    """The rig cannot start an appliance; the message names what is missing."""


@dataclass(frozen=True)
class QemuTarget:
    """How QEMU runs the image of one architecture."""

    binary: str
    package: str  # the Debian package that has ``binary``
    machine: str
    tcg_cpu: str  # the CPU model under TCG (under KVM: "host")
    console: str  # the serial console's device in the guest


QEMU_TARGETS = {
    # TCG: "max" gives the guest SSE4/AVX2, which numpy's and onnxruntime's wheels expect.
    "amd64": QemuTarget("qemu-system-x86_64", "qemu-system-x86", "q35", "max", "ttyS0"),
    # cortex-a72 (ARMv8.0, as a Raspberry Pi 4): the kernel reached userspace in 1.7 CPU seconds, against 1.8 for
    # "max,pauth=off" and 8.3 for "max", whose pointer authentication QEMU emulates at a high cost (docs/qemu.md).
    "arm64": QemuTarget("qemu-system-aarch64", "qemu-system-arm", "virt", "cortex-a72", "ttyAMA0"),
}


def qemu_target(art: ImageArtifacts) -> QemuTarget:
    """The emulator for ``art``'s architecture."""
    return QEMU_TARGETS[art.arch.name]


@dataclass(frozen=True)
class Identity:
    """A device identity as laid out on the data partition (docs/CONTRACTS.md)."""

    signing_key: nacl.signing.SigningKey

    @property
    def public_key_hex(self) -> str:
        return bytes(self.signing_key.verify_key).hex()

    @property
    def device_id(self) -> str:
        return hashlib.sha256(bytes(self.signing_key.verify_key)).digest()[:16].hex()

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def load_or_generate(cls, path: Path) -> Identity:
        """The key kept at ``path`` (hex, 0600), made there on first use: a rig work dir used again keeps
        its devices, so the aggregator's enrolment does not grow by a device per run."""
        if path.exists():
            return cls(nacl.signing.SigningKey(read_key_file(path)))
        identity = cls.generate()
        write_key_file(path, bytes(identity.signing_key), 0o600)
        return identity


@dataclass
class Appliance:
    """One guest: its name, files and forwarded ports."""

    name: str
    workdir: Path
    identity: Identity
    metrics_port: int
    aggregator_port: int | None
    data_image: Path = field(init=False)
    console_log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.data_image = self.workdir / f"{self.name}-data.ext4"
        self.console_log = self.workdir / f"{self.name}-console.log"


# The rig's link to the host aggregator is QEMU's user network on this machine: plain HTTP, said explicitly
# (the image's default config names the aggregator URL and nothing else).
RIG_AGENT_TOML = "[aggregator]\nallow_plain_http = true\n"


def provision_data_partition(
    art: ImageArtifacts,
    dest: Path,
    identity: Identity,
    aggregator_pub_hex: str | None,
    agent_toml: str | None = None,
) -> None:
    """Write a fresh data partition image for one appliance, its identity on it, owned by fl-agent."""
    size = art.partition(disk.DATA_LABEL).size
    uid, gid = int(art.manifest["fl_agent_uid"]), int(art.manifest["fl_agent_gid"])
    with tempfile.TemporaryDirectory(prefix="fl-data-") as tmp:
        state = Path(tmp) / "fl-agent"
        ident = state / "identity"
        ident.mkdir(parents=True)
        (ident / "device.key").write_text(bytes(identity.signing_key).hex() + "\n")
        os.chmod(ident / "device.key", 0o600)
        if aggregator_pub_hex is not None:
            if len(aggregator_pub_hex) != 64 or any(c not in "0123456789abcdef" for c in aggregator_pub_hex):
                raise RigError(f"aggregator public key must be 64 lowercase hex chars, got {aggregator_pub_hex!r}")
            (ident / "aggregator.pub").write_text(aggregator_pub_hex + "\n")
            os.chmod(ident / "aggregator.pub", 0o644)
        (state / "agent.toml").write_text(RIG_AGENT_TOML if agent_toml is None else agent_toml)
        os.chmod(state / "agent.toml", 0o644)
        os.chmod(state, 0o750)
        os.chmod(ident, 0o700)
        for path in [state, *state.rglob("*")]:
            os.chown(path, uid, gid)
        disk.make_data_fs(dest, size, source=Path(tmp))


def accelerator_for(art: ImageArtifacts) -> str:
    """The accelerator for ``art``: "tcg" for another architecture than the host's, else ``choose_accelerator``."""
    if is_foreign(art.arch):
        if os.environ.get(ENV_ACCEL) == "kvm":
            raise RigError(f"{ENV_ACCEL}=kvm: an {art.arch.name} image cannot run under KVM on this host")
        return "tcg"
    return choose_accelerator(str(art.kernel), str(art.initrd))


@functools.cache
def choose_accelerator(vmlinux: str, initrd: str) -> str:
    """ "kvm" when a tiny boot of the host architecture's image under KVM prints its marker within 15 s, else
    "tcg" (see docs/qemu.md).

    /dev/kvm may open and still be useless (nested paging-only virtualisation booted nothing in 400 s on the
    development machines), so its presence proves nothing: boot the initramfs with ``fl.probe=1``. The answer
    is remembered for a day per host kernel, QEMU and CPU (``<cache>/kvm-probe.json``), so a machine without
    working KVM pays the 15 s once, not on every run.
    """
    forced = os.environ.get(ENV_ACCEL)
    if forced:
        if forced not in ("kvm", "tcg"):
            raise RigError(f"{ENV_ACCEL}={forced!r}: expected 'kvm' or 'tcg'")
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    memo = cache_root() / "kvm-probe.json"
    host = _host_fingerprint()
    try:
        seen = json.loads(memo.read_text())
        if seen.get("host") == host and time.time() - float(seen.get("at", 0)) < KVM_PROBE_MEMO_SECONDS:
            return str(seen["accel"])
    except (OSError, ValueError, KeyError):
        pass
    accel = _probe_kvm(vmlinux, initrd)
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"host": host, "accel": accel, "at": time.time()}))
    return accel


def _host_fingerprint() -> str:
    qemu = subprocess.run([qemu_binary(), "-version"], capture_output=True, text=True, check=False).stdout
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = ""
    return hashlib.sha256(f"{os.uname().release}|{qemu.splitlines()[:1]}|{cpu}".encode()).hexdigest()[:16]


def _probe_kvm(vmlinux: str, initrd: str) -> str:
    host = host_target()
    cmd = [
        qemu_binary(host),
        "-accel",
        "kvm",
        "-M",
        host.machine,
        "-cpu",
        "host",
        "-m",
        "256",
        "-nographic",
        "-no-reboot",
        "-kernel",
        vmlinux,
        "-initrd",
        initrd,
        "-append",
        f"console={host.console} fl.probe=1 loglevel=1",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=KVM_PROBE_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        return "tcg"
    return "kvm" if b"FL-PROBE-OK" in proc.stdout else "tcg"


def host_target() -> QemuTarget:
    return QEMU_TARGETS[host_architecture().name]


def qemu_binary(target: QemuTarget | None = None) -> str:
    """The emulator's path (default: the host architecture's); one line naming the package when it is missing."""
    target = target or host_target()
    path = shutil.which(target.binary)
    if path is None:
        raise RigError(f"{target.binary} is not installed (apt-get install {target.package}; tools/host-packages.txt)")
    return path


@dataclass(frozen=True)
class MachineConfig:
    accel: str
    memory: str = "1024M"
    smp: int = 1
    # QEMU's -rtc base=: the date the guest's real-time clock starts at ("2020-01-01", "2020-01-01T08:00:00"),
    # as on a board whose clock is wrong; "" keeps QEMU's default (the host's time, UTC).
    rtc_base: str = ""
    # QEMU options added to every guest's command line, after the rig's own; "{name}" in an option becomes
    # the appliance's name, so that files named in it stay apart (file={name}.pcap).
    qemu_args: tuple[str, ...] = ()

    def cpu(self, target: QemuTarget) -> str:
        return "host" if self.accel == "kvm" else target.tcg_cpu


def drive_args(art: ImageArtifacts, appliance: Appliance) -> list[str]:
    root = art.partition(disk.ROOT_LABEL)
    return [
        "-drive",
        f"file={art.disk},format=raw,if=virtio,readonly=on,offset={root.offset},size={root.size}",
        "-drive",
        f"file={appliance.data_image},format=raw,if=virtio,discard=unmap",
    ]


def netdev_args(appliance: Appliance) -> list[str]:
    """The guest's one NIC (virtio) on a user-mode netdev with the id ``NETDEV_ID``.

    ``-nic`` would give the netdev an anonymous id, and QEMU options that attach to a netdev (filter-dump,
    filter-redirector) need its name. A ``-netdev`` also turns off QEMU's default NIC, as ``-nic`` does.
    """
    opts = ["user", f"id={NETDEV_ID}", "restrict=on"]
    if appliance.aggregator_port is not None:
        ip, port = GUEST_AGGREGATOR
        # One socat per guest connection: the plain tcp: form connects only once, at QEMU start.
        opts.append(f"guestfwd=tcp:{ip}:{port}-cmd:socat - TCP:127.0.0.1:{appliance.aggregator_port}")
    opts.append(f"hostfwd=tcp:127.0.0.1:{appliance.metrics_port}-:{GUEST_METRICS_PORT}")
    return ["-netdev", ",".join(opts), "-device", f"virtio-net-pci,netdev={NETDEV_ID}"]


def guest_args(art: ImageArtifacts, appliance: Appliance, machine: MachineConfig) -> list[str]:
    """Everything except kernel, -append, machine/cpu/memory, serial and monitor (labgrid sets those)."""
    return [
        "-accel",
        machine.accel,
        "-smp",
        str(machine.smp),
        "-initrd",
        str(art.initrd),
        *drive_args(art, appliance),
        *netdev_args(appliance),
        "-device",
        "virtio-rng-pci",
        *(["-rtc", f"base={machine.rtc_base}"] if machine.rtc_base else []),
        "-no-reboot",
        *[arg.replace("{name}", appliance.name) for arg in machine.qemu_args],
    ]


def qemu_command(
    art: ImageArtifacts,
    appliance: Appliance,
    machine: MachineConfig,
    qmp_socket: Path | None = None,
    console_on_stdio: bool = False,
) -> list[str]:
    """A complete command line for one guest. QEMU exits when the guest powers off (no -no-shutdown).

    The serial console goes to the appliance's log file, which never blocks the guest; with
    ``console_on_stdio`` it is also on QEMU's stdin/stdout (no monitor multiplexed in, so Ctrl-A is the
    guest's, and the terminal's Ctrl-C is a signal for whoever runs QEMU, not a key that kills it).
    ``qmp_socket``: a QMP server socket through which the rig asks the guest to power off.
    """
    if console_on_stdio:
        chardev = f"stdio,id=console,signal=on,logfile={appliance.console_log}"
        serial = ["-chardev", chardev, "-serial", "chardev:console"]
    else:
        serial = ["-serial", f"file:{appliance.console_log}"]
    target = qemu_target(art)
    return [
        qemu_binary(target),
        "-M",
        target.machine,
        "-cpu",
        machine.cpu(target),
        "-m",
        machine.memory,
        "-kernel",
        str(art.kernel),
        "-append",
        art.cmdline,
        *guest_args(art, appliance, machine),
        *serial,
        "-monitor",
        "none",
        *(["-qmp", f"unix:{qmp_socket},server=on,wait=off"] if qmp_socket is not None else []),
        "-display",
        "none",
    ]


def labgrid_env(art: ImageArtifacts, appliances: list[Appliance], machine: MachineConfig, path: Path) -> Path:
    """Write a labgrid environment (one target per appliance: QEMUDriver + ShellDriver) to ``path``."""
    import yaml

    target = qemu_target(art)
    targets = {}
    for a in appliances:
        targets[a.name] = {
            "drivers": {
                "QEMUDriver": {
                    "qemu_bin": "qemu",
                    "machine": target.machine,
                    "cpu": machine.cpu(target),
                    "memory": machine.memory,
                    "kernel": "kernel",
                    "boot_args": art.cmdline,
                    # Guest poweroff leaves QEMU paused (status "shutdown") so a test can tell it from a crash.
                    "extra_args": shlex.join(["-no-shutdown", *guest_args(art, a, machine)]),
                    "display": "none",
                },
                "ShellDriver": {
                    "prompt": PROMPT,
                    "login_prompt": LOGIN_PROMPT,
                    "username": "root",
                    "login_timeout": 300,
                    "await_login_timeout": 5,
                },
            }
        }
    env = {
        "targets": targets,
        "tools": {"qemu": qemu_binary(target)},
        "images": {"kernel": str(art.kernel)},
    }
    path.write_text(yaml.safe_dump(env, sort_keys=False))
    return path


def wait_for_port(port: int, timeout: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RigError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s") from None
            time.sleep(0.2)
