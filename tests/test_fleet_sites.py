"""The fleet view of a city in a site -> city tree: a site aggregator (``enroll --site``) sends no heartbeat, it is
alive when it forwards. Its last seen is its last accepted forward, its model the version that forward was based
on, and it counts as ``site_active`` or ``site_silent``, never as a silent device (the alert an operator sets on
``fl_aggregator_fleet_devices{state="silent"}`` means silent cameras)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
from nacl.signing import SigningKey
from test_aggregator_async_tree_window import SITE_POLICY, _delta, _fill, city_of_two_sites
from test_aggregator_tree import site_task, wait_until

from aggregator.app import SERVICES
from aggregator.fleet import SILENT_AFTER_SECONDS, Enrolled, Fleet, Forward, ReceiptRounds
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.upstream import UpstreamConfig
from appliance import wire
from appliance.protocol.heartbeat import Heartbeat, encode_heartbeat
from tests.aggregator_harness import Harness, run, running


def heartbeat(device: SimulatedDevice) -> bytes:
    report = Heartbeat(device_id=device.device_id, agent_version="0.4.0", model_version=0, last_round=0, cameras=1,
                       memory=100 << 20, memory_max=512 << 20, cpu_max=1000, cpu_throttled=0, oom_retries=0,
                       outbox=0, outbox_bytes=0, sent_at=int(time.time()))
    return encode_heartbeat(report, device.key)


async def fleet_views(city: Harness) -> tuple[dict, dict[str, dict], str, str]:
    """The city's listing counts, its rows by key, its metrics text and its status page."""
    listing = await (await city.client.get("/v1/status/devices")).json()
    metrics = await (await city.client.get("/metrics")).text()
    page = await (await city.client.get("/")).text()
    return listing["counts"], {d["device"]: d for d in listing["devices"]}, metrics, page


def gauge(metrics: str, state: str) -> float:
    prefix = f'fl_aggregator_fleet_devices{{state="{state}"}} '
    return float(next(line for line in metrics.splitlines() if line.startswith(prefix))[len(prefix):])


def test_a_site_that_forwarded_is_active_and_one_that_never_did_says_so_not_silent(tmp_path: Path) -> None:
    """A city with one device (heartbeating), site A (a real site aggregator with one device of its own) and site B
    (enrolled, never forwards). Before A's forward both sites are ``site_silent`` and no device is silent; after it,
    A is ``site_active`` with its forward's time, round and base version, and B is ``never forwarded``."""
    city_key, key_a, key_b = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    camera = SimulatedDevice()
    site_a, site_b = wire.key_id(key_a.verify_key), wire.key_id(key_b.verify_key)

    async def scenario() -> None:
        async with running(tmp_path / "city", key=city_key, enrolled=[camera],
                           policy=RoundPolicy(min_clients=1, goal_clients=2, round_timeout=60)) as city:
            city.app[SERVICES].registry.enroll([Enrolment(site_a, bytes(key_a.verify_key), "site-a", site=True),
                                                Enrolment(site_b, bytes(key_b.verify_key), "site-b", site=True)])
            response = await city.client.post("/v1/heartbeat", data=heartbeat(camera),
                                              headers={"Content-Type": "application/cose"})
            assert response.status == 204
            counts, rows, metrics, _ = await fleet_views(city)
            assert counts == {"enrolled": 3, "active": 1, "silent": 0, "behind": 0, "throttled": 0,
                              "site_active": 0, "site_silent": 2}
            assert gauge(metrics, "silent") == 0 and gauge(metrics, "site_silent") == 2
            assert gauge(metrics, "site_active") == 0

            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "a", devices=1, key=key_a, upstream=upstream,
                               policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60)) as a:
                task = await site_task(a, 0)
                status, answer = await a.upload(a.devices[0].update(task, a.delta(), num_samples=10))
                assert status == 200, answer
                await wait_until(lambda: city.engine.store.round_devices(1) == [site_a], what="site A's forward")
                forwarded = city.engine.store.round_updates(1)[0].accepted_at

                counts, rows, metrics, page = await fleet_views(city)
                assert counts == {"enrolled": 3, "active": 1, "silent": 0, "behind": 0, "throttled": 0,
                                  "site_active": 1, "site_silent": 1}
                assert (gauge(metrics, "silent"), gauge(metrics, "site_active"), gauge(metrics, "site_silent")) == (
                    0, 1, 1)
                a_row, b_row = rows[site_a], rows[site_b]
                assert a_row["site"] and a_row["state"] == "site_active" and a_row["health"] == "ok"
                assert a_row["last_seen"] == forwarded and a_row["last_round"] == 1
                assert (a_row["model_version"], a_row["versions_behind"]) == (0, 0)
                assert a_row["agent_version"] is None and a_row["cameras"] is None  # a site reports nothing else
                assert b_row["state"] == "site_silent" and b_row["health"] == "never forwarded"
                assert b_row["last_seen"] is None
                assert rows[camera.device_id]["state"] == "active" and not rows[camera.device_id]["site"]

                silent = await (await city.client.get("/v1/status/devices", params={"state": "silent"})).json()
                assert silent["total"] == 0  # the never-forwarding site is not a silent camera
                quiet = await (await city.client.get("/v1/status/devices", params={"state": "site_silent"})).json()
                assert [d["device"] for d in quiet["devices"]] == [site_b]
                table = page.split('<table class="devices">')[1].split("</table>")[0]
                b_html = next(r for r in table.split("<tr>") if site_b[:12] in r)
                a_html = next(r for r in table.split("<tr>") if site_a[:12] in r)
                assert "never forwarded" in b_html and "never seen" not in table
                assert ">ok<" in a_html and "<td>1</td><td>v0</td>" in a_html

    run(scenario())


