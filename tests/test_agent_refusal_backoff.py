"""A model release the agent refuses (here: a byte of it flipped, a digest mismatch) is downloaded again on each retry
of its round: up to 64 MiB a try, on a cellular link the device's whole data plan. The retry counter was reset by
every poll that answered, so the agent downloaded the refused release about once a second. Refusals of the same task
now back off (appliance/refusal_backoff.py), while a newer task is still taken at once.

Time is a fake clock that moves 30 s with each poll for a task, so the counts do not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from agent_harness import ADVISORY, FakeAggregator, agent_config, enrolled_state, on_loopback, run_agent, sample
from aiohttp import web

from appliance import agent as agent_module
from appliance.agent import Agent
from appliance.config import load_config
from appliance.outbox import Backoff
from appliance.refusal_backoff import RefusalBackoff

SECONDS_PER_POLL = 30.0
POLLS = 40
# Each wait is at least half its ceiling (0.5, 1, 2 ... 128 s, then 150 s): at 30 s a poll, the first six refusals
# come on six polls in a row, then 2, 3, 5, 5, 5 ... polls apart: at most 13 downloads in 40 polls.
MOST_DOWNLOADS = 13


@pytest.fixture
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "POLL_MIN_SECONDS", 0.02)


async def _run(fake: FakeAggregator, tmp_path: Path, until, app: web.Application | None = None,
               backoff: RefusalBackoff | None = None, poll_wait: float | None = None) -> Agent:
    fake.poll_seconds = 0.02  # a poll for a round the fake does not serve: 204 at once
    async with on_loopback(app or fake.app()) as url:
        state = tmp_path / "state"
        identity = enrolled_state(state, fake.key.verify_key)
        fake.device_keys = {identity.device_id: identity.verify_key}
        config = agent_config(tmp_path / "agent.toml", url, state)
        if poll_wait is not None:
            config.write_text(config.read_text().replace("poll_wait_seconds = 1.0", f"poll_wait_seconds = {poll_wait}"))
        agent = Agent(load_config(config), budget=ADVISORY)
        agent.refusal_backoff = backoff or RefusalBackoff(now=lambda: SECONDS_PER_POLL * len(fake.polls))
        return await run_agent(agent, until, at_most=120)


async def test_a_refused_release_is_downloaded_again_less_and_less_often(signed_package, tmp_path, quick_polls):
    key, path = signed_package
    fake = FakeAggregator(key, path, tamper=True)
    agent = await _run(fake, tmp_path, until=lambda agent: len(fake.polls) >= POLLS)
    assert len(fake.polls) >= POLLS
    refusals = sample(agent, "fl_agent_models_refused_total", {"reason": "digest-mismatch"})
    assert refusals == fake.release_downloads >= 6
    assert fake.release_downloads <= MOST_DOWNLOADS, (
        f"{fake.release_downloads} downloads of the refused release in {len(fake.polls)} polls")
    assert agent.status.startswith("refused the model from the aggregator: digest-mismatch"), agent.status
    assert agent.last_round == 0 and not fake.updates


async def test_a_newer_round_is_taken_at_once_while_a_refusal_backs_off(signed_package, tmp_path, quick_polls):
    key, path = signed_package
    fake = FakeAggregator(key, path, tamper=True)
    genuine = FakeAggregator(key, path).release
    opened_at: list[int] = []

    def refused_then_newer_round(agent: Agent) -> bool:
        if not opened_at and sample(agent, "fl_agent_models_refused_total", {"reason": "digest-mismatch"}) >= 9:
            fake.round_id, fake.release = 2, genuine  # the refusal now waits at least 128 s: four polls or more
            opened_at.append(len(fake.polls))
        return sample(agent, "fl_agent_updates_delivered_total") >= 1

    agent = await _run(fake, tmp_path, until=refused_then_newer_round)
    assert opened_at, "the release was never refused nine times"
    assert agent.last_round == 2 and len(fake.updates) == 1
    polls_to_take = fake.first_served[2] - opened_at[0]
    assert polls_to_take <= 1, f"round 2 asked for {polls_to_take} polls after it opened"


async def test_a_refused_round_that_closes_leaves_the_status_waiting_for_the_next_round(signed_package, tmp_path,
                                                                                         quick_polls):
    """Once the refused round is over (the aggregator answers with no round open), the status no longer says a
    retry of it is coming: it read "refused the model ...; retry in 1 s" until the next round opened, hours later."""
    key, path = signed_package
    fake = FakeAggregator(key, path, tamper=True)
    closed_at: list[int] = []

    @web.middleware
    async def round_closes_after_the_refusal(request: web.Request, handler) -> web.StreamResponse:
        if closed_at and request.path == "/v1/task":
            fake.polls.append(time.monotonic())  # the fake clock moves with the polls
            return web.Response(status=204)
        return await handler(request)

    def refused_then_closed(agent: Agent) -> bool:
        if not closed_at and sample(agent, "fl_agent_models_refused_total", {"reason": "digest-mismatch"}) >= 1:
            closed_at.append(len(fake.polls))
        return bool(closed_at) and len(fake.polls) >= closed_at[0] + 4

    app = fake.app()
    app.middlewares.append(round_closes_after_the_refusal)
    agent = await _run(fake, tmp_path, until=refused_then_closed, app=app)
    assert closed_at and len(fake.polls) >= closed_at[0] + 4
    assert agent.status == "waiting for round > 0", agent.status


async def test_a_refused_round_is_taken_up_again_when_its_wait_ends_not_when_the_long_poll_does(signed_package,
                                                                                                 tmp_path):
    """While a refusal's wait runs the agent long-polls for a newer round; that poll ends with the wait. It lasted the
    whole poll wait (30 s by default, 10 minutes here) whatever the refusal's wait, so a release the aggregator
    fixed meanwhile was taken that much later than the status's "retry in 2 s" said (here: never, in the test's
    time)."""
    key, path = signed_package
    fake = FakeAggregator(key, path, tamper=True)
    genuine = FakeAggregator(key, path).release
    over = asyncio.Event()

    @web.middleware
    async def long_polls_as_asked(request: web.Request, handler) -> web.StreamResponse:
        if request.path == "/v1/task" and int(request.query.get("after", "0")) >= fake.round_id:
            fake.polls.append(time.monotonic())
            with contextlib.suppress(TimeoutError):  # no newer round opens: 204 when the wait (or the test) ends
                await asyncio.wait_for(over.wait(), float(request.query["wait"]))
            return web.Response(status=204)
        return await handler(request)

    def refused_then_fixed(agent: Agent) -> bool:
        if sample(agent, "fl_agent_models_refused_total", {"reason": "digest-mismatch"}) >= 1:
            fake.release = genuine  # the aggregator publishes a sound release of the same round
        if sample(agent, "fl_agent_updates_delivered_total") >= 1:
            over.set()
        return over.is_set()

    app = fake.app()
    app.middlewares.append(long_polls_as_asked)
    # A first refusal's wait of 2 s: past the agent's 1 s between polls, so the next poll is made while it runs.
    backoff = RefusalBackoff(Backoff(base=4.0, cap=300.0), rng=lambda: 0.0)
    agent = await _run(fake, tmp_path, until=refused_then_fixed, app=app, backoff=backoff, poll_wait=600)
    assert agent.last_round == 1 and len(fake.updates) == 1
