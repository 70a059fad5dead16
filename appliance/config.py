"""fl-agent configuration: /etc/fl-agent/agent.toml, overridden key by key by <state_dir>/agent.toml.

The image ships the first (read-only root); provisioning writes the second onto the board's data partition.
Validation is strict: an unknown section or key, a wrong type or an out-of-range value stops start-up with
a message naming the file and the key, because a typo silently ignored on a street-corner camera is found
months later, if ever.
"""

from __future__ import annotations

import ssl
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.base_url import base_url_problem

DEFAULT_CONFIG_PATH = Path("/etc/fl-agent/agent.toml")
OVERRIDE_NAME = "agent.toml"


class ConfigError(Exception):
    """A configuration problem; the message names the file and the key."""


@dataclass(frozen=True)
class AggregatorConfig:
    url: str = "https://127.0.0.1:8080"
    # PEM file with the CA that signed the aggregator's certificate, or that certificate itself: the only
    # trust anchor for https (the system's CA store is not used). A relative path is relative to the file.
    ca_file: str = ""
    allow_plain_http: bool = False  # http:// URLs only with this set (loopback tests, the QEMU rig)
    poll_wait_seconds: float = 30.0
    request_timeout_seconds: float = 120.0


@dataclass(frozen=True)
class AgentConfig:
    state_dir: str = "/var/lib/fl-agent"
    log_level: str = "info"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "0.0.0.0:9101"  # empty string disables the endpoint
    # A Prometheus web configuration file (TLS, basic auth; see appliance/metrics_web.py); "": plain HTTP.
    # A relative path is relative to the file that sets it.
    web_config: str = ""


@dataclass(frozen=True)
class DataConfig:
    source: str = "cameras"  # "cameras" (V4L2 through udev) or "synthetic" (demo, tests)
    synthetic_camera: int = 0
    samples_per_round: int = 512
    seed: int = 0


@dataclass(frozen=True)
class CamerasConfig:
    sample_interval_seconds: float = 1.0
    buffer_max_frames: int = 4096
    buffer_max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class TrainingConfig:
    max_threads: int = 0  # 0: as many as the CPU budget allows
    memory_max_bytes: int = 0  # trainer child cgroup memory.max; 0: 3/4 of the agent's own limit
    pressure_pause_avg10: float = 40.0  # pause training while memory PSI "some avg10" is above this


@dataclass(frozen=True)
class OutboxConfig:
    max_messages: int = 64
    max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cameras: CamerasConfig = field(default_factory=CamerasConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)

    @property
    def state_path(self) -> Path:
        return Path(self.agent.state_dir)


_CHOICES = {
    ("data", "source"): ("cameras", "synthetic"),
    ("agent", "log_level"): ("debug", "info", "warning", "error"),
}
_NON_NEGATIVE = {
    ("training", "max_threads"),
    ("training", "memory_max_bytes"),
    ("data", "seed"),
    ("data", "synthetic_camera"),
}


def _check_value(path: Path, section: str, key: str, value: Any, default: Any) -> Any:
    where = f"{path}: [{section}] {key}"
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    if (section, key) in _CHOICES and value not in _CHOICES[(section, key)]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(_CHOICES[(section, key)])}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if (section, key) in _NON_NEGATIVE:
            if value < 0:
                raise ConfigError(f"{where}: must be >= 0, got {value}")
        elif value <= 0:
            raise ConfigError(f"{where}: must be > 0, got {value}")
    if (section, key) == ("aggregator", "url") and (problem := base_url_problem(value)):
        raise ConfigError(f"{where}: {value!r} is not an http(s) URL with a host ({problem})")
    if (section, key) == ("metrics", "listen") and value:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{where}: {value!r} is not HOST:PORT")
    return value


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes the whole file before parsing
        raise ConfigError(f"{path}: not UTF-8 text (TOML is UTF-8): {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _check_aggregator(config: Config, origin: dict[str, Path], main: Path) -> None:
    """Checks across keys (which may come from different files): the transport the URL asks for must be
    configured. Each message names the file that set the key in question."""
    agg = config.aggregator
    url_file = origin.get("url", main)
    if urlsplit(agg.url).scheme == "http":
        if not agg.allow_plain_http:
            raise ConfigError(f"{url_file}: [aggregator] url: {agg.url!r} is plain HTTP: updates and models would "
                              "cross the network unencrypted; use https:// with ca_file, or set "
                              "allow_plain_http = true (loopback tests, the QEMU rig)")
        return
    if not agg.ca_file:
        raise ConfigError(f"{url_file}: [aggregator] url: {agg.url!r} is https but [aggregator] ca_file is not "
                          "set: name the CA (or the aggregator's certificate) to pin")
    where = f"{origin.get('ca_file', url_file)}: [aggregator] ca_file"
    try:
        ssl.create_default_context(cafile=agg.ca_file)
    except FileNotFoundError:
        raise ConfigError(f"{where}: {agg.ca_file} does not exist") from None
    except ssl.SSLError as exc:  # an OSError too: caught first
        raise ConfigError(f"{where}: {agg.ca_file} holds no PEM certificate ({exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {agg.ca_file}: {exc.strerror}") from None


def _merge(config: Config, path: Path, data: dict[str, Any], origin: dict[str, Path] | None = None) -> Config:
    sections = {f.name: getattr(config, f.name) for f in fields(Config)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{path}: unknown section [{section}]; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        current = sections[section]
        known = {f.name: getattr(current, f.name) for f in fields(current)}
        updates = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{path}: [{section}] unknown key {key!r}; known: {', '.join(known)}")
            updates[key] = _check_value(path, section, key, value, known[key])
            if section == "aggregator" and origin is not None:
                origin[key] = path
        for key in ("ca_file", "web_config"):
            if updates.get(key):
                updates[key] = str(path.parent / updates[key])  # an absolute path stays as it is
        sections[section] = type(current)(**{**known, **updates})
    return Config(**sections)


def load_config(path: Path = DEFAULT_CONFIG_PATH, *, override: bool = True, transport: bool = True) -> Config:
    """Read ``path`` (which must exist), then ``<state_dir>/agent.toml`` on top when present. ``transport``
    False skips the checks across files (URL scheme against ca_file/allow_plain_http, the CA file itself, the
    metrics endpoint's web configuration file):
    for checking one file on a host where the device's other file and CA are not."""
    origin: dict[str, Path] = {}
    config = _merge(Config(), path, _read(path), origin)
    override_path = config.state_path / OVERRIDE_NAME
    if override and override_path.is_file() and override_path.resolve() != path.resolve():
        config = _merge(config, override_path, _read(override_path), origin)
    if transport:
        _check_aggregator(config, origin, path)
        _check_web_config(config)
    return config


def _check_web_config(config: Config) -> None:
    """The metrics endpoint's web configuration file must be usable (its certificates, keys and hashes)."""
    if not config.metrics.web_config:
        return
    from appliance.metrics_web import WebConfigError, load_web_config

    try:
        load_web_config(Path(config.metrics.web_config))
    except WebConfigError as exc:
        raise ConfigError(f"[metrics] web_config: {exc}") from None
