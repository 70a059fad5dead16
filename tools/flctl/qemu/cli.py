"""``flctl qemu run|test``: boot appliances of the development image in QEMU.

``flctl qemu run``   boots N appliances (default 1) that share the image's read-only root; each gets its own
                     data partition with its device key (kept in the work dir; enrolled with a local aggregator
                     when ``--aggregator-state`` is given) and a metrics port forwarded to host loopback. Serial
                     consoles go to log files (``--console`` puts appliance 0's on this terminal too).
                     Ctrl-C, SIGTERM or SIGHUP powers them off (guests.py).
``flctl qemu env``   provisions appliances the same way and writes a labgrid environment for them
                     (QEMUDriver + ShellDriver per appliance), for ``pytest --lg-env`` or labgrid-client.
                     Both write WORKDIR/prometheus/prometheus.yml (file_sd) to scrape them.
``flctl qemu test``  runs the boot tests (pytest -m qemu tests/qemu) -- what CI runs.

``--arch arm64`` does each of these with the arm64 image (qemu-system-aarch64, machine virt, TCG).

See docs/qemu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

from rich.console import Console

from appliance.identity import IdentityError

from ..image.arch import ARCHITECTURES, ArchitectureError
from ..image.build import ImageArtifacts, ImageBuildError, build_image
from ..image.cli import arch_name
from ..ports import free_port
from ..prometheus import ScrapeConfigError, prometheus_command, write_scrape_config
from ..shutdown import StopRequested, stop_on_signals
from . import guests, rig

PROJECT_ROOT = Path(__file__).resolve().parents[3]
# The architecture whose image the boot tests take (tests/qemu/conftest.py's dev_image): `flctl qemu test --arch`.
ENV_TEST_ARCH = "FL_QEMU_ARCH"


def _load_or_build(image_dir: Path | None, cache: Path | None, console: Console, arch: str | None) -> ImageArtifacts:
    if image_dir is not None:
        art = ImageArtifacts.load(image_dir)
        if arch is not None and art.arch.name != arch:
            raise rig.RigError(f"--arch {arch}, but the image in {image_dir} is an {art.arch.name} image")
        return art
    return build_image(cache=cache, console=console, arch=arch)


def _aggregator_pub(state: Path | None, pub: str | None) -> str | None:
    if pub:
        return pub.strip().lower()
    if state is not None:
        path = state / "aggregator.pub"
        if not path.exists():
            raise rig.RigError(f"{path} does not exist: run `fl-aggregator keygen --state {state}` first")
        return path.read_text().strip()
    return None


def _enroll(state: Path, public_key_hex: str) -> None:
    exe = Path(sys.executable).with_name("fl-aggregator")
    proc = subprocess.run(
        [str(exe), "enroll", "--state", str(state), public_key_hex], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise rig.RigError(f"fl-aggregator enroll failed: {proc.stderr.strip() or proc.stdout.strip()}")


def machine_from_args(args: argparse.Namespace, accel: str) -> rig.MachineConfig:
    """The guests' machine as ``run`` and ``env`` were asked for it."""
    return rig.MachineConfig(
        accel=accel, memory=args.memory, smp=args.smp, rtc_base=args.rtc_base or "", qemu_args=tuple(args.qemu_args)
    )


def _prepare(args: argparse.Namespace, console: Console):
    """Image, accelerator and the provisioned appliances shared by ``run`` and ``env``."""
    art = _load_or_build(args.image, args.cache, console, args.arch)
    pub = _aggregator_pub(args.aggregator_state, args.aggregator_pub)
    if pub is None:
        console.print(
            "[yellow]no aggregator key given (--aggregator-state/--aggregator-pub): "
            "fl-agent will refuse to start without a pinned aggregator key[/]"
        )
    accel = rig.accelerator_for(art)
    machine = machine_from_args(args, accel)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fl-qemu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    override = args.agent_toml.read_text() if args.agent_toml else None
    appliances = []
    for i in range(args.count):
        identity = rig.Identity.load_or_generate(workdir / f"fl{i}-device.key")
        a = rig.Appliance(
            f"fl{i}", workdir, identity, metrics_port=free_port(), aggregator_port=args.aggregator_port
        )
        rig.provision_data_partition(art, a.data_image, identity, pub, agent_toml=override)
        if args.aggregator_state is not None:
            _enroll(args.aggregator_state, identity.public_key_hex)
        appliances.append(a)
    return art, machine, workdir, appliances


