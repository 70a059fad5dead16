"""An async site keeps taking its devices' updates between its forward and the city's next version.

The city (async, --buffer 2) waits for both sites before it publishes, so after site A forwards its first buffer
there is a window in which the city has no new version. Site A opens its next buffer at once, on the version its
devices trained on; when that buffer fills it is forwarded as soon as the city has moved past the buffer that
holds A's first forward (the city counts one update per site per buffer), and it counts there at its staleness.
A site stopped, or SIGKILLed as a real process, in that window loses no acknowledged update and forwards nothing
twice, including when it dies after sending a forward and before recording it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
from nacl.signing import SigningKey
from test_aggregator_durability import _cli, _post, _wait_healthy
from test_aggregator_tree import ROOT, site_task, wait_until

from aggregator.app import SERVICES
from aggregator.buffered import BufferPolicy
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.upstream import UpstreamConfig
from appliance import wire
from flctl.ports import free_port
from tests.aggregator_harness import Harness, run, running

W1 = 2 ** -0.5  # the polynomial weight of staleness 1
SITE_POLICY = RoundPolicy(min_clients=1, round_timeout=60, buffer=BufferPolicy(size=2))


@contextlib.asynccontextmanager
async def city_of_two_sites(tmp: Path) -> AsyncIterator[tuple[Harness, UpstreamConfig, list[SigningKey]]]:
    city_key = SigningKey.generate()
    site_keys = [SigningKey.generate(), SigningKey.generate()]
    async with running(tmp / "city", key=city_key, enrolled=[],
                       policy=RoundPolicy(min_clients=1, round_timeout=60, buffer=BufferPolicy(size=2))) as city:
        city.app[SERVICES].registry.enroll(Enrolment(wire.key_id(k.verify_key), bytes(k.verify_key), site=True)
                                           for k in site_keys)
        upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
        yield city, upstream, site_keys


def _delta(site: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {s.name: rng.normal(0, 0.05, s.shape).astype(np.float32) for s in site.specs}


async def _fill(site: Harness, task: wire.Task, updates: list[tuple[dict[str, np.ndarray], int]]) -> None:
    for device, (tensors, n) in zip(site.devices, updates, strict=True):
        status, answer = await site.upload(device.update(task, tensors, num_samples=n))
        assert status == 200, answer


def _mean(site: Harness, updates: list[tuple[dict[str, np.ndarray], int]]) -> np.ndarray:
    flat = site.engine.models.layout.flatten
    return sum(flat(t).astype(np.float64) * n for t, n in updates) / sum(n for _, n in updates)


def test_a_site_takes_updates_between_its_forward_and_the_citys_next_version(tmp_path: Path) -> None:
    async def scenario() -> None:
        rng = np.random.default_rng(8)
        async with city_of_two_sites(tmp_path) as (city, upstream, (key_a, key_b)), \
                running(tmp_path / "a", devices=2, key=key_a, upstream=upstream, policy=SITE_POLICY) as a, \
                running(tmp_path / "b", devices=2, key=key_b, upstream=upstream, policy=SITE_POLICY) as b:
            v0 = city.engine.params.astype(np.float64)
            a_task, b_task = await site_task(a, 0), await site_task(b, 0)
            a1 = [(_delta(a, rng), 10), (_delta(a, rng), 30)]
            await _fill(a, a_task, a1)
            await wait_until(lambda: city.engine.store.round_devices(1) == [wire.key_id(key_a.verify_key)],
                             what="site A's forward")
            assert city.engine.version == 0  # the city waits for site B

            # The window: site A has an open buffer on version 0 (no closed round in its status) and takes updates. (It
            # opens once A has recorded its first buffer's end, on its records thread: a moment after the city's
            # receipt.)
            await wait_until(lambda: a.engine.current is not None and a.engine.current.round_id > a_task.round_id,
                             what="site A's next buffer")
            current = a.engine.status()["current_round"]
            assert current is not None and current["model_version"] == 0 and not current["closing"]
            carry_task = await site_task(a, a_task.round_id)
            assert carry_task.model_version == 0
            a2 = [(_delta(a, rng), 20), (_delta(a, rng), 4)]
            await _fill(a, carry_task, a2)

            # Site B's forward makes the city's version 1; then A's second buffer reaches the city at staleness 1.
            b1 = [(_delta(b, rng), 5), (_delta(b, rng), 15)]
            await _fill(b, b_task, b1)
            await wait_until(lambda: city.engine.version == 1, what="city version 1")
            v1 = v0 + (40 * _mean(a, a1) + 20 * _mean(b, b1)) / 60
            np.testing.assert_allclose(city.engine.params, v1, rtol=1e-5, atol=1e-7)
            await wait_until(lambda: city.engine.store.round_devices(2) == [wire.key_id(key_a.verify_key)],
                             what="site A's second forward")
            b_next = await site_task(b, b_task.round_id)
            assert b_next.model_version == 1
            b2 = [(_delta(b, rng), 6), (_delta(b, rng), 6)]
            await _fill(b, b_next, b2)
            await wait_until(lambda: city.engine.version == 2, what="city version 2")
            v2 = v1 + (24 * W1 * _mean(a, a2) + 12 * _mean(b, b2)) / 36
            np.testing.assert_allclose(city.engine.params, v2, rtol=1e-5, atol=1e-7)
            assert city.engine.store.get_round(1).participants == city.engine.store.get_round(2).participants == 2
            # ...and site A follows the city's version 2.
            await wait_until(lambda: a.engine.version == 2, what="site A on version 2")
            following = await site_task(a, carry_task.round_id)
            while following.model_version < 2:
                following = await site_task(a, following.round_id)

    run(scenario())


def test_a_site_restarted_in_the_window_keeps_its_new_buffer_and_forwards_it_once(tmp_path: Path) -> None:
    """Stopped with one acknowledged update in the buffer it opened after its forward, site A resumes that buffer
    (and still follows only the city's next round); its forward counts once, in the city's next buffer."""

    async def scenario() -> None:
        rng = np.random.default_rng(9)
        async with city_of_two_sites(tmp_path) as (city, upstream, (key_a, key_b)), \
                running(tmp_path / "b", devices=2, key=key_b, upstream=upstream, policy=SITE_POLICY) as b:
            site_a = wire.key_id(key_a.verify_key)
            async with running(tmp_path / "a", devices=2, key=key_a, upstream=upstream, policy=SITE_POLICY) as a:
                devices = a.devices
                a_task = await site_task(a, 0)
                a1 = [(_delta(a, rng), 10), (_delta(a, rng), 30)]
                await _fill(a, a_task, a1)
                await wait_until(lambda: city.engine.store.round_devices(1) == [site_a], what="site A's forward")
                carry_task = await site_task(a, a_task.round_id)
                first = (_delta(a, rng), 12)
                status, answer = await a.upload(devices[0].update(carry_task, first[0], num_samples=first[1]))
                assert status == 200, answer
            async with running(tmp_path / "a", key=key_a, enrolled=devices, upstream=upstream,
                               policy=SITE_POLICY) as a:
                assert (await site_task(a, a_task.round_id)).round_id == carry_task.round_id
                second = (_delta(a, rng), 36)
                status, answer = await a.upload(devices[1].update(carry_task, second[0], num_samples=second[1]))
                assert status == 200, answer
                b_task = await site_task(b, 0)
                await _fill(b, b_task, [(_delta(b, rng), 5), (_delta(b, rng), 15)])
                await wait_until(lambda: city.engine.version == 1, what="city version 1")
                await wait_until(lambda: city.engine.store.round_devices(2) == [site_a], what="A's second forward")
                row = city.engine.store.round_updates(2)[0]
                assert row.num_samples == 48
                np.testing.assert_allclose(city.engine.store.read_delta(2, row.offset, row.length),
                                           W1 * _mean(a, [first, second]), rtol=1e-5, atol=1e-7)
                assert sorted(city.engine.store.round_devices(1)) == sorted([site_a, wire.key_id(key_b.verify_key)])

    run(scenario())


class _DiedAfterSending(Exception):
    """Stands for a site killed after its forward reached the city and before it recorded the round."""


def test_a_site_killed_after_sending_its_forward_resends_the_same_update(tmp_path: Path) -> None:
    """The city (--buffer 1) publishes from site A's forward and opens its next buffer; site A dies before it
    records that forward. Restarted, it forwards the round again: the identical signed update, which the city
    answers with the original receipt, so the city's next buffer does not count it a second time."""

    async def scenario() -> None:
        rng = np.random.default_rng(10)
        city_key, key_a = SigningKey.generate(), SigningKey.generate()
        async with running(tmp_path / "city", key=city_key, enrolled=[],
                           policy=RoundPolicy(min_clients=1, round_timeout=60, buffer=BufferPolicy(size=1))) as city:
            city.app[SERVICES].registry.enroll([Enrolment(wire.key_id(key_a.verify_key), bytes(key_a.verify_key),
                                                          site=True)])
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "a", devices=2, key=key_a, upstream=upstream, policy=SITE_POLICY) as a:
                devices = a.devices
                sent = a.engine.forward
                assert sent is not None

                async def send_then_die(*args: object) -> str:
                    await sent(*args)  # type: ignore[arg-type]
                    raise _DiedAfterSending

                a.engine.forward = send_then_die
                a_task = await site_task(a, 0)
                a1 = [(_delta(a, rng), 10), (_delta(a, rng), 30)]
                await _fill(a, a_task, a1)
                await wait_until(lambda: city.engine.version == 1, what="city version 1")
                assert a.engine.store.get_round(a_task.round_id).status == "open"  # not recorded as forwarded
            async with running(tmp_path / "a", key=key_a, enrolled=devices, upstream=upstream,
                               policy=SITE_POLICY) as a:
                await wait_until(lambda: a.engine.store.get_round(a_task.round_id).status == "published",
                                 what="site A's round recorded")
                assert "forwarded to upstream round 1" in a.engine.store.get_round(a_task.round_id).note
                await wait_until(lambda: a.engine.version == 1, what="site A on version 1")
                assert city.engine.version == 1 and city.engine.store.round_devices(2) == []
                assert city.rejected("duplicate") == 0

    run(scenario())


