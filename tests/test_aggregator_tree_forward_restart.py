"""A site stopped after writing its forward and before recording it resumes that round closed: the forward written
(and perhaps counted by the city already) is what the round sends, so an update the resumed round took would be
acknowledged and never forwarded. It is refused instead (410 round-closed), and the round forwards once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from nacl.signing import SigningKey
from test_aggregator_async_tree_window import SITE_POLICY, city_of_two_sites
from test_aggregator_tree import site_task, wait_until

from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.upstream import TASKS_DIR, UpstreamConfig, UpstreamLink
from appliance import wire
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


def test_an_async_site_restarted_with_its_forward_written_opens_its_next_buffer_after_that_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under an async city, a site buffer resumed with its forward written closes and forwards at once, before the
    site's upstream link has read the city's mode. Its next buffer still opens right after that forward, so a device's
    update is taken, not refused 410 round-closed (which the agent does not retry) until the city's next version."""
    forwarded = tmp_path / "a" / TASKS_DIR / "round-00000001.forward"

    async def scenario() -> None:
        async with city_of_two_sites(tmp_path) as (city, upstream, (key_a, _)):
            with monkeypatch.context() as stalled:
                async def never_sent(self: AggregatorClient, body: bytes) -> None:
                    await asyncio.Event().wait()  # the site stops while sending

                stalled.setattr(AggregatorClient, "send_update", never_sent)
                async with running(tmp_path / "a", devices=3, key=key_a, upstream=upstream, policy=SITE_POLICY) as a:
                    task = await site_task(a, 0)
                    for device in a.devices[:2]:  # the buffer is full: its forward is written and sent
                        status, answer = await a.upload(device.update(task, a.delta(), num_samples=10))
                        assert status == 200, answer
                    await wait_until(forwarded.exists, what="site A's forward written")

            following = asyncio.Event()
            follow = UpstreamLink._follow

            async def late_follow(self: UpstreamLink) -> None:
                await following.wait()
                await follow(self)

            monkeypatch.setattr(UpstreamLink, "_follow", late_follow)
            try:
                async with running(tmp_path / "a", devices=3, key=key_a, upstream=upstream, policy=SITE_POLICY) as a:
                    await wait_until(lambda: a.engine.store.get_round(1).status == "published",
                                     what="the resumed buffer forwarded")
                    assert city.engine.store.round_devices(1) == [wire.key_id(key_a.verify_key)]
                    status, answer = await a.upload(a.devices[2].update(task, a.delta(), num_samples=10))
                    assert status == 200, answer
            finally:
                following.set()

    run(scenario())


