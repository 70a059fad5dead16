"""bench/model_download.py as a user runs it: every way downloads and checks a release from a real aggregator,
the agent's way holds the body once where ``response.read()`` held it twice, and bad arguments are refused in one
line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from appliance.client import READ_BUFFER_BYTES

BENCH = Path(__file__).resolve().parent.parent / "bench" / "model_download.py"


def test_the_agents_download_holds_the_release_once_where_read_held_it_twice() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--params", "1000000", "--downloads", "2", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = {}
    for line in run.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) == 4 and cells[0] != "way":
            rows[cells[0]] = float(cells[3])  # peak allocated MB
    assert set(rows) == {"before", "+ verified once", "+ one buffer", "now (+ read_bufsize)", "small GET (204)"}
    release_mb = 4.0  # 1M float32 parameters
    assert rows["before"] >= 2 * release_mb  # the chunk list and its join
    # the body once, and at most what aiohttp buffers before it stops reading the socket
    assert rows["now (+ read_bufsize)"] <= release_mb + 2 * READ_BUFFER_BYTES / 1e6


def test_a_non_positive_count_is_refused_in_one_line() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--repeats", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "bench/model_download.py: --params, --downloads and --repeats must be positive"
    ]
