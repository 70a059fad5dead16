"""The agent's status (systemd's STATUS=, what `systemctl status fl-agent` shows) names why the round loop is
waiting to retry: a model or a task the agent refused is named as refused, "aggregator unreachable" is kept for an
aggregator that does not answer, and a round taken afterwards clears it. A refusal read "aggregator unreachable",
and sent the operator looking at the network when the model was at fault."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from agent_harness import (
    ADVISORY,
    FakeAggregator,
    agent_config,
    enrolled_state,
    on_loopback,
    run_agent,
    run_agent_against,
    sample,
)
from aiohttp import web
from nacl.signing import SigningKey, VerifyKey

from appliance import wire
from appliance.agent import Agent
from appliance.config import load_config


def _agent(url: str, tmp_path: Path, aggregator_key: VerifyKey) -> Agent:
    state = tmp_path / "state"
    enrolled_state(state, aggregator_key)
    return Agent(load_config(agent_config(tmp_path / "agent.toml", url, state)), budget=ADVISORY)


def _polls_failed(agent: Agent) -> bool:
    return sample(agent, "fl_agent_aggregator_errors_total", {"operation": "task"}) >= 1


async def test_a_refused_model_is_named_in_the_status_until_a_round_is_taken(signed_package, tmp_path):
    key, path = signed_package
    fake = FakeAggregator(key, path, tamper=True)
    genuine = FakeAggregator(key, path).release
    seen: list[str] = []

    def refused_then_delivered(agent: Agent) -> bool:
        if not seen and sample(agent, "fl_agent_models_refused_total", {"reason": "digest-mismatch"}) >= 1:
            seen.append(agent.status)
            fake.release = genuine  # the aggregator publishes a sound release: the next retry takes the round
        return sample(agent, "fl_agent_updates_delivered_total") >= 1

    agent = await run_agent_against(fake, tmp_path, until=refused_then_delivered, at_most=120)
    assert seen, "the release was never refused"
    assert seen[0].startswith("refused the model from the aggregator: digest-mismatch"), seen[0]
    assert "unreachable" not in seen[0] and "; retry in " in seen[0]
    assert len(fake.updates) == 1
    assert agent.status == "waiting for round > 1"


async def test_a_task_that_does_not_verify_is_named_refused_in_the_status(tmp_path):
    pinned, other = SigningKey.generate(), SigningKey.generate()

    async def task(request: web.Request) -> web.Response:
        forged = wire.Task(1, 0, bytes(32), bytes(32), deadline=int(time.time()) + 300, epochs=1, batch_size=16)
        return web.Response(body=wire.encode_task(forged, other), content_type="application/cose")

    app = web.Application()
    app.router.add_get("/v1/task", task)
    async with on_loopback(app) as url:
        agent = await run_agent(_agent(url, tmp_path, pinned.verify_key), until=_polls_failed, at_most=60)
    assert agent.status.startswith("refused the task from the aggregator: "), agent.status
    assert "unreachable" not in agent.status and agent.last_round == 0


async def test_an_aggregator_that_does_not_answer_is_still_named_unreachable(tmp_path):
    with socket.socket() as closed:  # a loopback port nothing listens on once the block ends
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    agent = await run_agent(_agent(f"http://127.0.0.1:{port}", tmp_path, SigningKey.generate().verify_key),
                            until=_polls_failed, at_most=60)
    assert agent.status.startswith("aggregator unreachable; retry in "), agent.status


async def test_an_aggregator_answering_again_with_no_round_open_clears_unreachable(tmp_path):
    polls: list[int] = []

    async def task(request: web.Request) -> web.Response:  # down for the first poll, then no round open
        polls.append(1)
        return web.Response(status=503 if len(polls) == 1 else 204)

    app = web.Application()
    app.router.add_get("/v1/task", task)
    async with on_loopback(app) as url:
        agent = await run_agent(_agent(url, tmp_path, SigningKey.generate().verify_key),
                                until=lambda a: len(polls) >= 3, at_most=60)
    assert _polls_failed(agent)
    assert agent.status == "waiting for round > 0"
