"""The aggregator's status page at ``GET /``: rounds, devices, model version and the training curves, as a person
sees it in a browser (headless Chromium takes a screenshot of a running aggregator); and that the page,
``GET /v1/status`` (+ ``/v1/status/devices``) and ``fl-aggregator status --state`` say the same of lost updates,
sites and round statuses."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from aggregator_harness import Harness, run, running
from nacl.signing import SigningKey
from PIL import Image

from aggregator import statuschart, statuspage
from aggregator.app import SERVICES
from aggregator.cli import main as cli
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.store import Store

DOCS = Path(__file__).resolve().parent.parent / "docs"
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
        assert f'<td>{r}</td><td>v{r - 1}</td><td class="status-published">published</td><td>2/2</td>' in html
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


def _round_row(html: str, round_id: int) -> str:
    """The status page's table row of one round."""
    start = html.index(f"<tr><td>{round_id}</td>")
    return html[start:html.index("</tr>", start)]


def test_updates_the_disk_lost_are_named_by_the_page_the_json_and_status_state(tmp_path: Path, capsys) -> None:
    """Round 1 loses one of its two acknowledged updates (the disk cut its spool segment short) and is abandoned
    below its quorum after the restart; round 2 loses nothing. The page, GET /v1/status and
    ``fl-aggregator status --state`` name the lost device on round 1 and say nothing of losses on round 2."""
    key = SigningKey.generate()
    policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=600)

    async def first_run() -> list[SimulatedDevice]:
        async with running(tmp_path, devices=3, key=key, policy=policy) as h:
            task = await h.task()
            for device in h.devices[:2]:
                assert (await h.upload(device.update(task, h.delta())))[0] == 200
            return h.devices

    async def restart(devices: list[SimulatedDevice]) -> tuple[dict, str]:
        async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
            await h.engine.close_round()  # one update left of round 1: abandoned
            task = await h.task(after=1, wait=10)
            assert task is not None and task.round_id == 2
            for device in devices:
                assert (await h.upload(device.update(task, h.delta())))[0] == 200
            assert await h.task(after=2, wait=10) is not None  # round 2 is published
            return await (await h.client.get("/v1/status")).json(), await (await h.client.get("/")).text()

    devices = run(first_run())
    store = Store(tmp_path)
    try:
        last = store.round_updates(1)[-1]
    finally:
        store.close()
    with (tmp_path / "spool" / f"round-{1:08d}.seg").open("r+b") as fh:
        fh.truncate(last.offset + last.length - 4)  # the second record lacks its last float
    lost = last.device_id
    status, html = run(restart(devices))

    by_round = {r["round"]: r for r in status["rounds"]}
    assert by_round[1]["status"] == "abandoned" and by_round[1]["lost_devices"] == [lost]
    assert by_round[2]["status"] == "published" and by_round[2]["lost_devices"] == []
    row = _round_row(html, 1)
    assert "1/3<br>" in row and "1 update lost on disk:" in row
    assert f'<code title="{lost}">{lost[:12]}</code>' in row
    assert "lost on disk" not in _round_row(html, 2) and html.count("lost on disk") == 1

    assert cli(["status", "--state", str(tmp_path), "--json"]) == 0
    state = {r["round"]: r for r in json.loads(capsys.readouterr().out)["rounds"]}
    assert state[1]["lost_devices"] == [lost] and state[2]["lost_devices"] == []
    assert cli(["status", "--state", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  round     1 "))
    assert lines[at + 1].split() == ["1", "update", "lost", "on", "disk:", lost]
    assert [line for line in lines if "lost on disk" in line] == [lines[at + 1]]


def _page(rounds: list[dict]) -> str:
    return statuspage.render({"model": {"name": "m", "parameters": 1, "version": 2, "digest": "00"},
                              "current_round": None, "rounds": rounds, "devices": {"enrolled": 2, "revoked": 0,
                              "sites": 0}, "aggregator_id": "ab", "strategy": "fedavg"})  # fmt: skip


def test_each_round_status_has_its_style_and_the_legend_and_docs_list_every_status() -> None:
    """A ``superseded`` round (an async site's empty buffer) is styled as a status of its own, as ``published`` and
    ``abandoned`` are, and the legend, docs/api.md and the openapi ``Round`` schema list the same statuses."""
    statuses = yaml.safe_load((DOCS / "openapi.yaml").read_text())["components"]["schemas"]["Round"]["properties"][
        "status"]["enum"]
    assert sorted(statuspage.ROUND_STATUSES) == sorted(statuses)
    api = (DOCS / "api.md").read_text()
    assert all(f"`{s}`" in api.split("A round's `status` is")[1].split(".")[0] for s in statuses)

    rounds = [{"round": i, "model_version": 1, "status": status, "opened_at": 0.0, "closed_at": None, "goal": 2,
               "participants": 0, "samples": 0, "metrics": {}, "note": "", "lost_devices": []}
              for i, status in enumerate(statuses, start=1)]
    html = _page(rounds)
    for i, status in enumerate(statuses, start=1):
        assert f'<td class="status-{status}">{status}</td>' in _round_row(html, i)
        colour = statuspage.ROUND_STATUSES[status][0]
        assert f".status-{status}{{color:{colour};" in html
        assert f'<span class="status-{status}">{status}</span>: ' in html.split('<p class="legend">')[1]
    assert len({colour for colour, _ in statuspage.ROUND_STATUSES.values()}) == len(statuses)
    assert "lost on disk" not in html


def test_a_round_that_lost_many_updates_names_the_first_ten_and_counts_the_rest() -> None:
    lost = [f"{i:02d}" + "ab" * 15 for i in range(12)]  # a missing segment can take every update of a round
    rounds = [{"round": 1, "model_version": 0, "status": "open", "opened_at": 0.0, "closed_at": None, "goal": 20,
               "participants": 0, "samples": 0, "metrics": {}, "note": "", "lost_devices": lost}]
    row = _round_row(_page(rounds), 1)
    assert "12 updates lost on disk:" in row
    assert ' and <a href="/v1/status/rounds/1/lost_devices">2 more</a></small></td>' in row
    assert all(f'title="{d}"' in row for d in lost[:10]) and lost[10] not in row and lost[11] not in row


def test_a_site_is_marked_in_the_device_listing_and_on_the_page(tmp_path: Path, capsys) -> None:
    """A key enrolled with ``enroll --site`` (a site aggregator in a site -> city tree) is marked in
    GET /v1/status/devices (``"site": true``) and by a ``site`` label in its row of the page's device table, and
    counted in GET /v1/status, in the page's header and by ``fl-aggregator status --url`` as ``--state`` counts it."""
    site = SimulatedDevice()

    async def go() -> tuple[dict, dict, str]:
        async with running(tmp_path, devices=2) as h:
            site_key = Enrolment(site.device_id, bytes(site.key.verify_key), "site-a", site=True)
            h.app[SERVICES].registry.enroll([site_key])
            listing = await (await h.client.get("/v1/status/devices", params={"sort": "device"})).json()
            status = await (await h.client.get("/v1/status")).json()
            html = await (await h.client.get("/", params={"sort": "device"})).text()
            assert await asyncio.to_thread(cli, ["status", "--url", str(h.client.make_url("/"))]) == 0
            return listing, status, html

    listing, status, html = run(go())
    assert "devices: 3 enrolled (1 site), 0 revoked" in capsys.readouterr().out  # status --url
    assert status["devices"]["sites"] == 1 and "devices 3 enrolled (1 site), 0 revoked" in html
    assert listing["counts"]["enrolled"] == 3
    assert {d["device"]: d["site"] for d in listing["devices"]} == {
        **{d["device"]: False for d in listing["devices"] if d["device"] != site.device_id}, site.device_id: True}
    rows = [r for r in html.split('<table class="devices">')[1].split("</table>")[0].split("<tr>") if "<code>" in r]
    assert len(rows) == 3
    marked = [r for r in rows if 'class="site"' in r]
    assert len(marked) == 1 and site.device_id[:12] in marked[0] and "site-a" in marked[0]
