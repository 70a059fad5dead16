"""``GET /v1/status`` stays small however many devices a round has; ``GET /v1/status/rounds/{round}/devices`` (and
``/lost_devices``) pages through a round's whole list (aggregator/rounds.py ``STATUS_ROUND_DEVICES``; docs/api.md).

Each round of /v1/status used to list every device that took part and every one whose update the disk lost: at
10,000 devices a round, the default 20 rounds were about 7 MB on every poll of a dashboard or of
``fl-aggregator status --url``. Now each list holds the first STATUS_ROUND_DEVICES ids beside its total, so a cut
list says it is cut, and the paged endpoint gives every id exactly once in a stable order.

A round here has more devices than the bound both counted and lost: real uploads to an aggregator on loopback
(tests/aggregator_harness.py), its spool segment removed between two runs so the first run's updates are lost.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from aggregator_harness import Harness, run, running
from jsonschema import Draft202012Validator
from nacl.signing import SigningKey

from aggregator.app import PROBLEM_CONTENT_TYPE
from aggregator.cli import main as cli
from aggregator.fleet import MAX_PER_PAGE
from aggregator.rounds import STATUS_ROUND_DEVICES, RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.store import Store

DOCS = Path(__file__).resolve().parent.parent / "docs"
SPEC = yaml.safe_load((DOCS / "openapi.yaml").read_text())
LOST, COUNTED = STATUS_ROUND_DEVICES + 20, STATUS_ROUND_DEVICES + 30


def _validator(schema: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{schema}", "components": SPEC["components"]})


async def _json(h: Harness, path: str) -> dict:
    response = await h.client.get(path)
    assert response.status == 200, await response.text()
    return await response.json()


async def _every_page(h: Harness, which: str, per_page: int) -> list[str]:
    """The round's whole ``which`` list, page by page, each page checked against docs/openapi.yaml."""
    schema = _validator("RoundDevices" if which == "devices" else "RoundLostDevices")
    ids: list[str] = []
    page = 1
    while True:
        listing = await _json(h, f"/v1/status/rounds/1/{which}?page={page}&per_page={per_page}")
        assert [e.message for e in schema.iter_errors(listing)] == []
        assert (listing["round"], listing["page"], listing["per_page"]) == (1, page, per_page)
        if page > listing["pages"]:
            assert listing[which] == [] and listing["total"] == len(ids)  # a page past the last is empty
            return ids
        ids += listing[which]
        page += 1


def test_status_cuts_a_big_rounds_lists_and_the_paged_endpoint_lists_every_id_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = SigningKey.generate()
    devices = [SimulatedDevice() for _ in range(LOST + COUNTED)]
    lost, counted = devices[:LOST], devices[LOST:]
    policy = RoundPolicy(min_clients=2, goal_clients=10 * len(devices), round_timeout=600)  # stays open

    async def first_run() -> None:
        async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
            task = await h.task()
            for device in lost:
                assert (await h.upload(device.update(task, h.delta())))[0] == 200

    async def second_run() -> None:
        async with running(tmp_path, key=key, enrolled=devices, policy=policy) as h:
            task = await h.task()
            assert task is not None and task.round_id == 1
            for device in counted:
                assert (await h.upload(device.update(task, h.delta())))[0] == 200

            status = await _json(h, "/v1/status")
            assert [e.message for e in _validator("Status").iter_errors(status)] == []
            (round_,) = status["rounds"]
            assert round_["participants"] == COUNTED
            assert len(round_["devices"]) == STATUS_ROUND_DEVICES and round_["devices_total"] == COUNTED
            assert len(round_["lost_devices"]) == STATUS_ROUND_DEVICES and round_["lost_devices_total"] == LOST

            for which, expected in (("devices", counted), ("lost_devices", lost)):
                small = await _every_page(h, which, 7)  # 7 does not divide the totals: a short last page
                assert len(small) == len(expected) and set(small) == {d.device_id for d in expected}
                assert small == await _every_page(h, which, MAX_PER_PAGE)  # the same order at any page size
                assert round_[which] == small[:STATUS_ROUND_DEVICES]  # /v1/status lists the first ones

            html = await (await h.client.get("/")).text()
            assert f"{LOST} updates lost on disk:" in html
            assert f'<a href="/v1/status/rounds/1/lost_devices">{LOST - 10} more</a>' in html
            assert await asyncio.to_thread(cli, ["status", "--url", str(h.client.make_url("/"))]) == 0
            line = next(x for x in capsys.readouterr().out.splitlines() if "lost on disk" in x)
            assert line.split(":")[0].split() == [str(LOST), "updates", "lost", "on", "disk"]
            assert line.endswith(f" and {LOST - STATUS_ROUND_DEVICES} more (GET /v1/status/rounds/1/lost_devices)")
            assert all(d in line for d in round_["lost_devices"])

    run(first_run())
    (tmp_path / "spool" / f"round-{1:08d}.seg").unlink()  # the disk lost every update of the first run
    run(second_run())

    assert cli(["status", "--state", str(tmp_path), "--json"]) == 0
    (round_,) = json.loads(capsys.readouterr().out)["rounds"]
    assert len(round_["lost_devices"]) == STATUS_ROUND_DEVICES and round_["lost_devices_total"] == LOST
    assert cli(["status", "--state", str(tmp_path)]) == 0
    assert f"{LOST} updates lost on disk:" in capsys.readouterr().out