def test_an_async_site_restarted_while_its_city_is_unreachable_still_opens_its_next_buffer_after_the_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site and its city restarted together (a power cut): the site's upstream link asks for the city's mode
    before the city answers, and that read fails. The resumed buffer's forward, retried until the city is back,
    still opens the next buffer after it: a mode that was not read is read again then, not taken as 'sync'."""
    forwarded = tmp_path / "a" / TASKS_DIR / "round-00000001.forward"

    async def scenario() -> None:
        async with city_of_two_sites(tmp_path) as (city, upstream, (key_a, _)):
            with monkeypatch.context() as stalled:
                async def never_sent(self: AggregatorClient, body: bytes) -> None:
                    await asyncio.Event().wait()  # the site stops while sending

                stalled.setattr(AggregatorClient, "send_update", never_sent)
                async with running(tmp_path / "a", devices=3, key=key_a, upstream=upstream, policy=SITE_POLICY) as a:
                    task = await site_task(a, 0)
                    for device in a.devices[:2]:  # the buffer is full: its forward is written and sent
                        status, answer = await a.upload(device.update(task, a.delta(), num_samples=10))
                        assert status == 200, answer
                    await wait_until(forwarded.exists, what="site A's forward written")

            status_failed = asyncio.Event()
            get = aiohttp.ClientSession.get

            def city_down_for_status(self: aiohttp.ClientSession, url: str, **kwargs: object) -> object:
                if url.endswith("/v1/status") and not status_failed.is_set():
                    status_failed.set()
                    raise aiohttp.ClientConnectionError("the city is not up yet")
                return get(self, url, **kwargs)

            send = AggregatorClient.send_update

            async def sent_once_the_city_is_up(self: AggregatorClient, body: bytes) -> wire.Receipt:
                await status_failed.wait()
                return await send(self, body)

            monkeypatch.setattr(aiohttp.ClientSession, "get", city_down_for_status)
            monkeypatch.setattr(AggregatorClient, "send_update", sent_once_the_city_is_up)
            async with running(tmp_path / "a", devices=3, key=key_a, upstream=upstream, policy=SITE_POLICY) as a:
                await wait_until(lambda: a.engine.store.get_round(1).status == "published",
                                 what="the resumed buffer forwarded")
                assert status_failed.is_set()
                assert city.engine.store.round_devices(1) == [wire.key_id(key_a.verify_key)]
                status, answer = await a.upload(a.devices[2].update(task, a.delta(), num_samples=10))
                assert status == 200, answer

    run(scenario())


def test_a_site_restarted_after_its_forward_was_counted_resends_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The city counted the forward, and the site stopped before it recorded that: the resumed round sends the very
    update it wrote, which the city answers with the original receipt. A forward signed anew (another nonce) would be
    another update: refused as a duplicate by a synchronous city, counted a second time by an async one."""
    city_key, site_key = SigningKey.generate(), SigningKey.generate()
    devices = [SimulatedDevice() for _ in SAMPLES[:2]]
    site_policy = RoundPolicy(min_clients=1, goal_clients=3, round_timeout=60)
    real_send = AggregatorClient.send_update
    delivered: list[bytes] = []
    on_disk: list[dict[str, bool]] = []  # when the forward was sent: whether each record was durable
    records = tmp_path / "site" / TASKS_DIR
    synced: list[str] = []  # the files and directories fsynced, in order, and the renames over a name
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs) -> None:
        real_replace(src, dst, *args, **kwargs)
        synced.append(f"rename to {dst}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def durable(path: Path) -> bool:
        """``path`` was renamed into place and its directory fsynced since."""
        renamed = f"rename to {path}"
        return renamed in synced and str(path.parent) in synced[synced.index(renamed) + 1 :]

    async def scenario() -> None:
        async with running(tmp_path / "city", key=city_key, enrolled=[SimulatedDevice(key=site_key)],
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60)) as city:
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            with monkeypatch.context() as stopped:
                async def sent_then_stopped(self: AggregatorClient, body: bytes) -> None:
                    # What a restart reads to resend the same forward to the same parent round is on disk first.
                    on_disk.append({name: durable(records / name) for name in ("round-00000001.task",
                                                                               "round-00000001.forward")})
                    await real_send(self, body)
                    delivered.append(body)
                    await asyncio.Event().wait()  # the site stops before it records the forward

                stopped.setattr(AggregatorClient, "send_update", sent_then_stopped)
                async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                                   policy=site_policy) as site:
                    task = await site_task(site, 0)
                    for device, samples in zip(devices, SAMPLES, strict=False):
                        status, answer = await site.upload(device.update(task, site.delta(), num_samples=samples))
                        assert status == 200, answer
                    closing = asyncio.create_task(site.engine.close_round())
                    await wait_until(lambda: bool(delivered), what="the site's forward counted by the city")
                    closing.cancel()
                    await asyncio.gather(closing, return_exceptions=True)
            assert on_disk == [{"round-00000001.task": True, "round-00000001.forward": True}]
            # The city records its round's end on its records thread, a moment after its receipt.
            await wait_until(lambda: city.engine.store.get_round(1).samples == sum(SAMPLES[:2]),
                             what="the city's round recorded with the site's samples")

            async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                               policy=site_policy) as site:
                await wait_until(lambda: site.engine.store.get_round(1).status == "published",
                                 what="the resumed site round forwarded")
                assert site.engine.store.get_round(1).note.startswith("forwarded to upstream round 1:"), \
                    site.engine.store.get_round(1).note
                assert city.rejected("duplicate") == 0
                assert city.engine.store.get_round(1).samples == sum(SAMPLES[:2])

    run(scenario())
