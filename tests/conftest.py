"""Fixtures shared by the host-side test modules (the QEMU ones have tests/qemu/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from disk_space import needed_bytes, session_paths, shortfall
from flash_images import env_for_tests, make_fleet


def pytest_sessionstart(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    try:
        problem = shortfall(session_paths(session.config.option.basetemp), needed_bytes())
    except ValueError as bad:
        problem = str(bad)
    if problem:
        pytest.exit(problem, returncode=4)


@pytest.fixture
def flctl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet passphrase from the environment and the quick argon2id level, as a CI job would set them."""
    env_for_tests(monkeypatch)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A provisioned fleet (cam-1, cam-2, cam-3), made once per module: argon2id sealing is slow on purpose."""
    mp = pytest.MonkeyPatch()
    env_for_tests(mp)
    try:
        yield make_fleet(tmp_path_factory.mktemp("fleet"))
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def signed_package(tmp_path_factory: pytest.TempPathFactory):
    """(aggregator key, path) of the reference CNN's package signed with it, made once per module: the package the
    agent tests serve (the synthetic cameras' frames are what it takes)."""
    from nacl.signing import SigningKey

    from flctl.model import export_reference_package  # here: not an import of every test session

    key = SigningKey.generate()
    path = tmp_path_factory.mktemp("pkg") / "cnn.flpkg"
    export_reference_package("cnn", path, key)
    return key, path
