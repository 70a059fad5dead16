"""A tool whose reader went away (``fl-aggregator status --state s | head -1``) ends quietly, as ``cat`` does: exit
141 (what a shell reports for SIGPIPE) and nothing on stderr, not a BrokenPipeError traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.broken_pipe import EXIT_BROKEN_PIPE

BIN = Path(sys.executable).parent


def into_closed_pipe(command: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` with stdout a pipe whose reading end is closed before the command writes anything."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(command, stdout=write, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write)


def provision(tmp_path: Path) -> list[str]:
    (tmp_path / "passphrase").write_text("correct horse battery staple")
    return ["provision", "--fleet", str(tmp_path / "fleet"), "--boards", "1", "--passphrase-file",
            str(tmp_path / "passphrase"), "--aggregator-url", "http://127.0.0.1:8443"]


COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "fl-aggregator": lambda tmp_path: ["keygen", "--state", str(tmp_path / "state")],
    "fl-agent": lambda tmp_path: ["keygen", "--data", str(tmp_path / "data")],
    "flctl": lambda tmp_path: provision(tmp_path),
}


@pytest.mark.parametrize("tool", COMMANDS)
def test_a_tool_whose_reader_is_gone_exits_141_without_a_traceback(tool: str, tmp_path: Path) -> None:
    done = into_closed_pipe([str(BIN / tool), *COMMANDS[tool](tmp_path)])
    assert done.stderr.decode() == "" and done.returncode == EXIT_BROKEN_PIPE, done.stderr.decode()
