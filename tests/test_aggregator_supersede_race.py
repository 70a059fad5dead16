"""An async site's empty buffer superseded by its parent's next version while its record is being written (a slow
disk) reaches its deadline meanwhile: the round clock waits for that supersede instead of closing the round again.
It used to record the round abandoned on top of superseded, and count it under both outcomes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from test_aggregator_tree import site_task, wait_until

from aggregator.app import SERVICES
from aggregator.buffered import BufferPolicy
from aggregator.registry import Enrolment
from aggregator.rounds import RoundEngine, RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.store import Store
from aggregator.upstream import UpstreamConfig
from tests.aggregator_harness import run, running

SITE_ROUND_SECONDS = 3


def test_the_round_clock_waits_for_a_supersede_whose_record_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, disk_answers = threading.Event(), threading.Event()
    record = Store.finish_round
    ends: list[tuple[Store, int, str]] = []

    def finish_round(store: Store, round_id: int, status: str, *args: object, **kwargs: object) -> None:
        ends.append((store, round_id, status))
        if status == "superseded":
            entered.set()
            disk_answers.wait(timeout=60)
        record(store, round_id, status, *args, **kwargs)

    closes: list[tuple[RoundEngine, int]] = []
    close = RoundEngine.close_round

    async def close_round(engine: RoundEngine) -> None:
        if engine.current is not None:
            closes.append((engine, engine.current.round_id))
        await close(engine)

    monkeypatch.setattr(Store, "finish_round", finish_round)
    monkeypatch.setattr(RoundEngine, "close_round", close_round)
    city_key, site_key = SigningKey.generate(), SigningKey.generate()

    async def go() -> None:
        async with running(tmp_path / "city", devices=1, key=city_key,
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=600)) as city:
            city.app[SERVICES].registry.enroll([Enrolment(SimulatedDevice(key=site_key).device_id,
                                                          bytes(site_key.verify_key), site=True)])
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "site", devices=2, key=site_key, upstream=upstream,
                               policy=RoundPolicy(min_clients=1, round_timeout=SITE_ROUND_SECONDS,
                                                  buffer=BufferPolicy(size=2))) as site:
                try:
                    empty = (await site_task(site, 0)).round_id
                    city_task = await city.task()
                    assert city_task is not None
                    status, answer = await city.upload(city.devices[0].update(city_task, city.delta()))
                    assert status == 200, answer
                    await wait_until(entered.is_set, what="the site superseding its empty buffer")
                    await wait_until(lambda: (site.engine, empty) in closes,
                                     what="the round clock at the buffer's deadline")
                finally:
                    disk_answers.set()
                # The round the supersede opens on the city's version 1 (its row is written after any record the
                # clock queued behind the supersede's).
                await wait_until(lambda: site.engine.store.get_round(empty + 1) is not None,
                                 what="the site's round after the superseded buffer")
                assert site.engine.store.get_round(empty + 1).model_version == 1
                assert [end[2] for end in ends if end[:2] == (site.engine.store, empty)] == ["superseded"]
                assert site.engine.store.get_round(empty).status == "superseded"
                assert site.counter("fl_aggregator_rounds_total", outcome="superseded") == 1

    run(go())
