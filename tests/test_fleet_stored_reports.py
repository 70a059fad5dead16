"""Stored heartbeats read back at start (aggregator/stored_reports.py): a report written by a newer fl-aggregator
(a field this one does not know, such as ``storage_errors`` was to the version before it) made the aggregator fail
to start with a TypeError after a downgrade. The fields it does not know are now ignored and named in the log, and a
report whose known fields are malformed is dropped with a log line: the aggregator starts and lists its devices."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import fields
from pathlib import Path

import pytest
from aggregator_harness import run, running
from nacl.signing import SigningKey

from aggregator.simulate import SimulatedDevice
from aggregator.stored_reports import MalformedReport, read_report
from appliance.protocol.heartbeat import Heartbeat, encode_heartbeat


def heartbeat(device: SimulatedDevice, last_round: int) -> bytes:
    report = Heartbeat(device_id=device.device_id, agent_version="0.4.0", model_version=1, last_round=last_round,
                       cameras=1, memory=100 << 20, memory_max=512 << 20, cpu_max=1000, cpu_throttled=0,
                       oom_retries=0, outbox=0, outbox_bytes=0, sent_at=int(time.time()))
    return encode_heartbeat(report, device.key)


def edit_stored_report(db: Path, device: SimulatedDevice, **change: object) -> None:
    """What a newer fl-aggregator (or a damaged row) leaves in ``device_reports``, the aggregator stopped."""
    with sqlite3.connect(db) as conn:
        (text,) = conn.execute("SELECT report FROM device_reports WHERE device_id=?", (device.device_id,)).fetchone()
        conn.execute("UPDATE device_reports SET report=? WHERE device_id=?",
                     (json.dumps(json.loads(text) | change), device.device_id))
    conn.close()


def test_a_downgraded_aggregator_starts_on_stored_reports_it_cannot_wholly_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = SigningKey.generate()
    newer, damaged, plain = devices = [SimulatedDevice(), SimulatedDevice(), SimulatedDevice()]

    async def first() -> None:
        async with running(tmp_path, key=key, enrolled=devices) as h:
            for last_round, device in enumerate(devices, start=7):
                response = await h.client.post("/v1/heartbeat", data=heartbeat(device, last_round),
                                               headers={"Content-Type": "application/cose"})
                assert response.status == 204

    async def second() -> dict:
        async with running(tmp_path, key=key, enrolled=devices) as h:
            response = await h.client.get("/v1/status/devices")
            assert response.status == 200
            return await response.json()

    run(first())
    edit_stored_report(tmp_path / "aggregator.db", newer, battery_millivolts=3700)
    edit_stored_report(tmp_path / "aggregator.db", damaged, memory="a lot")
    with caplog.at_level(logging.WARNING, logger="aggregator.stored_reports"):
        listing = run(second())

    rows = {row["device"]: row for row in listing["devices"]}
    assert rows[newer.device_id]["state"] == "active" and rows[newer.device_id]["last_round"] == 7
    assert rows[plain.device_id]["state"] == "active" and rows[plain.device_id]["last_round"] == 9
    assert rows[damaged.device_id]["state"] == "silent"  # until its next heartbeat replaces the dropped report
    warnings = [r.getMessage() for r in caplog.records if r.name == "aggregator.stored_reports"]
    assert any("'battery_millivolts'" in m and "does not know" in m for m in warnings), warnings
    assert any(damaged.device_id in m and "'memory'" in m for m in warnings), warnings


def test_a_stored_report_is_read_as_written_and_refused_when_its_known_fields_are_not() -> None:
    """A report stored before ``storage_errors`` existed reads as 0 of them; ``sent_at`` has no stand-in (the
    current time would make an old report look fresh); a report must be a JSON object naming its own device."""
    device = SimulatedDevice()
    stored = {"device_id": device.device_id, "agent_version": "0.3.0", "model_version": None, "last_round": 2,
              "cameras": 1, "memory": 1, "memory_max": 0, "cpu_max": 0, "cpu_throttled": 0, "oom_retries": 0,
              "outbox": 0, "outbox_bytes": 0, "sent_at": 1_800_000_000}  # fmt: skip
    assert stored.keys() | {"storage_errors"} == {f.name for f in fields(Heartbeat)}  # a new field: add a check
    report, unknown = read_report(device.device_id, json.dumps(stored))
    assert (report.storage_errors, report.model_version, unknown) == (0, None, set())
    for text, problem in [(json.dumps({k: v for k, v in stored.items() if k != "sent_at"}), "'sent_at' is missing"),
                          (json.dumps(stored | {"cameras": True}), "'cameras' must be an integer"),
                          (json.dumps(stored | {"device_id": "other"}), "names device 'other'"),
                          ("[1, 2]", "not an object"), ("{", "not JSON")]:
        with pytest.raises(MalformedReport, match=problem):
            read_report(device.device_id, text)
