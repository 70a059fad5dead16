"""Every JSON document the tools print or the aggregator answers is RFC 8259 JSON: Python's json.dumps printed inf
and nan as Infinity and NaN, which jq and browsers refuse. Each path a user can reach is fed an inf or a nan here
and its output parsed with a strict parser; a number found non-finite is the text "Infinity", "-Infinity" or "NaN"
(docs/api.md, "Numbers in JSON")."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggregator_harness import run, running
from nacl.signing import SigningKey

from aggregator.app import SERVICES
from aggregator.registry import Enrolment
from aggregator.simulate import SimulatedDevice
from appliance import strict_json


def strict(text: str) -> Any:
    """``json.loads`` that refuses Infinity, -Infinity and NaN, as jq and JSON.parse do."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON (RFC 8259): {constant}")

    return json.loads(text, parse_constant=refuse)


def test_dumps_refuses_what_json_cannot_hold() -> None:
    for bad in (math.inf, -math.inf, math.nan, np.float32("nan")):
        with pytest.raises(ValueError):
            strict_json.dumps({"x": [1, {"y": bad}]}, default=float)


def test_numbers_found_non_finite_are_written_as_text() -> None:
    found = {"a": [math.inf, -math.inf, math.nan, 1.5, 2], "b": (np.float32("inf"), np.float64(0.25)), "c": "x",
             "d": None, "e": True}
    assert strict(strict_json.dumps_as_found(found)) == {
        "a": ["Infinity", "-Infinity", "NaN", 1.5, 2], "b": ["Infinity", 0.25], "c": "x", "d": None, "e": True}
    assert strict_json.dumps_as_found({"a": 1.0}) == json.dumps({"a": 1.0})


def _damage(state: Path, site: SimulatedDevice) -> None:
    """A damaged aggregator.db: a site's forward stamped at infinity, and round 1 opened at -inf with a NaN mean
    loss (Python's json reads NaN from the metrics column)."""
    with sqlite3.connect(state / "aggregator.db") as db:
        db.execute("INSERT INTO updates (digest, device_id, round_id, num_samples, metrics, offset, length, receipt, "
                   "accepted_at) VALUES (?, ?, 1, 10, '{}', 0, 0, ?, ?)", (bytes(32), site.device_id, b"\xa0",
                                                                          math.inf))
        db.execute("UPDATE rounds SET opened_at = ?, metrics = ? WHERE round_id = 1", (-math.inf, '{"loss": NaN}'))
    db.close()


def test_the_aggregators_json_answers_of_a_damaged_database_are_json(tmp_path: Path) -> None:
    """/v1/status and the device listing show a damaged record's numbers as they are, as text; before, the
    answers held Infinity and NaN and no JSON reader could read them."""

    async def go() -> None:
        async with running(tmp_path, devices=2) as h:
            assert await h.task(wait=10) is not None
            site = SimulatedDevice()
            h.app[SERVICES].registry.enroll([Enrolment(site.device_id, bytes(site.key.verify_key), "north",
                                                       site=True)])
            _damage(tmp_path, site)
            listing = strict(await (await h.client.get("/v1/status/devices")).text())
            (row,) = [d for d in listing["devices"] if d["device"] == site.device_id]
            assert row["last_seen"] == "Infinity"
            status = strict(await (await h.client.get("/v1/status")).text())
            (first,) = [r for r in status["rounds"] if r["round"] == 1]
            assert (first["opened_at"], first["metrics"]) == ("-Infinity", {"loss": "NaN"})
            for path in ("/healthz", "/v1/status/rounds/1/devices", "/v1/nothing"):
                strict(await (await h.client.get(path)).text())

    run(go())


def test_fl_aggregator_status_json_of_an_older_servers_infinity_is_json(tmp_path: Path, capsys, monkeypatch) -> None:
    """``status --url`` of an aggregator that answered Infinity (the version before this one, with a tiny
    --dp-noise-multiplier): printed as text."""
    from aggregator import cli

    answer = {"model": {"version": 1, "digest": "ab"}, "privacy": {"epsilon": math.inf, "noise_multiplier": 1e-300},
              "rounds": [], "devices": {"enrolled": 0, "revoked": 0}}
    monkeypatch.setattr(cli, "_status_from_url", lambda url: answer)
    assert cli.main(["status", "--url", "http://127.0.0.1:9", "--json"]) == 0
    assert strict(capsys.readouterr().out)["privacy"]["epsilon"] == "Infinity"


