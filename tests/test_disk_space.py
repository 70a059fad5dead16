"""The session refuses to start, in one line, on a disk too full to run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from disk_space import session_paths, shortfall

GB = 1024**3


def free_of(available: int):
    return lambda path: available


def test_a_full_disk_is_named_with_its_free_space(tmp_path: Path) -> None:
    line = shortfall([tmp_path / "not-made-yet"], needed=6 * GB, free=free_of(int(1.7 * GB)))
    assert line is not None and line.startswith(f"not enough disk for the tests: 1.7 GB free at {tmp_path}; ")
    assert "\n" not in line


def test_enough_space_passes_and_one_file_system_is_named_once(tmp_path: Path) -> None:
    assert shortfall([tmp_path], needed=6 * GB, free=free_of(7 * GB)) is None
    line = shortfall([tmp_path, tmp_path / "a", tmp_path / "b"], needed=6 * GB, free=free_of(GB))
    assert line is not None and line.count("GB free at") == 1


def test_pytest_stops_before_the_first_test_when_the_disk_is_short(tmp_path: Path) -> None:
    """Through the real conftest hook: a temporary directory on a disk with less than a session needs."""
    env = {**os.environ, "FL_TEST_NEEDED_BYTES": str(1 << 62)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_disk_space.py",
                           "-k", "full_disk"], cwd=Path(__file__).parent.parent, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "not enough disk for the tests:" in done.stdout + done.stderr
    assert " passed" not in done.stdout


def _pytest_with(needed: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FL_TEST_NEEDED_BYTES": needed}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
                           "tests/test_disk_space.py", "-k", "full_disk"], cwd=Path(__file__).parent.parent, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_bad_needed_bytes_value_stops_the_session_in_one_line() -> None:
    done = _pytest_with("2G")
    output = done.stdout + done.stderr
    assert done.returncode == 4, output
    assert "FL_TEST_NEEDED_BYTES='2G' is not a whole number of bytes" in output
    assert "Traceback" not in output and "ImportError" not in output
    assert _pytest_with("2G", "--collect-only").returncode == 0


def test_the_cache_checked_is_the_one_flctl_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FL_EDGE_CACHE=~/... is expanded by flctl; the check looked at a directory literally named '~'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FL_EDGE_CACHE", "~/big-disk/cache")
    assert tmp_path / "big-disk" / "cache" in session_paths()


def test_the_temporary_directory_checked_is_the_sessions_basetemp(tmp_path: Path) -> None:
    """``--basetemp`` moves every tmp_path, so that is the file system the session fills, not the system's /tmp."""
    done = _pytest_with(str(1 << 62), f"--basetemp={tmp_path / 'base'}")
    assert done.returncode == 4, done.stdout + done.stderr
    named = re.findall(r"GB free at ([^,;]+)", done.stdout + done.stderr)
    assert str(tmp_path) in named, named
