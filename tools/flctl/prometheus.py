"""A Prometheus scrape config for a fleet on this host: ``prometheus.yml`` plus file_sd target files.

Used by ``flctl demo`` (agents as local processes) and the QEMU rig (agents' metrics forwarded to host
loopback). The targets live in ``targets/aggregator.json`` and ``targets/appliances.json`` (file_sd), so a
running Prometheus picks up a rewritten target list without a restart. Jobs: ``fl-aggregator`` and
``fl-agent``; every target carries a ``role`` label, appliances also a ``device`` label.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import Path

AGGREGATOR_JOB = "fl-aggregator"
AGENT_JOB = "fl-agent"
SCRAPE_INTERVAL = "5s"


class ScrapeConfigError(ValueError):
    """A target the config cannot hold; the message names it."""


def _check_address(what: str, address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ScrapeConfigError(f"{what}: expected host:port with a port in 1-65535, got {address!r}")
    return address


def write_scrape_config(out_dir: Path, appliances: Mapping[str, str], aggregator: str | None = None) -> Path:
    """Write ``out_dir/prometheus.yml`` and its file_sd targets; return the config's path.

    ``appliances`` maps each appliance's device name to the host:port of its metrics endpoint;
    ``aggregator`` is the aggregator's host:port, or None when there is none to scrape (then the config
    has no ``fl-aggregator`` job and no aggregator target file). Paths in the config are absolute, so
    Prometheus can be started from any directory.
    """
    for name, address in appliances.items():
        if not name:
            raise ScrapeConfigError(f"an appliance with metrics at {address!r} has an empty name")
        _check_address(f"appliance {name}", address)
    if aggregator is not None:
        _check_address("aggregator", aggregator)

    out_dir = out_dir.absolute()
    targets = out_dir / "targets"
    targets.mkdir(parents=True, exist_ok=True)
    jobs = []
    aggregator_file = targets / "aggregator.json"
    if aggregator is not None:
        aggregator_file.write_text(json.dumps([{"targets": [aggregator], "labels": {"role": "aggregator"}}], indent=1))
        jobs.append((AGGREGATOR_JOB, aggregator_file))
    else:
        aggregator_file.unlink(missing_ok=True)  # a stale target from an earlier run would be scraped
    appliances_file = targets / "appliances.json"
    appliances_file.write_text(
        json.dumps(
            [
                {"targets": [address], "labels": {"role": "appliance", "device": name}}
                for name, address in appliances.items()
            ],
            indent=1,
        )
    )
    jobs.append((AGENT_JOB, appliances_file))

    config = out_dir / "prometheus.yml"
    # json.dumps quotes a path as a YAML double-quoted scalar, whatever characters it holds.
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL}\n"
        "scrape_configs:\n"
        + "".join(
            f"  - job_name: {job}\n    file_sd_configs:\n      - files: [{json.dumps(str(path))}]\n"
            for job, path in jobs
        )
    )
    return config


def prometheus_command(config: Path, port: int) -> str:
    """The command line that starts Prometheus on this config (printed for the user), complete: its time
    series go to ``data/`` beside the config (not ``./data`` wherever it is started) and its web UI and API
    listen on ``127.0.0.1:port`` only (Prometheus' default is every address, port 9090)."""
    return shlex.join(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={config.parent / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
    )