def write_prometheus_config(
    workdir: Path, appliances: list[rig.Appliance], aggregator_port: int | None, console: Console
) -> Path:
    """Write ``workdir/prometheus/prometheus.yml`` scraping every appliance through its metrics hostfwd
    (and the host aggregator when the rig was given its port), and tell the user how to start Prometheus."""
    config = write_scrape_config(
        workdir / "prometheus",
        {a.name: f"127.0.0.1:{a.metrics_port}" for a in appliances},
        aggregator=None if aggregator_port is None else f"127.0.0.1:{aggregator_port}",
    )
    console.print(f"Prometheus config (file_sd): {config}", markup=False, soft_wrap=True)
    console.print(f"  run: {prometheus_command(config, free_port())}", markup=False, soft_wrap=True)
    return config


def cmd_env(args: argparse.Namespace) -> int:
    """Provision appliances and write a labgrid environment for them (for ``pytest --lg-env``)."""
    console = Console(stderr=True, soft_wrap=True)  # messages stay one line, whatever the width
    try:
        art, machine, workdir, appliances = _prepare(args, console)
        path = rig.labgrid_env(art, appliances, machine, args.output)
    except (rig.RigError, ImageBuildError, ArchitectureError, IdentityError, OSError) as exc:
        console.print(f"[red]qemu env:[/] {exc}")
        return 1
    for a in appliances:
        console.print(f"[bold]{a.name}[/] device {a.identity.device_id}: metrics 127.0.0.1:{a.metrics_port}")
    console.print(f"labgrid environment {path} (targets {', '.join(a.name for a in appliances)}; data in {workdir})")
    try:
        write_prometheus_config(workdir, appliances, args.aggregator_port, console)
    except (ScrapeConfigError, OSError) as exc:
        console.print(f"[red]qemu env:[/] Prometheus config: {exc}")
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Boot the appliances and keep them running until one stops, Ctrl-C, SIGTERM or SIGHUP; then power them
    off (guests.stop_guests). 0 when every guest powered off cleanly."""
    console = Console(stderr=True, soft_wrap=True)  # messages stay one line, whatever the width
    with stop_on_signals():
        try:
            return _run(args, console)
        except KeyboardInterrupt:  # before any guest was started (while building, provisioning)
            console.print("qemu run: stopped (Ctrl-C)")
            return 130
        except StopRequested as exc:
            console.print(f"qemu run: stopped by {exc}")
            return exc.exit_code


def _run(args: argparse.Namespace, console: Console) -> int:
    try:
        art, machine, workdir, appliances = _prepare(args, console)
        write_prometheus_config(workdir, appliances, args.aggregator_port, console)
    except (rig.RigError, ImageBuildError, ArchitectureError, ScrapeConfigError, IdentityError, OSError) as exc:
        console.print(f"[red]qemu run:[/] {exc}")
        return 1
    sockets = Path(tempfile.mkdtemp(prefix="fl-qmp-"))  # short: a unix socket path holds 107 bytes at most
    terminal = _terminal_state() if args.console else None
    running: list[guests.Guest] = []
    try:
        for i, a in enumerate(appliances):
            on_terminal = args.console and i == 0
            running.append(guests.start_guest(art, a, machine, sockets / f"{a.name}.qmp", on_terminal))
            where = "this terminal and " if on_terminal else ""
            console.print(
                f"[bold]{a.name}[/] device {a.identity.device_id} ({machine.accel}): metrics "
                f"http://127.0.0.1:{a.metrics_port}/metrics, console {where}{a.console_log}, data {a.data_image}"
            )
        console.print(f"[dim]work dir {workdir}; Ctrl-C powers the appliances off[/]")
        while all(g.running for g in running):
            time.sleep(0.5)
    except (KeyboardInterrupt, StopRequested) as exc:
        console.print(f"qemu run: stopping ({'Ctrl-C' if isinstance(exc, KeyboardInterrupt) else exc})")
    finally:
        try:
            outcome = guests.stop_guests(running, args.shutdown_timeout, report=console.print)
        finally:
            _restore_terminal(terminal)
            shutil.rmtree(sockets, ignore_errors=True)
    for name, what in outcome.items():
        console.print(f"{name}: {what}")
    return 0 if all(what == guests.POWERED_OFF for what in outcome.values()) else 1


def _terminal_state() -> list | None:
    """The terminal's settings, to put back if a QEMU holding the console is killed before it restores them."""
    try:
        return termios.tcgetattr(sys.stdin.fileno())
    except (termios.error, OSError, ValueError):
        return None


def _restore_terminal(state: list | None) -> None:
    if state is not None:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, state)


