"""`fl-agent`: run the agent, make or show the device key, list cameras, check a config file."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
from pathlib import Path

from appliance.broken_pipe import quiet_on_broken_pipe
from appliance.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from appliance.identity import IdentityError, load_or_create_device_key


def _setup_logging(level: str) -> None:
    # Under systemd, journald stamps time and unit itself.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.agent import Agent  # imports onnxruntime's neighbours: keep `keygen` light

    config = load_config(args.config)
    _setup_logging(config.agent.log_level)
    agent = Agent(config)
    extra = []
    if config.data.source == "cameras":
        from appliance.cameras import camera_task

        count = functools.partial(agent.metrics.count_storage_failure, round_given_up=False)
        extra.append(camera_task(config, agent.metrics.registry, on_storage_error=count))
    try:
        asyncio.run(agent.run(extra))
    except KeyboardInterrupt:
        return 0
    return 1  # run() only returns when a loop failed; systemd restarts us


def cmd_keygen(args: argparse.Namespace) -> int:
    identity = load_or_create_device_key(args.data)
    print(f"device_id {identity.device_id}")
    print(f"public_key {identity.public_key_hex}")
    return 0


def cmd_cameras(args: argparse.Namespace) -> int:
    from appliance.cameras import format_camera_table, list_cameras

    print(format_camera_table(list_cameras()))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok (state {config.state_path}, aggregator {config.aggregator.url})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent (what fl-agent.service starts)")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    run.set_defaults(func=cmd_run)
    keygen = sub.add_parser("keygen", help="create the device key if absent; print the device id and public key")
    keygen.add_argument("--data", type=Path, required=True, help="the agent's state directory")
    keygen.set_defaults(func=cmd_keygen)
    cameras = sub.add_parser("cameras", help="list capture-capable V4L2 cameras and their formats")
    cameras.set_defaults(func=cmd_cameras)
    check = sub.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    return quiet_on_broken_pipe(lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, IdentityError) as exc:
        print(f"fl-agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