def test_a_site_process_killed_in_the_window_loses_nothing_and_forwards_once(tmp_path: Path) -> None:
    """A real `serve --mode async --upstream` site, SIGKILLed after its forward with one acknowledged update in
    the buffer it opened then: restarted, it holds that update, takes the next, and its forward counts once, in
    the city's next buffer, at its staleness there."""
    site_state = tmp_path / "site"
    _cli("keygen", "--state", str(site_state))
    site_key = SigningKey(bytes.fromhex((site_state / "aggregator.key").read_text().strip()))
    devices = [SimulatedDevice(), SimulatedDevice()]
    (tmp_path / "fleet.jsonl").write_text("".join(
        json.dumps({"device_id": d.device_id, "public_key": d.public_key_hex}) + "\n" for d in devices))
    _cli("enroll", "--state", str(site_state), "--from", str(tmp_path / "fleet.jsonl"))
    other_site = SimulatedDevice()
    port = free_port()
    site_url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(12)

    async def scenario() -> None:
        async with running(tmp_path / "city", key=(city_key := SigningKey.generate()), enrolled=[],
                           policy=RoundPolicy(min_clients=1, round_timeout=60, buffer=BufferPolicy(size=2))) as city:
            city.app[SERVICES].registry.enroll(
                Enrolment(d.device_id, bytes(d.key.verify_key), site=True)
                for d in (SimulatedDevice(key=site_key), other_site))
            site_a = wire.key_id(site_key.verify_key)

            def serve() -> subprocess.Popen[bytes]:
                log = (tmp_path / "site.log").open("ab")
                return subprocess.Popen(
                    [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(site_state), "--listen",
                     f"127.0.0.1:{port}", "--synthetic-parameters", "50", "--mode", "async", "--buffer", "2",
                     "--min-clients", "1", "--upstream", str(city.client.make_url("")),
                     "--upstream-key", bytes(city_key.verify_key).hex()],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                )

            async def task_after(session: aiohttp.ClientSession, after: int) -> wire.Task:
                async with session.get(site_url + "/v1/task", params={"after": str(after), "wait": "30"}) as r:
                    assert r.status == 200
                    return wire.decode_task(await r.read(), site_key.verify_key)

            async def upload(session: aiohttp.ClientSession, device: SimulatedDevice, task: wire.Task,
                             update: tuple[dict[str, np.ndarray], int]) -> None:
                code, answer = await _post(session, site_url, device.update(task, update[0], num_samples=update[1]))
                assert code == 200, answer

            site = serve()
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                    await _wait_healthy(session, site_url, site)
                    task = await task_after(session, 0)
                    for device, n in zip(devices, (10, 30), strict=True):
                        await upload(session, device, task, (_delta(city, rng), n))
                    await wait_until(lambda: city.engine.store.round_devices(1) == [site_a], what="the forward")
                    carry_task = await task_after(session, task.round_id)
                    assert carry_task.model_version == 0
                    first = (_delta(city, rng), 12)
                    await upload(session, devices[0], carry_task, first)
                os.kill(site.pid, signal.SIGKILL)
                await asyncio.get_running_loop().run_in_executor(None, site.wait)
                site = serve()
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                    await _wait_healthy(session, site_url, site)
                    async with session.get(site_url + "/v1/status") as r:
                        current = (await r.json())["current_round"]
                    assert (current["round"], current["accepted"]) == (carry_task.round_id, 1)
                    second = (_delta(city, rng), 36)
                    await upload(session, devices[1], carry_task, second)
                city_task = await city.task(after=0)
                assert city_task is not None and city_task.round_id == 1
                code, answer = await city.upload(other_site.update(city_task, _delta(city, rng), num_samples=20))
                assert code == 200, answer
                await wait_until(lambda: city.engine.store.round_devices(2) == [site_a], what="the second forward")
                row = city.engine.store.round_updates(2)[0]
                assert row.num_samples == 48
                np.testing.assert_allclose(city.engine.store.read_delta(2, row.offset, row.length),
                                           W1 * _mean(city, [first, second]), rtol=1e-5, atol=1e-7)
                assert sorted(city.engine.store.round_devices(1)) == sorted([site_a, other_site.device_id])
                # The city's next version answers the killed site's long-poll, which the city would otherwise hold
                # open for its full wait when it shuts down.
                site.kill()
                await asyncio.get_running_loop().run_in_executor(None, site.wait)
                city_task = await city.task(after=city_task.round_id)
                assert city_task is not None
                code, answer = await city.upload(other_site.update(city_task, _delta(city, rng), num_samples=20))
                assert code == 200, answer
            finally:
                if site.poll() is None:
                    site.kill()
                    site.wait()

    run(scenario())


