"""bench/spool_record_checks.py as a user runs it: every check is timed on records it accepts (the script asserts
each record matches its check before timing it); bad arguments are refused in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "spool_record_checks.py"


def test_each_check_is_timed_on_and_after_arrival() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--params", "1000", "--tensors", "3", "--repeats", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    timed = re.findall(r"^  (on arrival|at resume): (.+?) +[\d.]+ ms$", run.stdout, re.MULTILINE)
    assert [kind for when, kind in timed if when == "at resume"] == [
        "float32-sha256", "float16-sha256", "int8-sha256", "masked-sha256", "crc32"
    ], run.stdout
    assert len(timed) == 9, run.stdout


def test_a_non_positive_size_is_refused_in_one_line() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--tensors", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "bench/spool_record_checks.py: --params, --tensors and --repeats must be positive, and --tensors at most "
        "--params"
    ]
