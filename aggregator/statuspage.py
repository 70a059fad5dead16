"""``GET /``: a small HTML status page for people (the same facts as ``GET /v1/status``), refreshed every 5 s."""

from __future__ import annotations

import time
from html import escape
from typing import Any

from aggregator import statuschart


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%H:%M:%S", time.localtime(ts))


def _secure(r: dict[str, Any]) -> str:
    """What the page says of a secure round: how many devices the sum covers, or the phase it is in."""
    secure = r.get("secure")
    if not secure:
        return ""
    if secure["phase"] == "done":
        return f"secure: sum of {secure['sum_devices']} devices"
    return f"secure, {secure['phase']} phase"


def _async(status: dict[str, Any]) -> str:
    """Async mode (FedBuff): the buffer's settings, versions per hour and the staleness of accepted updates as a
    row of bars (one per staleness, height by count)."""
    mode = status.get("async")
    if not mode:
        return ""
    weighting = ("constant" if mode["weighting"] == "constant"
                 else f"polynomial (1 + s)^-{mode['exponent']:g}")
    counts = {int(s): n for s, n in mode["staleness"].items()}
    peak = max(counts.values(), default=0)
    bars = "".join(
        f'<td style="vertical-align:bottom;text-align:center"><div title="{n}" style="background:#4a7;width:1.6em;'
        f'height:{max(1, round(60 * n / peak))}px;margin:auto"></div>{s}<br><small>{n}</small></td>'
        for s, n in sorted(counts.items())
    )
    chart = (f'<table><tr><th style="vertical-align:bottom">staleness<br><small>updates</small></th>{bars}</tr></table>'
             if counts else "<p>no update accepted since start</p>")
    return (f"<p>async (FedBuff): a version every <b>{mode['buffer']}</b> updates, at most {mode['max_staleness']} "
            f"versions stale, weighting {escape(weighting)} &middot; versions in the last hour: "
            f"<b>{mode['versions_per_hour']}</b></p>\n"
            f"<p>staleness of accepted updates (versions behind, since start):</p>\n{chart}\n")


def render(status: dict[str, Any]) -> str:
    """The page for a ``RoundEngine.status()`` dict. Everything interpolated is escaped."""
    model = status["model"]
    current = status["current_round"]
    if current:
        left = max(0.0, current["deadline"] - time.time())
        now = (f"round {current['round']} on model v{current['model_version']}: {current['accepted']} of "
               f"{current['goal']} updates, closes in {left:.0f} s" + (" (closing)" if current["closing"] else ""))
    else:
        now = "no round open"
    rows = []
    for r in status["rounds"]:
        metrics = ", ".join(f"{escape(k)} {v:.4g}" for k, v in r["metrics"].items())
        rows.append(
            f"<tr><td>{r['round']}</td><td>v{r['model_version']}</td><td>{escape(r['status'])}"
            f"{'<br>' + escape(_secure(r)) if r.get('secure') else ''}</td>"
            f"<td>{r['participants']}/{r['goal']}</td><td>{r['samples']}</td><td>{metrics}</td>"
            f"<td>{_when(r['opened_at'])}</td><td>{_when(r['closed_at'])}</td><td>{escape(r['note'])}</td></tr>"
        )
    devices = status["devices"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>fl-aggregator {escape(status['aggregator_id'][:8])}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}}code{{font-size:12px}}</style></head>
<body><h1>fl-aggregator</h1>
<p>model <b>{escape(model['name'])}</b> ({model['parameters']:,} parameters), version <b>v{model['version']}</b>
<code>{escape(model['digest'][:16])}</code> &middot; strategy <b>{escape(status['strategy'])}</b>
&middot; devices {devices['enrolled']} enrolled, {devices['revoked']} revoked</p>
<p>{escape(now)}</p>
{_async(status)}{statuschart.render(status["rounds"])}
<table><tr><th>round</th><th>model</th><th>status</th><th>updates/goal</th><th>samples</th><th>metrics</th>
<th>opened</th><th>closed</th><th>note</th></tr>
{''.join(rows)}
</table>
<p><a href="/v1/status">/v1/status</a> &middot; <a href="/metrics">/metrics</a></p></body></html>
"""
