"""The compressed downlink over HTTP: ``fl-aggregator serve --downlink`` answers ``GET /v1/models/{v}?base=B&
base_digest=D`` with the steps from B, the agent's client rebuilds the very model the aggregator published,
a device too far behind (or naming a model it was never sent) gets the full model, a tampered delta is refused
by the agent, which keeps the model it had, a hostile query is a 400 with a reason, and each answer is counted
in /metrics with the bytes sent."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import ClientResponse, web
from nacl.signing import SigningKey

from aggregator import models
from aggregator.app import SERVICES, AggregatorConfig
from aggregator.metrics import MODEL_DOWNLOAD_ANSWERS
from aggregator.upstream import UpstreamConfig
from appliance import wire
from appliance.agent import Agent
from appliance.client import AggregatorClient
from appliance.config import load_config
from tests.agent_harness import ADVISORY, agent_config, enrolled_state, on_loopback
from tests.aggregator_harness import Harness, publish_rounds, run, running

PARAMETERS = 4000


def published(h: Harness, version: int) -> wire.ModelRelease:
    """The aggregator's own copy of ``version``: what it signed and what its tasks name."""
    data = h.app[SERVICES].models.release_bytes(version)
    assert data is not None
    return wire.decode_model_release(data, h.key.verify_key, h.specs)


async def fetch(h: Harness, version: int, base: wire.ModelRelease | None) -> tuple[wire.ModelRelease, int, bool]:
    """(the release the agent's client ends up with, bytes on the wire, whether they were a delta)."""
    query = {"base": str(base.version), "base_digest": base.digest.hex()} if base else None
    response = await h.client.get(f"/v1/models/{version}", params=query)
    assert response.status == 200, await response.text()
    body = await response.read()
    async with AggregatorClient(str(h.client.make_url("")), h.key.verify_key) as client:
        release = await client.model_release(version, h.specs, base)
    return release, len(body), "X-Model-Base" in response.headers


def downloads(h: Harness) -> dict[str, tuple[float, float]]:
    """answer -> (fl_aggregator_model_downloads_total, fl_aggregator_model_download_bytes_total)."""
    return {answer: (h.counter("fl_aggregator_model_downloads_total", answer=answer),
                     h.counter("fl_aggregator_model_download_bytes_total", answer=answer))
            for answer in MODEL_DOWNLOAD_ANSWERS}


async def counted_get(h: Harness, version: int, query: dict[str, str] | None = None,
                      method: str = "GET") -> tuple[ClientResponse, bytes, dict[str, tuple[float, float]]]:
    """(the response, its body, the download counters it moved: answer -> (requests, bytes))."""
    before = downloads(h)
    response = await h.client.request(method, f"/v1/models/{version}", params=query)
    body = await response.read()
    after = downloads(h)
    moved = {a: (after[a][0] - before[a][0], after[a][1] - before[a][1]) for a in after if after[a] != before[a]}
    return response, body, moved


def assert_same_bits(a: wire.ModelRelease, b: wire.ModelRelease) -> None:
    assert a.digest == b.digest and a.version == b.version
    for name in b.tensors:
        assert a.tensors[name].tobytes() == b.tensors[name].tobytes(), name


@pytest.mark.parametrize("encoding", ["float16", "int8", "sparse"])
def test_the_agent_rebuilds_the_published_model_from_the_steps(tmp_path: Path, encoding: str) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2, parameters=PARAMETERS, downlink=encoding) as h:
            v0, full_bytes, _ = await fetch(h, 0, None)
            await publish_rounds(h, 3)
            v1, down, is_delta = await fetch(h, 1, v0)  # one version behind
            assert is_delta and down < full_bytes / {"float16": 1.9, "int8": 3.5, "sparse": 10}[encoding]
            assert_same_bits(v1, published(h, 1))
            task = await h.task(after=2)
            assert task is not None and task.model_version == 3
            v3, _, is_delta = await fetch(h, 3, v1)  # two behind: float16's two steps outweigh the model
            assert is_delta == (encoding != "float16")
            assert_same_bits(v3, published(h, 3))
            assert v3.digest == task.model_digest

    run(go())


def test_a_device_too_far_behind_or_holding_another_model_gets_the_full_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(models, "KEEP_STEPS", 2)

    async def go() -> None:
        async with running(tmp_path, devices=2, parameters=PARAMETERS, downlink="int8") as h:
            v0, full_bytes, _ = await fetch(h, 0, None)
            await publish_rounds(h, 3)
            v3, down, is_delta = await fetch(h, 3, v0)  # three behind, two steps kept
            assert not is_delta and down == full_bytes
            assert_same_bits(v3, published(h, 3))
            stranger = wire.ModelRelease(2, v0.package_digest, v0.tensors, digest=bytes(32))
            _, _, is_delta = await fetch(h, 3, stranger)
            assert not is_delta

    run(go())


