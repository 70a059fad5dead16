"""Secure rounds on the aggregator: the published model is FedAvg of the survivors' updates, though the
aggregator saw only masked inputs; dropouts, bad input and bad shares cost their device, not the round; rules
that need individual updates are refused at start-up; the status and the metrics tell what happened."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import run, running
from nacl.signing import SigningKey
from secagg_harness import CLIP, expected_mean, flat_delta, secure_rounds, secure_running, transport, until_masked

from aggregator import cli
from aggregator.app import STATUS_FOR_REASON, AggregatorConfig, make_app
from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.secagg_round import SecAggConfig, SecAggConfigError
from aggregator.simulate import SimulatedDevice, synthetic_package
from aggregator.upstream import UpstreamConfig
from appliance import wire
from appliance.protocol import messages as m
from appliance.protocol.quantise import quantise
from appliance.reasons import SECAGG_REASONS
from tests.secagg_sim import _off_polynomial

TOLERANCE = 1e-5  # n devices' rounding, n * W * C / (B * total weight), is far below this for these rounds


async def _published_delta(h, task: wire.Task) -> np.ndarray:
    before = h.engine.params.copy()
    assert await h.task(after=task.round_id, wait=30) is not None, "the next round did not open"
    assert h.engine.version == task.model_version + 1
    return h.engine.params.astype(np.float64) - before


def test_the_published_model_is_fedavg_of_the_masked_updates(tmp_path: Path) -> None:
    async def go() -> None:
        async with secure_running(tmp_path, devices=4) as h:
            task = await h.task()
            assert task.secure_aggregation and task.clip_norm == CLIP
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            deltas = [flat_delta(h) for _ in rounds]
            samples = [32, 64, 96, 128]
            for r, delta, n in zip(rounds, deltas, samples, strict=True):
                status, receipt = await h.upload(r.masked_input(delta, n))
                assert status == 200, receipt
            await asyncio.gather(*(r.unmask() for r in rounds))
            published = await _published_delta(h, task)
            np.testing.assert_allclose(published, expected_mean(deltas, samples), atol=TOLERANCE)
            record = (await (await h.client.get("/v1/status")).json())["rounds"][-1]
            assert record["status"] == "published" and record["samples"] == sum(samples)
            assert record["secure"]["sum_devices"] == 4 and record["secure"]["phase"] == "done"
            assert "the sum of 4 devices" in record["note"]
            page = await (await h.client.get("/")).text()
            assert "secure: sum of 4 devices" in page

    run(go())


def test_devices_dropping_after_each_phase_leave_the_sum_of_the_others(tmp_path: Path) -> None:
    """Of six devices one never advertises, one stops after sharing, one after its masked input: the model is
    the mean of the three (and the fourth, whose input arrived) that the sum covers."""

    async def go() -> None:
        async with secure_running(tmp_path, devices=6, round_timeout=20, phase_timeout=3) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)[1:]  # device 0 never advertises
            await until_masked(rounds)
            gone_after_share, gone_after_masked = rounds[0], rounds[1]
            deltas, samples = {}, {}
            for i, r in enumerate(rounds[1:], start=1):
                deltas[i], samples[i] = flat_delta(h), 10 * i
                assert (await h.upload(r.masked_input(deltas[i], samples[i])))[0] == 200
            answering = [r for r in rounds if r not in (gone_after_share, gone_after_masked)]
            await asyncio.gather(*(r.unmask() for r in answering))
            published = await _published_delta(h, task)
            np.testing.assert_allclose(published, expected_mean(list(deltas.values()), list(samples.values())),
                                       atol=TOLERANCE)
            record = (await (await h.client.get("/v1/status")).json())["rounds"][-1]
            assert record["secure"]["sum_devices"] == 4
            assert record["secure"]["dropouts"] == {"share": 0, "masked": 1, "unmask": 1}
            assert h.counter("fl_aggregator_secagg_dropouts_total", phase="masked") == 1
            assert h.counter("fl_aggregator_secagg_dropouts_total", phase="unmask") == 1

    run(go())


def test_bad_input_is_refused_with_its_reason_and_the_round_goes_on(tmp_path: Path) -> None:
    async def go() -> None:
        async with secure_running(tmp_path, devices=3) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            first, second, third = rounds
            delta = flat_delta(h)
            body = first.masked_input(delta, 20)

            forged = bytearray(body)
            forged[60] ^= 1  # inside the signed payload
            assert (await h.upload(bytes(forged)))[1]["reason"] == "bad-signature"
            other_round = m.encode_masked(m.MaskedInput(task.round_id + 5, first.device_id, np.zeros(
                h.engine.models.layout.size + 1, dtype=np.uint32), ()), h.devices[0].key)
            assert (await h.upload(other_round))[1]["reason"] == "wrong-round"
            short = m.encode_masked(m.MaskedInput(task.round_id, first.device_id, np.zeros(7, dtype=np.uint32), ()),
                                    h.devices[0].key)
            status, problem = await h.upload(short)
            assert (status, problem["reason"]) == (422, "wrong-length")
            late_keys = m.encode_advertise(m.Advertise(task.round_id, first.device_id, first.device.keys,
                                                          first.device.cipher_key_proof(first.device_id)),
                                           h.devices[0].key)
            response = await h.client.post("/v1/secagg/advertise", data=late_keys,
                                           headers={"Content-Type": wire.CONTENT_TYPE})
            assert response.status == 409 and (await response.json())["reason"] == "wrong-phase"

            status, receipt = await h.upload(body)
            assert status == 200
            assert await h.upload(body) == (200, receipt)  # the same bytes again: the same receipt
            again = first.masked_input(delta, 20)  # a second, different masked input of the same device
            assert (await h.upload(again))[1]["reason"] == "duplicate"

            for reason in ("bad-signature", "wrong-round", "wrong-length", "wrong-phase", "duplicate"):
                assert h.rejected(reason) >= 1, reason
            for r in (second, third):
                assert (await h.upload(r.masked_input(flat_delta(h), 20)))[0] == 200
            await asyncio.gather(*(r.unmask() for r in rounds))
            assert await h.task(after=task.round_id, wait=30) is not None
            assert h.engine.version == 1

    run(go())


def test_a_device_dealing_shares_off_its_polynomial_loses_only_its_own_contribution(tmp_path: Path) -> None:
    async def go() -> None:
        async with secure_running(tmp_path, devices=4) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            await asyncio.gather(*(r.advertise() for r in rounds))
            await asyncio.gather(*(r.join() for r in rounds))
            cheat, victim = rounds[0], rounds[1]
            setup = cheat.roster.setup()
            dealing = cheat.device.deal(setup, cheat.index)
            devices = [None] * setup.size
            for r in rounds:
                devices[r.index] = r.device
            dealing.ciphertexts[victim.index] = _off_polynomial(setup, devices, cheat.index, victim.index,
                                                                dealing.ciphertexts[victim.index])
            await transport(h).post("shares", m.encode_shares(m.Shares(task.round_id, cheat.device_id, dealing),
                                                                 h.devices[0].key))
            await asyncio.gather(*(r.share() for r in rounds[1:]))
            await asyncio.gather(*(r.receive() for r in rounds))
            assert victim.rejected == [cheat.index]
            deltas = [flat_delta(h) for _ in rounds]
            for r, delta in zip(rounds, deltas, strict=True):
                assert (await h.upload(r.masked_input(delta, 50)))[0] == 200
            await asyncio.gather(*(r.unmask() for r in rounds))
            published = await _published_delta(h, task)
            np.testing.assert_allclose(published, expected_mean(deltas[1:], [50] * 3), atol=TOLERANCE)
            record = (await (await h.client.get("/v1/status")).json())["rounds"][-1]
            assert record["secure"]["sum_devices"] == 3
            assert h.counter("fl_aggregator_secagg_excluded_total", reason="bad-shares") == 1
            assert f"bad shares from {cheat.device_id}" in record["note"], record["note"]

    run(go())


def test_too_few_devices_abandon_the_round_with_the_reason(tmp_path: Path) -> None:
    async def go() -> None:
        async with secure_running(tmp_path, devices=3, round_timeout=20, phase_timeout=1) as h:
            task = await h.task()
            await secure_rounds(h, task)[0].advertise()  # one device of three: no roster can be made
            nxt = await h.task(after=task.round_id, wait=30)
            assert nxt is not None and h.engine.version == 0
            record = (await (await h.client.get("/v1/status")).json())["rounds"][-1]
            assert record["status"] == "abandoned"
            assert "1 devices advertised keys, below the minimum of 2" in record["note"]
            assert h.counter("fl_aggregator_secagg_abandoned_total", reason="too-few-advertised") == 1

    run(go())


def test_phases_are_measured(tmp_path: Path) -> None:
    async def go() -> None:
        async with secure_running(tmp_path, devices=3) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            for r in rounds:
                assert (await h.upload(r.masked_input(flat_delta(h), 10)))[0] == 200
            await asyncio.gather(*(r.unmask() for r in rounds))
            assert await h.task(after=task.round_id, wait=30) is not None
            for phase in ("advertise", "share", "masked", "unmask"):
                assert h.counter("fl_aggregator_secagg_phase_seconds_count", phase=phase) == 1, phase
                assert h.counter("fl_aggregator_secagg_bytes_total", phase=phase, direction="received") > 0, phase
            for phase in ("share", "masked", "unmask"):
                assert h.counter("fl_aggregator_secagg_bytes_total", phase=phase, direction="sent") > 0, phase
            assert h.counter("fl_aggregator_secagg_sum_devices_sum") == 3

    run(go())


def test_a_plain_update_to_a_secure_round_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with secure_running(tmp_path, devices=2) as h:
            task = await h.task()
            status, problem = await h.upload(h.devices[0].update(task, h.delta()))
            assert (status, problem["reason"]) == (409, "not-secure")

    run(go())


def test_a_plain_aggregator_says_it_runs_no_secure_aggregation(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2) as h:
            response = await h.client.get("/v1/secagg/1/roster")
            assert response.status == 409 and (await response.json())["reason"] == "not-secure"

    run(go())


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum"])  # not "strategy": labgrid's plugin owns it
def test_rules_that_need_individual_updates_are_refused_at_start_up(tmp_path: Path, rule: str, capsys) -> None:
    with pytest.raises(SecAggConfigError, match="looks at individual updates"):
        AggregatorConfig(tmp_path, synthetic_package(10), SigningKey.generate(), strategy=rule,
                         plan=TrainingPlan(clip_norm=1.0), secure_aggregation=SecAggConfig())
    code = cli.main(["serve", "--state", str(tmp_path / "s"), "--init", "--synthetic-parameters", "10",
                     "--secure-aggregation", "--clip-norm", "1", "--strategy", rule])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "individual updates" in err


def test_secure_aggregation_needs_a_clip_norm_and_refuses_central_dp(tmp_path: Path, capsys) -> None:
    base = ["serve", "--state", str(tmp_path / "s"), "--init", "--synthetic-parameters", "10", "--secure-aggregation"]
    assert cli.main(base) == 2 and "--clip-norm" in capsys.readouterr().err
    assert cli.main([*base, "--clip-norm", "1", "--dp", "central", "--dp-noise-multiplier", "1"]) == 2
    assert "never sees one" in capsys.readouterr().err
    assert cli.main([*base, "--clip-norm", "1", "--secagg-threshold", "0.4"]) == 2
    assert "[0.5, 1)" in capsys.readouterr().err


def test_the_curious_aggregator_stores_nothing_of_one_device_in_the_clear(tmp_path: Path, caplog) -> None:
    """Everything the aggregator holds while it waits for the unmask answers (database, spool, log): no device's
    update or quantised input is in it, and its masked inputs are uniform."""
    caplog.set_level(logging.DEBUG)

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, parameters=20_000) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            secrets = []
            for r in rounds:
                delta = flat_delta(h, scale=0.005)
                setup = r.roster.setup()
                plain = quantise(delta, 40, clip_norm=CLIP, levels=setup.levels, max_samples=setup.max_samples,
                                 rng=np.random.default_rng(1))
                words = r.device.mask(delta, 40, np.random.default_rng(1))  # the same rounding draws as plain
                secrets += [delta.tobytes()[:64], plain.tobytes()[:64]]
                body = m.encode_masked(m.MaskedInput(task.round_id, r.device_id, words, ()),
                                       next(d.key for d in h.devices if d.device_id == r.device_id))
                assert (await h.upload(body))[0] == 200
            stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
            for secret in secrets:
                assert secret not in stored
                assert secret.hex() not in caplog.text
            assert len(list((tmp_path / "spool").glob("round-*.seg"))) == 1
            store = h.engine.store  # the records, without the zero padding that aligns each one in the segment
            words = np.concatenate([store.read_delta(r.round_id, r.offset, r.length).view("<u4")
                                    for r in store.round_updates(task.round_id)])
            counts = np.bincount((words >> 24).astype(np.int64), minlength=256)
            chi2 = float(((counts - words.size / 256) ** 2 / (words.size / 256)).sum())
            assert chi2 < 400, "the spooled masked inputs are not uniform"
            await asyncio.gather(*(r.unmask() for r in rounds))
            assert await h.task(after=task.round_id, wait=30) is not None
            assert not list((tmp_path / "spool").glob("round-*.seg"))  # dropped once the round is published

    run(go())


def test_the_app_builds_with_secure_aggregation_and_a_fedadam_rule(tmp_path: Path) -> None:
    config = AggregatorConfig(tmp_path, synthetic_package(10), SigningKey.generate(), strategy="fedadam",
                              plan=TrainingPlan(clip_norm=1.0), policy=RoundPolicy(),
                              secure_aggregation=SecAggConfig())
    assert make_app(config) is not None


def test_a_site_runs_secure_aggregation_among_its_devices_and_forwards_only_their_sum(tmp_path: Path) -> None:
    """site -> city: the site's devices mask their updates; the site unmasks their sum and forwards it as its one
    update; the city's new model is FedAvg over the devices."""
    async def go() -> None:
        city_key, site_key = SigningKey.generate(), SigningKey.generate()
        async with running(tmp_path / "city", key=city_key, enrolled=[SimulatedDevice(key=site_key)],
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60)) as city:
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            async with secure_running(tmp_path / "site", devices=3, key=site_key, upstream=upstream) as site:
                task = await site.task(wait=30)
                assert task is not None and task.secure_aggregation
                rounds = secure_rounds(site, task)
                await until_masked(rounds)
                deltas, samples = [flat_delta(site) for _ in rounds], [5, 10, 15]
                for r, delta, n in zip(rounds, deltas, samples, strict=True):
                    assert (await site.upload(r.masked_input(delta, n)))[0] == 200
                before = city.engine.params.astype(np.float64)
                await asyncio.gather(*(r.unmask() for r in rounds))
                for _ in range(600):
                    if city.engine.version == 1:
                        break
                    await asyncio.sleep(0.05)
                assert city.engine.version == 1
                np.testing.assert_allclose(city.engine.params - before, expected_mean(deltas, samples),
                                           atol=TOLERANCE)
                assert city.engine.store.get_round(1).samples == sum(samples)
                forwarded = site.engine.store.recent_rounds(5)[-1]
                assert forwarded.status == "published" and "forwarded to upstream round" in forwarded.note
                assert "3 updates, 30 samples" in forwarded.note

    run(go())


def test_the_documented_secure_aggregation_statuses_are_the_ones_the_server_answers() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    section = text[text.index("### 12.7"): text.index("### 12.8")]
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)` +\| (\d{3}) +\|", section, re.M))
    assert set(rows) == set(SECAGG_REASONS)
    for reason, status in rows.items():
        assert STATUS_FOR_REASON.get(reason, 400) == int(status), reason
