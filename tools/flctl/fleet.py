"""A local fleet on loopback: one aggregator and N fl-agent processes, each with its own state directory.

Used by `flctl demo` and by the end-to-end tests. The processes are the real console scripts
(`fl-aggregator serve`, `fl-agent run`), configured the way a provisioned board is: a device key and the
pinned aggregator key in the agent's state directory, an agent.toml, and the aggregator's enrolment list.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from nacl.signing import SigningKey

from aggregator.adaptive_clip import AdaptiveClip
from aggregator.rounds import DEFAULT_MAX_SAMPLES
from appliance.identity import load_or_create_device_key, read_key_file, write_aggregator_key, write_key_file

from .ports import free_port
from .shutdown import dies_with_parent


def _script(name: str) -> str:
    """The console script installed beside this interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


# Secure aggregation's clip norm when none is given: far above one camera's delta (2-4 in the first rounds with the
# demo's defaults), so it does not bite, and fine enough: a device's quantisation step is below 1e-6.
SECAGG_CLIP_NORM = 10.0


@dataclass
class Device:
    index: int
    state_dir: Path
    config_path: Path
    device_id: str
    metrics_port: int
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@dataclass
class Fleet:
    root: Path
    model: str = "cnn"
    devices: int = 8
    rounds: int = 10
    strategy: str = "fedavg"
    encoding: str = "float32"
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 0.05
    samples_per_round: int = 768
    min_clients: int | None = None
    round_timeout: float = 120.0
    seed: int = 0
    secure_aggregation: bool = False  # `serve --secure-aggregation`: the aggregator sees only sums
    clip_norm: float = 0.0  # devices (and, with DP, the aggregator) clip each delta to this L2 norm; 0: off
    dp_noise_multiplier: float | None = None  # set: `--dp MODE` with this noise multiplier (docs/privacy.md)
    dp_mode: str = "central"  # or "distributed": the devices add the noise, inside secure aggregation
    dp_epsilon_budget: float | None = None
    dp_adaptive_clip: AdaptiveClip | None = None  # central DP: the clip norm follows this quantile of the norms
    port: int = 0
    members: list[Device] = field(default_factory=list)
    aggregator: subprocess.Popen | None = None

    @property
    def aggregator_state(self) -> Path:
        return self.root / "aggregator"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def package_path(self) -> Path:
        return self.root / f"{self.model}.flpkg"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def aggregator_key(self) -> SigningKey:
        """The aggregator's signing key, created in its state dir the way `fl-aggregator serve` expects it."""
        path = self.aggregator_state / "aggregator.key"
        if not path.exists():
            write_key_file(path, bytes(SigningKey.generate()), 0o600)
        return SigningKey(read_key_file(path))

    def prepare(self, export_package) -> None:
        """Keys, model package, agent configs and the enrolment file. ``export_package(model, out, key)``."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        key = self.aggregator_key()
        if not self.package_path.exists():
            export_package(self.model, self.package_path, key)
        self.port = self.port or free_port()
        enrolment = []
        self.members = []
        for i in range(self.devices):
            state = self.root / f"device-{i:02d}"
            identity = load_or_create_device_key(state)
            write_aggregator_key(state, key.verify_key)
            port = free_port()
            config = state / "agent.toml"
            config.write_text(
                f'[aggregator]\nurl = "{self.url}"\nallow_plain_http = true  # loopback\npoll_wait_seconds = 20.0\n'
                f'[agent]\nstate_dir = "{state}"\n'
                f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
                f'[data]\nsource = "synthetic"\nsynthetic_camera = {i}\n'
                f"samples_per_round = {self.samples_per_round}\nseed = {self.seed}\n"
                f"[training]\nmax_threads = 1\n"
            )
            enrolment.append(
                {"device_id": identity.device_id, "public_key": identity.public_key_hex, "name": state.name}
            )
            self.members.append(Device(i, state, config, identity.device_id, port, self.logs / f"{state.name}.log"))
        enrol_file = self.root / "enrolment.jsonl"
        enrol_file.write_text("".join(json.dumps(e) + "\n" for e in enrolment))
        subprocess.run(
            [_script("fl-aggregator"), "enroll", "--state", str(self.aggregator_state), "--from", str(enrol_file)],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def start(self) -> None:
        self.aggregator = _spawn(self.serve_command(), self.logs / "aggregator.log")
        self.wait_healthy()
        for device in self.members:
            device.process = _spawn([_script("fl-agent"), "run", "--config", str(device.config_path)], device.log_path)

    def serve_command(self) -> list[str]:
        """The ``fl-aggregator serve`` command line of this fleet's aggregator."""
        min_clients = self.min_clients or max(1, (self.devices * 3 + 3) // 4)
        cmd = [
            _script("fl-aggregator"), "serve",
            "--state", str(self.aggregator_state),
            "--listen", f"127.0.0.1:{self.port}",
            "--model", str(self.package_path),
            "--strategy", self.strategy,
            "--min-clients", str(min_clients),
            "--goal-clients", str(self.devices),
            "--round-timeout", str(self.round_timeout),
            "--rounds", str(self.rounds),
            "--epochs", str(self.epochs),
            "--batch-size", str(self.batch_size),
            "--lr", str(self.learning_rate),
            "--encoding", self.encoding,
        ]  # fmt: skip
        if self.clip_norm:
            cmd += ["--clip-norm", str(self.clip_norm)]
        if self.samples_per_round > DEFAULT_MAX_SAMPLES:  # each device signs its samples_per_round synthetic samples
            cmd += ["--max-samples", str(self.samples_per_round)]
        if self.dp_noise_multiplier is not None:
            cmd += ["--dp", self.dp_mode, "--dp-noise-multiplier", str(self.dp_noise_multiplier)]
            if self.dp_epsilon_budget is not None:
                cmd += ["--dp-epsilon-budget", str(self.dp_epsilon_budget)]
            if self.dp_adaptive_clip is not None:
                adaptive = self.dp_adaptive_clip
                cmd += ["--dp-adaptive-clip", str(adaptive.target_quantile),
                        "--dp-clip-learning-rate", str(adaptive.learning_rate)]
                if adaptive.count_stddev is not None:
                    cmd += ["--dp-clip-count-stddev", str(adaptive.count_stddev)]
        if self.secure_aggregation:  # it needs a clip norm: the quantisation range comes from it
            cmd += ["--secure-aggregation", *([] if "--clip-norm" in cmd else ["--clip-norm", str(SECAGG_CLIP_NORM)])]
        return cmd

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.aggregator is not None and self.aggregator.poll() is not None:
                raise RuntimeError(f"the aggregator exited with {self.aggregator.returncode}: see {self.logs}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the aggregator did not answer /healthz within {timeout} s: see {self.logs}")

    def status(self) -> dict:
        # generous: on a loaded machine (a demo's agents training on every core) the answer can take seconds
        with urllib.request.urlopen(self.url + "/v1/status", timeout=30) as r:
            return json.load(r)

    def stop(self) -> None:
        procs = [d.process for d in self.members if d.process] + ([self.aggregator] if self.aggregator else [])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen:
    """Start a fleet process in its own session (a terminal's Ctrl-C reaches only flctl, which stops the fleet
    in order); the kernel sends it SIGTERM if the process that started it dies without doing so."""
    log = log_path.open("ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        return subprocess.Popen(
            dies_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    finally:
        log.close()
