"""``GET /``: a small HTML status page for people (the same facts as ``GET /v1/status``), refreshed every 5 s.

The device table is one page of ``GET /v1/status/devices`` (aggregator/fleet.py), sorted and paged by the server
through plain links (``?sort=&state=&page=&per_page=``, kept by the refresh), so a fleet of any size sends the
browser one page of rows and no script.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from html import escape
from typing import Any
from urllib.parse import urlencode

from aggregator import statuschart
from aggregator.fleet import REPORT_MAX_AHEAD_SECONDS

#: Each round ``status`` of ``GET /v1/status``: its colour on the page and what it means (the legend under the
#: rounds; docs/api.md and the ``Round`` schema of docs/openapi.yaml list the same statuses).
ROUND_STATUSES: dict[str, tuple[str, str]] = {
    "open": ("#1f6fb4", "collecting updates"),
    "published": ("#4a7", "a new model version (a site: its devices' sum forwarded to its city)"),
    "abandoned": ("#c33", "ended without a new version: too few updates or a failed check, the reason in its note"),
    "superseded": ("#999", "an async site's buffer still empty when its city's next version came; nothing lost"),
}
#: How many of a round's lost devices the page names (a round can lose every update at once: a missing segment).
LOST_NAMED = 10
#: The page's colours for round statuses, lost updates and site rows.
_STYLE = "".join(f".status-{status}{{color:{colour};font-weight:bold}}"
                 for status, (colour, _) in ROUND_STATUSES.items()) + (
    ".legend{font-size:12px;color:#555}.lost{color:#c33}"
    ".site{font-size:11px;border:1px solid #1f6fb4;color:#1f6fb4;border-radius:3px;padding:0 .3em}")


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


def _named_devices(r: dict[str, Any], key: str) -> tuple[int, str]:
    """A round's device list ``key`` of /v1/status (cut at 100 ids, its ``<key>_total`` beside it): the total, and
    the first :data:`LOST_NAMED` ids as HTML followed by a link to the paged list for the rest."""
    ids = r.get(key, [])
    total = r.get(f"{key}_total", len(ids))
    names = ", ".join(f'<code title="{escape(d, quote=True)}">{escape(d[:12])}</code>' for d in ids[:LOST_NAMED])
    named = min(len(ids), LOST_NAMED)
    if total > named:
        names += f' and <a href="/v1/status/rounds/{r["round"]}/{key}">{total - named} more</a>'
    return total, names


def _lost(r: dict[str, Any]) -> str:
    """The round's acknowledged updates that the disk lost (taken out of the round at a restart), or nothing.

    /v1/status lists the first of them beside ``lost_devices_total``; the rest are a link to their paged list."""
    total, names = _named_devices(r, "lost_devices")
    if not total:
        return ""
    return (f'<br><small class="lost" title="acknowledged, then lost from the spool by the disk; not in the round">'
            f"{total} update{'s' if total != 1 else ''} lost on disk: {names}</small>")


#: What the page says of each reason a secure round's masked input is left out of its sum (aggregator/secagg_round.py).
LEFT_OUT_WHY = {"false-accusation": "accused an honest neighbour", "bad-shares": "dealt bad shares",
                "too-few-holders": "too few holders left", "late": "stored after the masked phase ended"}


def _left_out(r: dict[str, Any]) -> str:
    """A secure round's masked inputs that arrived and are not in its sum, and why (a plain round's updates stored
    after its close stopped waiting for them), or nothing: their devices are not among the round's devices.
    /v1/status lists the first of them beside ``left_out_devices_total``."""
    total, names = _named_devices(r, "left_out_devices")
    if not total:
        return ""
    if r.get("secure") is None:  # a plain round's are updates its close stopped waiting for (a stalled disk)
        return (f'<br><small class="left-out" title="stored after the round stopped waiting for them: never '
                f"acknowledged\">{total} update{'s' if total != 1 else ''} stored too late to count: {names}</small>")
    reasons = r["secure"].get("left_out", {})
    why = "; ".join(f"{count} {escape(LEFT_OUT_WHY.get(reason, reason))}" for reason, count in reasons.items())
    return (f'<br><small class="left-out" title="stored, but not in the secure sum">'
            f"{total} masked input{'s' if total != 1 else ''} left out of the sum"
            f"{f' ({why})' if why else ''}: {names}</small>")


def _sites(count: int) -> str:
    return f" ({count} site{'s' if count != 1 else ''})" if count else ""


def _legend() -> str:
    return '<p class="legend">' + " &middot; ".join(
        f'<span class="status-{status}">{status}</span>: {escape(meaning)}'
        for status, (_, meaning) in ROUND_STATUSES.items()
    ) + "</p>"


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


def size_text(n: int) -> str:
    """A byte count as the page and ``fl-aggregator status`` say it: B, KiB or MiB."""
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def fetches_naming_a_base(downlink: dict[str, Any]) -> int:
    """The fetches of ``downlink`` (``GET /v1/status``) by devices that held an earlier version: the deltas and the
    full models sent instead of one (answers ``full_<why no delta>``)."""
    return downlink["delta"]["downloads"] + sum(n["downloads"] for answer, n in downlink["answers"].items()
                                                if answer.startswith("full_"))


def downlink_text(downlink: dict[str, Any], *, number: Callable[[int], str] = str,
                  text: Callable[[str], str] = str, separator: str = "; ") -> str:
    """The models sent since start (``GET /v1/status``'s ``downlink``) in one line, as the page and ``fl-aggregator
    status --url`` say it: full models and deltas (downloads and bytes), and of the fetches that named a base (a
    device holding an earlier version), the share that got a delta. ``number`` and ``text`` mark up counts and
    names (the page makes counts bold and escapes names)."""
    full, delta, encoding = downlink["full"], downlink["delta"], downlink["encoding"]
    steps = f" ({text(encoding)} steps)" if encoding != "full" else ""
    parts = [
        f"{number(full['downloads'])} full model{'s' if full['downloads'] != 1 else ''}, {size_text(full['bytes'])}",
        f"{number(delta['downloads'])} delta{'s' if delta['downloads'] != 1 else ''}{steps}, "
        f"{size_text(delta['bytes'])}",
    ]
    named_base = fetches_naming_a_base(downlink)
    if named_base:
        parts.append(f"{100 * delta['downloads'] / named_base:.0f} % of the {named_base} fetches that named a base "
                     "got a delta")
    return f"downlink since start (--downlink {text(encoding)}): " + separator.join(parts)


def _downlink(status: dict[str, Any]) -> str:
    downlink = status.get("downlink")
    if not downlink:
        return ""
    return f"<p>{downlink_text(downlink, number=lambda n: f'<b>{n}</b>', text=escape, separator=' &middot; ')}</p>\n"


def _ago(seconds: float) -> str:
    if seconds < -REPORT_MAX_AHEAD_SECONDS:  # the aggregator's clock was stepped back since (aggregator/fleet.py)
        return "later than the aggregator's clock"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


_COLUMNS = (  # header, sort key (None: not sortable)
    ("device", "device"), ("health", "health"), ("last seen", "last_seen"), ("last round", "last_round"),
    ("model", "model_version"), ("agent", "agent_version"), ("cameras", None), ("memory MiB (limit)", None),
    ("CPU throttled", None), ("OOM retries", None), ("outbox", "outbox"), ("storage errors", None),
)  # fmt: skip
_SITE_MARK = (' <span class="site" title="a site aggregator (enroll --site): its updates carry its devices\' sum">'
              "site</span>")
_HEALTH_COLOUR = {"ok": "#4a7", "silent": "#999", "behind": "#d80", "throttled": "#c33", "behind, throttled": "#c33",
                  "never forwarded": "#999"}


def _link(fleet: dict[str, Any], **change: Any) -> str:
    query = {k: fleet[k] for k in ("state", "sort", "page", "per_page")} | change
    return escape("?" + urlencode(query), quote=True)


def _device_row(d: dict[str, Any], now: float) -> str:
    name = f" {escape(d['name'])}" if d["name"] else ""
    if d["site"]:
        name += _SITE_MARK
    colour = _HEALTH_COLOUR[d["health"]]
    if d["last_seen"] is None:
        never = "never forwarded" if d["site"] else "never seen"
        return (f'<tr><td><code>{escape(d["device"][:12])}</code>{name}</td><td style="color:{colour}">{never}</td>'
                + "<td>-</td>" * 10 + "</tr>")
    behind = d["versions_behind"] or 0  # negative only if the aggregator's state was reset under the fleet
    model = "-" if d["model_version"] is None else f"v{d['model_version']}" + (f" (-{behind})" if behind > 0 else "")
    if d["site"]:  # last seen: its last forward; round and model: what that forward answered and was based on
        return (f'<tr><td><code>{escape(d["device"][:12])}</code>{name}</td>'
                f'<td style="color:{colour}">{escape(d["health"])}</td><td>{_ago(now - d["last_seen"])}</td>'
                f"<td>{d['last_round']}</td><td>{model}</td>" + "<td>-</td>" * 7 + "</tr>")
    limit = f" ({_mib(d['memory_max'])})" if d["memory_max"] else ""
    return (
        f'<tr><td><code>{escape(d["device"][:12])}</code>{name}</td>'
        f'<td style="color:{colour}">{escape(d["health"])}</td><td>{_ago(now - d["last_seen"])}</td>'
        f"<td>{d['last_round']}</td><td>{model}</td><td>{escape(d['agent_version'])}</td><td>{d['cameras']}</td>"
        f"<td>{_mib(d['memory'])}{limit}</td><td>{d['cpu_throttled'] / 10:.1f} %</td><td>{d['oom_retries']}</td>"
        f"<td>{d['outbox']}</td><td>{d['storage_errors']}</td></tr>"
    )


def _fleet(fleet: dict[str, Any] | None) -> str:
    """Devices by state (links that filter the table) and one page of the device table."""
    if fleet is None:
        return ""
    counts = fleet["counts"]
    states = " &middot; ".join(
        f'<a href="{_link(fleet, state=state, page=1)}">{"<b>" if fleet["state"] == state else ""}{state} '
        f'{counts[state] if state != "all" else counts["enrolled"]}{"</b>" if fleet["state"] == state else ""}</a>'
        for state in ("all", "active", "silent", "behind", "throttled")
        + (("site_active", "site_silent") if counts["site_active"] + counts["site_silent"] else ())
    )
    heads = []
    for title, key in _COLUMNS:
        if key is None:
            heads.append(f"<th>{title}</th>")
            continue
        current = fleet["sort"].lstrip("-") == key
        descending = fleet["sort"].startswith("-")
        arrow = (" &#9660;" if descending else " &#9650;") if current else ""
        flip = key if current and descending else f"-{key}" if current else key
        heads.append(f'<th><a href="{_link(fleet, sort=flip, page=1)}">{title}</a>{arrow}</th>')
    rows = "".join(_device_row(d, fleet["now"]) for d in fleet["devices"])
    page, pages = fleet["page"], fleet["pages"]
    pager = " ".join(filter(None, [
        f'<a href="{_link(fleet, page=1)}">&laquo; first</a>' if page > 1 else "",
        f'<a href="{_link(fleet, page=page - 1)}">&lsaquo; previous</a>' if page > 1 else "",
        f"page {page} of {pages} ({fleet['total']} devices)",
        f'<a href="{_link(fleet, page=page + 1)}">next &rsaquo;</a>' if page < pages else "",
        f'<a href="{_link(fleet, page=pages)}">last &raquo;</a>' if page < pages else "",
    ]))  # fmt: skip
    return (f'<h2 id="devices">Devices</h2>\n<p>{states}</p>\n'
            f'<table class="devices"><tr>{"".join(heads)}</tr>\n{rows}</table>\n<p>{pager}</p>\n')


def _disk(status: dict[str, Any]) -> str:
    """A line while the disk has stopped answering (a write under way past --store-timeout), or nothing."""
    disk = status.get("disk") or {}
    if not disk.get("stalled"):
        return ""
    return (f'<p class="disk-stalled"><b>The disk has not answered for {disk["oldest_write_seconds"]:.0f} s</b> '
            f"({escape(disk['oldest_write'] or '')}): uploads are refused until it does.</p>\n")


def render(status: dict[str, Any], fleet: dict[str, Any] | None = None) -> str:
    """The page for a ``RoundEngine.status()`` dict and one page of ``Fleet.listing()``. Everything interpolated
    is escaped."""
    model = status["model"]
    current = status["current_round"]
    if current:
        left = max(0.0, current["deadline"] - time.time())
        now = (f"round {current['round']} on model v{current['model_version']}: {current['accepted']} of "
               f"{current['goal']} updates, closes in {left:.0f} s" + (" (closing)" if current["closing"] else "")
               + f"; an update counts with L2 norm at most {current['max_update_norm']:.4g} "
               f"({current['max_update_norm_source']}) and at most {current['max_samples']} samples (max-samples)")
    else:
        now = "no round open"
    rows = []
    for r in status["rounds"]:
        metrics = ", ".join(f"{escape(k)} {v:.4g}" for k, v in r["metrics"].items())
        rows.append(
            f"<tr><td>{r['round']}</td><td>v{r['model_version']}</td>"
            f"<td class=\"status-{escape(r['status'])}\">{escape(r['status'])}"
            f"{'<br>' + escape(_secure(r)) if r.get('secure') else ''}</td>"
            f"<td>{r['participants']}/{r['goal']}{_lost(r)}{_left_out(r)}</td><td>{r['samples']}</td><td>{metrics}</td>"
            f"<td>{_when(r['opened_at'])}</td><td>{_when(r['closed_at'])}</td><td>{escape(r['note'])}</td></tr>"
        )
    devices = status["devices"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>fl-aggregator {escape(status['aggregator_id'][:8])}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}}code{{font-size:12px}}
{_STYLE}</style></head>
<body><h1>fl-aggregator</h1>
<p>model <b>{escape(model['name'])}</b> ({model['parameters']:,} parameters), version <b>v{model['version']}</b>
<code>{escape(model['digest'][:16])}</code> &middot; strategy <b>{escape(status['strategy'])}</b>
&middot; devices {devices['enrolled']} enrolled{_sites(devices['sites'])}, {devices['revoked']} revoked</p>
<p>{escape(now)}</p>
{_disk(status)}{_downlink(status)}{_async(status)}{statuschart.render(status["rounds"])}
<table><tr><th>round</th><th>model</th><th>status</th><th>updates/goal</th><th>samples</th><th>metrics</th>
<th>opened</th><th>closed</th><th>note</th></tr>
{''.join(rows)}
</table>
{_legend()}
{_fleet(fleet)}<p><a href="/v1/status">/v1/status</a> &middot; <a href="/v1/status/devices">/v1/status/devices</a>
&middot; <a href="/metrics">/metrics</a></p></body></html>
"""
