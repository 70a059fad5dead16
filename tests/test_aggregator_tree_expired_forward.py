"""A site whose forward the city refuses as ``expired`` signs it anew once: it then counts exactly once; a city that
refuses even the fresh copy (the clocks disagree) gets no stream of retries, and the site's round says why."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from nacl.signing import SigningKey
from test_aggregator_async_tree_window import SITE_POLICY, _delta, _fill, _mean, city_of_two_sites
from test_aggregator_tree import site_task, wait_until

from aggregator.app import SERVICES
from aggregator.buffered import BufferPolicy
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy
from aggregator.upstream import UpstreamConfig
from appliance import wire
from tests.aggregator_harness import Harness, run, running


def _expired(harness: Harness) -> float:
    return harness.engine.metrics.registry.get_sample_value("fl_aggregator_updates_rejected_total",
                                                             {"reason": "expired"})


def test_a_forward_refused_as_expired_is_signed_anew_and_counts_once(tmp_path: Path, monkeypatch) -> None:
    async def scenario() -> None:
        rng = np.random.default_rng(11)
        async with city_of_two_sites(tmp_path) as (city, upstream, (key_a, key_b)), \
                running(tmp_path / "a", devices=2, key=key_a, upstream=upstream, policy=SITE_POLICY) as a, \
                running(tmp_path / "b", devices=2, key=key_b, upstream=upstream, policy=SITE_POLICY) as b:
            encode = wire.encode_update
            stale = []

            def first_forward_written_two_hours_ago(update: wire.Update, key: SigningKey) -> bytes:
                if key.verify_key == key_a.verify_key and not stale:  # as if written before a long outage
                    stale.append(update)
                    update = dataclasses.replace(update, created_at=update.created_at - 7200)
                return encode(update, key)

            monkeypatch.setattr(wire, "encode_update", first_forward_written_two_hours_ago)
            v0 = city.engine.params.astype(np.float64)
            a1 = [(_delta(a, rng), 10), (_delta(a, rng), 30)]
            await _fill(a, await site_task(a, 0), a1)
            site_a = wire.key_id(key_a.verify_key)
            await wait_until(lambda: city.engine.store.round_devices(1) == [site_a], what="site A's forward")
            assert stale and _expired(city) == 1  # the first copy was refused, the re-signed one taken
            await wait_until(lambda: "forwarded to upstream round 1" in a.engine.store.get_round(1).note,
                             what="site A's round recorded as forwarded")  # a moment after the city's receipt
            b1 = [(_delta(b, rng), 5), (_delta(b, rng), 15)]
            await _fill(b, await site_task(b, 0), b1)
            await wait_until(lambda: city.engine.version == 1, what="city version 1")
            assert city.engine.store.get_round(1).participants == 2
            np.testing.assert_allclose(city.engine.params, v0 + (40 * _mean(a, a1) + 20 * _mean(b, b1)) / 60,
                                       rtol=1e-5, atol=1e-7)

    run(scenario())


def test_a_city_whose_clock_refuses_every_forward_gets_one_resend_and_the_site_round_says_why(tmp_path: Path) -> None:
    async def scenario() -> None:
        rng = np.random.default_rng(12)
        city_key, key_a = SigningKey.generate(), SigningKey.generate()
        # clock_skew < 0: the city takes every update just signed as from the future (its clock is an hour behind).
        policy = RoundPolicy(min_clients=1, round_timeout=60, buffer=BufferPolicy(size=2), clock_skew=-3600)
        async with running(tmp_path / "city", key=city_key, enrolled=[], policy=policy) as city:
            city.app[SERVICES].registry.enroll([Enrolment(wire.key_id(key_a.verify_key), bytes(key_a.verify_key),
                                                          site=True)])
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "a", devices=2, key=key_a, upstream=upstream, policy=SITE_POLICY) as a:
                await _fill(a, await site_task(a, 0), [(_delta(a, rng), 10), (_delta(a, rng), 30)])
                await wait_until(lambda: a.engine.store.get_round(1).status == "abandoned", what="site round 1 ends")
                note = a.engine.store.get_round(1).note
                assert "expired" in note and "clocks" in note, note
                assert _expired(city) == 2  # the first copy and one re-signed copy, no more
                assert city.engine.store.round_devices(1) == []

    run(scenario())
