"""`flctl demo`: the local fleet demo. An aggregator and N simulated appliances on loopback train the
reference camera model (``--model cnn``, counting vehicles) or the vehicle detector (``--model detector``) for R
rounds, with live progress, a summary table, a plot and a Prometheus config.

Each appliance is a real `fl-agent` process with a synthetic traffic camera of its own style (lighting,
traffic density, road angle, noise), so the data is non-IID across devices. After each round the demo
fetches the signed global model, verifies it against the aggregator key as a device would, and measures its
accuracy on held-out frames of every camera style (the per-device curves) and of all of them together; for the
detector, mAP@0.5 (pycocotools), centre F1 and the vehicle count's error, and a picture of held-out frames with
predicted and true boxes.
"""

from __future__ import annotations

import argparse
import shutil
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from aggregator.adaptive_clip import AdaptiveClip, AdaptiveClipError
from aggregator.privacy import MODES, DPConfig, PrivacyError, check_mode, check_private_strategy
from aggregator.strategies import STRATEGIES
from appliance import strict_json, wire
from appliance.detection import DetectionSpec, encode_targets
from appliance.modelpkg import load_package
from appliance.synthetic import evaluation_set
from appliance.trainer import Trainer
from flctl import demo_detector
from flctl.fleet import Fleet
from flctl.ports import free_port
from flctl.prometheus import prometheus_command, write_scrape_config
from flctl.shutdown import StopRequested, stop_on_signals

HELD_OUT_PER_CAMERA = 150
# Local training per model when --epochs/--samples are not given. The detector's devices drift apart on non-IID
# cameras with more local steps: FedAvg's held-out mAP@0.5 after one round was 0.20 with these, 0.13 with 3 epochs
# of 768 frames; with 2 epochs of 256 at lr 0.05 it stayed 0.00 for 6 rounds (bench/detector_fl.py).
TRAINING_DEFAULTS = {
    "cnn": {"epochs": 3, "samples": 768, "learning_rate": 0.05},
    "detector": {"epochs": 1, "samples": 256, "learning_rate": 0.01},
}
# With --dp-noise-multiplier and no --clip-norm: the median L2 norm of a camera's first-round delta with the demo's
# defaults (4.2; 2.4 to 6.0 over the 8 cameras, with the reference CNN's gradient clipping; 4.1 before it).
# Smaller bounds cut the noise but clip most updates: with 2, clipping alone took the demo's final accuracy from
# 75 % to 51 %, with 4 to 70 % (one run each; docs/privacy.md).
DP_CLIP_NORM = 4.0
# The demo stops when this many rounds in a row end without a new model (devices failing, or training diverging).
STALLED_ROUNDS = 2


@dataclass
class RoundRow:
    round_id: int
    model_version: int
    participants: int
    samples: int
    seconds: float
    received_bytes: float
    train_loss: float
    accuracy: float  # the evaluator's headline: held-out accuracy, or mAP@0.5 for the detector
    loss: float
    per_device_accuracy: list[float] = field(default_factory=list)  # the headline per camera
    scores: dict[str, float] = field(default_factory=dict)  # every held-out figure (the detector's: mAP, F1, count)
    epsilon: float | None = None  # the privacy spent up to this version, from its signed release (DP only)
    clip_norm: float | None = None  # adaptive clipping: the clip norm of the round that made this version


class Evaluator:
    """Evaluates published model versions on held-out synthetic frames, overall and per camera style."""

    columns: tuple[tuple[str, str, str], ...] = (("accuracy", "held-out acc", "{:.1%}"),)  # key, title, format

    @property
    def headline(self) -> str:
        return self.columns[0][0]

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

    def release(self, version: int) -> wire.ModelRelease:
        """Model ``version`` as a device gets it: fetched, its signature checked against the aggregator key."""
        with urllib.request.urlopen(f"{self.url}/v1/models/{version}", timeout=30) as r:
            body = r.read()
        return wire.decode_model_release(body, self.key, self.package.param_specs)

    def params(self, version: int) -> dict[str, np.ndarray]:
        return self.release(version).tensors

    def evaluate(self, version: int) -> tuple[dict[str, float], list[float]]:
        return self.evaluate_params(self.params(version))

    def evaluate_params(self, params: dict[str, np.ndarray]) -> tuple[dict[str, float], list[float]]:
        overall = self.trainer.evaluate(params, self.all_x, self.all_y)
        per_device = [self.trainer.evaluate(params, x, y)["accuracy"] for x, y in self.per_camera]
        return overall, per_device


