"""The agent's loop under memory trouble: a trainer killed for memory is retried with half the batch, and
training waits while memory pressure (PSI) is high.

Both are injected into a real agent loop against the fake aggregator (tests/agent_harness.py): the trainer child
really dies of SIGKILL, which an advisory budget (no cgroup to ask) takes for the OOM killer, as on a laptop;
the pressure is a PSI file in place of ``/proc/pressure/memory``, read by the agent's real pressure gate. The
pieces (the batch-size rule, the gate, the sandbox's kill detection) have their own tests; these show the loop
uses them. The real OOM kill in a delegated cgroup is tests/test_budget_qemu.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import trainer_faults
from agent_harness import SAMPLES_PER_ROUND, TASK_BATCH_SIZE, FakeAggregator, run_agent_against, sample

from appliance import budget, wire
from appliance.agent import Agent

HIGH_PRESSURE = "some avg10=90.00 avg60=60.00 avg300=20.00 total=9000000\n"  # PSI "some" avg10: 90 % stalled
LOW_PRESSURE = "some avg10=0.00 avg60=0.00 avg300=0.00 total=9000000\n"


def delivered(agent: Agent) -> float:
    return sample(agent, "fl_agent_updates_delivered_total")


def skipped(agent: Agent) -> float:
    return sum(sample(agent, "fl_agent_rounds_skipped_total", {"reason": r})
               for r in ("trainer-killed", "trainer-failed", "no-data", "deadline-passed"))


async def test_a_trainer_killed_for_memory_is_retried_with_half_the_batch(signed_package, tmp_path, monkeypatch):
    key, path = signed_package
    monkeypatch.setattr("appliance.agent.run_train_job", trainer_faults.train_or_be_killed_for_memory)
    fake = FakeAggregator(key, path)
    state = tmp_path / "state"
    agent = await run_agent_against(
        fake, tmp_path,
        until=lambda a: delivered(a) >= 1 or skipped(a) >= 1 or len(trainer_faults.events(state)) >= 4,
    )
    assert trainer_faults.events(state) == [f"train {TASK_BATCH_SIZE}", f"train {TASK_BATCH_SIZE // 2}"]
    assert sample(agent, "fl_agent_trainer_killed_total", {"cause": "oom"}) == 1
    assert skipped(agent) == 0
    assert delivered(agent) == 1 and len(fake.updates) == 1
    update = wire.decode_update(fake.updates[0], lambda kid: agent.identity.verify_key, fake.package.param_specs)
    assert update.round_id == 1 and update.num_samples == SAMPLES_PER_ROUND


async def test_training_waits_while_memory_pressure_is_high(signed_package, tmp_path, monkeypatch):
    key, path = signed_package
    psi = tmp_path / "memory.pressure"
    psi.write_text(HIGH_PRESSURE)
    monkeypatch.setattr(budget, "SYSTEM_MEMORY_PRESSURE", psi)  # the agent's gate reads it (advisory budget)
    readings: list[bool] = []
    measured = budget.pressure_high

    def pressure_high(threshold: float, path: Path | None = None) -> bool:
        high = measured(threshold, path)
        readings.append(high)
        return high

    monkeypatch.setattr(budget, "pressure_high", pressure_high)
    monkeypatch.setattr("appliance.agent.run_train_job", trainer_faults.train_noted)

    async def pressure_falls(state: Path) -> None:
        """Once the agent has found the pressure high twice (it is waiting), the pressure falls."""
        while readings.count(True) < 2:
            await asyncio.sleep(0.05)
        psi.write_text(LOW_PRESSURE)
        trainer_faults.note(state, "pressure fell")

    fake = FakeAggregator(key, path)
    agent = await run_agent_against(fake, tmp_path, until=lambda a: delivered(a) >= 1 or skipped(a) >= 1,
                                    during=pressure_falls)
    assert trainer_faults.events(tmp_path / "state") == ["pressure fell", f"train {TASK_BATCH_SIZE}"]
    assert sample(agent, "fl_agent_pressure_pause_seconds_total") > 0
    assert delivered(agent) == 1
