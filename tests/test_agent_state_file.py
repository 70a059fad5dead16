"""A damaged ``agent-state.json`` (valid JSON of the wrong shape: a power cut cannot make one, a hand edit or a
broken restore can) is named in a warning and the agent starts from round 0; it does not fail at every start
(systemd would restart it forever, and the device would never take part again)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from agent_harness import ADVISORY, agent_config, enrolled_state
from nacl.signing import SigningKey

from appliance.agent import STATE_FILE, Agent, read_state
from appliance.config import load_config


@pytest.mark.parametrize(("saved", "kept", "named"), [
    ([1, 2], {}, "holds a JSON list, not an object"),
    ("round 5", {}, "holds a JSON str, not an object"),
    (7, {}, "holds a JSON int, not an object"),
    ({"last_round": "5", "acknowledged_at": 10.5}, {"acknowledged_at": 10.5}, "last_round '5' is not a round id"),
    ({"last_round": True}, {}, "last_round True is not a round id"),
    ({"last_round": -1}, {}, "last_round -1 is not a round id"),
    ({"last_round": 2**63}, {}, f"last_round {2**63} is not a round id"),
    ({"last_round": 3.0}, {}, "last_round 3.0 is not a round id"),
    ({"last_round": 4, "acknowledged_at": float("nan")}, {"last_round": 4}, "acknowledged_at nan is not a time"),
    ({"last_round": 4, "acknowledged_at": [1]}, {"last_round": 4}, "acknowledged_at [1] is not a time"),
])
def test_a_state_of_the_wrong_shape_is_named_and_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, saved: object, kept: dict, named: str
) -> None:
    path = tmp_path / STATE_FILE
    path.write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="fl_agent"):
        assert read_state(path) == kept
    (record,) = caplog.records
    assert record.getMessage().startswith(str(path)) and named in record.getMessage(), record.getMessage()


def test_the_state_the_agent_writes_reads_back_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / STATE_FILE
    path.write_text(json.dumps({"last_round": 12, "acknowledged_at": 1_700_000_000.25}))
    with caplog.at_level(logging.WARNING, logger="fl_agent"):
        assert read_state(path) == {"last_round": 12, "acknowledged_at": 1_700_000_000.25}
        assert read_state(tmp_path / "missing.json") == {}
    assert not caplog.records


@pytest.mark.parametrize("saved", ["[]", "7", "null", '"7"', '[{"last_round": 9}]'])
def test_an_agent_starts_from_round_0_on_a_state_that_is_not_an_object(tmp_path: Path, saved: str) -> None:
    """Before, ``Agent()`` raised AttributeError ('list' object has no attribute 'get') at every start."""
    state = tmp_path / "state"
    enrolled_state(state, SigningKey.generate().verify_key)
    (state / STATE_FILE).write_text(saved)
    config = agent_config(tmp_path / "agent.toml", "http://127.0.0.1:9", state)
    agent = Agent(load_config(config), budget=ADVISORY)
    assert (agent.last_round, agent.acknowledged_at) == (0, 0)