class DetectorEvaluator(Evaluator):
    """The detector's held-out figures: mAP@0.5 (pycocotools) overall and per camera, mAP@0.5:0.95, centre F1,
    the count's error, and the loss of the evaluation graph on targets built from the true boxes."""

    columns = demo_detector.COLUMNS

    def __init__(self, fleet: Fleet):
        super().__init__(fleet)
        self.held_out = demo_detector.held_out(fleet.devices, HELD_OUT_PER_CAMERA, sample_seed=999)
        spec = DetectionSpec.from_package(self.package)
        self.all_y = encode_targets(spec, [b for _, boxes in self.held_out for b in boxes])

    def evaluate_params(self, params: dict[str, np.ndarray]) -> tuple[dict[str, float], list[float]]:
        overall, per_device = demo_detector.scores(self.trainer, params, self.held_out)
        overall["loss"] = self.trainer.evaluate(params, self.all_x, self.all_y)["loss"]
        return overall, per_device


def _received_bytes(fleet: Fleet) -> float:
    with urllib.request.urlopen(fleet.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("fl_aggregator_received_bytes_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _progress_table(fleet: Fleet, status: dict, rows: list[RoundRow], started: float,
                    columns: tuple[tuple[str, str, str], ...] = Evaluator.columns) -> Table:
    current = status.get("current_round") or {}
    private = fleet.dp_noise_multiplier is not None
    title = f"fl-edge fleet demo: {fleet.devices} appliances, {fleet.strategy}, {fleet.encoding}"
    adaptive = fleet.dp_adaptive_clip is not None
    if private:
        title += f", DP z={fleet.dp_noise_multiplier:g} S={fleet.clip_norm:g}"
    if fleet.dp_adaptive_clip is not None:
        title += f" (adaptive: quantile {fleet.dp_adaptive_clip.target_quantile:g})"
    table = Table(title=title)
    for column in ("round", "model", "reporting", "train loss", *(title for _, title, _ in columns),
                   *(["epsilon"] if private else []), *(["clip norm"] if adaptive else []), "elapsed"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows[-6:]:
        table.add_row(
            str(row.round_id),
            f"v{row.model_version}",
            f"{row.participants}/{fleet.devices}",
            _loss_text(row.train_loss),
            *(fmt.format(row.scores[key]) for key, _, fmt in columns),
            *([_epsilon_text(row.epsilon)] if private else []),
            *([_clip_text(row.clip_norm)] if adaptive else []),
            "",
        )
    if current:
        table.add_row(
            f"[bold]{current.get('round')}",
            f"v{current.get('model_version')}",
            f"{current.get('participants', 0)}/{fleet.devices}",
            "…",
            *("…" for _ in columns),
            *(["…"] if private else []),
            *([_clip_text(current.get("clip_norm"))] if adaptive else []),
            f"{time.monotonic() - started:.0f} s",
        )
    return table


def _epsilon_text(epsilon: float | None) -> str:
    return "-" if epsilon is None else f"{epsilon:.3g}"


def _clip_text(clip_norm: float | None) -> str:
    return "-" if clip_norm is None else f"{clip_norm:.3g}"


def _round_clip_norms(status: dict) -> dict[int, float]:
    """Adaptive clipping: the clip norm each published version was trained with, from the status."""
    adaptive = (status.get("privacy") or {}).get("adaptive_clip") or {}
    return {int(entry["version"]): float(entry["clip_norm"]) for entry in adaptive.get("history", [])}


def _summary(rows: list[RoundRow], baseline: dict[str, float], private: bool = False,
             columns: tuple[tuple[str, str, str], ...] = Evaluator.columns, adaptive: bool = False) -> Table:
    table = Table(title="Summary (the global model on held-out frames of all cameras)")
    for column in (
        "round",
        "model",
        "participants",
        *(title for _, title, _ in columns),
        "held-out loss",
        *(["epsilon"] if private else []),
        *(["clip norm"] if adaptive else []),
        "train loss",
        "bytes received",
        "round s",
    ):
        table.add_column(column, justify="right")
    table.add_row("start", "v0", "-", *(fmt.format(baseline[key]) for key, _, fmt in columns),
                  f"{baseline['loss']:.3f}", *(["0"] if private else []), *(["-"] if adaptive else []),
                  "-", "-", "-")  # fmt: skip
    for r in rows:
        table.add_row(
            str(r.round_id),
            f"v{r.model_version}",
            str(r.participants),
            *(fmt.format(r.scores[key]) for key, _, fmt in columns),
            f"{r.loss:.3f}",
            *([_epsilon_text(r.epsilon)] if private else []),
            *([_clip_text(r.clip_norm)] if adaptive else []),
            _loss_text(r.train_loss),
            f"{r.received_bytes / 1e6:.2f} MB",
            f"{r.seconds:.1f}",
        )
    return table


def plot(rows: list[RoundRow], baseline: dict[str, float], baseline_devices: list[float], out: Path,
         headline: tuple[str, str] = ("accuracy", "held-out accuracy")) -> None:
    """Per camera and overall: the headline score (key, label) and the loss, per model version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [r.model_version for r in rows]
    private = any(r.epsilon is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if private else 2, figsize=(16 if private else 11, 4.2))
    ax_acc, ax_loss = axes[0], axes[1]
    for d in range(len(baseline_devices)):
        ax_acc.plot(
            rounds,
            [baseline_devices[d]] + [r.per_device_accuracy[d] for r in rows],
            lw=0.8,
            alpha=0.5,
            label=f"camera {d}",
        )
    ax_acc.plot(rounds, [baseline[headline[0]]] + [r.accuracy for r in rows], "k-o", lw=2, label="all cameras")
    ax_acc.set(xlabel="global model version", ylabel=headline[1], ylim=(0, 1),
               title=headline[1][:1].upper() + headline[1][1:])
    ax_acc.legend(fontsize=7, ncol=2)
    ax_loss.plot(rounds, [baseline["loss"]] + [r.loss for r in rows], "k-o", label="held-out loss")
    ax_loss.plot([r.model_version for r in rows], [r.train_loss for r in rows], "C1-s", label="mean train loss")
    ax_loss.set(xlabel="global model version", ylabel="the package's loss", title="Loss")
    ax_loss.legend()
    if private:
        _plot_accuracy_against_epsilon(axes[2], rows, baseline, headline)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_accuracy_against_epsilon(ax, rows: list[RoundRow], baseline: dict[str, float],
                                   headline: tuple[str, str]) -> None:  # fmt: skip
    """What each published version's privacy cost bought: the headline score against the epsilon in its release."""
    spent = [0.0] + [r.epsilon or 0.0 for r in rows]
    score = [baseline[headline[0]]] + [r.accuracy for r in rows]
    ax.plot(spent, score, "C3-o")
    for version, (x, y) in enumerate(zip(spent, score, strict=True)):
        ax.annotate(f"v{version}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="epsilon spent (delta in the release)", ylabel=headline[1], ylim=(0, 1),
           title=f"{headline[1].capitalize()} against privacy spent")  # fmt: skip


def write_prometheus_config(fleet: Fleet, out_dir: Path) -> Path:
    """A Prometheus scrape config with file_sd targets for the aggregator and every appliance."""
    return write_scrape_config(
        out_dir,
        {d.state_dir.name: f"127.0.0.1:{d.metrics_port}" for d in fleet.members},
        aggregator=f"127.0.0.1:{fleet.port}",
    )


def run_demo(fleet: Fleet, console: Console, keep_running: bool = False, deadline_s: float = 900) -> int:
    console.print(f"[bold]fl-edge demo[/]: state and logs in {fleet.root}")
    if fleet.model == "detector":
        console.print("exporting the detector with torch (flctl.model.detector, checked against autograd)...")
    fleet.prepare(demo_detector.export_demo_package)
    evaluator = DetectorEvaluator(fleet) if fleet.model == "detector" else Evaluator(fleet)
    baseline, baseline_devices = None, None
    rows: list[RoundRow] = []
    started = time.monotonic()
    try:
        fleet.start()  # inside: an aggregator that started before a failure (or a signal) is stopped too
        baseline, baseline_devices = evaluator.evaluate(0)
        seen_version = 0
        bytes_before = 0.0
        round_started = started
        budget_note = stalled_note = None
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
                stalled = _abandoned_in_a_row(status)
                if len(stalled) >= STALLED_ROUNDS:
                    stalled_note = _stalled_message(stalled, seen_version, fleet)
                    break
                published = [r for r in status.get("rounds", []) if r.get("status") == "published"]
                for r in sorted(published, key=lambda r: r["round"]):
                    version = r["model_version"] + 1
                    if version <= seen_version:
                        continue
                    release = evaluator.release(version)
                    overall, per_device = evaluator.evaluate_params(release.tensors)
                    received = _received_bytes(fleet)
                    now = time.monotonic()
                    rows.append(RoundRow(
                        round_id=r["round"], model_version=version, participants=r.get("participants", 0),
                        samples=r.get("samples", 0), seconds=now - round_started,
                        received_bytes=received - bytes_before,
                        train_loss=float((r.get("metrics") or {}).get("loss_after", float("nan"))),
                        accuracy=overall[evaluator.headline], loss=overall["loss"], per_device_accuracy=per_device,
                        scores=overall,
                        epsilon=None if release.privacy is None else float(release.privacy["epsilon"]),
                        clip_norm=_round_clip_norms(status).get(version),
                    ))  # fmt: skip
                    bytes_before, round_started, seen_version = received, now, version
                live.update(_progress_table(fleet, status, rows, started, evaluator.columns))
                budget_note = _budget_exhausted(status, seen_version)
                if budget_note:
                    break
                time.sleep(0.5)
        out = fleet.root
        if stalled_note and not rows:
            console.print(stalled_note, style="red", markup=False)
            return 1
        privacy = fleet.status().get("privacy")
        console.print(_summary(rows, baseline, private=privacy is not None, columns=evaluator.columns,
                               adaptive=fleet.dp_adaptive_clip is not None))
        if budget_note:
            console.print(budget_note, markup=False, soft_wrap=True)
        if stalled_note:
            console.print(stalled_note, style="red", markup=False, soft_wrap=True)
        if privacy is not None:
            console.print(_privacy_line(privacy, fleet), markup=False, soft_wrap=True)
        if fleet.secure_aggregation:
            console.print(_secure_line(fleet.status()), markup=False, soft_wrap=True)
        key, title, fmt = evaluator.columns[0]
        plot(rows, baseline, baseline_devices, out / "demo.png", (key, f"held-out {title}"))
        if isinstance(evaluator, DetectorEvaluator):
            picture = demo_detector.write_picture(evaluator.trainer, evaluator.params(seen_version),
                                                  evaluator.held_out, out / "detections.png",
                                                  f"model v{seen_version} on held-out frames")
            console.print(f"detections: {picture}", markup=False)
        prom = write_prometheus_config(fleet, out / "prometheus")
        figures = {"baseline": baseline, "privacy": privacy, "rounds": [r.__dict__ for r in rows]}
        write_summary(out / "summary.json", figures)
        improved = rows[-1].accuracy > baseline[key]
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
            f"{title} {fmt.format(baseline[key])} -> {fmt.format(rows[-1].accuracy)}: {verdict}[/] "
            f"in {time.monotonic() - started:.0f} s"
        )
        if keep_running:
            console.print("--keep-running: the fleet stays up; Ctrl-C (or SIGTERM) stops it")
            try:
                while True:
                    time.sleep(3600)
            except (KeyboardInterrupt, StopRequested):
                pass
        return 0 if improved and not stalled_note else 1
    finally:
        fleet.stop()


def write_summary(path: Path, figures: dict) -> None:
    """summary.json: strict JSON, a train loss no device reported (a secure round's) or a diverged figure as the text
    "NaN" (docs/api.md, "Numbers in JSON"), which jq reads where it refused NaN."""
    path.write_text(strict_json.dumps_as_found(figures, indent=1, default=float))


def _abandoned_in_a_row(status: dict) -> list[dict]:
    """The rounds abandoned since the last published one, newest first: the fleet is not making progress."""
    stalled = []
    for r in sorted(status.get("rounds", []), key=lambda r: r["round"], reverse=True):
        if r.get("status") == "published":
            break
        if r.get("status") == "abandoned":
            stalled.append(r)
    return stalled


def _stalled_message(stalled: list[dict], seen_version: int, fleet: Fleet) -> str:
    rounds = ", ".join(str(r["round"]) for r in reversed(stalled))
    text = (
        f"rounds {rounds} abandoned in a row at model v{seen_version} ({stalled[0].get('note')}); "
        f"see the device logs in {fleet.logs}"
    )
    if fleet.dp_noise_multiplier is not None:
        text += f" (noise multiplier {fleet.dp_noise_multiplier:g}: noise this large can make local training diverge)"
    return text


def _budget_exhausted(status: dict, seen_version: int) -> str | None:
    """Why no more rounds will come, when the privacy budget stopped them and every version was evaluated."""
    privacy = status.get("privacy") or {}
    if not privacy.get("exhausted") or status.get("current_round") or seen_version < status["model"]["version"]:
        return None
    return (
        f"privacy budget reached: epsilon {privacy['epsilon']:.3g} of {privacy['epsilon_budget']:g} after "
        f"v{seen_version}; the aggregator opens no more rounds and v{seen_version} stays published"
    )


def _privacy_line(privacy: dict, fleet: Fleet) -> str:
    """The guarantee of the last model, and what the noise costs a fleet this small."""
    adaptive = privacy.get("adaptive_clip")
    if adaptive is None:
        noise_on_mean = privacy["noise_multiplier"] * fleet.clip_norm / fleet.devices
        clip = f"clip norm {fleet.clip_norm:g}"
    else:  # the sum's noise is z_delta times the clip norm the estimate has reached
        noise_on_mean = adaptive["model_noise_multiplier"] * adaptive["clip_norm"] / fleet.devices
        clip = (f"adaptive clip norm {fleet.clip_norm:g} -> {adaptive['clip_norm']:.3g} (quantile "
                f"{adaptive['target_quantile']:g}; the model's sum noised at z_delta "
                f"{adaptive['model_noise_multiplier']:.3g})")
    return (
        f"differential privacy ({privacy['mode']}, per device): epsilon {privacy['epsilon']:.3g} at delta "
        f"{privacy['delta']:g} after {privacy['rounds']} noised round(s), noise multiplier "
        f"{privacy['noise_multiplier']:g}, {clip}; noise std on the mean "
        f"{noise_on_mean:.3g} per parameter with {fleet.devices} devices (accounting: {privacy['accounting']})"
    )


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


def privacy_settings(
    args: argparse.Namespace,
) -> tuple[float, float | None, float | None, AdaptiveClip | None]:
    """(clip norm, noise multiplier, epsilon budget, adaptive clipping) from the options, checked as
    `fl-aggregator serve` checks them, so a bad value is one line here rather than an aggregator that exits
    during start-up."""
    z, budget = args.dp_noise_multiplier, args.dp_epsilon_budget
    if args.clip_norm is not None and not args.clip_norm > 0:
        raise SystemExit(f"flctl demo: --clip-norm must be positive, got {args.clip_norm}")
    adaptive_flags = (("--dp-clip-learning-rate", args.dp_clip_learning_rate),
                      ("--dp-clip-count-stddev", args.dp_clip_count_stddev))
    for flag, value in adaptive_flags if args.dp_adaptive_clip is None else ():
        if value is not None:
            raise SystemExit(f"flctl demo: {flag} goes with --dp-adaptive-clip")
    if z is None:
        for flag, value in (("--dp-epsilon-budget", budget), ("--dp-mode", args.dp_mode),
                            ("--dp-adaptive-clip", args.dp_adaptive_clip)):
            if value is not None:
                raise SystemExit(f"flctl demo: {flag} goes with --dp-noise-multiplier")
        return args.clip_norm or 0.0, None, None, None  # 0: devices do not clip
    clip_norm = DP_CLIP_NORM if args.clip_norm is None else args.clip_norm
    try:
        adaptive = None
        if args.dp_adaptive_clip is not None:
            given = {"learning_rate": args.dp_clip_learning_rate, "count_stddev": args.dp_clip_count_stddev}
            adaptive = AdaptiveClip(args.dp_adaptive_clip, **{k: v for k, v in given.items() if v is not None})
        config = DPConfig(z, epsilon_budget=budget, mode=args.dp_mode or "central", adaptive=adaptive)
        check_private_strategy(args.strategy, clip_norm, site=False)
        check_mode(config, args.secure_aggregation)
    except (PrivacyError, AdaptiveClipError) as exc:
        raise SystemExit(f"flctl demo: {exc}") from None
    if adaptive is not None and args.secure_aggregation:
        raise SystemExit("flctl demo: --dp-adaptive-clip is central DP's: under secure aggregation nobody sees a "
                         "device's norm")
    return clip_norm, z, budget, adaptive


def cmd_demo(args: argparse.Namespace) -> int:
    clip_norm, noise_multiplier, budget, adaptive = privacy_settings(args)
    training = TRAINING_DEFAULTS[args.model]
    fleet = Fleet(
        root=fresh_output_dir(args.out), model=args.model, devices=args.devices, rounds=args.rounds,
        strategy=args.strategy, encoding=args.encoding, seed=args.seed, learning_rate=training["learning_rate"],
        epochs=training["epochs"] if args.epochs is None else args.epochs,
        samples_per_round=training["samples"] if args.samples is None else args.samples,
        secure_aggregation=args.secure_aggregation,
        clip_norm=clip_norm, dp_noise_multiplier=noise_multiplier, dp_epsilon_budget=budget,
        dp_mode=args.dp_mode or "central", dp_adaptive_clip=adaptive,
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
    p.add_argument("--model", choices=("cnn", "detector"), default="cnn",
                   help="cnn: the counting classifier (traffic-cnn, default); detector: the vehicle detector "
                   "(traffic-detector, exported with torch; docs/models.md)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--strategy", default="fedavg", choices=sorted(STRATEGIES))
    p.add_argument("--encoding", default="float32", choices=list(wire.ENCODINGS))
    p.add_argument("--epochs", type=int, help="local epochs per round (default: 3 for cnn, 1 for detector)")
    p.add_argument("--samples", type=int,
                   help="training samples per device per round (default: 768 for cnn, 256 for detector)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--secure-aggregation", action="store_true",
                   help="secure aggregation: the aggregator learns only the sum of the devices' updates "
                   "(docs/aggregator.md); fedavg, fedadam or fedyogi; with DP, only --dp-mode distributed")
    p.add_argument(
        "--clip-norm",
        type=float,
        metavar="S",
        help=f"devices clip their delta to this L2 norm (default: off; {DP_CLIP_NORM:g} with DP)",
    )
    p.add_argument(
        "--dp-noise-multiplier",
        type=float,
        metavar="Z",
        help="central differential privacy: Gaussian noise of std Z x clip norm on each round's sum; "
        "epsilon per round in the tables and the plot (docs/privacy.md)",
    )
    p.add_argument(
        "--dp-epsilon-budget",
        type=float,
        metavar="E",
        help="with --dp-noise-multiplier: the aggregator opens no round that would take epsilon past E",
    )
    p.add_argument(
        "--dp-mode",
        choices=MODES,
        help="with --dp-noise-multiplier: central (the aggregator adds the noise, the default) or distributed "
        "(each device adds its share of discrete Gaussian noise; needs --secure-aggregation)",
    )
    p.add_argument(
        "--dp-adaptive-clip",
        type=float,
        metavar="GAMMA",
        help="with --dp-noise-multiplier (central): the clip norm follows the GAMMA quantile of the cameras' update "
        "norms, starting at the clip norm; its value per round is a column of the tables (docs/privacy.md)",
    )
    p.add_argument("--dp-clip-learning-rate", type=float, metavar="ETA",
                   help="with --dp-adaptive-clip: the geometric step of the clip norm (default 0.2)")
    p.add_argument("--dp-clip-count-stddev", type=float, metavar="SIGMA_B",
                   help="with --dp-adaptive-clip: noise std on the count of cameras within the clip norm "
                   "(default 5 x Z)")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="state, logs, plot and summary")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the fleet up after the last round, until Ctrl-C or SIGTERM")
    p.set_defaults(func=cmd_demo)
