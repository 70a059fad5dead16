"""One real agent against the real aggregator, both on loopback: a round is published and the agent moves on
to the new model version.

`aggregator.app` with a quorum of one and a real agent loop (synthetic camera data, the small reference CNN
package, a trainer child process): the agent trains round 1 and delivers its update, the aggregator publishes
version 1, and the agent takes the task of round 2 and loads version 1, the very parameters the aggregator
published. The fleet demo and the QEMU fleet test show the same at scale; this one runs with the fast tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
from agent_harness import ADVISORY, beside_real_aggregator, run_agent, sample
from aiohttp import ClientSession

from aggregator.app import SERVICES, AggregatorConfig, make_app
from aggregator.models import load_package_file
from aggregator.rounds import RoundPolicy, TrainingPlan
from appliance import wire
from appliance.agent import Agent
from appliance.config import load_config

Train = Callable[..., Awaitable[wire.Update | None]]


def _round_one_only(train: Train) -> Train:
    """The agent's trainer, held before it trains round 2 (after the agent loaded round 2's model): the test stops
    the agent once it holds version 1, and a slow poll on a loaded machine must not let it deliver round 2 first."""

    async def trained(task: wire.Task, *args: object) -> wire.Update | None:
        if task.round_id >= 2:
            await asyncio.Event().wait()
        return await train(task, *args)

    return trained


async def test_agent_delivers_a_round_and_loads_the_version_the_aggregator_publishes(signed_package, tmp_path):
    key, package_path = signed_package
    package = load_package_file(package_path, key.verify_key)
    app = make_app(AggregatorConfig(
        state_dir=tmp_path / "aggregator", package=package, key=key,
        policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=600),
        plan=TrainingPlan(epochs=1, batch_size=16),
    ))
    async with beside_real_aggregator(app, key, tmp_path) as (url, config, _):
        agent = Agent(load_config(config), budget=ADVISORY)
        agent._train = _round_one_only(agent._train)
        await run_agent(agent, until=lambda a: sample(a, "fl_agent_model_version") >= 1
                        or a.outbox.counters.rejected_total.total() > 0)
        first = app[SERVICES].store.get_round(1)
        async with ClientSession() as session, session.get(f"{url}/v1/models/1") as response:
            published = wire.decode_model_release(await response.read(), key.verify_key, package.info.param_specs)
    assert agent.outbox.counters.rejected_total.total() == 0
    assert first is not None and first.status == "published" and first.participants == 1
    assert sample(agent, "fl_agent_updates_delivered_total") == 1
    assert sample(agent, "fl_agent_rounds_completed_total") == 1
    assert sample(agent, "fl_agent_model_version") == 1
    loaded = agent._release
    assert loaded is not None and (loaded.version, loaded.digest) == (1, published.digest)
    initial = package.info.initial_params
    for name in initial:
        np.testing.assert_array_equal(loaded.tensors[name], published.tensors[name])
    assert any(not np.array_equal(published.tensors[name], initial[name]) for name in initial), "nothing learnt"
