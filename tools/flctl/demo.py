"""`flctl demo`: the local fleet demo. An aggregator and N simulated appliances on loopback train the
reference camera model for R rounds, with live progress, a summary table, a plot and a Prometheus config.

Each appliance is a real `fl-agent` process with a synthetic traffic camera of its own style (lighting,
traffic density, road angle, noise), so the data is non-IID across devices. After each round the demo
fetches the signed global model, verifies it against the aggregator key as a device would, and measures its
accuracy on held-out frames of every camera style (the per-device curves) and of all of them together.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from aggregator.strategies import STRATEGIES
from appliance import wire
from appliance.modelpkg import load_package
from appliance.synthetic import evaluation_set
from appliance.trainer import Trainer
from flctl.fleet import Fleet
from flctl.model import export_reference_package
from flctl.ports import free_port
from flctl.prometheus import prometheus_command, write_scrape_config
from flctl.shutdown import StopRequested, stop_on_signals

HELD_OUT_PER_CAMERA = 150


@dataclass
class RoundRow:
    round_id: int
    model_version: int
    participants: int
    samples: int
    seconds: float
    received_bytes: float
    train_loss: float
    accuracy: float
    loss: float
    per_device_accuracy: list[float] = field(default_factory=list)


class Evaluator:
    """Evaluates published model versions on held-out synthetic frames, overall and per camera style."""

    def __init__(self, fleet: Fleet):
        key = fleet.aggregator_key().verify_key
        self.key = key
        self.package = load_package(fleet.package_path, key)
        self.trainer = Trainer(self.package, threads=1)
        self.url = fleet.url
        cams = range(fleet.devices)
        self.per_camera = [evaluation_set(HELD_OUT_PER_CAMERA, [c], sample_seed=999) for c in cams]
        self.all_x = np.concatenate([x for x, _ in self.per_camera])
        self.all_y = np.concatenate([y for _, y in self.per_camera])

    def params(self, version: int) -> dict[str, np.ndarray]:
        with urllib.request.urlopen(f"{self.url}/v1/models/{version}", timeout=30) as r:
            body = r.read()
        return wire.decode_model_release(body, self.key, self.package.param_specs).tensors

    def evaluate(self, version: int) -> tuple[dict[str, float], list[float]]:
        params = self.params(version)
        overall = self.trainer.evaluate(params, self.all_x, self.all_y)
        per_device = [self.trainer.evaluate(params, x, y)["accuracy"] for x, y in self.per_camera]
        return overall, per_device


def _received_bytes(fleet: Fleet) -> float:
    with urllib.request.urlopen(fleet.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("fl_aggregator_received_bytes_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _progress_table(fleet: Fleet, status: dict, rows: list[RoundRow], started: float) -> Table:
    current = status.get("current_round") or {}
    table = Table(title=f"fl-edge fleet demo: {fleet.devices} appliances, {fleet.strategy}, {fleet.encoding}")
    for column in ("round", "model", "reporting", "train loss", "held-out acc", "elapsed"):
        table.add_column(column, justify="right")
    for row in rows[-6:]:
        table.add_row(
            str(row.round_id),
            f"v{row.model_version}",
            f"{row.participants}/{fleet.devices}",
            _loss_text(row.train_loss),
            f"{row.accuracy:.1%}",
            "",
        )
    if current:
        table.add_row(
            f"[bold]{current.get('round')}",
            f"v{current.get('model_version')}",
            f"{current.get('participants', 0)}/{fleet.devices}",
            "…",
            "…",
            f"{time.monotonic() - started:.0f} s",
        )
    return table


def _summary(rows: list[RoundRow], baseline: dict[str, float]) -> Table:
    table = Table(title="Summary (accuracy and loss of the global model on held-out frames of all cameras)")
    for column in (
        "round",
        "model",
        "participants",
        "held-out acc",
        "held-out loss",
        "train loss",
        "bytes received",
        "round s",
    ):
        table.add_column(column, justify="right")
    table.add_row("start", "v0", "-", f"{baseline['accuracy']:.1%}", f"{baseline['loss']:.3f}", "-", "-", "-")
    for r in rows:
        table.add_row(
            str(r.round_id),
            f"v{r.model_version}",
            str(r.participants),
            f"{r.accuracy:.1%}",
            f"{r.loss:.3f}",
            _loss_text(r.train_loss),
            f"{r.received_bytes / 1e6:.2f} MB",
            f"{r.seconds:.1f}",
        )
    return table


def plot(rows: list[RoundRow], baseline: dict[str, float], baseline_devices: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [r.model_version for r in rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for d in range(len(baseline_devices)):
        ax_acc.plot(
            rounds,
            [baseline_devices[d]] + [r.per_device_accuracy[d] for r in rows],
            lw=0.8,
            alpha=0.5,
            label=f"camera {d}",
        )
    ax_acc.plot(rounds, [baseline["accuracy"]] + [r.accuracy for r in rows], "k-o", lw=2, label="all cameras")
    ax_acc.set(xlabel="global model version", ylabel="held-out accuracy", ylim=(0, 1), title="Accuracy")
    ax_acc.legend(fontsize=7, ncol=2)
    ax_loss.plot(rounds, [baseline["loss"]] + [r.loss for r in rows], "k-o", label="held-out loss")
    ax_loss.plot([r.model_version for r in rows], [r.train_loss for r in rows], "C1-s", label="mean train loss")
    ax_loss.set(xlabel="global model version", ylabel="cross-entropy", title="Loss")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_prometheus_config(fleet: Fleet, out_dir: Path) -> Path:
    """A Prometheus scrape config with file_sd targets for the aggregator and every appliance."""
    return write_scrape_config(
        out_dir,
        {d.state_dir.name: f"127.0.0.1:{d.metrics_port}" for d in fleet.members},
        aggregator=f"127.0.0.1:{fleet.port}",
    )


def run_demo(fleet: Fleet, console: Console, keep_running: bool = False, deadline_s: float = 900) -> int:
    console.print(f"[bold]fl-edge demo[/]: state and logs in {fleet.root}")
    fleet.prepare(export_reference_package)
    evaluator = Evaluator(fleet)
    baseline, baseline_devices = None, None
    rows: list[RoundRow] = []
    started = time.monotonic()
    try:
        fleet.start()  # inside: an aggregator that started before a failure (or a signal) is stopped too
        baseline, baseline_devices = evaluator.evaluate(0)
        seen_version = 0
        bytes_before = 0.0
        round_started = started
        with Live(console=console, refresh_per_second=2, transient=True) as live:
            while seen_version < fleet.rounds:
                if time.monotonic() - started > deadline_s:
                    console.print(f"[red]gave up after {deadline_s:.0f} s at model v{seen_version}; see {fleet.logs}")
                    return 1
                for d in fleet.members:
                    if d.process and d.process.poll() is not None:
                        console.print(f"[red]{d.state_dir.name} exited with {d.process.returncode}: see {d.log_path}")
                        return 1
                status = fleet.status()
                published = [r for r in status.get("rounds", []) if r.get("status") == "published"]
                for r in sorted(published, key=lambda r: r["round"]):
                    version = r["model_version"] + 1
                    if version <= seen_version:
                        continue
                    overall, per_device = evaluator.evaluate(version)
                    received = _received_bytes(fleet)
                    now = time.monotonic()
                    rows.append(RoundRow(
                        round_id=r["round"], model_version=version, participants=r.get("participants", 0),
                        samples=r.get("samples", 0), seconds=now - round_started,
                        received_bytes=received - bytes_before,
                        train_loss=float((r.get("metrics") or {}).get("loss_after", float("nan"))),
                        accuracy=overall["accuracy"], loss=overall["loss"], per_device_accuracy=per_device,
                    ))  # fmt: skip
                    bytes_before, round_started, seen_version = received, now, version
                live.update(_progress_table(fleet, status, rows, started))
                time.sleep(0.5)
        out = fleet.root
        console.print(_summary(rows, baseline))
        if fleet.secure_aggregation:
            console.print(_secure_line(fleet.status()), markup=False, soft_wrap=True)
        plot(rows, baseline, baseline_devices, out / "demo.png")
        prom = write_prometheus_config(fleet, out / "prometheus")
        (out / "summary.json").write_text(
            json.dumps({"baseline": baseline, "rounds": [r.__dict__ for r in rows]}, indent=1, default=float)
        )
        improved = rows[-1].accuracy > baseline["accuracy"]
        console.print(
            f"plot: {out / 'demo.png'}\nsummary: {out / 'summary.json'}\nlogs: {fleet.logs}\n"
            f"state: {out}\nPrometheus config (file_sd): {prom}",
            markup=False,
        )
        # One line, whatever the width: it is meant to be pasted.
        console.print(f"  run: {prometheus_command(prom, free_port())}", markup=False, soft_wrap=True)
        console.print(f"aggregator: {fleet.url}/v1/status  {fleet.url}/metrics  {fleet.url}/")
        for d in fleet.members:
            console.print(f"  {d.state_dir.name}: {d.metrics_url}")
        verdict = "[green]improved" if improved else "[red]did NOT improve"
        console.print(
            f"accuracy {baseline['accuracy']:.1%} -> {rows[-1].accuracy:.1%}: {verdict}[/] "
            f"in {time.monotonic() - started:.0f} s"
        )
        if keep_running:
            console.print("--keep-running: the fleet stays up; Ctrl-C (or SIGTERM) stops it")
            try:
                while True:
                    time.sleep(3600)
            except (KeyboardInterrupt, StopRequested):
                pass
        return 0 if improved else 1
    finally:
        fleet.stop()


def _loss_text(loss: float) -> str:
    """A mean train loss, or - when none was reported (in a secure round each device keeps its own to itself)."""
    return "-" if loss != loss else f"{loss:.3f}"


def _secure_line(status: dict) -> str:
    """What the aggregator saw of the devices' updates in a secure demo: only sums, and over how many devices."""
    covered = [(r["round"], r["secure"]["sum_devices"]) for r in sorted(status["rounds"], key=lambda r: r["round"])
               if r.get("status") == "published" and r.get("secure")]
    sums = ", ".join(f"round {round_id}: {n}" for round_id, n in covered)
    return (f"secure aggregation: the aggregator saw only masked inputs and, per round, the sum of the devices' "
            f"updates, never one device's update (devices in each sum: {sums})")


