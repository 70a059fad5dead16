"""Query parameters of the read-only GETs that a client can get wrong: each refusal is a 400 problem+json that names
the parameter and its valid forms (aggregator/app.py; docs/api.md).

* ``GET /v1/models/{v}?base=latest``: ``base`` is the version the device holds, in decimal digits; ``latest`` names
  the version asked for, in the path, and is no base (docs/protocol.md section 6.5). Alone it was answered "'base'
  and 'base_digest' go together", which never said what a base looks like.
* ``GET /v1/status?rounds=N``: each round lists its devices, so N is capped (``MAX_STATUS_ROUNDS``) and a value out
  of range is refused like the fleet listing's ``per_page``, where it used to be clamped silently to [1, 1000].
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aggregator_harness import Harness, run, running

from aggregator.app import MAX_STATUS_ROUNDS, PROBLEM_CONTENT_TYPE


async def _refusal(h: Harness, path: str) -> str:
    """The detail of the 400 ``bad-parameter`` problem+json that answers ``path``."""
    response = await h.client.get(path)
    assert response.status == 400 and response.content_type == PROBLEM_CONTENT_TYPE
    problem = await response.json()
    assert problem["reason"] == "bad-parameter" and "\n" not in problem["detail"]
    return problem["detail"]


@pytest.mark.parametrize("query", ["base=latest", "base=latest&base_digest=" + "ab" * 32])
def test_base_latest_is_refused_naming_the_parameter_and_its_valid_form(tmp_path: Path, query: str) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            detail = await _refusal(h, f"/v1/models/latest?{query}")
            assert "'base'" in detail and "'latest'" in detail
            assert "?base=B&base_digest=D" in detail and "decimal digits" in detail and "64 hexadecimal" in detail

    run(go())


def test_a_malformed_base_digest_alone_is_named_before_the_pair(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            detail = await _refusal(h, "/v1/models/latest?base_digest=xyz")
            assert detail.startswith("query parameter 'base_digest' must be 64 hexadecimal characters")

    run(go())


@pytest.mark.parametrize("rounds", [str(MAX_STATUS_ROUNDS + 1), "1000", "100000000", "0", "-5", "2.5"])
def test_status_refuses_a_rounds_count_out_of_its_range(tmp_path: Path, rounds: str) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            detail = await _refusal(h, f"/v1/status?rounds={rounds}")
            assert detail == (f"query parameter 'rounds' must be an integer in [1, {MAX_STATUS_ROUNDS}], "
                              f"got {float(rounds):.15g}")

    run(go())


def test_status_lists_the_rounds_asked_for_up_to_the_cap(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            await h.task()  # round 1 is open
            for rounds in ("1", str(MAX_STATUS_ROUNDS)):
                response = await h.client.get(f"/v1/status?rounds={rounds}")
                assert response.status == 200
                assert [r["round"] for r in (await response.json())["rounds"]] == [1]

    run(go())


@pytest.mark.parametrize("raw, expected", [("9007199254740993", 9007199254740993), (str(2**63 - 1), 2**63 - 1),
                                           ("7", 7), ("7.0", 7), ("1e3", 1000)])
def test_an_integer_query_parameter_is_read_exactly_past_2_to_the_53(raw: str, expected: int) -> None:
    """``after`` (GET /v1/task) was read through a float: 2^53 + 1 became 2^53, and a device at that round was
    served its own round again."""
    from aiohttp.test_utils import make_mocked_request

    from aggregator.app import _integer

    assert _integer(make_mocked_request("GET", f"/v1/task?after={raw}"), "after", 0, low=0) == expected


def test_a_refused_integer_is_named_with_its_digits(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            detail = await _refusal(h, "/v1/status?rounds=9007199254740993")
            assert detail.endswith(", got 9007199254740993")
            detail = await _refusal(h, f"/v1/status?rounds={'9' * 100}")
            assert detail.endswith(f", got {'9' * 20}... (100 digits)")
            assert await _refusal(h, f"/v1/status?rounds={'9' * 4400}") == "query parameter 'rounds' must be finite"

    run(go())