def test_flctl_model_inspect_of_a_package_with_non_finite_fields_names_the_first_and_prints_no_json(
    tmp_path: Path, capsys
) -> None:
    """A signed package whose optimizer and preprocessing hold inf and nan: ``inspect --json`` printed Infinity and
    NaN. Such a package is now refused as every device refuses it (appliance/modelpkg.py), the field named in one
    line, and nothing that is not JSON reaches stdout."""
    pytest.importorskip("torch", reason="the reference package is built with torch")
    from test_model_package import signed_unchecked

    from flctl.cli import main
    from flctl.model.reference import build_reference_package

    key = SigningKey(bytes(range(32)))
    pkg, _ = build_reference_package("mlp")
    odd = type(pkg)(**{**pkg.__dict__, "optimizer": {**pkg.optimizer, "lr": math.inf},
                       "preprocessing": {**pkg.preprocessing, "mean": math.nan}})
    path = tmp_path / "odd.flpkg"
    path.write_bytes(signed_unchecked(odd, key))
    pub = tmp_path / "aggregator.pub"
    pub.write_text(bytes(key.verify_key).hex() + "\n")
    capsys.readouterr()
    assert main(["model", "inspect", str(path), "--pub", str(pub), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"{path}: optimizer field 'lr' must be a number in (0, 1000], got inf" in err


def test_flctl_container_fleet_status_json_of_a_city_that_answered_infinity_is_json(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """The report embeds the city's /v1/status as it answered (an image of the version before this one could
    answer Infinity) and a held-out accuracy."""
    from flctl.container import cli

    report = {"containers": {}, "city": {"model": {"version": 2}, "privacy": {"epsilon": math.inf}},
              "held_out_accuracy": math.nan}
    monkeypatch.setattr(cli, "status", lambda fleet: report)
    monkeypatch.setattr(cli, "podman_ps", lambda fleet: "")
    from flctl.cli import main

    assert main(["container", "fleet", "--dir", str(tmp_path), "status", "--json"]) == 0
    printed = strict(capsys.readouterr().out)
    assert (printed["city"]["privacy"]["epsilon"], printed["held_out_accuracy"]) == ("Infinity", "NaN")


def test_the_demos_summary_of_a_secure_round_without_train_loss_is_json(tmp_path: Path) -> None:
    """A secure round's devices report no train loss: the demo's row holds nan, and summary.json held NaN."""
    from flctl.demo import RoundRow, write_summary

    row = RoundRow(1, 1, 3, 96, 2.0, 1e5, math.nan, np.float32(0.5), 1.2, [0.5, np.float32("nan")])
    write_summary(tmp_path / "summary.json", {"baseline": {"accuracy": 0.3}, "privacy": None,
                                              "rounds": [row.__dict__]})
    (saved,) = strict((tmp_path / "summary.json").read_text())["rounds"]
    assert (saved["train_loss"], saved["accuracy"], saved["per_device_accuracy"]) == ("NaN", 0.5, [0.5, "NaN"])


def test_fl_aggregator_status_text_of_a_damaged_database_read_over_http(tmp_path: Path, capsys) -> None:
    """``fl-aggregator status --url`` (the text) of an aggregator whose aggregator.db holds a NaN metric: /v1/status
    now answers it as the text "NaN", where the metric's {:.4g} failed with a traceback (ValueError); the line says
    loss=nan, as it did when the answer held NaN."""
    import asyncio

    from aggregator import cli

    async def go() -> int:
        async with running(tmp_path, devices=2) as h:
            assert await h.task(wait=10) is not None
            _damage(tmp_path, SimulatedDevice())
            return await asyncio.to_thread(cli.main, ["status", "--url", str(h.client.make_url("/"))])

    code = run(go())
    out = capsys.readouterr()
    assert code == 0 and "Traceback" not in out.err, out.err
    (line,) = [line for line in out.out.splitlines() if line.lstrip().startswith("round     1 ")]
    assert "loss=nan" in line, line


def test_fl_aggregator_status_text_of_an_open_round_whose_deadline_is_infinity(capsys, monkeypatch) -> None:
    """A round resumed from a damaged record, whose deadline /v1/status now answers as the text "Infinity": the
    text mode's "closes in" subtracted the time from it (TypeError)."""
    from aggregator import cli

    answer = {"model": {"version": 1, "digest": "ab"}, "rounds": [], "devices": {"enrolled": 0, "revoked": 0},
              "current_round": {"round": 2, "model_version": 1, "deadline": "Infinity", "goal": 3, "accepted": 0}}
    monkeypatch.setattr(cli, "_status_from_url", lambda url: answer)
    assert cli.main(["status", "--url", "http://127.0.0.1:9"]) == 0
    assert "open round 2 on version 1: 0/3 updates, closes in inf s" in capsys.readouterr().out


def test_a_number_shown_as_text_reads_back_as_the_number() -> None:
    for number in (math.inf, -math.inf, 1.5, 2):
        assert strict_json.found_number(strict(strict_json.dumps_as_found(number))) == number
    assert math.isnan(strict_json.found_number("NaN"))
    assert strict_json.found_number("late") == "late"
