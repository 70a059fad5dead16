"""The shipped udev rule, evaluated on recorded udev properties by a small interpreter of the udev
rule subset it uses (match ==/!= with globs, GOTO/LABEL, assignments). The real udevd runs it in the
QEMU rig; this catches syntax slips and logic mistakes (tagging a metadata node, missing a camera)."""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

import pytest
from cameras_fakes import FakeUdevDevice, FakeV4L2IO, recorded

from appliance.cameras import capture_decision

RULES = Path(__file__).parents[1] / "rootfs-overlay/usr/lib/udev/rules.d/70-fl-agent-cameras.rules"
TOKEN = re.compile(r'\s*([A-Z_]+)(?:\{([^}]+)\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(?:,|$)')


def parse(text: str) -> list[list[tuple[str, str | None, str, str]]]:
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens, pos = [], 0
        while pos < len(line):
            m = TOKEN.match(line, pos)
            assert m, f"{RULES.name}:{number}: cannot parse at {line[pos:]!r}"
            tokens.append(m.groups())
            pos = m.end()
        rules.append(tokens)
    return rules


def evaluate(rules, props: dict[str, str], action: str) -> tuple[dict[str, str], set[str]]:
    env, tags, goto = dict(props), set(), None
    values = {"ACTION": action, "SUBSYSTEM": props.get("SUBSYSTEM", ""),
              "KERNEL": os.path.basename(props.get("DEVNAME", ""))}
    for tokens in rules:
        if goto is not None:
            if tokens[0][0] == "LABEL" and tokens[0][3] == goto:
                goto = None
            continue
        matched = True
        for key, attr, op, value in tokens:
            if op in ("==", "!="):
                actual = env.get(attr, "") if key == "ENV" else values[key]
                hit = any(fnmatch.fnmatchcase(actual, alt) for alt in value.split("|"))
                if hit != (op == "=="):
                    matched = False
                    break
        if not matched:
            continue
        for key, attr, op, value in tokens:
            if key == "GOTO":
                goto = value
            elif key == "TAG":
                assert op == "+="
                tags.add(value)
            elif key == "ENV" and op == "=":
                env[attr] = value
            elif key in ("GROUP", "MODE") and op == "=":
                env[f"_{key}"] = value
            elif key not in ("ACTION", "SUBSYSTEM", "KERNEL", "ENV", "LABEL"):
                pytest.fail(f"rule key {key} is not understood by this test's interpreter")
    assert goto is None, f"GOTO {goto} has no LABEL"
    return env, tags


@pytest.fixture(scope="module")
def rules():
    return parse(RULES.read_text())


@pytest.mark.parametrize("name", ["vivid-video0", "uvc-video0"])
def test_capture_nodes_are_tagged_for_the_agent(rules, name: str) -> None:
    env, tags = evaluate(rules, recorded(name).properties, "add")
    assert "fl-agent" in tags and env["FL_AGENT_CAMERA"] == "1"
    assert env["_GROUP"] == "video" and env["_MODE"] == "0660"


def test_metadata_node_is_not_tagged(rules) -> None:
    env, tags = evaluate(rules, recorded("uvc-metadata-video1").properties, "add")
    assert "fl-agent" not in tags and "FL_AGENT_CAMERA" not in env


def test_non_video_nodes_are_not_tagged(rules) -> None:
    props = dict(recorded("vivid-video0").properties, DEVNAME="/dev/vbi0")
    _, tags = evaluate(rules, props, "add")
    assert not tags


def test_the_agent_agrees_with_the_rule_on_what_a_camera_is(rules) -> None:
    for name in ("vivid-video0", "uvc-video0", "uvc-metadata-video1"):
        env, tags = evaluate(rules, recorded(name).properties, "add")
        assert capture_decision(FakeUdevDevice(env), FakeV4L2IO()) == ("fl-agent" in tags), name