DEMO_MARKER = ".fl-edge-demo"


def fresh_output_dir(out: Path) -> Path:
    """An empty directory for this run. A previous demo's directory is replaced; anything else is refused."""
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise SystemExit(f"flctl demo: {out} exists and is not a demo directory; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    fleet = Fleet(
        root=fresh_output_dir(args.out), devices=args.devices, rounds=args.rounds, strategy=args.strategy,
        encoding=args.encoding, epochs=args.epochs, samples_per_round=args.samples, seed=args.seed,
        secure_aggregation=args.secure_aggregation,
    )  # fmt: skip
    console = Console()
    if not console.is_terminal:  # a log file or CI: wide enough for the summary table
        console = Console(width=130)
    # However the demo ends (Ctrl-C, SIGTERM from `timeout`/systemd/a CI runner, SIGHUP), run_demo's finally
    # stops the aggregator and the agents; each also gets SIGTERM from the kernel if flctl dies outright.
    with stop_on_signals():
        try:
            return run_demo(fleet, console, keep_running=args.keep_running)
        except KeyboardInterrupt:
            console.print("flctl demo: stopped (Ctrl-C); the fleet is stopped")
            return 130
        except StopRequested as exc:
            console.print(f"flctl demo: stopped by {exc}; the fleet is stopped")
            return exc.exit_code


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the local fleet demo (aggregator + simulated appliances on loopback)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--strategy", default="fedavg", choices=sorted(STRATEGIES))
    p.add_argument("--encoding", default="float32", choices=list(wire.ENCODINGS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=768, help="training samples per device per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--secure-aggregation", action="store_true",
                   help="secure aggregation: the aggregator learns only the sum of the devices' updates "
                   "(docs/aggregator.md); fedavg, fedadam or fedyogi, not with --dp-noise-multiplier")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="state, logs, plot and summary")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the fleet up after the last round, until Ctrl-C or SIGTERM")
    p.set_defaults(func=cmd_demo)