def test_without_downlink_a_base_changes_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2, parameters=PARAMETERS) as h:
            v0, full_bytes, _ = await fetch(h, 0, None)
            await publish_rounds(h, 1)
            v1, down, is_delta = await fetch(h, 1, v0)
            assert not is_delta and down == full_bytes
            assert_same_bits(v1, published(h, 1))
            _, body, moved = await counted_get(h, 1, {"base": "0", "base_digest": v0.digest.hex()})
            assert moved == {"full_downlink_off": (1, len(body))}

    run(go())


def test_each_model_fetch_is_counted_by_answer_with_the_bytes_sent(tmp_path: Path, monkeypatch) -> None:
    """What the downlink costs and how often devices get a delta, read off /metrics: each GET moves its answer's
    counter by one and its bytes by the body the device received; a HEAD sends no model and counts nothing."""
    monkeypatch.setattr(models, "KEEP_STEPS", 2)

    async def go() -> None:
        async with running(tmp_path, devices=2, parameters=PARAMETERS, downlink="int8") as h:
            await publish_rounds(h, 3)
            v0, v2 = published(h, 0), published(h, 2)
            for version, query, answer in [
                (0, None, "full"),
                (3, {"base": "2", "base_digest": v2.digest.hex()}, "delta"),
                (3, {"base": "0", "base_digest": v0.digest.hex()}, "full_base_too_old"),  # 3 behind, 2 steps kept
                (3, {"base": "2", "base_digest": "ab" * 32}, "full_base_unknown"),
            ]:
                response, body, moved = await counted_get(h, version, query)
                assert response.status == 200 and body
                assert ("X-Model-Base" in response.headers) == (answer == "delta")
                assert moved == {answer: (1, len(body))}, answer
            response, _, moved = await counted_get(h, 9)
            assert response.status == 404 and moved == {"not_found": (1, 0)}
            response, _, moved = await counted_get(h, 0, method="HEAD")
            assert response.status == 200 and moved == {}

    run(go())


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ({"base": "0"}, "go together"),
        ({"base_digest": "00" * 32}, "go together"),
        ({"base": "-1", "base_digest": "00" * 32}, "version number"),
        ({"base": "1e3", "base_digest": "00" * 32}, "version number"),
        ({"base": "9" * 40, "base_digest": "00" * 32}, "version number"),
        ({"base": "0", "base_digest": "zz" * 32}, "64 hexadecimal"),
        ({"base": "0", "base_digest": "00" * 31}, "64 hexadecimal"),
        ({"base": "1", "base_digest": "00" * 32}, "not older"),
    ],
)
def test_a_hostile_query_is_a_400_with_a_reason(tmp_path: Path, query: dict[str, str], detail: str) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2, parameters=PARAMETERS, downlink="int8") as h:
            await publish_rounds(h, 1)
            response = await h.client.get("/v1/models/1", params=query)
            assert response.status == 400
            assert response.content_type == "application/problem+json"
            problem = await response.json()
            assert problem["reason"] == "bad-parameter" and detail in problem["detail"]

    run(go())


def test_a_tampered_delta_is_refused_and_the_agent_keeps_its_model(tmp_path: Path) -> None:
    """A relay between agent and aggregator flips one byte of every delta: the agent refuses it (the signed
    digest), counts it, and still holds version 0; the genuine delta then takes it to version 1."""

    async def go() -> None:
        async with running(tmp_path / "agg", devices=2, parameters=PARAMETERS, downlink="int8") as h:
            tamper = True

            async def relay(request: web.Request) -> web.Response:
                upstream = await h.client.get(request.path, params=request.query)
                body = bytearray(await upstream.read())
                if tamper and "X-Model-Base" in upstream.headers:
                    body[-2] ^= 0x01
                return web.Response(status=upstream.status, body=bytes(body))

            app = web.Application()
            app.router.add_get("/v1/models/{version}", relay)
            state = tmp_path / "state"
            enrolled_state(state, h.key.verify_key)
            async with on_loopback(app) as url:
                agent = Agent(load_config(agent_config(tmp_path / "agent.toml", url, state)), budget=ADVISORY)
                agent._package = h.package.info
                try:
                    async with AggregatorClient(url, h.key.verify_key) as client:
                        first = await h.task()
                        assert first is not None
                        held = await agent._ensure_release(client, first)
                        await publish_rounds(h, 1)
                        task = await h.task(after=first.round_id)
                        assert task is not None and task.model_version == 1
                        with pytest.raises(wire.ProtocolError) as caught:
                            await agent._ensure_release(client, task)
                        assert caught.value.reason == "digest-mismatch"
                        assert agent._release is held and agent._release.version == 0
                        tamper = False
                        release = await agent._ensure_release(client, task)
                        assert release.version == 1 and release.digest == task.model_digest
                        assert_same_bits(release, published(h, 1))
                finally:
                    agent.sandbox.close()

    run(go())


def test_a_site_refuses_a_compressed_downlink(tmp_path: Path) -> None:
    from aggregator.simulate import synthetic_package

    key = SigningKey.generate()
    upstream = UpstreamConfig(url="http://127.0.0.1:1", key=SigningKey.generate().verify_key)
    with pytest.raises(ValueError, match="root aggregator"):
        AggregatorConfig(state_dir=tmp_path, package=synthetic_package(10), key=key, upstream=upstream,
                         downlink="int8")
