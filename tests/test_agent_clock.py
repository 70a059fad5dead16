"""Time on a board whose clock is wrong: the agent judges deadlines and stamps updates in the aggregator's time,
learnt from the signed tasks, and says how far off its own clock is.

The unit tests drive :class:`appliance.clock.AggregatorClock` with fake wall and monotonic clocks; the loopback
tests run a real agent, whose device clock is years behind or a year ahead, against a real aggregator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_harness import beside_real_aggregator, run_agent
from aiohttp.test_utils import TestServer
from nacl.signing import SigningKey

from aggregator.app import METRICS, SERVICES, AggregatorConfig, make_app
from aggregator.models import load_package_file
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.simulate import synthetic_package
from appliance.agent import Agent
from appliance.budget import Budget
from appliance.clock import BOUND_MAX_AGE_SECONDS, DEADLINE_SLACK_SECONDS, AggregatorClock
from appliance.config import load_config
from appliance.identity import load_or_create_device_key, write_aggregator_key

YEAR = 365 * 86400.0
T = 1_800_000_000.0  # the aggregator's time in the unit tests (2027)


class FakeTime:
    """A wall clock and a monotonic clock that tests move by hand."""

    def __init__(self, wall: float) -> None:
        self.wall_value = wall
        self.mono_value = 1000.0

    def wall(self) -> float:
        return self.wall_value

    def monotonic(self) -> float:
        return self.mono_value

    def advance(self, seconds: float) -> None:
        self.wall_value += seconds
        self.mono_value += seconds


def clock_at(wall: float) -> tuple[AggregatorClock, FakeTime]:
    fake = FakeTime(wall)
    return AggregatorClock(wall=fake.wall, monotonic=fake.monotonic), fake


def test_before_any_task_the_device_clock_is_all_there_is():
    clock, _ = clock_at(T - 5 * YEAR)
    assert clock.now() == T - 5 * YEAR
    assert math.isnan(clock.offset())


def test_a_clock_years_behind_is_replaced_by_the_aggregators_time_and_keeps_running():
    clock, fake = clock_at(T - 5 * YEAR)
    clock.observe(issued_at=T, deadline=T + 600)
    assert clock.now() == T
    fake.advance(42)
    assert clock.now() == T + 42
    assert clock.offset() == 5 * YEAR


def test_time_sync_stepping_the_wall_clock_does_not_disturb_the_estimate():
    clock, fake = clock_at(T - 5 * YEAR)
    clock.observe(issued_at=T, deadline=T + 600)
    fake.advance(30)
    fake.wall_value = T + 30  # timesyncd reached its server: the wall clock jumps five years
    assert clock.now() == T + 30
    assert clock.offset() == 0.0


def test_a_synchronised_device_keeps_its_own_clock_even_for_a_task_fetched_late():
    """A device that (re)starts 500 s into a round gets a task issued 500 s ago: its own clock is still right."""
    clock, _ = clock_at(T)
    clock.observe(issued_at=T - 500, deadline=T + 100)
    assert clock.now() == T and clock.offset() == 0.0


def test_a_clock_ahead_is_brought_back_to_the_lower_bound_never_into_the_aggregators_future():
    clock, _ = clock_at(T + YEAR)
    clock.observe(issued_at=T, deadline=T + 600)
    assert clock.now() == T
    assert clock.offset() == -YEAR


def test_an_old_task_fetched_again_does_not_pull_the_estimate_back():
    clock, fake = clock_at(T - 5 * YEAR)
    clock.observe(issued_at=T, deadline=T + 600)  # fresh: arrived through a waiting long-poll
    fake.advance(300)
    clock.observe(issued_at=T, deadline=T + 600)  # the same round again after a network error: 300 s stale
    assert clock.now() == T + 300


def test_a_tighter_bound_from_a_newer_task_wins():
    clock, fake = clock_at(T - 5 * YEAR)
    clock.observe(issued_at=T - 400, deadline=T + 200)  # joined a round 400 s after it opened
    assert clock.now() == T - 400
    fake.advance(100)
    clock.observe(issued_at=T + 100, deadline=T + 700)  # the next round, received as it opened
    assert clock.now() == T + 100


def test_bounds_older_than_an_hour_give_way_to_a_newer_looser_one():
    clock, fake = clock_at(T - 5 * YEAR)
    clock.observe(issued_at=T, deadline=T + 600)
    fake.advance(BOUND_MAX_AGE_SECONDS + 1)
    stale_round = T + BOUND_MAX_AGE_SECONDS - 500
    clock.observe(issued_at=stale_round, deadline=stale_round + 600)
    assert clock.now() == stale_round


def test_an_aggregator_clock_stepped_back_resets_the_bounds():
    clock, fake = clock_at(T - 5 * YEAR)
    clock.observe(issued_at=T, deadline=T + 600)
    fake.advance(10)
    back = T - 86400  # the aggregator's own clock was a day fast and got corrected
    clock.observe(issued_at=back, deadline=back + 600)
    assert clock.now() == back


def test_the_deadline_bound_has_slack_for_the_moment_a_round_takes_to_close():
    clock, _ = clock_at(T + 600 + DEADLINE_SLACK_SECONDS / 2)
    clock.observe(issued_at=T, deadline=T + 600)  # served just after its deadline, before the round closed
    assert clock.offset() == 0.0


# -- a real agent against a real aggregator on loopback ------------------------------------------------------

ADVISORY = Budget(None, 1, None, None, False, True, "test: no cgroup")


@dataclass
class RoundOutcome:
    agent: Agent
    devices: list[str]  # devices whose update the aggregator accepted in round 1
    refused: dict[str, float]  # the aggregator's refusals, by reason


async def run_round_with_device_clock(signed_package, tmp_path: Path, device_offset: float) -> RoundOutcome:
    """Round 1 of a real aggregator (quorum 1) with one agent whose device clock is ``device_offset`` s off."""
    key, package_path = signed_package
    state = tmp_path / "state"
    identity = load_or_create_device_key(state)
    write_aggregator_key(state, key.verify_key)
    (tmp_path / "aggregator").mkdir()
    app = make_app(
        AggregatorConfig(
            state_dir=tmp_path / "aggregator",
            package=load_package_file(package_path, key.verify_key),
            key=key,
            # one round only: with quorum 1, round 2 opens at once and a quick agent finished it too before the
            # checks below (rounds_completed_total 2; seen under load)
            policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=600, max_rounds=1),
            plan=TrainingPlan(epochs=1, batch_size=16),
        )
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    app[SERVICES].registry.enroll([Enrolment(identity.device_id, bytes(identity.verify_key))])
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        f'[aggregator]\nurl = "http://127.0.0.1:{server.port}"\nallow_plain_http = true\npoll_wait_seconds = 1.0\n'
        f'[agent]\nstate_dir = "{state}"\n[metrics]\nlisten = ""\n'
        '[data]\nsource = "synthetic"\nsamples_per_round = 64\n'
    )
    device_clock = AggregatorClock(wall=lambda: time.time() + device_offset)
    agent = Agent(load_config(config_path), budget=ADVISORY, clock=device_clock)
    running = asyncio.create_task(agent.run())

    def settled() -> bool:
        """The round is over for this agent: a receipt, a refusal, a skipped round, or the agent stopped."""
        return bool(
            sample(agent, "fl_agent_rounds_completed_total")
            or sample(agent, "fl_agent_rounds_skipped_total", reason="deadline-passed")
            or agent.outbox.counters.rejected_total
            or running.done()
        )

    deadline = time.monotonic() + 300  # only keeps a broken agent from hanging the run
    try:
        while not settled() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        registry = app[METRICS].registry
        refused = {
            s.labels["reason"]: s.value
            for metric in registry.collect()
            if metric.name == "fl_aggregator_updates_rejected"
            for s in metric.samples
            if s.name.endswith("_total") and s.value
        }
        devices = app[SERVICES].store.round_devices(1)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await server.close()
    return RoundOutcome(agent, devices, refused)


def sample(agent: Agent, name: str, **labels: str) -> float:
    return agent.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_an_agent_whose_clock_is_years_behind_still_completes_a_round(signed_package, tmp_path):
    """A board without a real-time clock, booted with a clock five years old and no time sync."""
    outcome = await run_round_with_device_clock(signed_package, tmp_path, device_offset=-5 * YEAR)
    agent = outcome.agent
    assert outcome.refused == {}, "the aggregator refused the update (expired: stamped with the device clock?)"
    assert outcome.devices == [agent.identity.device_id]
    assert sample(agent, "fl_agent_rounds_completed_total") == 1
    offset = sample(agent, "fl_agent_clock_offset_seconds")
    assert offset == pytest.approx(5 * YEAR, abs=60), "the metric must show how far behind the device clock is"
    assert "behind the aggregator's" in agent.status and "1825.0 days" in agent.status


async def test_an_agent_whose_clock_is_a_year_ahead_does_not_take_the_round_for_over(signed_package, tmp_path):
    """A clock set a year ahead made every deadline look passed: the agent skipped every round."""
    outcome = await run_round_with_device_clock(signed_package, tmp_path, device_offset=YEAR)
    agent = outcome.agent
    assert sample(agent, "fl_agent_rounds_skipped_total", reason="deadline-passed") == 0
    assert outcome.refused == {}
    assert outcome.devices == [agent.identity.device_id]
    assert sample(agent, "fl_agent_clock_offset_seconds") == pytest.approx(-YEAR, abs=60)
    assert "ahead of the aggregator's" in agent.status


async def test_an_agent_with_a_right_clock_reads_an_offset_of_zero(signed_package, tmp_path):
    outcome = await run_round_with_device_clock(signed_package, tmp_path, device_offset=0.0)
    assert outcome.devices == [outcome.agent.identity.device_id]
    assert sample(outcome.agent, "fl_agent_clock_offset_seconds") == 0.0
    assert "clock" not in outcome.agent.status


# -- the first heartbeat of a board whose clock is off ---------------------------------------------------------


async def test_an_agent_restarted_mid_round_with_a_clock_years_behind_is_seen_by_the_fleet_view(tmp_path):
    """A board without a real-time clock reboots after taking part in the open round: no new task comes until the
    next round (which may be an hour away, or never once the rounds are over), so the first heartbeat was stamped
    by the device clock, refused as expired, and the device showed as silent all that time."""
    key = SigningKey.generate()
    app = make_app(AggregatorConfig(state_dir=tmp_path / "aggregator", package=synthetic_package(10), key=key,
                                    policy=RoundPolicy(min_clients=5, goal_clients=5, round_timeout=3600)))
    async with beside_real_aggregator(app, key, tmp_path) as (_, config_path, identity):
        round_id = app[SERVICES].engine.current.round_id
        (tmp_path / "agent" / "agent-state.json").write_text(json.dumps({"last_round": round_id}))
        fleet = app[SERVICES].fleet
        device_clock = AggregatorClock(wall=lambda: time.time() - 5 * YEAR)
        agent = await run_agent(Agent(load_config(config_path), budget=ADVISORY, clock=device_clock),
                                until=lambda a: fleet.entry(a.identity.device_id) is not None, at_most=60)
    entry = fleet.entry(identity.device_id)
    assert entry is not None, "the fleet view never took the restarted device's heartbeat"
    assert abs(entry.report.sent_at - entry.last_seen) < 60, "the heartbeat must be stamped in the aggregator's time"
    assert sample(agent, "fl_agent_aggregator_errors_total", operation="heartbeat") == 0
    assert agent.last_round == round_id, "the round it took part in before the restart is not taken again"
