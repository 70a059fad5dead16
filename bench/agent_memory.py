"""Memory of a whole fl-agent while it trains the reference CNN: the service, not just the trainer.

bench/training.py measures a bare trainer process. Here a real `fl-agent run` (aiohttp client, Prometheus
endpoint, outbox, the forkserver that preloads numpy and onnxruntime, and the trainer child it forks each
round) takes part in rounds against a real `fl-aggregator serve` on loopback. Its process tree is sampled
every 50 ms:

* peak RSS of each process (VmHWM: the agent's own, and the largest of its children's);
* peak PSS of the tree (/proc/PID/smaps_rollup): shared pages are split between the processes that share
  them, so the sum is what the tree costs the machine (RSS sums count the forked trainer's shared pages
  twice). This is what the unit's `MemoryMax=` has to hold, and what the issue's "agent peak RSS <= 100 MB
  while training" is checked against.

    .venv/bin/python bench/agent_memory.py                # 3 rounds of the reference CNN, 768 samples x 3 epochs
    .venv/bin/python bench/agent_memory.py --rounds 2 --samples 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from proctree import descendants, pss_bytes, status_bytes

from flctl.fleet import Fleet
from flctl.model import export_reference_package

MiB = 1024 * 1024


class TreeSampler(threading.Thread):
    """Peak figures of a process and its descendants, sampled until stopped."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.agent_hwm = self.child_hwm = self.tree_pss = 0
        self.max_processes = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            kids = descendants(self.pid)
            self.max_processes = max(self.max_processes, 1 + len(kids))
            self.agent_hwm = max(self.agent_hwm, status_bytes(self.pid, "VmHWM"))
            for k in kids:
                self.child_hwm = max(self.child_hwm, status_bytes(k, "VmHWM"))
            pss = sum(pss_bytes(p) for p in [self.pid, *kids])
            self.tree_pss = max(self.tree_pss, pss)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=768, help="samples per round")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="agent-memory-") as tmp:
        fleet = Fleet(root=Path(tmp), devices=1, rounds=args.rounds, samples_per_round=args.samples,
                      epochs=args.epochs, round_timeout=600)
        fleet.prepare(export_reference_package)
        fleet.start()
        try:
            device = fleet.members[0]
            assert device.process is not None
            sampler = TreeSampler(device.process.pid)
            sampler.start()
            started = time.monotonic()
            while fleet.status()["model"]["version"] < args.rounds:
                if device.process.poll() is not None:
                    print(f"fl-agent exited ({device.process.returncode}); log {device.log_path}", file=sys.stderr)
                    return 1
                if time.monotonic() - started > 1800:
                    print("rounds did not complete within 30 min", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            sampler.stop()
            took = time.monotonic() - started
        finally:
            fleet.stop()
    print(f"fl-agent, reference CNN, {args.rounds} rounds x {args.samples} samples x {args.epochs} epochs "
          f"({took:.0f} s, up to {sampler.max_processes} processes in the agent's tree):")
    print(f"  agent process peak RSS (VmHWM)        {sampler.agent_hwm / MiB:7.1f} MiB")
    print(f"  largest child peak RSS (trainer)      {sampler.child_hwm / MiB:7.1f} MiB")
    print(f"  whole tree peak PSS (what it costs)   {sampler.tree_pss / MiB:7.1f} MiB   (target <= 100 MiB: "
          f"{'met' if sampler.tree_pss <= 100 * MiB else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
