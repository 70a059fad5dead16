"""bench/upload_receive.py runs both ways of receiving a body against its own server and prints one line each;
bad counts get one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "upload_receive.py"


def test_it_prints_the_event_loop_cpu_of_both_ways() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--size", "1500000", "--batches", "1", "--per-batch", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["1.50 MB bodies,     aiohttp", "1.50 MB bodies, lent socket"]
    assert all("ms of event loop CPU per upload" in line for line in lines)


def test_a_non_positive_count_is_refused_in_one_line() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--batches", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "must be positive" in done.stderr