def test_an_idle_site_buffer_is_superseded_by_the_citys_next_version_not_abandoned(tmp_path: Path) -> None:
    """An operator alerting on abandoned rounds must not be paged once per city version by a site with no updates."""
    async def scenario() -> None:
        rng = np.random.default_rng(9)
        async with city_of_two_sites(tmp_path) as (city, upstream, (key_a, key_b)), \
                running(tmp_path / "a", devices=2, key=key_a, upstream=upstream, policy=SITE_POLICY) as a, \
                running(tmp_path / "b", devices=2, key=key_b, upstream=upstream, policy=SITE_POLICY) as b:
            await _fill(a, await site_task(a, 0), [(_delta(a, rng), 10), (_delta(a, rng), 30)])
            await _fill(b, await site_task(b, 0), [(_delta(b, rng), 5), (_delta(b, rng), 15)])
            await wait_until(lambda: city.engine.version == 1, what="city version 1")
            # Each site's next buffer opened empty after its forward; the city's version 1 moves it on.
            await wait_until(lambda: a.engine.version == 1, what="site A on version 1")
            rounds = {r["round"]: r for r in a.engine.status()["rounds"]}
            assert [r["status"] for r in rounds.values()].count("abandoned") == 0, rounds
            superseded = [r for r in rounds.values() if r["status"] == "superseded"]
            assert [r["note"] for r in superseded] == ["no updates when upstream version 1 came"], rounds
            samples = a.engine.metrics.registry.get_sample_value
            assert samples("fl_aggregator_rounds_total", {"outcome": "abandoned"}) == 0
            assert samples("fl_aggregator_rounds_total", {"outcome": "superseded"}) == 1

    run(scenario())


