"""A site round closed outside the round clock (its parent's next task came while it was open) whose forward is
still under way when the round's own deadline passes: the round clock found the round still open and closed it a
second time, so the round was forwarded twice and recorded twice, and the second close, ending after the first had
opened the site's next round, could drop that round."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from test_aggregator_tree import site_task, wait_until

from aggregator.rounds import RoundEngine, RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.upstream import UpstreamConfig
from appliance.client import AggregatorClient
from tests.aggregator_harness import run, running


def test_a_site_round_whose_deadline_passes_while_it_is_being_closed_is_closed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    city_key, site_key = SigningKey.generate(), SigningKey.generate()
    devices = [SimulatedDevice() for _ in range(3)]
    site_policy = RoundPolicy(min_clients=1, goal_clients=len(devices), round_timeout=1)
    forwards: list[bytes] = []
    let_through = asyncio.Event()
    send_update = AggregatorClient.send_update

    async def slow_upload(self: AggregatorClient, body: bytes) -> object:
        forwards.append(body)
        await let_through.wait()  # a large forward on a slow link
        return await send_update(self, body)

    closes_started: list[int] = []
    closes_ended: list[int] = []
    close_round = RoundEngine.close_round

    async def counted_close(self: RoundEngine) -> None:
        closes_started.append(1)
        try:
            await close_round(self)
        finally:
            closes_ended.append(1)

    async def scenario() -> None:
        async with running(tmp_path / "city", key=city_key, enrolled=[SimulatedDevice(key=site_key)],
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60)) as city:
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                               policy=site_policy) as site:
                task = await site_task(site, 0)
                for device in devices[:2]:
                    assert (await site.upload(device.update(task, site.delta())))[0] == 200
                closing = asyncio.create_task(site.engine.close_round())  # as when the parent's next task comes
                # The round's deadline (1 s) passes while its forward is under way, and the round clock finds it.
                await wait_until(lambda: len(closes_started) == 2, what="the round clock at the round's deadline")
                let_through.set()
                await closing
                await wait_until(lambda: len(closes_ended) == 2, what="both closes ended")
                await wait_until(lambda: city.engine.version == 1, what="the city's version 1")
                assert len(forwards) == 1, "the round was closed, and forwarded, twice"
                assert site.counter("fl_aggregator_rounds_total", outcome="published") == 1
                assert site.engine.store.get_round(task.round_id).status == "published"

    with monkeypatch.context() as patched:
        patched.setattr(AggregatorClient, "send_update", slow_upload)
        patched.setattr(RoundEngine, "close_round", counted_close)
        run(scenario())
