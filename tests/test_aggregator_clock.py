"""The aggregator's clock stepping, or wrong at start: a board serving as a site aggregator may boot with its clock
at its image's build date and have it stepped by years when time sync succeeds, and any server's clock can be
corrected. Rounds still close, and the fleet view still follows its devices.

The aggregator's clock is moved by replacing the ``time`` module one aggregator module sees (:class:`ShiftedTime`);
the monotonic clock, asyncio's and the devices' clocks stay real.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from aggregator_harness import running
from nacl.signing import SigningKey
from secagg_harness import flat_delta, secure_rounds, secure_running, until_masked
from test_aggregator_tree import site_task, tree
from test_fleet_heartbeat import report

from aggregator import statuspage
from aggregator.fleet import Enrolled, Fleet
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.upstream import UpstreamConfig

YEAR = 365 * 86400.0


class ShiftedTime:
    """The ``time`` module with ``time()`` ``offset`` seconds off (a test moves ``offset`` to step the clock)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def __getattr__(self, name: str):
        return getattr(time, name)


async def wait_until(condition, at_most: float = 60.0) -> None:
    """Poll ``condition()`` until it holds; ``at_most`` only keeps a broken aggregator from hanging the run."""
    deadline = time.monotonic() + at_most
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def set_open_round_times(state: Path, opened_at: float, deadline: float) -> None:
    """What an aggregator stopped mid-round leaves on disk: its open round's opening time and deadline."""
    with sqlite3.connect(state / "aggregator.db") as db:
        db.execute("UPDATE rounds SET opened_at=?, deadline=? WHERE status='open'", (opened_at, deadline))


async def test_a_round_resumed_on_a_clock_years_behind_closes_after_its_length(tmp_path, monkeypatch):
    """Restarted before time sync, with the clock at its build date: the open round's deadline on disk lay years
    ahead of the clock, and the round waited for it (years) unless its goal was reached."""
    policy = RoundPolicy(min_clients=1, goal_clients=3, round_timeout=600)
    async with running(tmp_path, policy=policy) as h:
        task = await h.task()
        assert (await h.upload(h.devices[0].update(task, h.delta())))[0] == 200
    now = time.time()
    set_open_round_times(tmp_path, opened_at=now - 1, deadline=now + 1)  # a round of 2 s, 1 s left
    monkeypatch.setattr("aggregator.rounds.time", ShiftedTime(-5 * YEAR))
    async with running(tmp_path, policy=policy, key=h.key, enrolled=h.devices) as h:
        assert h.engine.current.round_id == task.round_id
        await wait_until(lambda: h.engine.version == 1)
        assert h.engine.version == 1, "the resumed round never closed: it waited for a deadline years ahead"
        assert h.engine.store.get_round(task.round_id).status == "published"


# -- the fleet view ------------------------------------------------------------------------------------------


def test_after_the_aggregators_clock_steps_back_a_year_devices_report_again_and_a_dead_one_shows_silent(tmp_path):
    """The aggregator's clock ran a year ahead and was corrected. Every device's latest report was then from the
    aggregator's future: new reports were refused (409 stale-report, or 429 too-frequent with a Retry-After of a
    year), and a device that had died counted as active for that year, its last heartbeat 'seen 0 s ago'."""
    alive, dead = SimulatedDevice(), SimulatedDevice()
    fleet = Fleet(tmp_path / "fleet.db", lambda: [Enrolled(alive.device_id, "alive"), Enrolled(dead.device_id, "dead")])
    ahead = 1_800_000_000.0
    for device in (alive, dead):
        fleet.accept(report(device, sent_at=int(ahead)), ahead)
    now = ahead - YEAR + 600  # corrected, and 10 minutes on: the alive device has learnt the time from a task
    fleet.accept(report(alive, sent_at=int(now), outbox=3), now)
    assert fleet.entry(alive.device_id).report.outbox == 3
    assert fleet.counts(0, now) | {"enrolled": 2} == {"enrolled": 2, "active": 1, "silent": 1, "behind": 0,
                                                       "throttled": 0, "site_active": 0, "site_silent": 0}
    listing = fleet.listing(0, now)
    rows = {row["name"]: row for row in listing["devices"]}
    assert (rows["alive"]["health"], rows["dead"]["health"]) == ("ok", "silent")
    html = statuspage.render({"model": {"name": "m", "parameters": 1, "version": 0, "digest": "00"},
                              "current_round": None, "rounds": [], "devices": {"enrolled": 2, "revoked": 0, "sites": 0},
                              "aggregator_id": "ab", "strategy": "fedavg"}, listing)  # fmt: skip
    assert html.count("0 s ago") == 1 and html.count("later than the aggregator's clock") == 1  # alive, dead


