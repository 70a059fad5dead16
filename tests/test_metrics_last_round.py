"""When did the last round complete? Both sides say so in a gauge an alert can compare with time():
``fl_aggregator_last_round_timestamp_seconds{outcome}`` and, on each device,
``fl_agent_last_round_timestamp_seconds`` (the time in the receipt of its last acknowledged update). Both are
set again from durable state when the process restarts, so an alert does not fire because a process restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from nacl.signing import SigningKey

from aggregator.app import METRICS, SERVICES, AggregatorConfig, make_app
from aggregator.metrics import AggregatorMetrics
from aggregator.models import load_package_file
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy, TrainingPlan
from appliance import wire
from appliance.agent import Agent
from appliance.budget import Budget
from appliance.config import load_config
from appliance.identity import load_or_create_device_key, write_aggregator_key
from appliance.metrics import AgentMetrics

REPO = Path(__file__).resolve().parent.parent
ADVISORY = Budget(None, 1, None, None, False, True, "test: no cgroup")


def aggregator_config(tmp_path: Path, key: SigningKey, package_path: Path) -> AggregatorConfig:
    return AggregatorConfig(
        state_dir=tmp_path / "aggregator",
        package=load_package_file(package_path, key.verify_key),
        key=key,
        policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=600),
        plan=TrainingPlan(epochs=1, batch_size=16),
    )


def gauge(registry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_both_sides_say_when_the_last_round_completed_and_remember_it_across_restarts(
    signed_package, tmp_path
):
    key, package_path = signed_package
    state = tmp_path / "state"
    identity = load_or_create_device_key(state)
    write_aggregator_key(state, key.verify_key)
    (tmp_path / "aggregator").mkdir()
    app = make_app(aggregator_config(tmp_path, key, package_path))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    aggregator_metrics = app[METRICS].registry
    assert gauge(aggregator_metrics, "fl_aggregator_last_round_timestamp_seconds", outcome="published") == 0
    app[SERVICES].registry.enroll([Enrolment(identity.device_id, bytes(identity.verify_key))])
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        f'[aggregator]\nurl = "http://127.0.0.1:{server.port}"\nallow_plain_http = true\npoll_wait_seconds = 1.0\n'
        f'[agent]\nstate_dir = "{state}"\n[metrics]\nlisten = ""\n'
        '[data]\nsource = "synthetic"\nsamples_per_round = 64\n'
    )
    agent = Agent(load_config(config_path), budget=ADVISORY)
    assert gauge(agent.metrics.registry, "fl_agent_last_round_timestamp_seconds") == 0
    running = asyncio.create_task(agent.run())
    store = app[SERVICES].store

    def round_one_published() -> bool:
        closed = store.get_round(1)
        return bool(agent.metrics.registry.get_sample_value("fl_agent_rounds_completed_total")
                    and closed is not None and closed.status == "published")

    deadline = time.monotonic() + 300  # only keeps a broken agent from hanging the run
    try:
        while not round_one_published() and not running.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    try:
        assert round_one_published(), "round 1 was not published"
        # The agent may have completed round 2 too before it was stopped: the gauges name the *last* round.
        rounds = [store.get_round(r) for r in range(1, store.last_round_id() + 1)]
        published = [r for r in rounds if r is not None and r.status == "published"]
        receipts = [wire.decode_receipt(store.receipt_for(u.digest), key.verify_key)
                    for r in rounds if r is not None for u in store.round_updates(r.round_id)]
        agent_seen = gauge(agent.metrics.registry, "fl_agent_last_round_timestamp_seconds")
        assert agent_seen == max(receipt.accepted_at for receipt in receipts) > 0
        closed_at = max(r.closed_at for r in published)
        assert gauge(aggregator_metrics, "fl_aggregator_last_round_timestamp_seconds", outcome="published") == closed_at
        assert gauge(aggregator_metrics, "fl_aggregator_last_round_timestamp_seconds", outcome="abandoned") == 0
    finally:
        await server.close()

    restarted_agent = Agent(load_config(config_path), budget=ADVISORY)
    restarted_agent.sandbox.close()
    assert gauge(restarted_agent.metrics.registry, "fl_agent_last_round_timestamp_seconds") == agent_seen

    restarted = make_app(aggregator_config(tmp_path, key, package_path))
    server = TestServer(restarted, host="127.0.0.1")
    await server.start_server()
    try:
        registry = restarted[METRICS].registry
        assert gauge(registry, "fl_aggregator_last_round_timestamp_seconds", outcome="published") == closed_at
        assert gauge(registry, "fl_aggregator_last_round_timestamp_seconds", outcome="abandoned") == 0
    finally:
        await server.close()


def test_the_alert_rules_the_docs_show_are_valid_and_name_exported_series(tmp_path):
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    docs = (REPO / "docs" / "metrics.md").read_text()
    (rules,) = [block for block in re.findall(r"```yaml\n(.*?)```", docs, re.S) if block.startswith("groups:")]
    path = tmp_path / "rules.yml"
    path.write_text(rules)
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    exported = {m.name for registry in (AgentMetrics().registry, AggregatorMetrics().registry)
                for m in registry.collect()}
    named = set(re.findall(r"\b(fl_(?:agent|aggregator)_[a-z_]+)", rules))
    assert named and all(n in exported or n.removesuffix("_total") in exported for n in named), named - exported
