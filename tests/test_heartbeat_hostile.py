"""A hostile enrolled device's heartbeats (docs/protocol.md section 13) over HTTP: every field of the wrong type or
out of its range, timestamps far ahead or behind, a burst of reports at once. Each refusal is one 4xx problem naming
the field or the rule, counted in fl_aggregator_requests_rejected_total; nothing of a refused report is kept, and
the device's next sane report is taken. (tests/test_fleet_heartbeat.py has the decoder's cases one by one, the
rate limit and replays in the domain, and the media type, size and unknown-key refusals over HTTP.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aggregator_harness import Harness, run, running
from test_fleet_heartbeat import report, resigned

from aggregator.app import SERVICES
from appliance.protocol.heartbeat import FIELD_RANGES, MAX_AGENT_VERSION_CHARS, encode_heartbeat

NOT_UNSIGNED = (-1, 1.5, float("nan"), float("inf"), "1", b"\x01", [1], {"a": 1}, True)
_MAX_ID = 2**63 - 1


async def send(h: Harness, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
    response = await h.client.post("/v1/heartbeat", data=body, headers={"Content-Type": "application/cose"})
    problem = {} if response.status == 204 else await response.json()
    return response.status, problem, dict(response.headers)


def rejected(h: Harness, reason: str) -> float:
    return h.counter("fl_aggregator_requests_rejected_total", reason=reason)


def test_every_field_of_the_wrong_type_or_out_of_range_is_a_400_naming_it(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            (device,) = h.devices
            ranges = FIELD_RANGES | {"model_version": _MAX_ID}
            cases = [(name, value) for name, high in ranges.items() for value in (*NOT_UNSIGNED, high + 1)]
            too_long = "x" * (MAX_AGENT_VERSION_CHARS + 1)
            cases += [("agent", value) for value in (0, 0.4, b"0.4", ["0.4"], {"v": 1}, "", too_long, "0.4 beta",
                                                     "0.4\x00", "0.4é")]
            cases += [("device", value) for value in (5, b"x" * 16, [device.device_id], {"id": 1}, 1.5, True)]
            for name, value in cases:
                status, problem, _ = await send(h, resigned(device, {name: value}))
                assert (status, problem["reason"]) == (400, "bad-payload"), (name, value, problem)
                assert f"'{name}'" in problem["detail"], (name, value, problem["detail"])
            assert rejected(h, "bad-payload") == len(cases)
            assert h.app[SERVICES].fleet.entry(device.device_id) is None

            now = int(time.time())
            for sent_at in (2**40, now + 3600, 0, now - 7200):  # in the field's range, outside the window
                status, problem, _ = await send(h, encode_heartbeat(report(device, sent_at=sent_at), device.key))
                assert (status, problem["reason"]) == (422, "expired"), sent_at
            assert h.app[SERVICES].fleet.entry(device.device_id) is None

            status, _, _ = await send(h, encode_heartbeat(report(device, model_version=0), device.key))
            assert status == 204  # none of that stands in the way of its next sane report
            listing = await (await h.client.get("/v1/status/devices")).json()
            assert listing["counts"]["active"] == 1 and listing["devices"][0]["health"] == "ok"

    run(go())


def test_a_burst_of_heartbeats_from_one_device_takes_one(tmp_path: Path) -> None:
    """Fifty reports of one device at once, each newer than the one before: one is taken, every other one is
    answered too-frequent (with Retry-After) or, if it is older than the one taken, stale-report."""

    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            (device,) = h.devices
            now = int(time.time())
            bodies = [encode_heartbeat(report(device, sent_at=now + i, outbox=i), device.key) for i in range(50)]
            answers = await asyncio.gather(*(send(h, body) for body in bodies))
            statuses = [status for status, _, _ in answers]
            assert statuses.count(204) == 1
            taken = statuses.index(204)
            for i, (status, problem, headers) in enumerate(answers):
                if i < taken:
                    assert (status, problem["reason"]) in ((409, "stale-report"), (429, "too-frequent")), problem
                elif i > taken:
                    assert (status, problem["reason"]) == (429, "too-frequent"), problem
                    assert int(headers["Retry-After"]) > 0
            assert rejected(h, "too-frequent") + rejected(h, "stale-report") == 49
            fleet = h.app[SERVICES].fleet
            assert len(fleet) == 1 and fleet.entry(device.device_id).report.outbox == taken
            assert h.counter("fl_aggregator_fleet_reports_total") == 1

    run(go())