async def test_a_clock_stepped_forward_past_the_deadline_closes_the_round_then(tmp_path, monkeypatch):
    """Time sync moves the clock of an aggregator that came up at its build date forward by years: the round's
    deadline has passed by the clock its task states it in, and waiting out the rest of its hour on the monotonic
    clock only refused every update meanwhile (stamped before the step: expired)."""
    monkeypatch.setattr("aggregator.rounds.WALL_CLOCK_CHECK_SECONDS", 0.1)
    clock = ShiftedTime()
    monkeypatch.setattr("aggregator.rounds.time", clock)
    async with running(tmp_path, policy=RoundPolicy(min_clients=1, goal_clients=3, round_timeout=3600)) as h:
        task = await h.task()
        assert (await h.upload(h.devices[0].update(task, h.delta())))[0] == 200
        clock.offset = 5 * YEAR
        await wait_until(lambda: h.engine.version == 1)
        assert h.engine.version == 1, "the round stayed open after its deadline had passed by the aggregator's clock"


async def test_a_clock_stepped_back_mid_round_does_not_keep_the_round_open(tmp_path, monkeypatch):
    """The other way: the clock of an aggregator that ran a year ahead is corrected mid-round. The round still
    closes after its length."""
    monkeypatch.setattr("aggregator.rounds.WALL_CLOCK_CHECK_SECONDS", 0.1)
    clock = ShiftedTime()
    monkeypatch.setattr("aggregator.rounds.time", clock)
    async with running(tmp_path, policy=RoundPolicy(min_clients=1, goal_clients=3, round_timeout=2)) as h:
        task = await h.task()
        assert (await h.upload(h.devices[0].update(task, h.delta())))[0] == 200
        clock.offset = -YEAR
        await wait_until(lambda: h.engine.version == 1)
        assert h.engine.version == 1, "the round waited for its deadline a year ahead of the corrected clock"


# -- a site and its parent -----------------------------------------------------------------------------------


async def test_a_site_whose_clock_runs_years_ahead_of_its_citys_still_answers_the_citys_rounds(tmp_path, monkeypatch):
    """A site judged the city's deadline by its own clock: a year ahead (or five), every city round looked over
    and was skipped ('closes too soon'); years behind, its forwards were stamped in the past and refused 'expired'.
    It now works in the city's time as learnt from the city's tasks, as an agent does."""
    monkeypatch.setattr("aggregator.upstream.time", ShiftedTime(5 * YEAR))  # the site's clock, toward its parent
    async with tree(tmp_path) as (city, sites):
        for site in sites:
            task = await site_task(site, 0)
            for device in site.devices:
                assert (await site.upload(device.update(task, site.delta())))[0] == 200
        await wait_until(lambda: city.engine.version == 1)
        assert city.engine.version == 1
        assert city.engine.store.get_round(1).participants == 2
        assert city.rejected("expired") == 0