FLEET_LISTING = "/v1/status/devices"


@pytest.mark.parametrize("query", ["page=0", "page=1.5", "page=x", "per_page=0", f"per_page={MAX_PER_PAGE + 1}",
                                   "per_page=-3"])
@pytest.mark.parametrize("which", ["devices", "lost_devices"])
def test_a_bad_page_is_the_fleet_listings_one_line_400(tmp_path: Path, query: str, which: str) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            await h.task()  # round 1 is open
            answers = [await h.client.get(f"{path}?{query}")
                       for path in (f"/v1/status/rounds/1/{which}", FLEET_LISTING)]
            problems = []
            for answer in answers:
                assert answer.status == 400 and answer.content_type == PROBLEM_CONTENT_TYPE
                problems.append(await answer.json())
            assert [e.message for e in _validator("Problem").iter_errors(problems[0])] == []
            assert problems[0] == problems[1]  # the same problem as the fleet listing's, word for word
            assert problems[0]["reason"] == "bad-parameter" and "\n" not in problems[0]["detail"]
            assert query.split("=")[0] in problems[0]["detail"]

    run(go())


@pytest.mark.parametrize("round_", ["x", "-1", "1.0", "9223372036854775808", "9" * 5000])
def test_a_round_that_is_no_round_id_is_400(tmp_path: Path, round_: str) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            answer = await h.client.get(f"/v1/status/rounds/{round_}/devices")
            assert answer.status == 400 and answer.content_type == PROBLEM_CONTENT_TYPE
            problem = await answer.json()
            assert [e.message for e in _validator("Problem").iter_errors(problem)] == []
            assert problem["reason"] == "bad-parameter"
            assert problem["detail"] == (f"the round must be an integer in [0, 9223372036854775807], "
                                         f"got {round_[:40]!r}")  # 5,000 digits: a 500 (ValueError) before

    run(go())