def test_uploads_to_a_site_whose_parent_does_not_move_are_told_to_come_back(tmp_path: Path, monkeypatch) -> None:
    """Site B never comes, so the city keeps A's first forward in its buffer and publishes nothing. A's next
    buffer fills and cannot be forwarded yet; a further upload waits at most BUFFER_ROOM_SECONDS for room, then
    gets 503 buffer-full (the agent keeps the update and retries), instead of holding its upload slot until the
    city moves."""
    monkeypatch.setattr("aggregator.rounds.BUFFER_ROOM_SECONDS", 1.0)

    async def scenario() -> None:
        rng = np.random.default_rng(9)
        async with city_of_two_sites(tmp_path) as (city, upstream, (key_a, _)), \
                running(tmp_path / "a", devices=3, key=key_a, upstream=upstream, policy=SITE_POLICY) as a:
            task = await site_task(a, 0)
            for device in a.devices[:2]:
                assert (await a.upload(device.update(task, _delta(a, rng), num_samples=10)))[0] == 200
            await wait_until(lambda: city.engine.store.round_devices(1) == [wire.key_id(key_a.verify_key)],
                             what="A's first forward in the city's buffer")
            for device in a.devices[:2]:  # A's next buffer, full: its forward waits for the city's next version
                assert (await a.upload(device.update(task, _delta(a, rng), num_samples=10)))[0] == 200
            status, problem = await a.upload(a.devices[2].update(task, _delta(a, rng), num_samples=10))
            assert (status, problem["reason"]) == (503, "buffer-full"), problem
            assert city.engine.version == 0

    run(scenario())