def test_an_async_sites_forward_shows_the_version_it_was_based_on_not_the_buffer_it_counts_in(
    tmp_path: Path,
) -> None:
    """Async city (K=2): site A's second forward, trained on version 0 for city round 1, counts in the city's
    buffer 2 (on version 1). A's row says round 1 and version 0, one version behind."""

    async def scenario() -> None:
        rng = np.random.default_rng(4)
        async with city_of_two_sites(tmp_path) as (city, upstream, (key_a, key_b)), contextlib.AsyncExitStack() as st:
            a = await st.enter_async_context(running(tmp_path / "a", devices=2, key=key_a, upstream=upstream,
                                                     policy=SITE_POLICY))
            b = await st.enter_async_context(running(tmp_path / "b", devices=2, key=key_b, upstream=upstream,
                                                     policy=SITE_POLICY))
            site_a = wire.key_id(key_a.verify_key)
            a_task, b_task = await site_task(a, 0), await site_task(b, 0)
            await _fill(a, a_task, [(_delta(a, rng), 10), (_delta(a, rng), 30)])
            await wait_until(lambda: city.engine.store.round_devices(1) == [site_a], what="site A's forward")
            carry = await site_task(a, a_task.round_id)
            await _fill(a, carry, [(_delta(a, rng), 20), (_delta(a, rng), 4)])
            await _fill(b, b_task, [(_delta(b, rng), 5), (_delta(b, rng), 15)])
            await wait_until(lambda: city.engine.store.round_devices(2) == [site_a], what="site A's second forward")
            assert city.engine.store.get_round(2).model_version == 1

            listing = await (await city.client.get("/v1/status/devices")).json()
            row = next(d for d in listing["devices"] if d["device"] == site_a)
            assert (row["state"], row["last_round"], row["model_version"], row["versions_behind"]) == (
                "site_active", 1, 0, 1)
            assert row["last_seen"] == city.engine.store.round_updates(2)[0].accepted_at

    run(scenario())


def test_a_site_goes_silent_after_an_hour_or_two_round_timeouts_without_a_forward(tmp_path: Path) -> None:
    device, site, fresh = SimulatedDevice(), SimulatedDevice(), SimulatedDevice()
    roster = [Enrolled(device.device_id, "cam"), Enrolled(site.device_id, "old", True),
              Enrolled(fresh.device_id, "new", True)]
    now = 1_800_000_000.0
    forwards = {site.device_id: Forward(now - SILENT_AFTER_SECONDS - 1, 7, 6)}
    fleet = Fleet(tmp_path / "db", lambda: roster, lambda: forwards)
    assert fleet.counts(8, now) == {"enrolled": 3, "active": 0, "silent": 1, "behind": 0, "throttled": 0,
                                    "site_active": 0, "site_silent": 2}
    rows = {d["device"]: d for d in fleet.listing(8, now)["devices"]}
    assert (rows[site.device_id]["health"], rows[site.device_id]["versions_behind"]) == ("silent", 2)
    assert rows[fresh.device_id]["health"] == "never forwarded"
    # Rounds of 40 minutes: a site forwards once per round, so it is silent only after two of them.
    patient = Fleet(tmp_path / "db", lambda: roster, lambda: forwards, round_timeout=2400.0)
    assert patient.counts(8, now)["site_active"] == 1
    assert patient.listing(8, now)["thresholds"]["site_silent_seconds"] == 4800.0
    by_health = [d["device"] for d in patient.listing(8, now, sort="-health")["devices"]]
    assert by_health[-1] == site.device_id  # ok sorts below silent and never forwarded


def test_a_forward_whose_receipt_no_longer_verifies_falls_back_to_the_round_it_was_taken_into() -> None:
    """After the city's key is changed, its old receipts fail their signature: the fleet views (and /metrics, which
    count sites) must still answer, with the round the forward was taken into."""
    from aggregator.app import _site_forwards

    old_key, new_key = SigningKey.generate(), SigningKey.generate()
    stamp = wire.Receipt(device_id="site-a", round_id=3, update_digest=bytes(32), accepted_at=1)
    receipt = wire.encode_receipt(stamp, old_key)

    class Rounds:
        def site_last_updates(self) -> dict[str, tuple[float, int, bytes]]:
            return {"site-a": (100.0, 4, receipt)}

        def get_round(self, round_id: int):
            return type("Row", (), {"model_version": round_id - 1})()

    assert _site_forwards(Rounds(), ReceiptRounds(old_key.verify_key)) == {"site-a": Forward(100.0, 3, 2)}
    assert _site_forwards(Rounds(), ReceiptRounds(new_key.verify_key)) == {"site-a": Forward(100.0, 4, 3)}
