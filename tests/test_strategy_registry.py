"""The strategy registry is the one source of the rules' names and options: the CLI, the demo and the docs follow
it, options are checked before any state exists, and saved server state belongs to the rule that wrote it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from aggregator import cli
from aggregator.strategies import STRATEGIES, make_strategy, option_flags, options_from_flags
from flctl import cli as flctl_cli
from flctl.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def _table_first_cells(markdown: str, heading: str) -> list[str]:
    section = markdown.split(heading, 1)[1]
    rows = re.findall(r"^\| `([^`]+)`", section.split("\n## ", 1)[0], flags=re.M)
    return rows


def _parser_choices(parser, *path: str, flag: str = "--strategy") -> list[str]:
    for name in path:
        parser = next(a for a in parser._actions if a.dest in ("command", "cmd") or (a.choices and name in a.choices))
        parser = parser.choices[name]
    return list(next(a for a in parser._actions if flag in a.option_strings).choices)


def test_every_rule_declares_a_summary_and_distinct_flags() -> None:
    for name, cls in STRATEGIES.items():
        assert cls.name == name and cls.summary
        assert len({o.flag for o in cls.options}) == len(cls.options)
    assert set(option_flags()) == {"--server-lr", "--tau", "--trim", "--byzantine", "--krum-keep"}


def test_the_cli_and_the_demo_offer_exactly_the_registered_rules_and_their_flags() -> None:
    parser = cli.build_parser()
    assert sorted(_parser_choices(parser, "serve")) == sorted(STRATEGIES)
    serve_flags = {f for a in parser._subparsers._group_actions[0].choices["serve"]._actions for f in a.option_strings}
    assert set(option_flags()) <= serve_flags
    demo = flctl_cli.build_parser()
    assert sorted(_parser_choices(demo, "demo")) == sorted(STRATEGIES)


def test_the_docs_name_every_rule_and_every_flag() -> None:
    page = (ROOT / "docs" / "aggregator.md").read_text()
    assert _table_first_cells(page, "## Strategies") == list(STRATEGIES)
    for flag in option_flags():
        assert f"| `{flag}` |" in page, f"docs/aggregator.md has no row for {flag}"
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"--strategy \{([^}]+)\}", readme)
    assert listed is not None and sorted(listed.group(1).split(",")) == sorted(STRATEGIES)
    spec = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    assert spec["components"]["schemas"]["Status"]["properties"]["strategy"]["enum"] == list(STRATEGIES)


def test_a_flag_of_another_rule_is_refused_naming_the_rules_that_take_it() -> None:
    with pytest.raises(ValueError, match=r"--trim applies to --strategy trimmed-mean, not krum"):
        options_from_flags("krum", {"--trim": 0.1})
    assert options_from_flags("fedadam", {"--server-lr": 0.1, "--trim": None}) == {"eta": 0.1}
    assert options_from_flags("fedavg", {"--server-lr": 0.5}) == {"server_lr": 0.5}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "trimmed-mean", "--trim", "0.5"], "beta must be in [0, 0.5)"),
        (["--strategy", "krum", "--trim", "0.1"], "--trim applies to --strategy trimmed-mean"),
        (["--strategy", "fedadam", "--tau", "0"], "tau > 0"),
        (["--strategy", "krum", "--byzantine", "-1"], "byzantine >= 0"),
    ],
)
def test_a_bad_option_is_one_line_and_creates_no_state(tmp_path: Path, args: list[str], message: str) -> None:
    state = tmp_path / "state"
    run = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "serve", "--init", "--state", str(state),
         "--synthetic-parameters", "10", "--listen", f"127.0.0.1:{free_port()}", *args],  # refused before it is bound
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not state.exists()


def test_saved_state_is_namespaced_and_another_rules_is_not_loaded() -> None:
    adam = make_strategy("fedadam")
    adam.m, adam.v = np.ones(3), np.full(3, 2.0)
    saved = adam.saved_state()
    assert set(saved) == {"fedadam/m", "fedadam/v"}
    yogi = make_strategy("fedyogi")
    yogi.restore(saved)
    assert yogi.m is None and yogi.v is None
    again = make_strategy("fedadam")
    again.restore(saved)
    np.testing.assert_array_equal(again.v, np.full(3, 2.0))
