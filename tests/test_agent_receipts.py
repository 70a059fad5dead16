"""A receipt is the agent's only proof that an update counts; a model release must be the one the task names.

A receipt that is not signed by the pinned aggregator key, or that names another update, proves nothing: if
the agent took it, it would delete from its outbox an update that was never counted. So it is refused,
counted (``fl_agent_receipts_refused_total{reason}``), and the update stays in the outbox to be sent again,
until a genuine receipt arrives. A release signed by the right key but carrying other parameters (or another
package) than the task names is refused before any training.
"""

from __future__ import annotations

import pytest
from agent_harness import FakeAggregator, run_agent_against, sample

from appliance.agent import Agent


def refused(agent: Agent, reason: str) -> float:
    return sample(agent, "fl_agent_receipts_refused_total", {"reason": reason})


def delivered(agent: Agent) -> float:
    return sample(agent, "fl_agent_updates_delivered_total")


@pytest.mark.parametrize(
    ("receipts", "reason"),
    [
        ("unsigned", "unverified"),
        ("wrong-key", "unverified"),
        ("bad-signature", "unverified"),
        ("wrong-update", "wrong-update"),
        ("whole-body", "wrong-update"),
    ],
)
async def test_a_receipt_that_proves_nothing_is_refused_and_the_update_kept_until_a_genuine_one(
    signed_package, tmp_path, receipts, reason
):
    key, path = signed_package
    fake = FakeAggregator(key, path, receipts=receipts)
    seen: dict[str, float] = {}

    def refused_then_fixed(agent: Agent) -> bool:
        """Once the agent has refused a receipt, note what it holds, then let the aggregator answer honestly."""
        if not seen and (refused(agent, reason) >= 1 or delivered(agent) >= 1):
            seen.update(refused=refused(agent, reason), delivered=delivered(agent), depth=agent.outbox.depth,
                        completed=sample(agent, "fl_agent_rounds_completed_total"))
            fake.receipts = "genuine"
        return bool(seen) and delivered(agent) >= 1

    agent = await run_agent_against(fake, tmp_path, until=refused_then_fixed)
    assert seen["refused"] >= 1, f"the agent took a {receipts} receipt"
    assert seen["delivered"] == 0 and seen["completed"] == 0
    assert seen["depth"] == 1, "the update left the outbox on a receipt that proves nothing"
    # the update that was kept is the one delivered once a genuine receipt came
    assert delivered(agent) == 1 and agent.outbox.depth == 0
    assert len(set(fake.updates)) == 1 and len(fake.updates) >= 2
    assert sample(agent, "fl_agent_rounds_total") == 1


@pytest.mark.parametrize("mismatch", ["parameters", "package"])
async def test_agent_refuses_a_signed_release_that_is_not_the_model_the_task_names(
    signed_package, tmp_path, mismatch
):
    key, path = signed_package
    genuine = FakeAggregator(key, path).package
    other = {name: value + 0.5 for name, value in genuine.initial_params.items()}
    fake = FakeAggregator(key, path, release_params=other if mismatch == "parameters" else None,
                          release_package_digest=b"\x01" * 32 if mismatch == "package" else None)
    agent = await run_agent_against(
        fake, tmp_path,
        until=lambda a: sample(a, "fl_agent_models_refused_total", {"reason": "wrong-model"}) >= 1
        or sample(a, "fl_agent_rounds_joined_total") >= 1,
    )
    assert sample(agent, "fl_agent_models_refused_total", {"reason": "wrong-model"}) >= 1
    assert sample(agent, "fl_agent_rounds_joined_total") == 0
    assert sample(agent, "fl_agent_rounds_total") == 0 and fake.updates == []
    assert agent.outbox.depth == 0
