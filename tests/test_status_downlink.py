"""``GET /v1/status`` and the status page show the downlink: the full models and the deltas sent since start, with
their bytes, and each answer as the metrics count it; the answer matches the ``Status`` schema of
docs/openapi.yaml."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from aggregator.cli import main as cli
from aggregator.metrics import MODEL_DOWNLOAD_ANSWERS
from aggregator.statuspage import size_text
from appliance import wire
from appliance.protocol.downlink import DOWNLINK_ENCODINGS
from tests.aggregator_harness import Harness, publish_rounds, run, running

DOCS = Path(__file__).resolve().parent.parent / "docs"
SPEC = yaml.safe_load((DOCS / "openapi.yaml").read_text())


def status_validator() -> Draft202012Validator:
    """The ``Status`` schema, its references resolved in the document's components."""
    return Draft202012Validator({"$ref": "#/components/schemas/Status", "components": SPEC["components"]})


async def body_of(h: Harness, version: int, query: dict[str, str] | None = None) -> bytes:
    response = await h.client.get(f"/v1/models/{version}", params=query)
    assert response.status == 200, await response.text()
    return await response.read()


async def full_delta_and_unknown_base(h: Harness) -> tuple[bytes, bytes, bytes]:
    """The bodies of three fetches: version 0 in full (no base), after two rounds version 1 as an int8 delta from
    version 0, and version 2 in full to a device naming a base the aggregator never published."""
    first = await body_of(h, 0)
    await publish_rounds(h, 2)
    digest0 = wire.decode_model_release(first, h.key.verify_key, h.specs).digest.hex()
    delta = await body_of(h, 1, {"base": "0", "base_digest": digest0})
    unknown = await body_of(h, 2, {"base": "1", "base_digest": "00" * 32})
    return first, delta, unknown


def test_the_status_and_the_page_count_the_full_models_and_deltas_sent(tmp_path: Path) -> None:
    """Two full models (one to a device that named no base, one to a device naming a base the aggregator never
    published), one int8 delta and one 404: /v1/status gives those downloads and the bodies' bytes, and the page
    says it in a line."""

    async def go() -> None:
        async with running(tmp_path, devices=2, parameters=4000, downlink="int8") as h:
            first, delta, unknown = await full_delta_and_unknown_base(h)
            assert (await h.client.get("/v1/models/9")).status == 404
            assert (await h.client.head("/v1/models/0")).status == 200  # a HEAD sends no model: not counted

            response = await h.client.get("/v1/status")
            assert response.status == 200
            status = await response.json()
            assert [e.message for e in status_validator().iter_errors(status)] == []
            without = {name: value for name, value in status.items() if name != "downlink"}
            assert not status_validator().is_valid(without)  # the schema promises it in every status
            downlink = status["downlink"]
            assert downlink["encoding"] == "int8"
            assert downlink["full"] == {"downloads": 2, "bytes": len(first) + len(unknown)}
            assert downlink["delta"] == {"downloads": 1, "bytes": len(delta)}
            assert downlink["answers"]["full"] == {"downloads": 1, "bytes": len(first)}
            assert downlink["answers"]["full_base_unknown"] == {"downloads": 1, "bytes": len(unknown)}
            assert downlink["answers"]["not_found"] == {"downloads": 1, "bytes": 0}

            page = await (await h.client.get("/")).text()
            assert "downlink since start (--downlink int8): <b>2</b> full models" in page
            assert "<b>1</b> delta (int8 steps)" in page
            assert "50 % of the 2 fetches that named a base got a delta" in page

    run(go())


def test_the_schema_names_every_answer_and_encoding() -> None:
    downlink = SPEC["components"]["schemas"]["Downlink"]
    assert downlink["properties"]["encoding"]["enum"] == list(DOWNLINK_ENCODINGS)
    assert list(downlink["properties"]["answers"]["properties"]) == list(MODEL_DOWNLOAD_ANSWERS)
    assert downlink["properties"]["answers"]["required"] == list(MODEL_DOWNLOAD_ANSWERS)


def test_status_url_says_the_downlink_in_one_line_as_the_page_does(tmp_path: Path, capsys) -> None:
    """``fl-aggregator status --url`` showed no downlink line while /v1/status and the page had its figures: it
    says the full models and deltas sent, their bytes and the share of fetches that named a base that got a
    delta, as the page does; ``--state`` (no running process, so no counters) says nothing of it."""

    async def go() -> tuple[bytes, bytes, bytes]:
        async with running(tmp_path, devices=2, parameters=4000, downlink="int8") as h:
            first, delta, unknown = await full_delta_and_unknown_base(h)
            capsys.readouterr()
            assert await asyncio.to_thread(cli, ["status", "--url", str(h.client.make_url("/"))]) == 0
            return first, delta, unknown

    first, delta, unknown = run(go())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("downlink")]
    assert lines == [f"downlink since start (--downlink int8): 2 full models, {size_text(len(first) + len(unknown))}; "
                     f"1 delta (int8 steps), {size_text(len(delta))}; 50 % of the 2 fetches that named a base got a "
                     "delta"]
    assert cli(["status", "--state", str(tmp_path)]) == 0
    assert "downlink" not in capsys.readouterr().out
