"""An async tree on loopback: a city in async mode (a version per site forward, K=1) and two async sites (K=2),
two devices each. Each site forwards its buffer as one partial update; staleness is weighted at the site (a
device's update based on an older site version; at the city, test_aggregator_async_tree_window.py), and the city's
versions must be what a numpy reference computes. A site whose buffer is empty when the city publishes moves to
the new version. City and sites run --max-samples 30: the sites' forwards carry 40 and 32 samples, which the city
takes from keys enrolled as sites."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from nacl.signing import SigningKey
from test_aggregator_tree import site_task, wait_until

from aggregator.app import SERVICES
from aggregator.buffered import BufferPolicy
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.upstream import UpstreamConfig
from tests.aggregator_harness import Harness, run, running

W1 = 2 ** -0.5  # the polynomial weight of staleness 1
W2 = 3 ** -0.5  # ...and of staleness 2
MAX_SAMPLES = 30  # the most one device below claims; sites forward sums above it


@contextlib.asynccontextmanager
async def async_tree(tmp: Path) -> AsyncIterator[tuple[Harness, list[Harness]]]:
    city_key = SigningKey.generate()
    site_keys = [SigningKey.generate(), SigningKey.generate()]
    async with running(
        tmp / "city", key=city_key, enrolled=[],
        policy=RoundPolicy(min_clients=1, round_timeout=60, buffer=BufferPolicy(size=1), max_samples=MAX_SAMPLES),
    ) as city:
        city.app[SERVICES].registry.enroll(Enrolment(SimulatedDevice(key=k).device_id, bytes(k.verify_key), site=True)
                                           for k in site_keys)
        upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
        async with contextlib.AsyncExitStack() as stack:
            sites = [
                await stack.enter_async_context(running(
                    tmp / f"site{i}", devices=2, key=key, upstream=upstream,
                    policy=RoundPolicy(min_clients=1, round_timeout=60, buffer=BufferPolicy(size=2),
                                       max_samples=MAX_SAMPLES),
                ))
                for i, key in enumerate(site_keys)
            ]
            yield city, sites


def test_async_sites_forward_their_buffers_and_staleness_is_weighted_at_both_levels(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with async_tree(tmp_path) as (city, (a, b)):
            layout = city.engine.models.layout
            rng = np.random.default_rng(3)

            def delta(site: Harness) -> dict[str, np.ndarray]:
                return {s.name: rng.normal(0, 0.05, s.shape).astype(np.float32) for s in site.specs}

            async def upload(site: Harness, device: SimulatedDevice, task, tensors, n: int) -> None:
                status, answer = await site.upload(device.update(task, tensors, num_samples=n))
                assert status == 200, answer

            v0 = city.engine.params.astype(np.float64)
            a_task0, b_task0 = await site_task(a, 0), await site_task(b, 0)
            assert a_task0.model_version == b_task0.model_version == 0

            # Site A fills its buffer on v0 and forwards: the city (K=1) publishes v1 from it alone.
            a1 = [(delta(a), 10), (delta(a), 30)]
            for device, (tensors, n) in zip(a.devices, a1, strict=True):
                await upload(a, device, a_task0, tensors, n)
            await wait_until(lambda: city.engine.version == 1, what="city version 1")
            mean_a1 = sum(layout.flatten(t).astype(np.float64) * n for t, n in a1) / 40
            v1 = v0 + mean_a1
            np.testing.assert_allclose(city.engine.params, v1, rtol=1e-5, atol=1e-7)

            # Site B's buffer was empty when the city published v1, so B moved to v1: its devices' updates, trained
            # on v0, are stale by 1 at the site, and its forward is based on v1.
            await wait_until(lambda: b.engine.version == 1, what="site B on the city's version 1")
            b1 = [(delta(b), 20), (delta(b), 5)]
            for device, (tensors, n) in zip(b.devices, b1, strict=True):
                await upload(b, device, b_task0, tensors, n)
            await wait_until(lambda: city.engine.version == 2, what="city version 2")
            v2 = v1 + W1 * sum(layout.flatten(t).astype(np.float64) * n for t, n in b1) / 25
            np.testing.assert_allclose(city.engine.params, v2, rtol=1e-5, atol=1e-7)

            # Site A's next buffer, empty until now, follows the city's newest version (v2): one device trained on
            # v2, the other still on v0 (staleness 2 at the site); the forward, based on v2, reaches the city at v2.
            await wait_until(lambda: a.engine.version == 2, what="site A on the city's version 2")
            a_task2 = await site_task(a, a_task0.round_id)
            assert a_task2.model_version == 2
            fresh, stale = (delta(a), 8), (delta(a), 24)
            await upload(a, a.devices[0], a_task2, *fresh)
            await upload(a, a.devices[1], a_task0, *stale)
            await wait_until(lambda: city.engine.version == 3, what="city version 3")
            site_mean = (layout.flatten(fresh[0]).astype(np.float64) * 8
                         + W2 * layout.flatten(stale[0]).astype(np.float64) * 24) / 32
            np.testing.assert_allclose(city.engine.params, v2 + site_mean, rtol=1e-5, atol=1e-7)
            assert city.engine.activity is not None and dict(city.engine.activity.staleness) == {0: 3}
            assert a.engine.activity is not None and dict(a.engine.activity.staleness) == {0: 3, 2: 1}
            assert b.engine.activity is not None and dict(b.engine.activity.staleness) == {1: 2}

    run(scenario())