async def test_a_site_restarted_mid_round_with_its_clock_years_off_still_forwards_its_resumed_round(tmp_path,
                                                                                                   monkeypatch):
    """The site's half of an agent restarted mid-round: a site board reboots with its clock years off while its round
    (answering the city's open round) is open. The city opens no new round until that one closes, so the site saw no
    city task before its resumed round forwarded: the forward was stamped by the site's own clock, refused
    'expired', signed anew by the same clock, refused again, and the round with its devices' updates abandoned."""
    city_key, site_key = SigningKey.generate(), SigningKey.generate()
    devices = [SimulatedDevice(), SimulatedDevice()]
    site_policy = RoundPolicy(min_clients=1, goal_clients=2, round_timeout=600)
    async with running(tmp_path / "city", key=city_key, enrolled=[SimulatedDevice(key=site_key)],
                       policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=600)) as city:
        upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
        async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                           policy=site_policy) as site:
            task = await site_task(site, 0)
            assert (await site.upload(devices[0].update(task, site.delta())))[0] == 200
        monkeypatch.setattr("aggregator.upstream.time", ShiftedTime(5 * YEAR))  # the site's clock, toward its parent
        async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                           policy=site_policy) as site:
            assert (await site.upload(devices[1].update(task, site.delta())))[0] == 200
            await wait_until(lambda: city.engine.version == 1 or site.engine.store.get_round(1).status != "open")
            assert site.engine.store.get_round(1).status == "published", site.engine.store.get_round(1).note
            assert city.engine.version == 1 and city.engine.store.get_round(1).samples > 0
            assert city.rejected("expired") == 0


# -- a secure round ------------------------------------------------------------------------------------------


async def test_a_secure_round_resumed_in_its_advertise_phase_on_a_clock_years_behind_waits_one_phase_timeout(
        tmp_path, monkeypatch):
    """Restarted before time sync in the advertise phase: the phase's deadline on disk lay years ahead of the clock,
    so no roster came until the round closed at the end of its length, abandoned ('the round's deadline passed in
    the advertise phase'), though two devices had advertised. The phase now waits --secagg-phase-timeout at most."""
    async with secure_running(tmp_path, devices=3, round_timeout=600, phase_timeout=60) as h:
        task = await h.task()
        rounds = secure_rounds(h, task)
        await asyncio.gather(*(secure_round.advertise() for secure_round in rounds[:2]))
    behind = ShiftedTime(-5 * YEAR)
    monkeypatch.setattr("aggregator.secagg_round.time", behind)
    monkeypatch.setattr("aggregator.rounds.time", behind)
    async with secure_running(tmp_path, devices=3, round_timeout=600, phase_timeout=1, key=h.key,
                              enrolled=h.devices) as h:
        await wait_until(lambda: h.engine.secure.current.roster is not None)
        assert h.engine.secure.current.roster is not None, "no roster: the phase waited for its deadline years ahead"
        assert len(h.engine.secure.current.roster.device_ids) == 2


async def test_a_secure_round_resumed_in_its_unmask_phase_on_a_clock_years_behind_waits_one_phase_timeout(
        tmp_path, monkeypatch):
    """Restarted before time sync in the unmask phase: that phase's deadline on disk lay years ahead of the clock,
    and the aggregator waited for it (years) for answers that never came, the round neither published nor
    abandoned and no round opening after it. It waits --secagg-phase-timeout, as after any restart in that phase."""
    async with secure_running(tmp_path, devices=3, round_timeout=600, phase_timeout=60) as h:
        task = await h.task()
        rounds = secure_rounds(h, task)
        await until_masked(rounds)
        for secure_round in rounds:
            assert (await h.upload(secure_round.masked_input(flat_delta(h), 10)))[0] == 200
        await wait_until(lambda: h.engine.secure.current.phase == "unmask")
        assert h.engine.secure.current.phase == "unmask"
    behind = ShiftedTime(-5 * YEAR)
    monkeypatch.setattr("aggregator.secagg_round.time", behind)
    monkeypatch.setattr("aggregator.rounds.time", behind)
    async with secure_running(tmp_path, devices=3, round_timeout=600, phase_timeout=1, key=h.key,
                              enrolled=h.devices) as h:
        await wait_until(lambda: h.engine.store.get_round(task.round_id).status != "open")
        record = h.engine.store.get_round(task.round_id)
        assert record.status == "abandoned", "the resumed unmask phase waited for its deadline years ahead"
        assert "shares" in record.note, record.note
