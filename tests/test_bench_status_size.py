"""bench/status_size.py as a user runs it: it fills the rounds, checks that GET /v1/status lists the first ids of
each full round beside their total and that the paged endpoint lists every device of a round, and prints the sizes;
bad arguments are refused in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "status_size.py"


def test_the_status_and_a_rounds_pages_are_measured() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--devices", "750", "--rounds", "3"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.startswith("3 rounds of 750 devices:\n"), run.stdout
    assert re.search(r"^  GET /v1/status: [\d.]+ KB in \d+ ms$", run.stdout, re.MULTILINE), run.stdout
    assert re.search(r"^  one round's whole list, 2 pages of 500: [\d.]+ KB in \d+ ms$", run.stdout, re.MULTILINE)


def test_a_non_positive_count_is_refused_in_one_line() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--devices", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == ["bench/status_size.py: --devices and --rounds must be positive"]
