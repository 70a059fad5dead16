"""What a site (aggregator/upstream.py) refuses from its parent, and why: a parent task for another model package, a
parent release that is not the model its task names, a closed site round that answers no recorded parent task. Each
refusal is logged or recorded with its reason, and the site trains on nothing but the parent's model. And a parent's
secure round, which a site cannot join."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey
from secagg_harness import secure_running

from aggregator.app import SERVICES
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy
from aggregator.upstream import TASKS_DIR, UpstreamConfig
from appliance import wire
from appliance.client import AggregatorClient
from tests.aggregator_harness import async_city_and_site, run, running, site_task, wait_until

DEVICES = 2


def test_a_parent_task_for_another_package_is_refused_naming_both_and_its_model_is_not_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A site started with another package than its parent's (its own model, not the parent's re-signed) joins none
    of the parent's rounds, and says so naming both packages; it does not download the parent's model for it (which
    fails on the site's tensors) again at every retry."""
    downloads: list[int] = []
    real = AggregatorClient.model_release

    async def model_release(client: AggregatorClient, version: int, *args: object, **kwargs: object) -> object:
        downloads.append(version)
        return await real(client, version, *args, **kwargs)

    monkeypatch.setattr(AggregatorClient, "model_release", model_release)
    city_key, site_key = SigningKey.generate(), SigningKey.generate()

    def refusal() -> list[str]:
        return [r.getMessage() for r in caplog.records if "not joining" in r.getMessage()]

    async def go() -> None:
        async with running(tmp_path / "city", key=city_key, enrolled=[], parameters=50,
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=600)) as city:
            city.app[SERVICES].registry.enroll([Enrolment(wire.key_id(site_key.verify_key),
                                                          bytes(site_key.verify_key), site=True)])
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2,
                                      retry_seconds=0.05)
            async with running(tmp_path / "site", devices=DEVICES, key=site_key, upstream=upstream, parameters=60,
                               policy=RoundPolicy(min_clients=1, goal_clients=DEVICES, round_timeout=600)) as site:
                await wait_until(lambda: refusal() or downloads, what="the site taking the city's task")
                assert downloads == []
                (message,) = refusal()
                city_package, site_package = city.package.info.digest.hex(), site.package.info.digest.hex()
                assert f"package {city_package[:16]}" in message and f"serves {site_package[:16]}" in message
                assert site.engine.current is None and await site.task(after=0) is None

    with caplog.at_level(logging.INFO):
        run(go())


def test_a_parent_secure_round_is_not_joined_and_the_site_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A site forwards one plain sum, not a masked input: in a secure round its forward would be refused (and its
    devices' updates lost). It opens no round on such a task and logs what to run instead."""
    city_key, site_key = SigningKey.generate(), SigningKey.generate()

    def refusal() -> list[str]:
        return [r.getMessage() for r in caplog.records if "which a site cannot join" in r.getMessage()]

    async def go() -> None:
        async with secure_running(tmp_path / "city", devices=0, key=city_key) as city:
            city.app[SERVICES].registry.enroll([Enrolment(wire.key_id(site_key.verify_key),
                                                          bytes(site_key.verify_key), site=True)])
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "site", devices=DEVICES, key=site_key, upstream=upstream,
                               policy=RoundPolicy(min_clients=1, goal_clients=DEVICES, round_timeout=600)) as site:
                await wait_until(lambda: refusal() or site.engine.current is not None,
                                 what="the site taking the city's task")
                (message,) = refusal()
                assert "secure-aggregation round" in message and "plain FedAvg at the root" in message
                assert site.engine.current is None and await site.task(after=0) is None

    with caplog.at_level(logging.INFO):
        run(go())


