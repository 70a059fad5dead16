"""`flctl`: the host-side tool. Model packages, the fleet demo, development images, the QEMU rig,
flashing and provisioning; each subcommand group lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import sys

from appliance.broken_pipe import quiet_on_broken_pipe
from flctl import demo, model, provision
from flctl.container import cli as container
from flctl.flash import write as flash
from flctl.image import cli as image
from flctl.qemu import cli as qemu

GROUPS = (demo, model, image, qemu, flash, provision, container)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)

    return quiet_on_broken_pipe(run)


if __name__ == "__main__":
    sys.exit(main())
