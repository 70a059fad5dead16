"""Does secure aggregation train as well as plain FedAvg? `flctl demo` with and without it, over several seeds.

One run of the demo cannot answer: secure aggregation's stochastic rounding is drawn from each device's own entropy,
so no two secure runs are alike, and a plain run varies too (the order in which the aggregator sums updates differs
from run to run). Since the reference CNN clips its gradients (docs/models.md, "Gradient clipping") that moves the
held-out accuracy by a point or two, not the tens of points it did when training was chaotic. So each seed runs the
demo plain once and secure ``--repeats`` times, and printed are, per seed and over all seeds: the final round's
accuracy and the mean of the last three rounds, secure minus plain.

    python bench/secagg_quality.py                           # seeds 0-4, 10 rounds, 8 devices, 1 secure run each
    python bench/secagg_quality.py --seeds 0 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def demo_accuracies(out: Path, devices: int, rounds: int, seed: int, secure: bool) -> list[float]:
    """Held-out accuracy per round of one `flctl demo` run."""
    flctl = Path(sys.executable).parent / "flctl"
    cmd = [str(flctl), "demo", "--devices", str(devices), "--rounds", str(rounds), "--seed", str(seed),
           "--out", str(out), *(["--secure-aggregation"] if secure else [])]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return [r["accuracy"] for r in summary["rounds"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--repeats", type=int, default=1, help="secure runs per seed")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.rounds < 3 or args.repeats < 1 or not args.seeds:
        raise SystemExit("bench/secagg_quality.py: needs --rounds >= 3, --repeats >= 1 and at least one seed")
    final_gaps: list[float] = []
    last3_gaps: list[float] = []
    print(f"{'seed':>4} | {'final acc %: plain, secure runs':<40} | {'last-3 mean %: plain, secure runs':<40}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            plain = demo_accuracies(Path(tmp, f"plain-{seed}"), args.devices, args.rounds, seed, secure=False)
            secure = [demo_accuracies(Path(tmp, f"secure-{seed}-{r}"), args.devices, args.rounds, seed, secure=True)
                      for r in range(args.repeats)]  # fmt: skip
            plain_last3 = statistics.fmean(plain[-3:])
            final_gaps += [s[-1] - plain[-1] for s in secure]
            last3_gaps += [statistics.fmean(s[-3:]) - plain_last3 for s in secure]
            finals = ", ".join(f"{s[-1] * 100:.1f}" for s in secure)
            last3s = ", ".join(f"{statistics.fmean(s[-3:]) * 100:.1f}" for s in secure)
            print(f"{seed:>4} | {plain[-1] * 100:5.1f}; {finals:<33} | {plain_last3 * 100:5.1f}; {last3s:<33}",
                  flush=True)

    def spread(gaps: list[float]) -> str:
        sem = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
        return f"{statistics.fmean(gaps) * 100:+.1f} points (s.e. {sem * 100:.1f}, {len(gaps)} runs)"

    print(f"secure - plain, final round: {spread(final_gaps)}")
    print(f"secure - plain, mean of the last three rounds: {spread(last3_gaps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