def cmd_test(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.cache:
        env["FL_EDGE_CACHE"] = str(args.cache)
    if args.arch:
        env[ENV_TEST_ARCH] = args.arch
    cmd = [sys.executable, "-m", "pytest", "-m", "qemu", "-s", str(PROJECT_ROOT / "tests" / "qemu"), *args.pytest_args]
    return subprocess.call(cmd, cwd=PROJECT_ROOT, env=env)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``flctl qemu`` (``run``, ``test``) on the flctl subcommand parser."""
    qemu = sub.add_parser("qemu", help="boot the development image in QEMU (the appliance rig)")
    qsub = qemu.add_subparsers(dest="qemu_command", required=True)

    run = qsub.add_parser("run", help="boot N appliances sharing the read-only root image")
    _appliance_args(run)
    run.add_argument("--console", action="store_true", help="attach appliance 0's serial console to this terminal "
                     "(it is written to its log file too); Ctrl-C powers the appliances off")
    run.add_argument("--shutdown-timeout", type=_seconds, default=guests.POWEROFF_TIMEOUT, metavar="SECONDS",
                     help="how long a guest may take to power off before it is stopped (default %(default).0f)")
    run.set_defaults(func=cmd_run)

    env = qsub.add_parser("env", help="provision N appliances and write a labgrid environment (pytest --lg-env)")
    _appliance_args(env)
    env.add_argument("-o", "--output", type=Path, default=Path("fl-qemu-env.yaml"), help="environment file")
    env.set_defaults(func=cmd_env)

    test = qsub.add_parser("test", help="run the QEMU boot tests (pytest -m qemu tests/qemu)")
    test.add_argument("--cache", type=Path, help="image cache dir")
    test.add_argument("--arch", type=arch_name, help=f"boot the {'/'.join(ARCHITECTURES)} image (default: this "
                      "machine's); tests/qemu/test_arm64_boot.py boots the arm64 one whatever this says")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments")
    test.set_defaults(func=cmd_test)


def _appliance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--count", type=_positive, default=1, help="number of appliances (default 1)")
    p.add_argument("--image", type=Path, metavar="DIR",
                   help="the image in DIR, as `flctl image build` left it (<cache>/image) or wrote it (--out DIR) "
                        "(default: build the image, or take it from the cache when nothing changed)")
    p.add_argument("--cache", type=Path, help="image cache dir (default: $FL_EDGE_CACHE, else "
                   "$XDG_CACHE_HOME/fl-edge, else ~/.cache/fl-edge)")
    p.add_argument("--arch", type=arch_name, help=f"the image's architecture: {', '.join(ARCHITECTURES)} (default: "
                   "this machine's, or the --image's); arm64 runs in qemu-system-aarch64 (machine virt, TCG)")
    p.add_argument("--workdir", type=Path, help="where data partitions and console logs go (default: a temp dir)")
    p.add_argument("--aggregator-port", type=_port, help="host loopback port of the aggregator (guest 10.0.2.100:8080)")
    p.add_argument("--aggregator-state", type=Path, help="aggregator state dir: pin its key, enroll the devices")
    p.add_argument("--aggregator-pub", help="aggregator public key (64 hex chars) if not from --aggregator-state")
    p.add_argument("--agent-toml", type=Path, help="per-device agent.toml override put on each data partition "
                   "(replaces the rig's default one: include [aggregator] allow_plain_http = true)")
    p.add_argument("--memory", default="1024M", help="guest memory (default 1024M)")
    p.add_argument("--smp", type=_positive, default=1, help="guest CPUs (default 1)")
    p.add_argument("--rtc-base", type=_rtc_date, metavar="DATE",
                   help="start the guests' real-time clock at DATE (2020-01-01 or 2020-01-01T08:00:00), as on a "
                        "board without a battery-backed clock (default: the host's time)")
    p.add_argument("qemu_args", nargs="*", metavar="-- QEMU_ARG",
                   help="QEMU options added to each guest's command line, after `--`; {name} in them becomes the "
                        "appliance's name, and the guest's netdev is net0: "
                        "-- -object filter-dump,id=dump,netdev=net0,file={name}.pcap")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _rtc_date(text: str) -> str:
    """A date QEMU's -rtc base= takes, checked here so a typo is one line rather than a QEMU that exits."""
    for layout in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"):
        with contextlib.suppress(ValueError):
            time.strptime(text, layout)
            return text
    raise argparse.ArgumentTypeError(f"expected a date like 2020-01-01 or 2020-01-01T08:00:00, got {text!r}")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a TCP port in 1-65535, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run ``qemu`` subcommands standalone: ``python -m flctl.qemu run``."""
    parser = argparse.ArgumentParser(prog="flctl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["qemu"]:
        argv.insert(0, "qemu")
    args = parser.parse_args(argv)
    return int(args.func(args))
