"""A real async-mode (FedBuff) ``GET /v1/status`` matches the ``Status`` schema of docs/openapi.yaml, which holds its
``async`` object and its ``fleet`` counts to exactly the fields the server sends: a field dropped, renamed or given
another type is a schema error, not a silent drift between the docs and the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from aggregator.buffered import BufferPolicy
from aggregator.rounds import RoundPolicy
from tests.aggregator_harness import run, running

DOCS = Path(__file__).resolve().parent.parent / "docs"
SPEC = yaml.safe_load((DOCS / "openapi.yaml").read_text())
VALIDATOR = Draft202012Validator({"$ref": "#/components/schemas/Status", "components": SPEC["components"]})
K = 2


def errors(status: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(status)]


def async_status(tmp_path: Path, weighting: str) -> dict[str, Any]:
    """/v1/status after one buffer published and one update a version stale accepted into the next."""

    async def go() -> dict[str, Any]:
        policy = RoundPolicy(min_clients=1, round_timeout=600, buffer=BufferPolicy(size=K, weighting=weighting))
        async with running(tmp_path, devices=K + 1, policy=policy) as h:
            task0 = await h.task()
            assert task0 is not None
            for device in h.devices[:K]:
                assert (await h.upload(device.update(task0, h.delta())))[0] == 200
            assert await h.task(after=task0.round_id, wait=10) is not None  # version 1 published
            assert (await h.upload(h.devices[K].update(task0, h.delta())))[0] == 200  # staleness 1
            response = await h.client.get("/v1/status")
            assert response.status == 200
            return await response.json()

    return run(go())


@pytest.mark.parametrize(("weighting", "exponent"), [("polynomial", 0.5), ("constant", None)])
def test_an_async_status_matches_the_schema_field_for_field(tmp_path: Path, weighting: str,
                                                            exponent: float | None) -> None:
    status = async_status(tmp_path, weighting)
    assert status["async"] == {"buffer": K, "max_staleness": 10, "weighting": weighting, "exponent": exponent,
                               "staleness": {"0": K, "1": 1}, "versions_per_hour": 1}
    assert errors(status) == []

    described = status["async"]
    for name in described:  # every field the server sends is required
        assert errors({**status, "async": {k: v for k, v in described.items() if k != name}}), name
    wrong = {"buffer": 0, "max_staleness": "10", "weighting": "linear", "exponent": "0.5",
             "staleness": {"one": 1}, "versions_per_hour": -1}
    for name, value in wrong.items():
        assert errors({**status, "async": {**described, name: value}}), name
    assert errors({**status, "async": {**described, "buffer_size": K}})  # a field the server does not send
    assert errors({**status, "async": {**described, "staleness": {"0": 1.5}}})
    assert errors({key: value for key, value in status.items() if key != "async"})  # null in sync mode, not absent


def test_the_fleet_counts_must_give_every_state(tmp_path: Path) -> None:
    status = async_status(tmp_path, "polynomial")
    fleet = status["fleet"]
    assert set(fleet) == {"enrolled", "active", "silent", "behind", "throttled", "site_active", "site_silent"}
    for name in fleet:
        assert errors({**status, "fleet": {k: v for k, v in fleet.items() if k != name}}), name
    assert errors({**status, "fleet": {**fleet, "active": "3"}})
