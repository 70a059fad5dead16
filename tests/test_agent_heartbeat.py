"""The agent's side of the fleet view: a real agent reports itself to a real aggregator as soon as it starts, with
what it holds (model, outbox, budget), and a training run killed for memory shows as an OOM retry."""

from __future__ import annotations

import random
from pathlib import Path

import trainer_faults
from agent_harness import (
    ADVISORY,
    TASK_BATCH_SIZE,
    FakeAggregator,
    beside_real_aggregator,
    run_agent,
    run_agent_against,
    sample,
)
from nacl.signing import SigningKey

from aggregator.app import SERVICES, AggregatorConfig, make_app
from aggregator.rounds import RoundPolicy
from aggregator.simulate import synthetic_package
from appliance import __version__
from appliance.agent import Agent
from appliance.budget import Budget, Usage
from appliance.config import load_config
from appliance.fleet_report import HEARTBEAT_SECONDS, ThrottleMeter, build_heartbeat, next_delay


async def test_a_starting_agent_appears_in_the_fleet_view(tmp_path: Path) -> None:
    key = SigningKey.generate()
    app = make_app(AggregatorConfig(state_dir=tmp_path / "aggregator", package=synthetic_package(10), key=key,
                                    policy=RoundPolicy(min_clients=5, goal_clients=5, round_timeout=600)))
    async with beside_real_aggregator(app, key, tmp_path) as (_, config, identity):
        fleet = app[SERVICES].fleet
        await run_agent(Agent(load_config(config), budget=ADVISORY),
                        until=lambda a: fleet.entry(a.identity.device_id) is not None, at_most=120)
        entry = fleet.entry(identity.device_id)
        counts = fleet.counts(0, entry.last_seen if entry else 0)
    assert entry is not None, "no heartbeat arrived"
    report = entry.report
    assert report.agent_version == __version__ and report.outbox == 0 and report.last_round == 0
    assert report.model_version is None  # no round opened (5 devices needed), so no model was fetched
    assert (report.memory_max, report.cpu_max, report.cameras, report.oom_retries) == (0, 0, 0, 0)  # advisory
    assert counts["active"] == 1 and counts["silent"] == 0


async def test_a_training_run_killed_for_memory_shows_in_the_next_heartbeat(signed_package, tmp_path, monkeypatch):
    key, path = signed_package
    monkeypatch.setattr("appliance.agent.run_train_job", trainer_faults.train_or_be_killed_for_memory)
    fake = FakeAggregator(key, path)  # serves no /v1/heartbeat: the agent logs the 404 and goes on
    agent = await run_agent_against(
        fake, tmp_path, until=lambda a: sample(a, "fl_agent_updates_delivered_total") >= 1
        or len(trainer_faults.events(tmp_path / "state")) >= 4,
    )
    assert trainer_faults.events(tmp_path / "state") == [f"train {TASK_BATCH_SIZE}", f"train {TASK_BATCH_SIZE // 2}"]
    report = agent.heartbeat()
    assert report.oom_retries == 1 and report.last_round == 1 and report.model_version == 0


async def test_a_heartbeat_the_aggregator_does_not_take_is_counted_and_training_goes_on(signed_package, tmp_path):
    key, path = signed_package
    fake = FakeAggregator(key, path)  # serves no /v1/heartbeat: every report is refused (404)
    agent = await run_agent_against(
        fake, tmp_path, until=lambda a: sample(a, "fl_agent_updates_delivered_total") >= 1
        and sample(a, "fl_agent_aggregator_errors_total", {"operation": "heartbeat"}) >= 1, at_most=60,
    )
    assert sample(agent, "fl_agent_aggregator_errors_total", {"operation": "heartbeat"}) == 1  # one per 5 min
    assert sample(agent, "fl_agent_aggregator_errors_total", {"operation": "task"}) == 0
    assert len(fake.updates) == 1


def test_build_heartbeat_keeps_every_field_in_the_range_the_aggregator_takes() -> None:
    budget = Budget(cpu_quota=1.5, threads=2, memory_max=3 << 50, memory_high=None, delegated=True, advisory=False,
                    reason="test")
    usage = Usage(memory_current=200 << 20, cpu_usage_usec=None, cpu_throttled_usec=None,
                  memory_pressure_some_avg10=None, trainer_oom_kills=None, trainer_memory_peak=None)
    report = build_heartbeat(device_id="d" * 32, agent_version="1.2.3+local build\n", model_version=4,
                             last_round=9, cameras=100, budget=budget, usage=usage, cpu_throttled=1500,
                             oom_retries=2, outbox=3, outbox_bytes=-1, sent_at=1_800_000_000.7)
    assert report.agent_version == "1.2.3+localbuild"
    assert (report.cameras, report.cpu_max, report.cpu_throttled, report.memory_max) == (64, 1500, 1000, 2**48)
    assert (report.memory, report.outbox_bytes, report.sent_at) == (200 << 20, 0, 1_800_000_000)


def test_throttle_meter_gives_the_share_of_time_throttled_between_readings() -> None:
    now = [100.0]
    meter = ThrottleMeter(clock=lambda: now[0])
    assert meter.permille(5_000_000) == 0  # the first reading has nothing to compare with
    now[0] += 10.0
    assert meter.permille(7_500_000) == 250  # 2.5 s of 10 s
    now[0] += 10.0
    assert meter.permille(None) == 0  # the cgroup went away
    now[0] += 10.0
    assert meter.permille(1_000_000) == 0


def test_heartbeats_are_spread_around_five_minutes() -> None:
    rng = random.Random(1)
    delays = [next_delay(rng) for _ in range(200)]
    assert 0.9 * HEARTBEAT_SECONDS <= min(delays) < max(delays) <= 1.1 * HEARTBEAT_SECONDS
    assert max(delays) - min(delays) > 0.1 * HEARTBEAT_SECONDS
