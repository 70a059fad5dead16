"""Real agents in a secure round: they take part because the task says so, deliver their masked inputs through
the outbox like updates, and the aggregator publishes the next version from their sum; an agent that restarts
mid-round has dropped out of that round (its secrets were in memory only) and the round goes on without it."""

from __future__ import annotations

import asyncio

from agent_harness import run_agent, sample
from secagg_harness import make_agent, secure_aggregator

from aggregator.app import SERVICES
from appliance.agent import Agent


async def test_agents_take_part_in_a_secure_round_and_the_model_moves(signed_package, tmp_path):
    key, package = signed_package
    async with secure_aggregator(tmp_path, key, package, devices=3, min_clients=3,
                                 max_rounds=1) as client:  # no round 2: a loaded machine's slow poll must not
        # let an agent deliver round 2's masked input before it is stopped (CI saw delivered == 2 once)
        url = str(client.server.make_url("")).rstrip("/")
        agents = [make_agent(tmp_path, f"agent{i}", url, key, client) for i in range(3)]
        engine = client.server.app[SERVICES].engine
        try:
            await asyncio.gather(*(run_agent(a, lambda a: engine.version >= 1 and a.outbox.depth == 0)
                                   for a in agents))
        finally:
            for a in agents:
                a.sandbox.close()
        assert engine.version == 1
        record = engine.store.get_round(1)
        assert record.status == "published" and "the sum of 3 devices" in record.note
        for a in agents:
            assert sample(a, "fl_agent_updates_delivered_total") == 1  # the masked input, acknowledged
            assert a.outbox.depth == 0 and a.last_round >= 1


async def test_an_agent_restarting_mid_round_has_dropped_out_of_it(signed_package, tmp_path):
    key, package = signed_package
    async with secure_aggregator(tmp_path, key, package, devices=3, min_clients=2) as client:
        url = str(client.server.make_url("")).rstrip("/")
        agents = [make_agent(tmp_path, f"agent{i}", url, key, client) for i in range(3)]
        engine = client.server.app[SERVICES].engine
        secure = engine.secure
        quitter = agents[0]

        def advertised(a: Agent) -> bool:
            return secure.current is not None and quitter.identity.device_id in secure.current.advertised

        try:
            # the quitter joins round 1 (its keys are in the aggregator's hands), then its process ends
            await run_agent(quitter, advertised)
            assert quitter.last_round == 1  # marked as taken before it started: a restart will not rejoin
            quitter.sandbox.close()
            restarted = make_agent(tmp_path, "agent0", url, key, client)
            agents[0] = restarted
            await asyncio.gather(*(run_agent(a, lambda a: engine.version >= 1 and a.outbox.depth == 0)
                                   for a in agents[1:]),
                                 run_agent(restarted, lambda a: engine.version >= 1))
        finally:
            for a in agents:
                a.sandbox.close()
        assert engine.version == 1
        record = engine.store.get_round(1)
        assert record.status == "published" and "the sum of 2 devices" in record.note
        assert sample(restarted, "fl_agent_updates_delivered_total") == 0  # nothing of round 1 from it
        assert restarted.last_round >= 1