def test_an_upload_while_the_site_moves_to_the_citys_new_version_is_retried_not_refused(tmp_path: Path) -> None:
    """When the city publishes, site A's empty buffer is superseded and A writes the new model before its next
    buffer opens. An upload in that moment is told to come back (503 buffer-full: the agent keeps it and
    retries) and counts when it does; it was refused 410 round-closed (the agent sets such an update aside)."""

    async def scenario() -> None:
        rng = np.random.default_rng(10)
        async with city_of_two_sites(tmp_path) as (city, upstream, (key_a, key_b)), \
                running(tmp_path / "a", devices=3, key=key_a, upstream=upstream, policy=SITE_POLICY) as a, \
                running(tmp_path / "b", devices=2, key=key_b, upstream=upstream, policy=SITE_POLICY) as b:
            a_task, b_task = await site_task(a, 0), await site_task(b, 0)
            for device in a.devices[:2]:  # A's first buffer: forwarded, then A's next buffer is open and empty
                assert (await a.upload(device.update(a_task, _delta(a, rng), num_samples=10)))[0] == 200
            await wait_until(lambda: city.engine.store.round_devices(1) == [wire.key_id(key_a.verify_key)],
                             what="A's forward in the city's buffer")
            in_write, release = threading.Event(), threading.Event()
            write = a.engine.models.write

            def slow_write(*args, **kwargs):
                in_write.set()
                release.wait(30)
                return write(*args, **kwargs)

            a.engine.models.write = slow_write
            await _fill(b, b_task, [(_delta(b, rng), 10), (_delta(b, rng), 10)])  # the city publishes version 1
            await wait_until(in_write.is_set, what="site A writing the city's version 1")
            late = a.devices[2].update(a_task, _delta(a, rng), num_samples=7)
            status, problem = await a.upload(late)
            assert (status, problem["reason"]) == (503, "buffer-full"), problem
            release.set()
            await wait_until(lambda: a.engine.current is not None, what="site A's next buffer")
            status, answer = await a.upload(late)  # the agent's retry: the same bytes
            assert status == 200, answer if status == 200 else answer["detail"]
            assert a.engine.current is not None and a.engine.current.model_version == 1

    run(scenario())