def test_a_parent_round_closing_too_soon_to_collect_anything_is_skipped_not_opened_past_its_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The city's rounds last a second, less than the margin a site leaves its forward: the site opens no round (one
    would be past its deadline as it opens, handing its devices tasks already over) and says why."""
    city_key, site_key = SigningKey.generate(), SigningKey.generate()

    def skipped() -> list[str]:
        return [r.getMessage() for r in caplog.records if "closes too soon to collect anything" in r.getMessage()]

    async def go() -> None:
        async with running(tmp_path / "city", key=city_key, enrolled=[],
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=1)) as city:
            city.app[SERVICES].registry.enroll([Enrolment(wire.key_id(site_key.verify_key),
                                                          bytes(site_key.verify_key), site=True)])
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "site", devices=DEVICES, key=site_key, upstream=upstream,
                               policy=RoundPolicy(min_clients=1, goal_clients=DEVICES, round_timeout=600)) as site:
                await wait_until(lambda: skipped() or site.engine.store.last_round_id() > 0,
                                 what="the site taking the city's task")
                assert skipped() and site.engine.store.last_round_id() == 0
                assert site.engine.current is None and await site.task(after=0) is None

    with caplog.at_level(logging.INFO):
        run(go())


@pytest.mark.parametrize("answer", ["the-model-before", "another-package"])
def test_a_parent_release_that_is_not_the_model_its_task_names_is_refused_and_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, answer: str
) -> None:
    """The city's version 1 is asked for and the first answer is not it: its version 0 (other tensors than the task's
    digest names), or version 1 naming another package. The site refuses it with its reason, takes the task again,
    and trains on the city's version 1, never on what was refused."""
    downloads: list[int] = []
    real = AggregatorClient.model_release

    async def wrong_once(client: AggregatorClient, version: int, *args: object, **kwargs: object) -> object:
        downloads.append(version)
        if version != 1 or len(downloads) > 1:
            return await real(client, version, *args, **kwargs)
        if answer == "the-model-before":
            return await real(client, 0, *args, **kwargs)
        return dataclasses.replace(await real(client, version, *args, **kwargs), package_digest=b"\x01" * 32)

    monkeypatch.setattr(AggregatorClient, "model_release", wrong_once)
    reason = "does not match its task" if answer == "the-model-before" else "names another model package"

    async def go() -> None:
        async with async_city_and_site(tmp_path, city_buffer=1, devices=DEVICES, retry_seconds=0.05) as (city, site, _):
            await wait_until(lambda: site.engine.version == 1 and site.engine.current is not None
                             and site.engine.current.model_version == 1,
                             what="the site's round on the city's version 1")
            np.testing.assert_array_equal(site.engine.params, city.engine.params)
            assert downloads == [1, 1]
            assert [r for r in caplog.records if "wrong-model" in r.getMessage() and reason in r.getMessage()]

    with caplog.at_level(logging.INFO):
        run(go())


def test_a_site_round_whose_parent_task_record_is_lost_is_abandoned_naming_why_and_nothing_is_forwarded(
    tmp_path: Path
) -> None:
    """The record of the parent task a site round answers (``<state>/upstream/round-N.task``) is gone when the round
    closes: the site cannot say which parent round its devices' mean belongs to, so it forwards nothing and records
    the round abandoned, naming why (it went on to fail the close at every retry)."""
    city_key, site_key = SigningKey.generate(), SigningKey.generate()

    async def go() -> None:
        async with running(tmp_path / "city", key=city_key, enrolled=[],
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=600)) as city:
            city.app[SERVICES].registry.enroll([Enrolment(wire.key_id(site_key.verify_key),
                                                          bytes(site_key.verify_key), site=True)])
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with running(tmp_path / "site", devices=DEVICES, key=site_key, upstream=upstream,
                               policy=RoundPolicy(min_clients=DEVICES, goal_clients=DEVICES,
                                                  round_timeout=600)) as site:
                task = await site_task(site, 0)
                records = site.state_dir / TASKS_DIR
                await wait_until(lambda: any(records.glob("round-*.task")), what="the parent task recorded")
                (record,) = records.glob("round-*.task")
                record.unlink()
                for device in site.devices:
                    status, answer = await site.upload(device.update(task, site.delta()))
                    assert status == 200, answer
                await wait_until(lambda: site.engine.store.get_round(task.round_id).status != "open",
                                 what="the site round's end recorded")
                ended = site.engine.store.get_round(task.round_id)
                assert ended.status == "abandoned", ended
                assert "answers no recorded upstream round; nothing forwarded" in ended.note
                assert city.engine.current is not None and city.engine.current.accepted == 0

    run(go())
