"""``flctl image build``: the command line of the development image build (image/build.py does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from . import disk, kernel, rootfs
from .arch import ARCHITECTURES, ArchitectureError, architecture
from .build import DISK_NAME, ImageBuildError, build_image, default_image_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``flctl image`` (with ``build``) on the flctl subcommand parser."""
    image = sub.add_parser("image", help="build the development disk image of the appliance")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build fl-dev.img (+ .bmap, vmlinux, initrd) from Debian packages")
    build.add_argument(
        "--out",
        type=Path,
        help="also put the image's files in this directory (default: only <cache>/image, a link to the cache)",
    )
    build.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache dir (default: $FL_EDGE_CACHE, else $XDG_CACHE_HOME/fl-edge, else ~/.cache/fl-edge)",
    )
    build.add_argument(
        "--data-size",
        type=_mib,
        default=disk.DEFAULT_DATA_SIZE,
        metavar="MIB",
        help="size of the data partition in MiB (default: 256)",
    )
    build.add_argument(
        "--arch",
        type=arch_name,
        default=None,
        help=f"target architecture: {', '.join(ARCHITECTURES)} (default: this machine's); a foreign one is built "
        "through qemu-user-static",
    )
    build.add_argument("--rebuild", action="store_true", help="ignore cached images and base system")
    build.set_defaults(func=_cmd_build)


def arch_name(text: str) -> str:
    """``--arch``: Debian's name of a known architecture (uname's x86_64/aarch64 are accepted too)."""
    try:
        return architecture(text).name
    except ArchitectureError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _mib(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--data-size wants a whole number of MiB, got {text!r}") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"--data-size {value} MiB is too small (at least 16)")
    return value * disk.MIB


def _cmd_build(args: argparse.Namespace) -> int:
    console = Console(stderr=True, soft_wrap=True)  # messages stay one line, whatever the width
    try:
        build_image(
            cache=args.cache,
            out=args.out,
            data_size=args.data_size,
            rebuild=args.rebuild,
            console=console,
            arch=args.arch,
        )
    except (ImageBuildError, kernel.KernelError, rootfs.RootfsError, disk.DiskError, ArchitectureError) as exc:
        console.print(f"[red]image build failed:[/] {exc}")
        return 1
    print((args.out or default_image_dir(args.cache, args.arch)) / DISK_NAME)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``image`` subcommands standalone: ``python -m flctl.image build``."""
    parser = argparse.ArgumentParser(prog="flctl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["image"]:
        argv.insert(0, "image")
    args = parser.parse_args(argv)
    return int(args.func(args))
