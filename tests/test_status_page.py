"""The aggregator's status page at ``GET /``: rounds, devices, model version and the training curves, as a person
sees it in a browser (headless Chromium takes a screenshot of a running aggregator)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import Harness, run, running
from PIL import Image

from aggregator import statuschart

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CURVE_BLUE = np.array([0x1F, 0x6F, 0xB4])  # statuschart's line colour
LOSSES = [2.0, 1.2, 0.7]  # reported by the devices in rounds 1, 2, 3
ACCURACIES = [0.35, 0.6, 0.8]


async def _publish_rounds(h: Harness) -> None:
    after = 0
    for loss, accuracy in zip(LOSSES, ACCURACIES, strict=True):
        task = await h.task(after=after, wait=10)
        assert task is not None
        for device in h.devices:
            metrics = {"loss_after": loss, "accuracy_after": accuracy, "train_loss": loss + 0.1}
            status, _ = await h.upload(device.update(task, h.delta(), num_samples=20, metrics=metrics))
            assert status == 200
        after = task.round_id
    await h.task(after=after, wait=10)  # the last round is published once the next one opens


async def _screenshot(url: str, out: Path) -> None:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}", "--window-size=1200,900", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout=180)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 0 and out.exists(), output.decode(errors="replace")[-2000:]
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (tools/host-packages.txt)")
def test_browser_shows_rounds_devices_version_and_the_loss_curve(tmp_path: Path) -> None:
    shot = tmp_path / "status.png"

    async def go() -> str:
        async with running(tmp_path / "state", devices=2) as h:
            await _publish_rounds(h)
            page = await h.client.get("/")
            assert page.status == 200 and page.content_type == "text/html"
            html = await page.text()
            await _screenshot(str(h.client.make_url("/")), shot)
            return html

    html = run(go())
    for r in (1, 2, 3):
        assert f"<td>{r}</td><td>v{r - 1}</td><td>published</td><td>2/2</td>" in html
        assert f"<title>round {r}: loss_after {LOSSES[r - 1]:.3g}</title>" in html
    assert "version <b>v3</b>" in html and "devices 2 enrolled" in html
    assert html.count("<polyline") == 2  # loss and accuracy

    if os.environ.get("FL_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["FL_KEEP_SCREENSHOT"])
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert image.shape == (900, 1200, 3)
    assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not a blank page
    curve = np.abs(image - CURVE_BLUE).sum(axis=2) < 40
    assert curve.sum() > 300, "the curves' blue line is not on the screenshot"


def test_chart_follows_published_rounds_in_order_and_skips_the_rest() -> None:
    rounds = [  # as GET /v1/status lists them: newest first
        {"round": 4, "status": "collecting", "metrics": {}},
        {"round": 3, "status": "published", "metrics": {"loss_after": 0.5, "accuracy_after": 0.9}},
        {"round": 2, "status": "abandoned", "metrics": {"loss_after": 9.0}},
        {"round": 1, "status": "published", "metrics": {"train_loss": 1.5, "loss_after": 1.0}},
    ]
    html = statuschart.render(rounds)
    assert "<title>round 1: loss_after 1</title>" in html and "<title>round 3: loss_after 0.5</title>" in html
    assert "round 2:" not in html and "round 4:" not in html
    assert html.count("<polyline") == 2
    loss_points = html.split("<polyline")[1].split('points="')[1].split('"')[0].split()
    ys = [float(p.split(",")[1]) for p in loss_points]
    assert ys[0] < ys[1]  # SVG y grows downwards: round 1's higher loss (1.0) is drawn above round 3's (0.5)
    assert float(loss_points[0].split(",")[0]) < float(loss_points[1].split(",")[0])  # round 1 left of round 3


def test_chart_without_published_rounds_says_so_and_escapes_metric_names() -> None:
    assert "no published round reports it yet" in statuschart.render([])
    svg = statuschart.chart("<loss>", "a&b", [(1, 1.0), (2, 0.5)])
    assert "&lt;loss&gt;" in svg and "a&amp;b" in svg and "<loss>" not in svg
