"""A real agent, unchanged, against an aggregator in async mode (FedBuff, K=1): it trains on the version its task
names, its update fills the buffer, the aggregator publishes version 1, and the agent loads exactly that."""

from __future__ import annotations

import numpy as np
from agent_harness import ADVISORY, beside_real_aggregator, run_agent, sample
from aiohttp import ClientSession

from aggregator.app import SERVICES, AggregatorConfig, make_app
from aggregator.buffered import BufferPolicy
from aggregator.models import load_package_file
from aggregator.rounds import RoundPolicy, TrainingPlan
from appliance import wire
from appliance.agent import Agent
from appliance.config import load_config


async def test_an_unchanged_agent_takes_part_in_async_mode(signed_package, tmp_path):
    key, package_path = signed_package
    package = load_package_file(package_path, key.verify_key)
    app = make_app(AggregatorConfig(
        state_dir=tmp_path / "aggregator", package=package, key=key,
        policy=RoundPolicy(min_clients=1, round_timeout=600, buffer=BufferPolicy(size=1)),
        plan=TrainingPlan(epochs=1, batch_size=16),
    ))
    async with beside_real_aggregator(app, key, tmp_path) as (url, config, _):
        agent = await run_agent(
            Agent(load_config(config), budget=ADVISORY),
            until=lambda a: sample(a, "fl_agent_model_version") >= 1 or a.outbox.counters.rejected_total.total() > 0
            or sample(a, "fl_agent_updates_delivered_total") >= 2,
        )
        status = app[SERVICES].engine.status()
        async with ClientSession() as session, session.get(f"{url}/v1/models/1") as response:
            published = wire.decode_model_release(await response.read(), key.verify_key, package.info.param_specs)
    assert agent.outbox.counters.rejected_total.total() == 0
    assert sample(agent, "fl_agent_updates_delivered_total") == 1
    assert status["async"]["staleness"] == {"0": 1} and status["rounds"][-1]["status"] == "published"
    loaded = agent._release
    assert loaded is not None and (loaded.version, loaded.digest) == (1, published.digest)
    for name in package.info.initial_params:
        np.testing.assert_array_equal(loaded.tensors[name], published.tensors[name])
