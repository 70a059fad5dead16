"""Inline SVG charts of the training curves for the status page: no JavaScript, no files, no build step.

The aggregator has no held-out data, so the curves are what the devices report with their updates (the
sample-weighted mean per published round, ``RoundEngine.status()["rounds"][i]["metrics"]``): the loss and the
accuracy on each device's own data after its local training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

WIDTH, HEIGHT = 440, 210
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 28, 34

#: (title, metric names in order of preference, fixed y range or None to fit the data)
CHARTS: tuple[tuple[str, tuple[str, ...], tuple[float, float] | None], ...] = (
    ("training loss", ("loss_after", "train_loss", "loss"), None),
    ("training accuracy", ("accuracy_after", "accuracy"), (0.0, 1.0)),
)


def _points(rounds: Sequence[Mapping[str, Any]], names: Sequence[str]) -> tuple[str, list[tuple[int, float]]]:
    """The first metric in ``names`` that published rounds report, as (round, value) in round order."""
    published = sorted((r for r in rounds if r.get("status") == "published"), key=lambda r: r["round"])
    for name in names:
        points = [(int(r["round"]), float(r["metrics"][name])) for r in published
                  if isinstance(r.get("metrics"), Mapping) and name in r["metrics"]
                  and math.isfinite(float(r["metrics"][name]))]
        if points:
            return name, points
    return "", []


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _round_ticks(first: int, last: int, most: int = 10) -> list[int]:
    step = max(1, math.ceil((last - first + 1) / most))
    return list(range(first, last + 1, step))


def chart(title: str, metric: str, points: Sequence[tuple[int, float]],
          y_range: tuple[float, float] | None = None) -> str:
    """One line chart (value per round) as an ``<svg>`` element."""
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" style="border:1px solid #ddd" '
            f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-label="{escape(title)} per round">'
            f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>')
    if not points:
        return (head + f'<text x="{LEFT}" y="{HEIGHT // 2}" font-size="12" fill="#777">'
                "no published round reports it yet</text></svg>")
    rounds = [r for r, _ in points]
    values = [v for _, v in points]
    lo, hi = y_range if y_range is not None else (min(values), max(values))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    first, last = rounds[0], rounds[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    pad = 12  # keeps the first and last points off the value labels and the frame

    def x(r: int) -> float:
        span = plot_w - 2 * pad
        return LEFT + pad + (span / 2 if last == first else (r - first) / (last - first) * span)

    def y(v: float) -> float:
        return TOP + (1 - (v - lo) / (hi - lo)) * plot_h

    parts = [head, f'<text x="{WIDTH - RIGHT}" y="16" font-size="11" fill="#777" text-anchor="end">'
                   f"{escape(metric)}</text>"]
    for frac in (0.0, 0.5, 1.0):  # horizontal grid lines with their values
        v = lo + frac * (hi - lo)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e3e3e3"/>'
                     f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">{_fmt(v)}</text>')
    for r in _round_ticks(first, last):
        parts.append(f'<text x="{x(r):.1f}" y="{HEIGHT - BOTTOM + 16}" font-size="11" text-anchor="middle">{r}'
                     "</text>")
    parts.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 4}" font-size="11" text-anchor="middle" '
                 'fill="#555">round</text>')
    line = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in points)
    parts.append(f'<polyline fill="none" stroke="#1f6fb4" stroke-width="2" points="{line}"/>')
    for r, v in points:
        parts.append(f'<circle cx="{x(r):.1f}" cy="{y(v):.1f}" r="3.5" fill="#1f6fb4">'
                     f"<title>round {r}: {escape(metric)} {_fmt(v)}</title></circle>")
    return "".join(parts) + "</svg>"


def render(rounds: Sequence[Mapping[str, Any]]) -> str:
    """The status page's charts for the round history of ``GET /v1/status``."""
    svgs = []
    for title, names, y_range in CHARTS:
        metric, points = _points(rounds, names)
        svgs.append(chart(title, metric, points, y_range))
    return ('<div class="charts" style="display:flex;flex-wrap:wrap;gap:1em">' + "".join(svgs) + "</div>"
            '<p class="note" style="color:#666;font-size:12px">Reported by the devices with their updates: the '
            "sample-weighted mean, per published round, on each device's own data after local training.</p>")
