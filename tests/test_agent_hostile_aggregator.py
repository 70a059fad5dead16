"""What an aggregator answers is checked before the agent believes it: a signature proves who sent it, not that it is
sane, and an aggregator that was compromised, or a proxy on the path, can answer anything. A refusal nested deeper
than the JSON reader goes, not UTF-8, a list or a number instead of an object, an integer of thousands of digits,
or gigabytes: each is a malformed or failed answer named in one log line, and no loop of the agent ends on it.
A round whose deadline is weeks away is trained for, not an OverflowError ending the agent."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from agent_harness import FakeAggregator, on_loopback, run_agent_against, sample, small_package
from aiohttp import web
from nacl.signing import SigningKey
from test_model_package import signed_unchecked

from appliance import wire
from appliance.client import (
    MAX_ANSWER_BYTES,
    MAX_DETAIL_CHARS,
    AggregatorClient,
    AggregatorUnavailable,
    held_sent_at,
    problem_reason,
)
from appliance.framebuffer import FrameBuffer
from appliance.secagg_client import SecAggDropped, SecureRound, Transport

DEEP_LIST = b"[" * 10_000 + b"]" * 10_000  # 20 kB, within the bound on what is read
DEEP_OBJECT = b'{"reason": ' * 5_000 + b"1" + b"}" * 5_000


class RefusingHeartbeats(FakeAggregator):
    """The fake aggregator, answering every heartbeat with ``status`` and ``body`` as problem+json."""

    def __init__(self, key: SigningKey, package_path: Path, status: int, body: bytes):
        super().__init__(key, package_path)
        self.status, self.body = status, body

    def app(self) -> web.Application:
        async def heartbeat(request: web.Request) -> web.Response:
            return web.Response(status=self.status, body=self.body, content_type="application/problem+json")

        app = super().app()
        app.router.add_post("/v1/heartbeat", heartbeat)
        return app


async def test_a_refusal_nested_past_the_json_reader_is_logged_and_the_agent_goes_on(signed_package, tmp_path, caplog):
    key, path = signed_package
    fake = RefusingHeartbeats(key, path, 409, DEEP_LIST)
    with caplog.at_level(logging.WARNING, logger="fl_agent"):
        agent = await run_agent_against(
            fake, tmp_path, until=lambda a: sample(a, "fl_agent_updates_delivered_total") >= 1
            and sample(a, "fl_agent_aggregator_errors_total", {"operation": "heartbeat"}) >= 1, at_most=60,
        )
    assert sample(agent, "fl_agent_aggregator_errors_total", {"operation": "heartbeat"}) == 1
    assert len(fake.updates) == 1  # the round loop and the delivery went on
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("heartbeat not taken")]
    assert line.startswith("heartbeat not taken: 409 unknown: malformed problem+json answer (JSON nested too deeply")


async def test_a_round_whose_deadline_is_weeks_away_is_trained_for(signed_package, tmp_path):
    key, path = signed_package
    fake = FakeAggregator(key, path)
    fake.round_seconds = 30 * 86400  # past the 24.8 days poll(2) can wait at once
    agent = await run_agent_against(fake, tmp_path, until=lambda a: sample(a, "fl_agent_updates_delivered_total") >= 1,
                                    at_most=120)
    assert len(fake.updates) == 1 and agent.last_round == 1


async def test_a_signed_package_with_a_nan_mean_is_refused_naming_it_before_any_training(signed_package, tmp_path,
                                                                                       caplog):
    """Signed by the pinned key, and NaN where the inputs' mean goes: every step would train on NaN. The device
    refuses it (counted bad-content, the field named) and keeps asking; it never trains on it."""
    key, path = signed_package
    fake = FakeAggregator(key, path)
    good = fake.package
    fake.package_bytes = signed_unchecked(
        dataclasses.replace(good, preprocessing={**good.preprocessing, "mean": float("nan")}), key)
    digest = bytes(wire.verify(fake.package_bytes, wire.pinned(key.verify_key)).payload["content_sha256"])
    fake.package = dataclasses.replace(good, digest=digest)  # the task and the release name the NaN package
    fake.release, fake.digest = wire.encode_model_release(wire.ModelRelease(0, digest, good.initial_params), key)

    def refused_or_trained(agent) -> bool:
        return (sample(agent, "fl_agent_models_refused_total", {"reason": "bad-content"}) >= 3
                or sample(agent, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) >= 1)

    with caplog.at_level(logging.ERROR, logger="fl_agent"):
        agent = await run_agent_against(fake, tmp_path, until=refused_or_trained, at_most=60)
    assert sample(agent, "fl_agent_models_refused_total", {"reason": "bad-content"}) >= 3
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) == 0
    assert not (tmp_path / "state" / "models" / f"{digest.hex()}.flpkg").exists() and not fake.updates
    assert any("preprocessing field 'mean' must be a number in [-1e+06, 1e+06], got nan" in r.getMessage()
               for r in caplog.records)
    # Each retry of the round refuses it again; its digest names that content, so it is not downloaded again.
    assert fake.package_downloads == 1


async def test_a_batch_larger_than_the_frame_buffer_holds_skips_the_round_at_once(signed_package, tmp_path, caplog):
    """Cameras never fill a batch of more frames than the buffer keeps: the round loop waited until the deadline
    (weeks, if the task says so), taking no other round meanwhile."""
    key, path = signed_package
    fake = FakeAggregator(key, path)
    fake.batch_size, fake.round_seconds = 5000, 30 * 86400  # the buffer holds 4096 frames by default
    with caplog.at_level(logging.WARNING, logger="fl_agent"):
        agent = await run_agent_against(fake, tmp_path, source="cameras", at_most=60,
                                        until=lambda a: sample(a, "fl_agent_rounds_skipped_total",
                                                               {"reason": "no-data"}) >= 1)
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "no-data"}) == 1 and agent.last_round == 1
    assert any("asks for batches of 5000 frames, more than the frame buffer holds (4096" in r.getMessage()
               for r in caplog.records)


async def test_a_batch_whose_bytes_the_frame_buffer_cannot_hold_skips_the_round_at_once(tmp_path, caplog):
    """The frame buffer holds what the camera recorder writes: 1x32x32 frames with their box slots, 1,112 bytes each
    whatever the model (docs/cameras.md). 70,400 bytes hold 63 of them, so a batch of 64 is never there; counted in the
    model's own record (no box slots for a counting model, 1,048 bytes: 67 frames) it was waited for until the
    deadline (weeks, here), no other round taken meanwhile."""
    key = SigningKey.generate()
    package = small_package(tmp_path / "counting.flpkg", key, specs=[wire.ParamSpec("w", (4,))],
                            input_shape=[1, 32, 32])
    fake = FakeAggregator(key, package)
    fake.batch_size, fake.round_seconds = 64, 30 * 86400
    with caplog.at_level(logging.WARNING, logger="fl_agent"):
        agent = await run_agent_against(fake, tmp_path, source="cameras", at_most=60,
                                        extra_toml="[cameras]\nbuffer_max_bytes = 70400\n",
                                        until=lambda a: sample(a, "fl_agent_rounds_skipped_total",
                                                               {"reason": "no-data"}) >= 1)
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "no-data"}) == 1 and agent.last_round == 1
    assert any("asks for batches of 64 frames, more than the frame buffer holds (63 frames of 1112 bytes: "
               "[cameras] buffer_max_frames = 4096, buffer_max_bytes = 70400)" in r.getMessage()
               for r in caplog.records)


async def test_a_batch_larger_than_a_round_trains_on_skips_the_round_instead_of_failing_it(signed_package, tmp_path,
                                                                                         caplog):
    """The trainer reads the newest ``samples_per_round`` frames (64 here): a batch of 100 never fit, and each round
    failed in the trainer, counted trainer-failed, as "64 readable labelled frames in the buffer, need at least 100"
    (which blames the card)."""
    key, path = signed_package
    buffer = FrameBuffer(tmp_path / "state" / "frames")
    for i in range(200):
        buffer.append(np.full((1, 32, 32), i % 256, np.uint8), i % 4)
    buffer.flush()
    fake = FakeAggregator(key, path)
    fake.batch_size = 100
    with caplog.at_level(logging.WARNING, logger="fl_agent"):
        agent = await run_agent_against(fake, tmp_path, source="cameras", at_most=60,
                                        until=lambda a: sample(a, "fl_agent_rounds_skipped_total",
                                                               {"reason": "no-data"}) >= 1
                                        or sample(a, "fl_agent_rounds_skipped_total",
                                                  {"reason": "trainer-failed"}) >= 1)
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) == 0
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "no-data"}) == 1 and agent.last_round == 1
    assert any("asks for batches of 100 frames, more than a round trains on ([data] samples_per_round = 64)"
               in r.getMessage() for r in caplog.records)


async def test_a_release_of_another_version_than_the_task_names_is_refused(signed_package, tmp_path):
    """The task asks for version 0; the release answering it, signed, with the task's parameters, says version
    2^64 - 1. It was taken, and every heartbeat then reported that version, which the fleet view refuses: the device
    showed as silent while it trained."""
    key, path = signed_package
    fake = FakeAggregator(key, path)
    fake.release, digest = wire.encode_model_release(
        wire.ModelRelease(2**64 - 1, fake.package.digest, fake.package.initial_params), key)
    assert digest == fake.digest  # the parameters the task names, under another version
    agent = await run_agent_against(fake, tmp_path, at_most=60, until=lambda a: sample(
        a, "fl_agent_models_refused_total", {"reason": "wrong-model"}) >= 1 or bool(fake.updates))
    assert sample(agent, "fl_agent_models_refused_total", {"reason": "wrong-model"}) >= 1
    assert not fake.updates and agent.heartbeat().model_version is None


@pytest.mark.parametrize("answer, why", [
    (DEEP_LIST, "JSON nested too deeply to read"),
    (DEEP_OBJECT, "JSON nested too deeply to read"),
    (b'{"reason": "\xff\xfe"}', "not UTF-8 text"),
    (b'{"reason": 1' + b"0" * 5000 + b"}", "not JSON (Exceeds the limit (4300 digits)"),
    (b"not json", "not JSON (Expecting value"),
    (b'["stale-report"]', "JSON list, not an object"),
    (b"409", "JSON int, not an object"),
    (b'"stale-report"', "JSON str, not an object"),
])
def test_an_answer_that_is_not_a_problem_object_is_named_malformed(answer, why):
    reason, detail = problem_reason(answer)
    assert reason == "unknown"
    assert detail.startswith(f"malformed problem+json answer ({why}") and detail.isprintable(), detail
    assert len(detail) < 250
    assert held_sent_at(answer) is None


@pytest.mark.parametrize("problem, expected", [
    ({"reason": "stale-report", "detail": "older than the one held"}, ("stale-report", "older than the one held")),
    ({"reason": ["stale-report"], "detail": "x"}, ("unknown", "x")),
    ({"reason": "bad-payload", "detail": json.loads("[" * 900 + "]" * 900)},
     ("bad-payload", "(its detail is not text)")),
    ({"reason": "bad\npayload", "detail": "line one\nforged log line"}, ("bad?payload", "line one?forged log line")),
    ({"reason": "r" * 1000}, ("r" * 64 + "...", "")),
])
def test_a_problems_reason_and_detail_are_one_printable_bounded_line_each(problem, expected):
    assert problem_reason(json.dumps(problem).encode()) == expected


def test_a_long_detail_is_cut_to_its_bound():
    _, detail = problem_reason(json.dumps({"reason": "bad-payload", "detail": "d" * 100_000}).encode())
    assert detail == "d" * MAX_DETAIL_CHARS + "..."


def huge_answer(status: int, announced: bool) -> web.Application:
    """Answers every POST with ``status`` and 4 MiB of spaces, with its length announced or streamed without one."""
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if announced:
            return web.Response(status=status, body=b" " * (4 << 20))
        response = web.StreamResponse(status=status)
        await response.prepare(request)
        for _ in range(64):
            await response.write(b" " * (64 << 10))
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    return app


@pytest.mark.parametrize("announced", [True, False])
@pytest.mark.parametrize("status", [200, 409])
async def test_an_answer_to_a_post_past_the_limit_is_a_failed_request_not_read_whole(status, announced):
    key = SigningKey.generate()
    async with on_loopback(huge_answer(status, announced)) as url, AggregatorClient(url, key.verify_key) as client:
        with pytest.raises(AggregatorUnavailable, match=f"limit is {MAX_ANSWER_BYTES}|limit of {MAX_ANSWER_BYTES}"):
            await client.send_heartbeat(b"a heartbeat")
        with pytest.raises(AggregatorUnavailable, match=f"limit is {MAX_ANSWER_BYTES}|limit of {MAX_ANSWER_BYTES}"):
            await client.send_update(b"an update")  # kept in the outbox and sent again, as after a network error
        transport = Transport(url, client.session, key.verify_key)
        with pytest.raises(ConnectionError, match="too-large"):
            await transport.post("keys", b"a secure round's message")


@pytest.mark.parametrize("answer", ["204 at once", "the round taken, whatever after= says"])
async def test_an_aggregator_answering_polls_at_once_is_not_polled_in_a_tight_loop(signed_package, tmp_path, answer):
    """An aggregator's long-poll waits for the next round; a proxy that answers 204 at once, or an aggregator that
    serves the round the agent has taken again, had the round loop poll as fast as the answers came (thousands a
    second). Polls that bring no round to take start a second apart."""
    key, path = signed_package
    fake = FakeAggregator(key, path)
    fake.poll_seconds = 0.0
    fake.ignores_after = answer != "204 at once"
    await run_agent_against(fake, tmp_path, at_most=60,
                            until=lambda a: len(fake.polls) >= 6 and sample(a, "fl_agent_updates_delivered_total") >= 1)
    assert len(fake.updates) == 1  # round 1 taken once
    after_the_round = fake.polls[1:]
    gaps = [later - earlier for earlier, later in itertools.pairwise(after_the_round)]
    assert len(gaps) >= 4 and min(gaps) >= 0.9, gaps


class NotPublishedAtOnce:
    """A secure round's transport through a proxy that answers every poll 204 at once."""

    def __init__(self) -> None:
        self.polls = 0

    async def get(self, path: str, wait: float) -> bytes | None:
        self.polls += 1
        return None


async def test_a_secure_round_polled_with_204_at_once_waits_between_polls_until_its_deadline():
    """A secure round's device polled as fast as the answers came, until the round's deadline: thousands of polls."""
    key = SigningKey.generate()
    task = wire.Task(1, 0, b"m" * 32, b"p" * 32, deadline=int(time.time()) + 600, secure_aggregation=True)
    proxy = NotPublishedAtOnce()
    secure = SecureRound(proxy, task, "device-1", key)
    with pytest.raises(SecAggDropped, match="no roster before the deadline"):
        await secure._fetch("/v1/secagg/1/roster", "roster", time.time() + 2.5)
    assert 1 <= proxy.polls <= 4
