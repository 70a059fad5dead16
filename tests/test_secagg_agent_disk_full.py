"""A full or read-only data partition in a secure round skips the round, as in a plain one (test_agent_disk_full.py).

A secure round stores two things (appliance/agent.py, ``_secure_round``): the round as taken, before its secrets
exist (a restart must not rejoin it), and the signed masked input, into the outbox. When the partition refuses
either, the agent gives the round up in one log line, counts it in ``fl_agent_storage_errors_total`` and
``fl_agent_rounds_skipped_total``, leaves nothing half-written and waits for the next round. Real agents (training
stubbed) against a real secure aggregator on loopback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

import pytest
from agent_harness import run_agent, sample, small_package
from nacl.signing import SigningKey
from secagg_harness import make_agent, secure_aggregator
from storage_faults import FullDirectory, trained

from aggregator.app import SERVICES
from appliance import secagg_client
from appliance.agent import STATE_FILE, Agent


def agent_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fl_agent" and r.levelno >= logging.ERROR]


def skipped(agent: Agent, reason: str) -> bool:
    return sample(agent, "fl_agent_rounds_skipped_total", {"reason": reason}) >= 1


async def test_a_secure_round_that_cannot_be_saved_as_taken_is_skipped_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The round's secrets live in memory only, so it is saved as taken before it starts; a state that cannot be
    saved skips the round before the device advertises its keys."""
    key = SigningKey.generate()
    package = small_package(tmp_path / "small.flpkg", key)
    monkeypatch.setattr(Agent, "_train", trained)
    async with secure_aggregator(tmp_path, key, package, devices=2, min_clients=2) as client:
        url = str(client.server.make_url("")).rstrip("/")
        agent = make_agent(tmp_path, "agent", url, key, client)
        state = agent.state_dir
        monkeypatch.setattr(os, "fsync", FullDirectory(state, matches=lambda path: STATE_FILE in path))
        with caplog.at_level(logging.INFO, logger="fl_agent"):
            try:
                await run_agent(agent, lambda a: skipped(a, "disk-full"), at_most=120)
            finally:
                agent.sandbox.close()
        secure = client.server.app[SERVICES].engine.secure
        advertised = secure.current.advertised if secure.current is not None else {}

    assert agent_errors(caplog) == [
        f"round 1: cannot store the agent's state in {state}: {os.strerror(errno.ENOSPC)}; skipping the round"
    ]
    assert sample(agent, "fl_agent_storage_errors_total", {"reason": "disk-full"}) == 1
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "disk-full"}) == 1
    assert agent.identity.device_id not in advertised  # it never took part
    assert agent.last_round == 1 and not (state / STATE_FILE).exists()


@pytest.mark.parametrize(("error", "reason"), [(errno.ENOSPC, "disk-full"), (errno.EROFS, "read-only")])
async def test_a_masked_input_the_outbox_cannot_store_skips_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: int, reason: str
) -> None:
    """Two agents in a secure round; one's outbox refuses its masked input after it advertised, shared and trained:
    that round is given up in one line and counted, nothing of the masked input is left in its outbox, and the
    agent goes on (the other's masked input is queued as usual)."""
    key = SigningKey.generate()
    package = small_package(tmp_path / "small.flpkg", key)
    monkeypatch.setattr(Agent, "_train", trained)
    # The other agent long-polls for the unmask request when it is stopped; the aggregator answers that poll
    # before it closes: a short one.
    monkeypatch.setattr(secagg_client, "POLL_SECONDS", 1.0)
    async with secure_aggregator(tmp_path, key, package, devices=2, min_clients=2) as client:
        url = str(client.server.make_url("")).rstrip("/")
        full, fine = (make_agent(tmp_path, name, url, key, client) for name in ("full", "fine"))
        outbox = full.outbox.directory
        disk = FullDirectory(outbox, error)
        monkeypatch.setattr(os, "fsync", disk)
        with caplog.at_level(logging.INFO, logger="fl_agent"):
            try:
                await asyncio.gather(*(run_agent(a, lambda _: skipped(full, reason), at_most=120)
                                       for a in (full, fine)))
            finally:
                full.sandbox.close()
                fine.sandbox.close()
        secure = client.server.app[SERVICES].engine.secure
        advertised = secure.current.advertised if secure.current is not None else {}

    assert disk.refused >= 1
    assert agent_errors(caplog) == [
        f"round 1: cannot store the masked input in {outbox}: {os.strerror(error)}; skipping the round"
    ]
    assert sample(full, "fl_agent_storage_errors_total", {"reason": reason}) == 1
    assert sample(full, "fl_agent_rounds_skipped_total", {"reason": reason}) == 1
    assert sample(full, "fl_agent_rounds_total") == 0
    assert full.identity.device_id in advertised  # it took part up to its masked input
    assert full.outbox.depth == 0 and [p.name for p in outbox.iterdir() if p.is_file()] == []
    assert sample(fine, "fl_agent_storage_errors_total", {"reason": reason}) == 0
