"""The shipped Grafana dashboard only queries metrics that fl-agent and fl-aggregator export, in queries Prometheus
parses, and shows the metric of every device alert docs/metrics.md proposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

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


def device_alert_metrics() -> dict[str, set[str]]:
    """The device (``fl_agent_*``) metrics each alert rule in docs/metrics.md fires on, by alert name."""
    rules = re.findall(r"- alert: (\w+)\n\s+expr: (.+)", (ROOT / "docs" / "metrics.md").read_text())
    assert rules, "no alert rules found in docs/metrics.md"
    found = {name: {w for w in re.findall(r"[a-z_]+", expr) if w.startswith("fl_agent_")} for name, expr in rules}
    return {name: metrics for name, metrics in found.items() if metrics}


def test_every_device_alert_has_a_panel_showing_its_metric():
    """An operator paged by a device alert (a data partition refusing writes, a device not contributing) finds on
    the dashboard which appliances it is and since when."""
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {w for panel in dashboard["panels"] for target in panel["targets"]
               for w in re.findall(r"[a-z_]+", target["expr"])}
    alerts = device_alert_metrics()
    assert "FlDeviceStorageRefused" in alerts
    missing = {name: metrics - queried for name, metrics in alerts.items() if metrics - queried}
    assert not missing, f"no panel queries the metrics of these alerts: {missing}"


def test_every_panel_query_is_valid_promql(tmp_path: Path):
    """Each panel's query, checked by promtool as a recording rule: a query Prometheus cannot parse shows an
    empty panel in Grafana, not an error anyone sees."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    dashboard = json.loads(DASHBOARD.read_text())
    rules = [{"record": f"panel:{panel['id']}:{target['refId']}", "expr": target["expr"]}
             for panel in dashboard["panels"] for target in panel["targets"]]
    path = tmp_path / "panels.yml"
    path.write_text(json.dumps({"groups": [{"name": "panels", "rules": rules}]}))  # JSON is YAML
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
