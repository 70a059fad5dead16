"""Async mode publishes a version every K updates, so a busy fleet (or a few hostile devices sending tiny updates
as fast as they can) publishes hundreds of versions a minute. The aggregator keeps the releases an update may still
be based on (the newest --max-staleness + 1) and the newest version's FedAdam moments, not a model and its moments
for every version: older versions answer 404 unknown-version, and a restart resumes from what is kept."""

from __future__ import annotations

from pathlib import Path

from nacl.signing import SigningKey
from test_aggregator_tree import wait_until

from aggregator.app import SERVICES
from aggregator.buffered import BufferPolicy
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.upstream import UpstreamConfig
from appliance import wire
from tests.aggregator_harness import Harness, run, running

MAX_STALENESS = 2
VERSIONS = 6
POLICY = RoundPolicy(min_clients=1, round_timeout=600, buffer=BufferPolicy(size=1, max_staleness=MAX_STALENESS))


def stored(h: Harness, suffix: str) -> list[int]:
    """The versions with a file ``v<version><suffix>`` in the state's models directory."""
    return sorted(int(path.name[1:9]) for path in (h.state_dir / "models").glob(f"v*{suffix}"))


def test_async_mode_keeps_the_versions_an_update_may_be_based_on_and_the_newest_moments(tmp_path: Path) -> None:
    key = SigningKey.generate()
    devices = [SimulatedDevice() for _ in range(VERSIONS + 2)]

    async def go() -> None:
        tasks: list[wire.Task] = []
        async with running(tmp_path, key=key, enrolled=devices, policy=POLICY, strategy="fedadam") as h:
            for device in devices[:VERSIONS]:  # K = 1: every update publishes a version
                task = await h.task(after=tasks[-1].round_id if tasks else 0, wait=10)
                assert task is not None
                tasks.append(task)
                status, answer = await h.upload(device.update(task, h.delta()))
                assert status == 200, answer
            kept = list(range(VERSIONS - MAX_STALENESS, VERSIONS + 1))
            await wait_until(lambda: h.engine.version == VERSIONS and stored(h, ".release") == kept
                             and stored(h, ".strategy.npz") == [VERSIONS],
                             what=f"version {VERSIONS} published and the older releases and moments deleted")
            before = h.counter("fl_aggregator_requests_rejected_total", reason="unknown-version")
            response = await h.client.get(f"/v1/models/{kept[0] - 1}")
            problem = await response.json()
            assert (response.status, problem["reason"]) == (404, "unknown-version")
            assert "no longer stored" in problem["detail"]
            assert h.counter("fl_aggregator_requests_rejected_total", reason="unknown-version") == before + 1
            assert (await h.client.get(f"/v1/models/{kept[0]}")).status == 200

            # The oldest kept version is still a base an update may have: it counts, at staleness MAX_STALENESS.
            status, answer = await h.upload(devices[VERSIONS].update(tasks[kept[0]], h.delta()))
            assert status == 200, answer
            await wait_until(lambda: h.engine.version == VERSIONS + 1, what=f"version {VERSIONS + 1} published")

        async with running(tmp_path, key=key, enrolled=devices, policy=POLICY, strategy="fedadam") as h:
            assert h.engine.version == VERSIONS + 1 and h.engine.strategy.m is not None  # the moments it kept
            task = await h.task(wait=10)
            assert task is not None and task.model_version == VERSIONS + 1
            status, answer = await h.upload(devices[VERSIONS + 1].update(task, h.delta()))
            assert status == 200, answer
            newest = list(range(VERSIONS + 2 - MAX_STALENESS, VERSIONS + 3))
            await wait_until(lambda: stored(h, ".release") == newest, what="the releases kept after the restart")

    run(go())


def test_a_device_on_a_version_no_longer_stored_still_gets_the_steps_from_it(tmp_path: Path) -> None:
    """--downlink sparse: the steps of the last 16 versions stay when their releases go, so a device back from a few
    versions offline downloads the steps from the version it holds, not the whole model."""

    async def go() -> None:
        async with running(tmp_path, devices=VERSIONS, parameters=4000, policy=POLICY, downlink="sparse") as h:
            response = await h.client.get("/v1/models/0")
            held = wire.decode_model_release(await response.read(), h.key.verify_key)
            after = 0
            for device in h.devices:
                task = await h.task(after=after, wait=10)
                assert task is not None
                after = task.round_id
                status, answer = await h.upload(device.update(task, h.delta()))
                assert status == 200, answer
            await wait_until(lambda: h.engine.version == VERSIONS and stored(h, ".release")[0] > 0,
                             what=f"version {VERSIONS} published and version 0's release deleted")
            assert (await h.client.get("/v1/models/0")).status == 404

            response = await h.client.get(f"/v1/models/{VERSIONS}",
                                          params={"base": "0", "base_digest": held.digest.hex()})
            assert response.status == 200 and response.headers.get("X-Model-Base") == "0"
            assert h.counter("fl_aggregator_model_downloads_total", answer="delta") == 1

    run(go())


def test_an_async_site_keeps_the_newest_of_the_versions_it_adopts(tmp_path: Path) -> None:
    """An idle async site adopts each version its parent publishes: it keeps the newest --max-staleness + 1."""
    city_key, site_key = SigningKey.generate(), SigningKey.generate()

    async def go() -> None:
        async with running(tmp_path / "city", devices=VERSIONS, key=city_key, policy=POLICY) as city:
            city.app[SERVICES].registry.enroll([Enrolment(SimulatedDevice(key=site_key).device_id,
                                                          bytes(site_key.verify_key), site=True)])
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "site", devices=1, key=site_key, upstream=upstream, policy=POLICY) as site:
                after = 0
                for version, device in enumerate(city.devices, start=1):
                    task = await city.task(after=after, wait=10)
                    assert task is not None
                    after = task.round_id
                    status, answer = await city.upload(device.update(task, city.delta()))
                    assert status == 200, answer
                    await wait_until(lambda version=version: site.engine.version == version,
                                     what=f"the site on the city's version {version}")
                oldest = VERSIONS - MAX_STALENESS
                await wait_until(lambda: stored(site, ".release") == list(range(oldest, VERSIONS + 1)),
                                 what=f"the site's releases before version {oldest} deleted")

    run(go())
