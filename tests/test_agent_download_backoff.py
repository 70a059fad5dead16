"""A model release whose download is cut mid-way (a connection reset, a timeout: a network fault, not a refusal) is
downloaded again from its start on each retry: up to 64 MiB a try, on a cellular link. The retry went down the
failed-poll path, whose count the poll that brought the task had just reset, so the agent downloaded the release
about once a second. Failed downloads of the same task now back off as refusals do (appliance/refusal_backoff.py),
while a newer task is still taken at once.

Time is a fake clock that moves 30 s with each poll for a task, so the counts do not depend on the machine's speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_harness import ADVISORY, FakeAggregator, agent_config, enrolled_state, on_loopback, run_agent, sample
from aiohttp import web

from appliance import agent as agent_module
from appliance.agent import Agent
from appliance.config import load_config
from appliance.refusal_backoff import RefusalBackoff

SECONDS_PER_POLL = 30.0
POLLS = 40
# As for refusals (tests/test_agent_refusal_backoff.py): each wait at least half its ceiling, at most 13 downloads.
MOST_DOWNLOADS = 13


@pytest.fixture
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "POLL_MIN_SECONDS", 0.02)


async def _run(fake: FakeAggregator, tmp_path: Path, until, app: web.Application | None = None) -> Agent:
    fake.poll_seconds = 0.02  # a poll for a round the fake does not serve: 204 at once
    async with on_loopback(app or fake.app()) as url:
        state = tmp_path / "state"
        identity = enrolled_state(state, fake.key.verify_key)
        fake.device_keys = {identity.device_id: identity.verify_key}
        agent = Agent(load_config(agent_config(tmp_path / "agent.toml", url, state)), budget=ADVISORY)
        agent.refusal_backoff = RefusalBackoff(now=lambda: SECONDS_PER_POLL * len(fake.polls))
        return await run_agent(agent, until, at_most=120)


async def test_a_release_download_cut_mid_way_is_tried_again_less_and_less_often(signed_package, tmp_path,
                                                                                 quick_polls):
    key, path = signed_package
    fake = FakeAggregator(key, path)
    fake.cut_release = True
    agent = await _run(fake, tmp_path, until=lambda agent: len(fake.polls) >= POLLS)
    assert len(fake.polls) >= POLLS
    assert fake.release_downloads >= 6
    assert fake.release_downloads <= MOST_DOWNLOADS, (
        f"{fake.release_downloads} cut downloads of the release in {len(fake.polls)} polls")
    assert agent.status.startswith("aggregator unreachable; retry in "), agent.status
    assert sample(agent, "fl_agent_models_refused_total", {"reason": "digest-mismatch"}) == 0
    assert agent.last_round == 0 and not fake.updates


async def test_a_newer_round_is_taken_at_once_while_failed_downloads_back_off(signed_package, tmp_path, quick_polls):
    key, path = signed_package
    fake = FakeAggregator(key, path)
    fake.cut_release = True
    opened_at: list[int] = []

    def cut_then_newer_round(agent: Agent) -> bool:
        if not opened_at and fake.release_downloads >= 9:
            fake.round_id, fake.cut_release = 2, False  # the failed round now waits at least 128 s: four polls or more
            opened_at.append(len(fake.polls))
        return sample(agent, "fl_agent_updates_delivered_total") >= 1

    agent = await _run(fake, tmp_path, until=cut_then_newer_round)
    assert opened_at, "the release download was never cut nine times"
    assert agent.last_round == 2 and len(fake.updates) == 1
    polls_to_take = fake.first_served[2] - opened_at[0]
    assert polls_to_take <= 1, f"round 2 asked for {polls_to_take} polls after it opened"
    assert agent.status == "waiting for round > 2", agent.status


@pytest.mark.parametrize("unpublished", ["models", "packages"])
async def test_a_model_the_aggregator_has_not_published_is_named_in_the_status(signed_package, tmp_path, quick_polls,
                                                                               unpublished):
    """A 404 for the model version or the package a task names (a publication the aggregator is still retrying)
    read "aggregator unreachable", and sent the operator looking at the network while the aggregator answered."""
    key, path = signed_package
    fake = FakeAggregator(key, path)
    asked: list[str] = []

    @web.middleware
    async def not_published(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith(f"/v1/{unpublished}/"):
            asked.append(request.path)
            return web.json_response({"reason": "unknown-version", "detail": "not published"}, status=404)
        return await handler(request)

    app = fake.app()
    app.middlewares.append(not_published)
    agent = await _run(fake, tmp_path, until=lambda agent: len(asked) >= 2, app=app)
    assert len(asked) >= 2
    what = "model version 0" if unpublished == "models" else f"package {fake.package.digest.hex()}"
    assert agent.status.startswith(f"the aggregator has no {what}; retry in "), agent.status
    assert agent.last_round == 0 and not fake.updates
