"""bench/async_window.py as a user runs it: a real async aggregator takes every device's update in one window,
publishing a version every K, and the figures are printed; bad arguments are refused in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "async_window.py"


def test_every_update_of_the_window_is_acknowledged_across_several_versions() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--devices", "40", "--params", "200", "--buffer", "10",
                          "--concurrency", "8"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    line = re.search(r"N=40 P=200 K=10: all updates acknowledged in [\d.]+ s .*devices trained on (\d+) versions, "
                     r"server peak RSS \d+ MB", run.stdout)  # fmt: skip
    assert line is not None, run.stdout
    assert int(line.group(1)) >= 2  # 40 updates, a version every 10: later devices trained on newer versions


def test_a_non_positive_buffer_is_refused_in_one_line() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--buffer", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "bench/async_window.py: --devices, --params, --buffer and --concurrency must be positive"
    ]