def test_a_round_never_opened_is_404_unknown_round(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            await h.task()  # round 1 is open
            assert (await _json(h, "/v1/status/rounds/1/devices"))["devices"] == []
            for round_, path in ((2, "devices"), (7, "lost_devices?page=2"), (0, "lost_devices")):
                answer = await h.client.get(f"/v1/status/rounds/{round_}/{path}")
                assert answer.status == 404 and answer.content_type == PROBLEM_CONTENT_TYPE
                problem = await answer.json()
                assert [e.message for e in _validator("Problem").iter_errors(problem)] == []
                assert problem["reason"] == "unknown-round"
                assert problem["detail"] == f"round {round_} is not in this aggregator's history (newest: 1)"
            assert h.counter("fl_aggregator_requests_rejected_total", reason="unknown-round") == 3

    run(go())


def test_a_device_that_lost_updates_at_two_restarts_is_listed_and_counted_once(tmp_path: Path) -> None:
    """Its update lost at one restart, sent again and lost at the next: two rows of ``lost_updates``, one device
    (it was listed twice, so a round's pages could not give every id exactly once)."""
    store = Store(tmp_path)
    try:
        store.insert_round(1, 0, 0.0, 600.0, 3)
        rows = [("a" * 32, 1.0), ("b" * 32, 2.0), ("a" * 32, 3.0), ("c" * 32, 2.0)]
        with sqlite3.connect(store.db_path) as db:
            db.executemany("INSERT INTO lost_updates (digest, device_id, round_id, num_samples, accepted_at, lost_at, "
                           "cause) VALUES (?, ?, 1, 8, ?, 0, 'segment-missing')",
                           [(bytes([i]) * 32, device, at) for i, (device, at) in enumerate(rows)])
        assert store.round_lost_devices(1) == ["a" * 32, "b" * 32, "c" * 32]  # by first loss, ties by id
        assert store.count_round_lost_devices(1) == 3
        assert store.round_lost_devices(1, 2) + store.round_lost_devices(1, 2, 2) == store.round_lost_devices(1)
    finally:
        store.close()


def _add_updates(store: Store, rows: list[tuple[str, float]]) -> None:
    """Accepted update rows of round 1, committed in this order with these ``accepted_at`` (wall-clock) times."""
    with sqlite3.connect(store.db_path) as db:
        db.executemany("INSERT INTO updates (digest, device_id, round_id, num_samples, metrics, offset, length, "
                       "receipt, accepted_at) VALUES (?, ?, 1, 8, '{}', 0, 0, x'', ?)",
                       [(device.encode().ljust(32, b"-"), device, at) for device, at in rows])


def test_an_open_rounds_pages_do_not_shift_when_the_clock_steps_back(tmp_path: Path) -> None:
    """Updates keep arriving while a client pages through an open round. ``accepted_at`` is the wall clock: after
    NTP steps it back, a new update's time is earlier than those already listed. Ordered by it, the new update went
    to the front and shifted every page by one (page 2 repeated the last id of page 1, the new one was never
    listed); ordered as stored, it comes last."""
    store = Store(tmp_path)
    try:
        store.insert_round(1, 0, 0.0, 600.0, 10)
        _add_updates(store, [("a", 1000.0), ("b", 1001.0), ("c", 1002.0)])
        first = store.round_devices(1, 2)
        _add_updates(store, [("d", 990.0)])  # the clock stepped back 12 s
        second = store.round_devices(1, 2, 2)
        assert first + second == ["a", "b", "c", "d"]
        assert store.round_devices(1, STATUS_ROUND_DEVICES) == ["a", "b", "c", "d"]  # /v1/status: page 1's order
    finally:
        store.close()


def test_a_page_and_its_total_are_read_in_one_snapshot(tmp_path: Path) -> None:
    """An update committed between the count and the page read is in neither (else a page could hold ids beyond
    the total it was answered with)."""
    store = Store(tmp_path)
    try:
        store.insert_round(1, 0, 0.0, 600.0, 10)
        _add_updates(store, [("a", 1.0)])
        with store.snapshot():
            total = store.count_round_devices(1)
            _add_updates(store, [("b", 2.0)])  # the writer commits meanwhile
            assert (total, store.round_devices(1)) == (1, ["a"])
        assert store.round_devices(1) == ["a", "b"]
    finally:
        store.close()


@pytest.mark.parametrize("which", ["devices", "lost_devices", "left_out_devices"])
@pytest.mark.parametrize("page", ["10000000000000000000", "1e300", "18446744073709560"])
def test_a_page_far_past_the_last_is_empty_not_an_internal_error(tmp_path: Path, which: str, page: str) -> None:
    """Its offset, (page - 1) * per_page, is past SQLite's 64-bit integers: it was a 500 ``internal`` and a
    traceback in the log."""
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            await h.task()  # round 1 is open
            listing = await _json(h, f"/v1/status/rounds/1/{which}?page={page}&per_page={MAX_PER_PAGE}")
            assert (listing["total"], listing["pages"], listing[which]) == (0, 1, [])
            assert listing["page"] == int(float(page))
            assert h.counter("fl_aggregator_requests_rejected_total", reason="internal") == 0

    run(go())


_PAGE = {"round": 1, "page": 1, "per_page": 50, "total": 1, "pages": 1}
_ROUND = {"round": 1, "status": "open", "participants": 1, "devices": ["a"], "devices_total": 1, "lost_devices": [],
          "lost_devices_total": 0, "left_out_devices": [], "left_out_devices_total": 0}


@pytest.mark.parametrize(("schema", "answer", "extra"), [
    ("RoundDevices", {**_PAGE, "devices": ["a"]}, "lost_devices"),  # one list per endpoint
    ("RoundLostDevices", {**_PAGE, "lost_devices": ["a"]}, "devices"),
    ("RoundLeftOutDevices", {**_PAGE, "left_out_devices": ["a"]}, "devices"),
    ("RoundDevices", {**_PAGE, "devices": ["a"]}, "next"),
    ("Round", _ROUND, "members"),
])
def test_the_schemas_hold_the_answers_to_their_fields(schema: str, answer: dict, extra: str) -> None:
    """docs/openapi.yaml holds the new answers to exactly their fields (as Downlink is held), so a field renamed
    or added on one side only fails the schema checks of the answers above."""
    assert [e.message for e in _validator(schema).iter_errors(answer)] == []
    assert [e.message for e in _validator(schema).iter_errors({**answer, extra: ["b"]})] != []
