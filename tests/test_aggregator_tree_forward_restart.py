"""A site stopped after writing its forward and before recording it resumes that round closed: the forward written
(and perhaps counted by the city already) is what the round sends, so an update the resumed round took would be
acknowledged and never forwarded. It is refused instead (410 round-closed), and the round forwards once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey
from test_aggregator_tree import site_task, wait_until

from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.upstream import TASKS_DIR, UpstreamConfig
from appliance.client import AggregatorClient
from tests.aggregator_harness import run, running

SAMPLES = (10, 20, 30)


def test_a_site_restarted_with_its_forward_written_takes_no_update_that_forward_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    city_key, site_key = SigningKey.generate(), SigningKey.generate()
    devices = [SimulatedDevice() for _ in SAMPLES]
    # The site's round would close at three updates; it is closed at two, as when its parent's next task comes.
    site_policy = RoundPolicy(min_clients=1, goal_clients=len(devices), round_timeout=60)
    forwarded = tmp_path / "site" / TASKS_DIR / "round-00000001.forward"

    async def scenario() -> None:
        async with running(tmp_path / "city", key=city_key, enrolled=[SimulatedDevice(key=site_key)],
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60)) as city:
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            with monkeypatch.context() as stalled:
                async def never_sent(self: AggregatorClient, body: bytes) -> None:
                    await asyncio.Event().wait()  # the site stops while sending

                stalled.setattr(AggregatorClient, "send_update", never_sent)
                async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                                   policy=site_policy) as site:
                    task = await site_task(site, 0)
                    for device, samples in zip(devices[:2], SAMPLES, strict=False):
                        status, answer = await site.upload(device.update(task, site.delta(), num_samples=samples))
                        assert status == 200, answer
                    closing = asyncio.create_task(site.engine.close_round())
                    await wait_until(forwarded.exists, what="the site's forward written")
                    closing.cancel()  # the site is stopped before it records the forward
                    await asyncio.gather(closing, return_exceptions=True)

            async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                               policy=site_policy) as site:
                status, answer = await site.upload(devices[2].update(task, site.delta(), num_samples=SAMPLES[2]))
                assert status == 410, "the resumed round took an update that its written forward lacks"
                assert answer["reason"] == "round-closed"
                await wait_until(lambda: city.engine.version == 1, what="the city's version 1")
                assert city.engine.store.get_round(1).samples == sum(SAMPLES[:2])
                record = site.engine.store.get_round(1)
                assert (record.status, record.participants, record.samples) == ("published", 2, sum(SAMPLES[:2]))
                assert np.isfinite(city.engine.params).all()

    run(scenario())
