"""``flctl container``: build the images (``build``) and run a fleet of them under podman (``fleet``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance import strict_json
from flctl.image.cache import cache_root

from .build import build_images
from .fleet import CITY, Fleet, FleetSettings, down, podman_ps, status, up
from .payload import SERVICES
from .platforms import PlatformError, host_platform, platform_named
from .podman import ContainerError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``flctl container`` on the flctl subcommand parser."""
    container = sub.add_parser("container", help="OCI images of fl-aggregator and fl-agent; a fleet under podman")
    container_sub = container.add_subparsers(dest="container_command", required=True)
    build = container_sub.add_parser("build", help="build the fl-aggregator and fl-agent images (no registry needed)")
    build.add_argument("--arch", type=_architectures, default=None,
                       help="comma-separated architectures: amd64, arm64 (default: this machine's); a foreign one's "
                       "base system is built through qemu-user-static")
    build.add_argument("--image", choices=sorted(SERVICES), action="append",
                       help="build only this image (repeatable; default: both)")
    build.add_argument("--cache", type=Path, default=None,
                       help="cache dir (default: $FL_EDGE_CACHE, else $XDG_CACHE_HOME/fl-edge, else ~/.cache/fl-edge)")
    build.set_defaults(func=_cmd_build)
    add_fleet_parser(container_sub)


def _architectures(text: str) -> list:
    try:
        return list(dict.fromkeys(platform_named(name.strip()) for name in text.split(",") if name.strip()))
    except PlatformError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_build(args: argparse.Namespace) -> int:
    platforms = args.arch or [host_platform()]
    services = [SERVICES[name] for name in args.image] if args.image else None
    try:
        built = build_images(platforms, services, args.cache, progress=lambda line: print(line, file=sys.stderr))
    except (ContainerError, PlatformError) as exc:
        print(f"flctl container build: {exc}", file=sys.stderr)
        return 1
    for image in built:
        print(f"{image.ref}\t{image.size_bytes / 1e6:.0f} MB\t{image.seconds:.1f} s")
    return 0


def add_fleet_parser(container_sub: argparse._SubParsersAction) -> None:
    fleet = container_sub.add_parser("fleet", help="the city aggregator and N agents under `podman kube play`, "
                                     "from deploy/k8s (docs/containers.md)")
    fleet.add_argument("--dir", type=Path, default=None,
                       help="the fleet's files (default: <cache>/containers/fleet)")
    fleet.add_argument("--cache", type=Path, default=None, help="cache dir (as for build)")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    up = fleet_sub.add_parser("up", help="start the fleet (made on first use; later: resumed as it was)")
    up.add_argument("--devices", type=_positive, default=3, help="agents, one per simulated camera node (default 3)")
    up.add_argument("--port", type=_positive, default=18443, help="the city's HTTPS port on 127.0.0.1 (default 18443)")
    up.add_argument("--rounds", type=int, default=0, help="stop publishing after this many model versions (0: none)")
    up.set_defaults(func=_cmd_fleet_up)
    down = fleet_sub.add_parser("down", help="stop and remove the pods; volumes (state, identities) stay")
    down.add_argument("--purge", action="store_true", help="also remove the volumes, the network and the files")
    down.set_defaults(func=_cmd_fleet_down)
    status = fleet_sub.add_parser("status", help="health of every container, the round, held-out accuracy")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(func=_cmd_fleet_status)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _fleet(args: argparse.Namespace) -> Fleet:
    return Fleet(args.dir or (args.cache or cache_root()) / "containers" / "fleet", args.cache)


def _cmd_fleet_up(args: argparse.Namespace) -> int:
    settings = FleetSettings(devices=args.devices, port=args.port, rounds=args.rounds)
    try:
        result = up(_fleet(args), settings, progress=lambda line: print(line, file=sys.stderr))
    except ContainerError as exc:
        print(f"flctl container fleet up: {exc}", file=sys.stderr)
        return 1
    print(strict_json.dumps(result))
    return 0


def _cmd_fleet_down(args: argparse.Namespace) -> int:
    try:
        down(_fleet(args), purge=args.purge)
    except ContainerError as exc:
        print(f"flctl container fleet down: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_fleet_status(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    try:
        report = status(fleet)
        table = podman_ps(fleet)
    except ContainerError as exc:
        print(f"flctl container fleet status: {exc}", file=sys.stderr)
        return 1
    if args.json:  # the city's /v1/status as it answered: an older aggregator's may hold Infinity
        print(strict_json.dumps_as_found(report))
        return 0
    print(table, end="")
    city = report.get("city")
    if city is None:
        print(f"{CITY}: not answering ({report.get('city_error')})")
        return 1
    current = city.get("current_round") or {}
    accuracy = report.get("held_out_accuracy")
    print(f"{CITY}: model version {city['model']['version']}, round {current.get('round')} "
          f"({current.get('accepted', 0)} update(s) so far)"
          + (f", held-out accuracy {accuracy:.1%}" if accuracy is not None else ""))
    return 0
