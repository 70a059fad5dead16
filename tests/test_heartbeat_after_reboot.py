"""A board without a real-time clock that reboots mid-round is seen by the fleet view at once, not when the next
round opens.

After the reboot the agent's estimate of the aggregator's time is the open round's ``issued_at`` plus the time since
start, behind by the round's age; a heartbeat it sent before the reboot, after the round opened, is newer than any it
can stamp, and the fleet view refused them all (409 ``stale-report``) until the next round. The refusal now names the
held report's ``sent_at`` and the agent stamps its heartbeats after it (appliance/heartbeat_stamps.py), within a
bound a hostile or buggy answer cannot push past, and without moving the clock it judges deadlines by.

The loopback test moves the aggregator's clock by replacing the ``time`` module two aggregator modules see
(:class:`ShiftedTime`), so that the round it opened at start opened 30 minutes ago by that clock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from agent_harness import (
    ADVISORY,
    FakeAggregator,
    beside_real_aggregator,
    run_agent,
    run_agent_against,
    sample,
    small_package,
)
from aiohttp import web
from nacl.signing import SigningKey
from test_aggregator_clock import ShiftedTime

from aggregator.app import SERVICES, AggregatorConfig, make_app
from aggregator.rounds import RoundPolicy
from aggregator.simulate import synthetic_package
from appliance import __version__
from appliance.agent import Agent
from appliance.client import held_sent_at
from appliance.clock import AggregatorClock
from appliance.config import load_config
from appliance.heartbeat_stamps import REPORT_AHEAD_SECONDS, HeartbeatStamps
from appliance.protocol.heartbeat import Heartbeat, decode_heartbeat

YEAR = 365 * 86400.0
ROUND_AGE = 1800.0  # the open round opened this long ago when the board reboots
LAST_REPORT_AGE = 120.0  # its last heartbeat before the reboot arrived this long ago


def before_reboot(device_id: str, round_id: int, sent_at: int) -> Heartbeat:
    """The heartbeat the device sent before it rebooted (an agent version the restarted one does not have)."""
    return Heartbeat(device_id=device_id, agent_version="before-reboot", model_version=None, last_round=round_id,
                     cameras=0, memory=0, memory_max=0, cpu_max=0, cpu_throttled=0, oom_retries=0, outbox=0,
                     outbox_bytes=0, sent_at=sent_at)


async def test_a_board_rebooted_mid_round_after_reporting_in_it_is_seen_at_once(tmp_path, monkeypatch):
    key = SigningKey.generate()
    app = make_app(AggregatorConfig(state_dir=tmp_path / "aggregator", package=synthetic_package(10), key=key,
                                    policy=RoundPolicy(min_clients=5, goal_clients=5, round_timeout=3600)))
    async with beside_real_aggregator(app, key, tmp_path) as (_, config_path, identity):
        shifted = ShiftedTime(ROUND_AGE)  # the round opened at start: by the aggregator's clock, 30 minutes ago
        monkeypatch.setattr("aggregator.app.time", shifted)
        monkeypatch.setattr("aggregator.rounds.time", shifted)
        round_id = app[SERVICES].engine.current.round_id  # it took part in the open round before it rebooted
        (tmp_path / "agent" / "agent-state.json").write_text(json.dumps({"last_round": round_id}))
        fleet = app[SERVICES].fleet
        reported = shifted.time() - LAST_REPORT_AGE  # the device's heartbeat before it rebooted
        fleet.accept(before_reboot(identity.device_id, round_id, int(reported)), reported)
        held = fleet.entry(identity.device_id)
        device_clock = AggregatorClock(wall=lambda: time.time() - 5 * YEAR)  # no real-time clock, no time sync
        agent = await run_agent(Agent(load_config(config_path), budget=ADVISORY, clock=device_clock),
                                until=lambda a: fleet.entry(identity.device_id) is not held, at_most=60)
        aggregator_now = shifted.time()
    entry = fleet.entry(identity.device_id)
    assert entry is not held, "the fleet view refused the restarted device's heartbeats (stale-report)"
    assert entry.report.sent_at == int(reported) + 1, "stamped just after the report held"
    assert entry.report.agent_version == __version__, "the report taken is the restarted agent's"
    assert sample(agent, "fl_agent_aggregator_errors_total", {"operation": "heartbeat"}) == 0
    assert agent.clock.now() < aggregator_now - ROUND_AGE / 2, (
        "the refusal must move only the heartbeats' stamps, never the clock that judges deadlines and stamps updates"
    )


class RefusingAggregator(FakeAggregator):
    """Serves task 1 and refuses the first heartbeat as ``stale-report`` naming ``held_sent_at``; refuses later ones
    stamped more than 300 s ahead of its clock as ``expired``, as the real fleet view does, and takes the rest."""

    def __init__(self, key: SigningKey, package_path: Path, held_sent_at: int):
        super().__init__(key, package_path)
        self.held_sent_at = held_sent_at
        self.stamps: list[int] = []  # sent_at of every heartbeat received

    def app(self) -> web.Application:
        async def heartbeat(request: web.Request) -> web.Response:
            sent_at = decode_heartbeat(await request.read(), self.device_keys.get).sent_at
            self.stamps.append(sent_at)
            if len(self.stamps) == 1:
                problem = {"reason": "stale-report", "detail": "not after the report held",
                           "held_sent_at": self.held_sent_at}
                return web.json_response(problem, status=409, content_type="application/problem+json")
            if sent_at > time.time() + 300:
                return web.json_response({"reason": "expired", "detail": "ahead"}, status=422,
                                         content_type="application/problem+json")
            return web.Response(status=204)

        app = super().app()
        app.router.add_post("/v1/heartbeat", heartbeat)
        return app


@pytest.mark.parametrize("held_ahead", [2**40, 300 + 60 + 300], ids=["past-the-bound", "within-the-bound"])
async def test_a_refusal_naming_a_report_far_ahead_never_leaves_the_stamps_there(tmp_path, held_ahead):
    """A hostile or buggy aggregator names a held report far in the future. Past the bound (the task's deadline, plus
    a minute, plus the 300 s the fleet view allows ahead) it is not followed; within it, the heartbeat stamped after
    it is refused ``expired``, and the next one is stamped by the clock again."""
    key = SigningKey.generate()
    now = int(time.time())  # the fake's task: issued now, its deadline 300 s on
    fake = RefusingAggregator(key, small_package(tmp_path / "small.flpkg", key),
                              held_sent_at=min(now + held_ahead, 2**40))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "agent-state.json").write_text(json.dumps({"last_round": 1}))  # no round to train in
    errors = {"operation": "heartbeat"}
    agent = await run_agent_against(fake, tmp_path, at_most=60,
                                    until=lambda a: sample(a, "fl_agent_aggregator_errors_total", errors) >= 1)
    assert sample(agent, "fl_agent_aggregator_errors_total", errors) == 1
    assert fake.stamps[0] <= time.time()
    if held_ahead == 2**40:
        assert len(fake.stamps) == 1, "a held_sent_at past the bound must not be followed"
    else:
        assert fake.stamps[1:] == [fake.held_sent_at + 1], "followed once: sent again once"
    assert agent.heartbeat_stamps.stamp() <= agent.clock.now() + 1, "the next heartbeat is stamped by the clock"


# -- the stamps, on fake clocks --------------------------------------------------------------------------------

T = 1_800_000_000.0  # the aggregator's time when the round opened


class FakeMonotonic:
    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


def rebooted_mid_round() -> tuple[HeartbeatStamps, AggregatorClock, FakeMonotonic]:
    """An agent started 30 minutes into a round of an hour, on a board whose clock is years behind."""
    mono = FakeMonotonic()
    clock = AggregatorClock(wall=lambda: T - 5 * YEAR, monotonic=mono)
    clock.observe(issued_at=T, deadline=T + 3600)
    return HeartbeatStamps(clock, monotonic=mono), clock, mono


def test_a_refusal_naming_the_held_report_moves_the_stamps_after_it_and_they_run_on():
    stamps, clock, mono = rebooted_mid_round()
    held = int(T + ROUND_AGE - LAST_REPORT_AGE)
    assert stamps.stamp() == T
    assert stamps.after_stale(held) is True
    assert stamps.stamp() == held + 1
    mono.value += 300  # the next heartbeat, 5 minutes later: after the one taken
    assert stamps.stamp() == held + 1 + 300
    assert clock.now() == T + 300, "the clock is not moved"


def test_a_held_sent_at_past_what_the_tasks_allow_is_not_followed():
    """The signed task bounds the aggregator's time by its deadline: a report the aggregator holds is at most
    REPORT_AHEAD_SECONDS past that. A larger held_sent_at (a hostile or buggy answer) is ignored."""
    stamps, _, _ = rebooted_mid_round()
    latest = T + 3600 + 60  # the deadline and the slack a round takes to close
    assert stamps.after_stale(2**40) is False
    assert stamps.after_stale(int(latest + REPORT_AHEAD_SECONDS) + 1) is False
    assert stamps.stamp() == T
    assert stamps.after_stale(int(latest + REPORT_AHEAD_SECONDS)) is True  # the most it follows


def test_stamps_the_aggregator_refuses_as_too_far_ahead_go_back_to_the_clock():
    """A floor that was wrong (within the bound, but ahead of the aggregator's clock) lasts until the aggregator
    refuses a heartbeat stamped from it: never for good."""
    stamps, _, mono = rebooted_mid_round()
    assert stamps.after_stale(int(T + 3600)) is True
    stamps.after_expired()
    assert stamps.stamp() == T
    mono.value += 300
    assert stamps.stamp() == T + 300


def test_before_any_task_a_refusal_is_not_followed():
    """Without a signed task nothing bounds the answer: the stamps stay the device clock's."""
    clock = AggregatorClock(wall=lambda: T)
    stamps = HeartbeatStamps(clock)
    assert stamps.after_stale(int(T + 60)) is False


def test_a_held_report_before_the_stamp_moves_nothing():
    stamps, _, _ = rebooted_mid_round()
    assert stamps.after_stale(int(T) - 10) is False
    assert stamps.stamp() == T


@pytest.mark.parametrize("answer, expected", [
    (b'{"reason": "stale-report", "held_sent_at": 1800001680}', 1800001680),
    (b'{"reason": "stale-report"}', None),
    (b'{"reason": "stale-report", "held_sent_at": "1800001680"}', None),
    (b'{"reason": "stale-report", "held_sent_at": 1.8e9}', None),
    (b'{"reason": "stale-report", "held_sent_at": true}', None),
    (b'{"reason": "stale-report", "held_sent_at": -1}', None),
    (b'{"reason": "stale-report", "held_sent_at": 1099511627777}', None),
    (b"[1, 2]", None),
    (b"not json", None),
])
def test_held_sent_at_is_read_only_from_a_well_formed_answer(answer, expected):
    assert held_sent_at(answer) == expected
