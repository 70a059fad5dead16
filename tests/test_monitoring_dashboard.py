"""The shipped Grafana dashboard only queries metrics that fl-agent and fl-aggregator export."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "tools" / "monitoring" / "grafana-fleet.json"


def exported_names() -> set[str]:
    source = "\n".join(p.read_text() for p in [*ROOT.glob("appliance/*.py"), *ROOT.glob("aggregator/**/*.py")])
    names = set(re.findall(r'"(fl_(?:agent|aggregator)_[a-z_]+)"', source))
    # prometheus-client adds _total to counters, _bucket/_sum/_count to histograms, _info to Info
    return names | {n + s for n in names for s in ("_total", "_bucket", "_sum", "_count", "_info")}


def test_every_panel_queries_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported_names()
    assert dashboard["panels"], "empty dashboard"
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            metrics = {w for w in re.findall(r"[a-z_]+", target["expr"]) if w.startswith("fl_")}
            assert metrics or "up" in target["expr"], panel["title"]
            unknown = metrics - known
            assert not unknown, f"panel {panel['title']!r} queries {unknown}, which nothing exports"
