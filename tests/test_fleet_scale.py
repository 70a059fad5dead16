"""10,000 devices report to a real ``fl-aggregator serve`` (bench/fleet.py): every heartbeat is taken, the counts
by state are exact, memory grows by a few MB, and the status page stays one small page that Chromium renders.

The figures (ingest time, RSS, page and JSON sizes, render time) are printed; `pytest -s` shows them."""

from __future__ import annotations

import asyncio
import importlib.util
import re
from pathlib import Path

import pytest

from aggregator.fleet import is_behind, is_throttled

DEVICES = 10_000
_spec = importlib.util.spec_from_file_location("bench_fleet", Path(__file__).resolve().parents[1] / "bench/fleet.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.slow
def test_ten_thousand_devices_report_and_the_page_stays_small(tmp_path: Path) -> None:
    result = asyncio.run(bench.measure(DEVICES, tmp_path))
    print("\n" + bench.report(result))
    reporting = [i for i in range(DEVICES) if i % 10 != 9]
    keys = [bench.SigningKey(bench.np.random.default_rng(i).bytes(32)) for i in reporting]
    reports = [bench.heartbeat(i, k, 0) for i, k in zip(reporting, keys, strict=True)]
    assert result["statuses"] == {204: len(reporting)}
    assert result["counts"] == {
        "enrolled": DEVICES, "active": len(reporting), "silent": DEVICES - len(reporting),
        "behind": sum(is_behind(r, bench.VERSIONS) for r in reports),
        "throttled": sum(is_throttled(r) for r in reports), "site_active": 0, "site_silent": 0,
    }  # fmt: skip
    for state, count in result["counts"].items():
        if state != "enrolled":
            assert f'fl_aggregator_fleet_devices{{state="{state}"}} {float(count)}' in result["metrics"]
    # one entry per device: 9,000 reports cost the server a few MB, not a copy of every message
    assert result["rss_after"] - result["rss_before"] < 40 * 2**20
    html = result["page_html"]
    assert "page 1 of 200 (10000 devices)" in html and html.count("<tr><td><code>") == 50
    assert result["page_bytes"] < 64 * 1024 and result["json_500_bytes"] < 512 * 1024
    if bench.CHROMIUM is None:
        pytest.skip("needs Debian's chromium package for the render check (tools/host-packages.txt)")
    dom = result["chromium_dom"]
    assert len(re.findall(r"<tr><td><code>[0-9a-f]{12}</code>", dom)) == 50  # the browser built the table
    assert ">never seen</td>" in dom and "page 1 of 200" in dom  # sorted by health: the silent ones first
