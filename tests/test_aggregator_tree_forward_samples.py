"""A site's forward carries its round's samples in one signed count of at most 2^31 - 1, and the city refuses more
(bad-payload). A site whose devices may claim many samples (--max-samples up to 2^31 - 1) refuses the update that
would take its round past that (422 too-many-samples, before it is acknowledged), so the round still forwards,
instead of the city refusing the forward with every acknowledged update in it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from test_aggregator_async_tree_window import city_of_two_sites
from test_aggregator_tree import site_task, wait_until

from aggregator.app import SERVICES
from aggregator.buffered import BufferPolicy
from aggregator.registry import Enrolment
from aggregator.rounds import MAX_SAMPLES_LIMIT, RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.store import SpoolJob, Store
from aggregator.upstream import UpstreamConfig
from appliance import wire
from appliance.client import AggregatorClient
from tests.aggregator_harness import run, running

HALF = 2**30


def test_a_site_refuses_the_update_its_forward_could_not_carry_and_forwards_the_rest(tmp_path: Path) -> None:
    city_key, site_key = SigningKey.generate(), SigningKey.generate()
    devices = [SimulatedDevice() for _ in range(3)]
    site_policy = RoundPolicy(min_clients=2, goal_clients=2, round_timeout=60, max_samples=MAX_SAMPLES_LIMIT)

    async def scenario() -> None:
        async with running(tmp_path / "city", key=city_key, enrolled=[],
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60)) as city:
            city.app[SERVICES].registry.enroll([Enrolment(wire.key_id(site_key.verify_key),
                                                          bytes(site_key.verify_key), site=True)])
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                               policy=site_policy) as site:
                task = await site_task(site, 0)
                status, answer = await site.upload(devices[0].update(task, site.delta(), num_samples=HALF))
                assert status == 200, answer
                before = site.rejected("too-many-samples")
                status, answer = await site.upload(devices[1].update(task, site.delta(), num_samples=HALF))
                assert status == 422, "the site took an update its round's forward cannot carry"
                assert answer["reason"] == "too-many-samples" and str(MAX_SAMPLES_LIMIT) in answer["detail"]
                assert site.rejected("too-many-samples") == before + 1
                status, answer = await site.upload(devices[2].update(task, site.delta(), num_samples=1))
                assert status == 200, answer

                await wait_until(lambda: city.engine.version == 1, what="the city's version 1 from the forward")
                assert city.engine.store.get_round(1).samples == HALF + 1
                record = site.engine.store.get_round(1)
                assert (record.status, record.participants, record.samples) == ("published", 2, HALF + 1)

    run(scenario())


def test_a_site_takes_updates_stored_at_the_same_time_when_their_samples_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --max-samples 2^31 - 1 on the site, an update still being stored counts at the samples it claims, not at
    --max-samples: two devices of 10 samples each uploading at once are both acknowledged and forwarded."""
    city_key, site_key = SigningKey.generate(), SigningKey.generate()
    devices = [SimulatedDevice() for _ in range(2)]
    site_policy = RoundPolicy(min_clients=2, goal_clients=2, round_timeout=60, max_samples=MAX_SAMPLES_LIMIT)
    spool = Store.spool
    held: list[asyncio.Event] = []

    async def first_held(self: Store, job: SpoolJob) -> int:
        if job.device_id == devices[0].device_id:
            await held[0].wait()
        return await spool(self, job)

    monkeypatch.setattr(Store, "spool", first_held)

    async def scenario() -> None:
        held.append(asyncio.Event())
        async with running(tmp_path / "city", key=city_key, enrolled=[],
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60)) as city:
            city.app[SERVICES].registry.enroll([Enrolment(wire.key_id(site_key.verify_key),
                                                          bytes(site_key.verify_key), site=True)])
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                               policy=site_policy) as site:
                task = await site_task(site, 0)
                first = asyncio.create_task(site.upload(devices[0].update(task, site.delta(), num_samples=10)))
                try:
                    await wait_until(lambda: site.engine.current.pending == 1, what="the first update being stored")
                    status, answer = await site.upload(devices[1].update(task, site.delta(), num_samples=10))
                    assert status == 200, answer
                finally:
                    held[0].set()  # the site stops only once it has stored what it took
                status, answer = await first
                assert status == 200, answer

                await wait_until(lambda: city.engine.version == 1, what="the city's version 1 from the forward")
                assert city.engine.store.get_round(1).samples == 20

    run(scenario())


def test_an_async_site_checks_an_update_against_the_buffer_it_waits_for_not_the_full_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async site's buffer that is full (its two updates claim 2^31 - 1 samples in all) is being forwarded; an
    update of 10 samples arriving then waits for the next buffer, as any update arriving at a full buffer does, and
    counts there, instead of being refused 422 too-many-samples against the full buffer's samples."""
    send = AggregatorClient.send_update
    sending: list[asyncio.Event] = []

    async def held_send(self: AggregatorClient, body: bytes) -> wire.Receipt:
        await sending[0].wait()
        return await send(self, body)

    monkeypatch.setattr(AggregatorClient, "send_update", held_send)
    policy = RoundPolicy(min_clients=1, round_timeout=60, buffer=BufferPolicy(size=2), max_samples=MAX_SAMPLES_LIMIT)

    async def scenario() -> None:
        sending.append(asyncio.Event())
        async with city_of_two_sites(tmp_path) as (city, upstream, (key_a, _)), \
                running(tmp_path / "a", devices=3, key=key_a, upstream=upstream, policy=policy) as a:
            task = await site_task(a, 0)
            for device, samples in zip(a.devices, (HALF, HALF - 1), strict=False):
                status, answer = await a.upload(device.update(task, a.delta(), num_samples=samples))
                assert status == 200, answer
            late = asyncio.create_task(a.upload(a.devices[2].update(task, a.delta(), num_samples=10)))
            try:
                await wait_until(lambda: late.done() or bool(a.engine._changed._waiters),
                                 what="the late update refused or waiting for the next buffer")
            finally:
                sending[0].set()
            status, answer = await late
            assert status == 200, answer
            assert a.engine.current is not None and a.engine.current.samples == 10
            assert city.engine.current is not None and city.engine.current.samples == MAX_SAMPLES_LIMIT

    run(scenario())
