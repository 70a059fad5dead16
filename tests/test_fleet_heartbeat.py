"""The fleet view (issue 17, item 4): devices send a small signed Heartbeat (docs/protocol.md section 13), the
aggregator keeps the latest per device, bounded and durable, and shows who is silent, behind or throttled in
GET /v1/status/devices, GET /v1/status, the status page and the metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path

import cbor2
import pytest
from aggregator_harness import Harness, run, running
from nacl.signing import SigningKey

from aggregator import statuspage
from aggregator.app import SERVICES
from aggregator.fleet import MIN_REPORT_INTERVAL_SECONDS, SILENT_AFTER_SECONDS, Enrolled, Fleet, ReportRefused
from aggregator.simulate import SimulatedDevice
from aggregator.uploads import ReadDeadline
from appliance import wire
from appliance.errors import ProtocolError
from appliance.protocol.heartbeat import MAX_HEARTBEAT_BYTES, Heartbeat, decode_heartbeat, encode_heartbeat


def report(device: SimulatedDevice, **fields: object) -> Heartbeat:
    values = {"agent_version": "0.4.0", "model_version": 3, "last_round": 4, "cameras": 2, "memory": 200 << 20,
              "memory_max": 512 << 20, "cpu_max": 1500, "cpu_throttled": 12, "oom_retries": 0, "outbox": 1,
              "outbox_bytes": 4096, "sent_at": int(time.time())} | fields  # fmt: skip
    return Heartbeat(device_id=device.device_id, **values)  # type: ignore[arg-type]


def lookup(device: SimulatedDevice) -> wire.KeyLookup:
    return {device.device_id: device.key.verify_key}.get


def resigned(device: SimulatedDevice, change: dict) -> bytes:
    """A heartbeat of ``device`` whose payload was edited (and signed again: a signature proves no sanity)."""
    payload = dict(cbor2.loads(cbor2.loads(encode_heartbeat(report(device), device.key)).value[2]))
    payload.update(change)
    return wire.sign({k: v for k, v in payload.items() if v is not None}, device.key, device.device_id)


# -- the message ------------------------------------------------------------------------------------------


def test_a_heartbeat_round_trips_and_is_small() -> None:
    device = SimulatedDevice()
    sent = report(device)
    body = encode_heartbeat(sent, device.key)
    assert len(body) < 400
    assert decode_heartbeat(body, lookup(device)) == sent
    no_model = replace(sent, model_version=None)
    assert decode_heartbeat(encode_heartbeat(no_model, device.key), lookup(device)).model_version is None


def test_a_device_whose_data_partition_failed_says_how_often_and_the_fleet_view_shows_it(tmp_path: Path) -> None:
    """A card filling up or dying showed only in the device's own metrics: the fleet view said nothing of it. Absent
    from the message while there were none (a healthy device's heartbeat is what it was), the count otherwise."""
    healthy, failing = SimulatedDevice(), SimulatedDevice()
    assert b"storage_errors" not in encode_heartbeat(report(healthy), healthy.key)
    sent = report(failing, storage_errors=3)
    assert decode_heartbeat(encode_heartbeat(sent, failing.key), lookup(failing)).storage_errors == 3
    fleet = Fleet(tmp_path / "db", lambda: [Enrolled(healthy.device_id, "a"), Enrolled(failing.device_id, "b")])
    now = 1_800_000_000.0
    fleet.accept(report(healthy, sent_at=int(now)), now)
    fleet.accept(replace(sent, sent_at=int(now)), now)
    rows = {d["device"]: d["storage_errors"] for d in fleet.listing(3, now, per_page=10)["devices"]}
    assert rows == {healthy.device_id: 0, failing.device_id: 3}
    fleet.write(fleet.take_dirty())
    html = statuspage.render({"model": {"name": "m", "parameters": 1, "version": 3, "digest": "00"},
                              "current_round": None, "rounds": [], "devices": {"enrolled": 2, "revoked": 0, "sites": 0},
                              "aggregator_id": "ab", "strategy": "fedavg"}, fleet.listing(3, now, sort="name"))
    assert "storage errors</th>" in html and "<td>1</td><td>3</td></tr>" in html  # the outbox, then the count
    fleet.close()
    again = Fleet(tmp_path / "db", lambda: [])  # kept across a restart
    assert [again.entry(d.device_id).report.storage_errors for d in (failing, healthy)] == [3, 0]


@pytest.mark.parametrize("change, reason", [
    ({"cameras": 65}, "bad-payload"),
    ({"cpu_throttled": 1001}, "bad-payload"),
    ({"outbox": -1}, "bad-payload"),
    ({"oom_retries": True}, "bad-payload"),
    ({"memory": 2.5}, "bad-payload"),
    ({"agent": "x" * 33}, "bad-payload"),
    ({"agent": "1.0\n<script>"}, "bad-payload"),
    ({"model_version": "3"}, "bad-payload"),
    ({"storage_errors": 2**32 + 1}, "bad-payload"),
    ({"storage_errors": -1}, "bad-payload"),
    ({"extra": 1}, "bad-payload"),
    ({"outbox_bytes": None}, "bad-payload"),  # missing
    ({"type": "update"}, "wrong-type"),
    ({"device": "0" * 32}, "kid-mismatch"),
])  # fmt: skip
def test_a_signed_but_insane_heartbeat_is_refused_with_its_reason(change: dict, reason: str) -> None:
    device = SimulatedDevice()
    with pytest.raises(ProtocolError) as refused:
        decode_heartbeat(resigned(device, change), lookup(device))
    assert refused.value.reason == reason


def test_size_and_trailing_bytes_are_refused_before_anything_is_trusted() -> None:
    device = SimulatedDevice()
    body = encode_heartbeat(report(device), device.key)
    with pytest.raises(ProtocolError, match="trailing") as trailing:
        decode_heartbeat(body + b"\x00", lookup(device))
    assert trailing.value.reason == "trailing-bytes"
    padded = resigned(device, {"agent": "a"}) + bytes(MAX_HEARTBEAT_BYTES)
    with pytest.raises(ProtocolError) as large:
        decode_heartbeat(padded, lookup(device))
    assert large.value.reason == "too-large"


# -- states, bounds and durability (the domain, no HTTP) --------------------------------------------------------


def test_states_silent_behind_throttled_are_judged_from_the_latest_report(tmp_path: Path) -> None:
    ok, behind, cpu, memory, oom, silent, never = (SimulatedDevice() for _ in range(7))
    roster = [Enrolled(d.device_id, f"cam-{i}") for i, d in enumerate((ok, behind, cpu, memory, oom, silent, never))]
    fleet = Fleet(tmp_path / "db", lambda: roster)
    now = 1_800_000_000.0
    fleet.accept(report(ok, model_version=8, sent_at=int(now)), now)
    fleet.accept(report(behind, model_version=7, sent_at=int(now)), now)  # 10 - 7 = 3 > 2
    fleet.accept(report(cpu, model_version=10, cpu_throttled=200, sent_at=int(now)), now)
    fleet.accept(report(memory, model_version=10, memory=461 << 20, memory_max=512 << 20, sent_at=int(now)), now)
    fleet.accept(report(oom, model_version=10, oom_retries=1, sent_at=int(now)), now)
    old = now - SILENT_AFTER_SECONDS - 1
    fleet.accept(report(silent, model_version=0, cpu_throttled=900, sent_at=int(old)), old)
    counts = fleet.counts(10, now)
    assert counts == {"enrolled": 7, "active": 5, "silent": 2, "behind": 1, "throttled": 3, "site_active": 0,
                      "site_silent": 0}
    health = {d["device"]: d["health"] for d in fleet.listing(10, now, per_page=10)["devices"]}
    assert health == {ok.device_id: "ok", behind.device_id: "behind", cpu.device_id: "throttled",
                      memory.device_id: "throttled", oom.device_id: "throttled", silent.device_id: "silent",
                      never.device_id: "silent"}  # fmt: skip
    # one more version makes the first device behind too
    assert fleet.counts(11, now)["behind"] == 2


def test_reports_are_rate_limited_fresh_and_never_replayed(tmp_path: Path) -> None:
    device = SimulatedDevice()
    fleet = Fleet(tmp_path / "db", lambda: [Enrolled(device.device_id, "")])
    now = 1_800_000_000.0
    fleet.accept(report(device, sent_at=int(now)), now)

    def refused(hb: Heartbeat, at: float) -> ReportRefused:
        with pytest.raises(ReportRefused) as caught:
            fleet.accept(hb, at)
        return caught.value

    too_soon = refused(report(device, sent_at=int(now) + 5), now + 5)
    assert (too_soon.status, too_soon.reason) == (429, "too-frequent")
    assert too_soon.retry_after == MIN_REPORT_INTERVAL_SECONDS - 5
    later = now + MIN_REPORT_INTERVAL_SECONDS
    replay = refused(report(device, sent_at=int(now)), later)
    assert (replay.status, replay.reason) == (409, "stale-report")
    assert refused(report(device, sent_at=int(later) - 4000), later).reason == "expired"
    assert refused(report(device, sent_at=int(later) + 301), later).reason == "expired"
    fleet.accept(report(device, sent_at=int(later), outbox=7), later)
    assert fleet.entry(device.device_id).report.outbox == 7


def test_one_row_per_device_overwritten_and_kept_across_a_restart(tmp_path: Path) -> None:
    devices = [SimulatedDevice() for _ in range(3)]
    fleet = Fleet(tmp_path / "db", lambda: [Enrolled(d.device_id, "") for d in devices])
    now = 1_800_000_000.0
    for step in range(5):
        at = now + step * MIN_REPORT_INTERVAL_SECONDS
        for d in devices:
            fleet.accept(report(d, sent_at=int(at), last_round=step), at)
        fleet.write(fleet.take_dirty())
    assert fleet.take_dirty() == []
    fleet.close()
    again = Fleet(tmp_path / "db", lambda: [])
    assert len(again) == 3
    assert {again.entry(d.device_id).report.last_round for d in devices} == {4}
    rows = again._conn.execute("SELECT count(*) FROM device_reports").fetchone()[0]
    assert rows == 3


def test_listing_pages_sorts_and_filters(tmp_path: Path) -> None:
    devices = [SimulatedDevice() for _ in range(12)]
    fleet = Fleet(tmp_path / "db", lambda: [Enrolled(d.device_id, f"cam-{i:02d}") for i, d in enumerate(devices)])
    now = 1_800_000_000.0
    for i, d in enumerate(devices[:10]):  # two never report
        fleet.accept(report(d, last_round=i, model_version=i, sent_at=int(now)), now - i)
    first = fleet.listing(9, now, sort="-last_round", per_page=5)
    assert first["total"] == 12 and first["pages"] == 3
    assert [d["last_round"] for d in first["devices"]] == [9, 8, 7, 6, 5]
    last = fleet.listing(9, now, sort="-last_round", per_page=5, page=3)
    assert [d["last_seen"] for d in last["devices"]] == [None, None]  # never seen: after the lowest, descending
    oldest = [d["name"] for d in fleet.listing(9, now, sort="last_seen")["devices"]]
    assert set(oldest[:2]) == {"cam-10", "cam-11"} and oldest[2] == "cam-09"  # never seen, then the oldest report
    behind = fleet.listing(9, now, state="behind")
    assert {d["model_version"] for d in behind["devices"]} == {0, 1, 2, 3, 4, 5, 6}
    assert fleet.listing(9, now, state="silent")["total"] == 2


# -- over HTTP -------------------------------------------------------------------------------------------------


async def _send(h: Harness, body: bytes, content_type: str = "application/cose") -> tuple[int, dict, dict]:
    response = await h.client.post("/v1/heartbeat", data=body, headers={"Content-Type": content_type})
    problem = {} if response.status == 204 else await response.json()
    return response.status, problem, dict(response.headers)


def test_heartbeats_over_http_feed_the_listing_status_page_and_metrics(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=3) as h:
            first, second, _ = h.devices
            status, _, _ = await _send(h, encode_heartbeat(report(first, model_version=0), first.key))
            assert status == 204
            status, _, _ = await _send(h, encode_heartbeat(report(second, model_version=0, oom_retries=2),
                                                           second.key))
            assert status == 204
            again = report(first, model_version=0, sent_at=int(time.time()) + 1)
            status, problem, headers = await _send(h, encode_heartbeat(again, first.key))
            assert (status, problem["reason"]) == (429, "too-frequent") and int(headers["Retry-After"]) > 0

            listing = await (await h.client.get("/v1/status/devices", params={"sort": "-health"})).json()
            assert listing["counts"] == {"enrolled": 3, "active": 2, "silent": 1, "behind": 0, "throttled": 1,
                                         "site_active": 0, "site_silent": 0}
            assert [d["health"] for d in listing["devices"]] == ["silent", "throttled", "ok"]
            row = next(d for d in listing["devices"] if d["device"] == first.device_id)
            assert row["agent_version"] == "0.4.0" and row["cameras"] == 2 and row["outbox"] == 1

            status_json = await (await h.client.get("/v1/status")).json()
            assert status_json["fleet"]["active"] == 2

            page = await (await h.client.get("/", params={"state": "throttled"})).text()
            assert "throttled 1" in page and second.device_id[:12] in page and first.device_id[:12] not in page

            metrics = await (await h.client.get("/metrics")).text()
            assert 'fl_aggregator_fleet_devices{state="silent"} 1.0' in metrics
            assert 'fl_aggregator_fleet_devices{state="throttled"} 1.0' in metrics
            assert h.counter("fl_aggregator_fleet_reports_total") == 2
            assert h.counter("fl_aggregator_requests_rejected_total", reason="too-frequent") == 1

    run(go())


def test_hostile_heartbeats_get_a_clear_4xx(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            (device,) = h.devices
            stranger = SimulatedDevice()
            body = encode_heartbeat(report(device), device.key)
            cases = [
                (body, "application/json", 415, "unsupported-media-type"),
                (encode_heartbeat(report(stranger), stranger.key), "application/cose", 403, "unknown-key"),
                (body + bytes(MAX_HEARTBEAT_BYTES), "application/cose", 413, "body-too-large"),
                (resigned(device, {"cameras": 10**6}), "application/cose", 400, "bad-payload"),
                (b"\xa0", "application/cose", 400, "not-signed"),
                (encode_heartbeat(report(device, sent_at=int(time.time()) - 7200), device.key), "application/cose",
                 422, "expired"),
            ]  # fmt: skip
            for message, content_type, status, reason in cases:
                got, problem, _ = await _send(h, message, content_type)
                assert (got, problem.get("reason")) == (status, reason), problem

            async def chunked():  # no Content-Length: the size cannot be checked before reading
                yield body

            response = await h.client.post("/v1/heartbeat", data=chunked(),
                                           headers={"Content-Type": "application/cose"})
            assert (response.status, (await response.json()).get("reason")) == (411, "length-required")
            assert h.app[SERVICES].fleet.entry(device.device_id) is None
            listing = await (await h.client.get("/v1/status/devices")).json()
            assert listing["counts"]["active"] == 0
            for query in ({"page": "0"}, {"per_page": "501"}, {"sort": "secret"}, {"state": "asleep"}):
                response = await h.client.get("/v1/status/devices", params=query)
                assert response.status == 400 and (await response.json())["reason"] == "bad-parameter"

    run(go())


def test_reports_survive_a_restart_of_the_aggregator(tmp_path: Path) -> None:
    key = SigningKey.generate()
    devices = [SimulatedDevice(), SimulatedDevice()]

    async def first() -> None:
        async with running(tmp_path, key=key, enrolled=devices) as h:
            assert (await _send(h, encode_heartbeat(report(devices[0], last_round=9), devices[0].key)))[0] == 204

    async def second() -> dict:
        async with running(tmp_path, key=key, enrolled=devices) as h:
            return await (await h.client.get("/v1/status/devices", params={"sort": "-last_round"})).json()

    run(first())
    listing = run(second())
    assert listing["devices"][0]["last_round"] == 9 and listing["counts"]["active"] == 1


def test_the_table_says_how_far_behind_a_device_is_and_nothing_for_one_ahead(tmp_path: Path) -> None:
    """A device holding a version newer than the aggregator's newest (its state was reset) showed "v5 (--3)"."""
    behind, ahead = SimulatedDevice(), SimulatedDevice()
    fleet = Fleet(tmp_path / "db", lambda: [Enrolled(behind.device_id, "a"), Enrolled(ahead.device_id, "b")])
    now = 1_800_000_000.0
    fleet.accept(report(behind, model_version=1, sent_at=int(now)), now)
    fleet.accept(report(ahead, model_version=5, sent_at=int(now)), now)
    listing = fleet.listing(2, now, sort="name")
    html = statuspage.render({"model": {"name": "m", "parameters": 1, "version": 2, "digest": "00"},
                              "current_round": None, "rounds": [], "devices": {"enrolled": 2, "revoked": 0, "sites": 0},
                              "aggregator_id": "ab", "strategy": "fedavg"}, listing)  # fmt: skip
    assert "<td>v1 (-1)</td>" in html and "<td>v5</td>" in html and "--" not in html


def test_stuck_status_views_do_not_take_the_threads_that_verify_uploads(tmp_path: Path) -> None:
    """Device listings need no key and sort every device (~0.2 s at 10,000): a few clients asking for them kept
    every verification thread busy, and uploads waited. Views now have a thread of their own: with listings
    stuck, an upload is still verified and acknowledged."""

    async def scenario() -> None:
        async with running(tmp_path, devices=2, workers=2) as h:
            fleet = h.app[SERVICES].fleet
            release = threading.Event()
            listing = fleet.listing

            def stuck_listing(*args, **kwargs):
                release.wait(60)
                return listing(*args, **kwargs)

            fleet.listing = stuck_listing
            views = [asyncio.create_task(h.client.get("/v1/status/devices")) for _ in range(6)]
            try:
                await asyncio.sleep(0.5)
                task = await h.task(wait=10)
                assert task is not None
                status, _ = await asyncio.wait_for(h.upload(h.devices[0].update(task, h.delta())), timeout=45)
                assert status == 200
            finally:
                release.set()
                for response in await asyncio.gather(*views):
                    assert response.status == 200
                    response.release()

    run(scenario())


def test_a_stalled_heartbeat_body_times_out_like_an_upload(tmp_path: Path) -> None:
    """A client that announces a heartbeat and sends part of it held its connection and handler for ever; now
    the body has an upload's deadline (408 body-timeout, connection closed), and the device is heard next time."""

    async def go() -> None:
        async with running(tmp_path, devices=1, upload_deadline=ReadDeadline(floor=2.0, min_rate=1e9)) as h:
            (device,) = h.devices
            body = encode_heartbeat(report(device), device.key)
            server = h.client.server
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(f"POST /v1/heartbeat HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/cose\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])  # fmt: skip
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(), 30)  # the server answers and closes
            finally:
                writer.close()
            assert b" 408 " in answer.split(b"\r\n", 1)[0] and b"body-timeout" in answer
            assert h.app[SERVICES].fleet.entry(device.device_id) is None
            assert (await _send(h, body))[0] == 204

    run(go())
